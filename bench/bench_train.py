"""Training images/s of one stage-1 and one stage-3 step: gfnet's trainer against the reference's step.

One setup is shared by every provider: the same backbone (GRU classifier, as the reference's ResNet),
image size S, patch size P, T, batch and labels, freshly built networks with the same weights, SGD with
the same groups. Providers:

- ``reference-fp32`` (the baseline): a straightforward fp32 implementation of the reference ``train.py``
  step: float normalised input, the glance by a separate ``F.interpolate`` (bicubic, align_corners=True),
  the focus crop as a Python loop over the batch with ``.item()`` host syncs per sample, an ``nn.GRU``
  classifier with its hidden state threaded by hand, deep supervision, ``loss.backward()``, SGD step;
  stage 3 samples the policy's actions around its mean (std 0.1), clamped to [0, 1].
- ``gfnet-fp32``: :meth:`gfnet.train.Trainer.train_step` with its defaults (fused glance/focus ops on uint8
  input, which normalise in the same pass; batched crop without host syncs; channels-last encoders).
- ``gfnet-bf16``: the same with bf16 autocast (on a CPU without native bf16 units it may be slower, and the
  table says so).
- with ``compile``: ``gfnet-fp32-compiled`` and ``gfnet-bf16-compiled``, the same with ``TrainOptions(compile=True)``.

Before timing, each provider's first step runs from the same weights and the same seed (so the same random
patch positions: both draw them from torch's generator in the same order) and its loss is compared with
the reference's (tolerances below). Then the providers take turns, one step each per round (a shared
machine's load swings hit all alike); the speed-up is the median of the per-round ratios.
Run: ``gfnet-bench train [--quick] [--threads 2]``.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from gfnet.bench.common import OutputMismatch, cold_compile_cache, make_rows, measure, resolve_device, use_threads
from gfnet.data import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ReferenceTrainStep", "run"]

PROVIDERS = ("reference-fp32", "gfnet-fp32", "gfnet-bf16")
BASELINE = "reference-fp32"
#: Relative tolerance of the first step's loss against the reference's: fp32 differs only by summation order
#: (fused glance taps, normalisation in the kernel); bf16 autocast keeps 8 mantissa bits through the encoders.
LOSS_RTOL = {"gfnet-fp32": 1e-4, "gfnet-bf16": 5e-2, "gfnet-fp32-compiled": 1e-4, "gfnet-bf16-compiled": 5e-2}
#: With compile=True (gfnet-bench train --compile): the same steps with the encoders under torch.compile.
COMPILED = ("gfnet-fp32-compiled", "gfnet-bf16-compiled")
EXTRA_COLUMNS = ("stage", "loss", "reference_loss", "compile_s")
NOTES = ("A whole optimisation step (forward of all T steps, backward, SGD). On a CPU the step is compute-bound: "
         "the reference's per-sample .item() syncs cost little there, so fp32 runs level; bf16 autocast is where "
         "a CPU with bf16 units gains. The sync-free batched crop and fused glance matter on a GPU.")


class ReferenceTrainStep:
    """The reference's stage-1/3 training step, written plainly in fp32 (the baseline).

    Args:
        net: a :class:`gfnet.GFNet` with a GRU classifier (its modules are used as plain modules).
        stage: 1 (random actions) or 3 (policy actions sampled with std 0.1).
        dsn_ratio, lr, fc_lr: as in the reference configs.
    Call with images Tensor[N, 3, S, S] float32 normalised and labels Tensor[N] int64.
    """

    def __init__(self, net, stage: int, dsn_ratio: float = 1.0, lr: float = 0.01, fc_lr: float = 0.1):
        if not net.fc.is_rnn:
            raise ValueError("the baseline implements the reference's GRU classifier: use a ResNet-like backbone")
        self.net, self.stage, self.dsn_ratio = net, stage, dsn_ratio
        self.optimizer = torch.optim.SGD(
            [{"params": net.model.parameters()}, {"params": net.model_prime.parameters()},
             {"params": net.fc.parameters(), "lr": fc_lr}], lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
        net.train()
        net.policy.eval()

    @staticmethod
    def get_patch(images: torch.Tensor, actions: torch.Tensor, patch_size: int) -> torch.Tensor:
        size = images.shape[2]
        coords = torch.floor(actions * (size - patch_size)).int()
        patches = []
        for i in range(images.shape[0]):
            r, c = coords[i, 0].item(), coords[i, 1].item()
            patches.append(images[i:i + 1, :, r:r + patch_size, c:c + patch_size])
        return torch.cat(patches, 0)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        net, P = self.net, self.net.patch_size
        n = images.shape[0]
        prime = F.interpolate(images, size=(P, P), mode="bicubic", align_corners=True)
        pooled, fmap = net.model_prime(prime)
        hidden = torch.zeros(1, n, net.fc.hidden_dim, device=images.device)
        out, hidden = net.fc.rnn(pooled.view(1, n, -1), hidden)
        losses = [F.cross_entropy(net.fc.fc(out[0]), labels)]
        dsn = [F.cross_entropy(net.model_prime.head(pooled), labels)]
        policy_hidden = torch.zeros(1, n, net.policy.hidden_dim, device=images.device)
        for _ in range(1, net.T):
            if self.stage == 1:
                actions = torch.rand(n, 2, device=images.device)
            else:
                with torch.no_grad():
                    state = net.policy.state_encoder(fmap if net.policy.conv else fmap.flatten(1))
                    gru_out, policy_hidden = net.policy.gru(state.view(1, n, -1), policy_hidden)
                    mean = net.policy.actor(gru_out[0])
                    actions = (mean + 0.1 * torch.randn_like(mean)).clamp(0, 1)
            patches = self.get_patch(images, actions, P)
            pooled, fmap = net.model(patches)
            out, hidden = net.fc.rnn(pooled.view(1, n, -1), hidden)
            losses.append(F.cross_entropy(net.fc.fc(out[0]), labels))
            dsn.append(F.cross_entropy(net.model.head(pooled), labels))
        loss = (sum(losses) + self.dsn_ratio * sum(dsn)) / net.T
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()


def _setup(device: torch.device, quick: bool) -> dict:
    if quick:
        return dict(arch="resnet18", image_size=64, patch_size=32, T=3, batch=8, classes=10, rounds=2)
    if device.type == "cuda":
        return dict(arch="resnet50", image_size=224, patch_size=96, T=5, batch=128, classes=1000, rounds=20)
    # the configuration of issue 14's targets: ResNet-50, P=96, T=5, batch 16
    return dict(arch="resnet50", image_size=224, patch_size=96, T=5, batch=16, classes=1000, rounds=5)


def run(device=None, quick: bool = False, threads=None, compile: bool = False) -> list:
    """Time the providers on stage-1 and stage-3 steps; one row per (stage, provider). ``compile``: also the
    compiled modes (eager fp32, compiled fp32, bf16, compiled bf16), their compilation timed apart."""
    device = resolve_device(device)
    with use_threads(threads), cold_compile_cache(compile):
        return _run(device, quick, compile)


def _run(device: torch.device, quick: bool, compile: bool = False) -> list:
    import gfnet
    from gfnet.train import Trainer, TrainOptions

    setup = _setup(device, quick)
    torch.manual_seed(0)
    base = gfnet.build_model(setup["arch"], patch_size=setup["patch_size"], T=setup["T"],
                             num_classes=setup["classes"])
    S, N = setup["image_size"], setup["batch"]
    images_u8 = torch.randint(0, 256, (N, 3, S, S), dtype=torch.uint8, device=device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    images_f32 = (images_u8.float() / 255.0 - mean) / std  # the same pixels, as the reference's loader gives them
    labels = torch.randint(0, setup["classes"], (N,), device=device)
    rows = []
    providers = PROVIDERS + (COMPILED if compile else ())
    for stage in (1, 3):
        steps, first_loss, compile_s = {}, {}, {}
        for provider in providers:
            net = copy.deepcopy(base).to(device)
            if provider == BASELINE:
                step = ReferenceTrainStep(net, stage, dsn_ratio=1.0)
                steps[provider] = (lambda s=step: s(images_f32, labels))
            else:
                amp = "bf16" if provider.startswith("gfnet-bf16") else "none"
                trainer = Trainer(net, TrainOptions(stage=stage, epochs=1, amp=amp, dsn_ratio=1.0, progress=False,
                                                    compile=provider in COMPILED))
                trainer._set_modes()
                steps[provider] = (lambda t=trainer: t.train_step(images_u8, labels)["loss"].item())
            torch.manual_seed(1234)  # the same random patch positions for every provider's first step
            start = time.perf_counter()
            first_loss[provider] = float(steps[provider]())
            if provider in COMPILED:  # the first step compiles (a second may recompile): timed apart
                steps[provider]()
                compile_s[provider] = time.perf_counter() - start
        ref = first_loss[BASELINE]
        for provider in providers[1:]:
            rtol = LOSS_RTOL[provider]
            if abs(first_loss[provider] - ref) > rtol * abs(ref):
                raise OutputMismatch(f"train stage {stage}: {provider}'s first loss {first_loss[provider]:.6g} against "
                                     f"{BASELINE}'s {ref:.6g}, beyond rtol={rtol:g}")
        timings = measure(steps, min_run_time=0.0, rounds=setup["rounds"], device=device)
        extra = {p: {"stage": stage, "arch": setup["arch"], "image_size": S, "patch_size": setup["patch_size"],
                     "T": setup["T"], "loss": first_loss[p], "reference_loss": ref, "compile_s": compile_s.get(p)}
                 for p in providers}
        case = f"stage {stage} {setup['arch']} S={S} P={setup['patch_size']} T={setup['T']}"
        for row in make_rows("train", case, timings, BASELINE, device=device, dtype="float32", batch=N, items=N,
                             unit="images/s", extra=extra):
            row.dtype = ("bf16 autocast" if row.provider.startswith("gfnet-bf16") else "float32") + \
                (", compiled" if row.provider in COMPILED else "") + \
                (", channels-last" if row.provider != BASELINE else "")
            rows.append(row)
    return rows
