"""Training images/s of one stage-1 and one stage-3 step: gfnet's trainer against the reference's step.

One setup is shared by every provider: the same backbone (GRU classifier, as the reference's ResNet),
image size S, patch size P, T, batch and labels, freshly built networks with the same weights, SGD with
the same groups. Providers:

- ``reference-fp32``: a straightforward fp32 implementation of the reference ``train.py`` step: float
  normalised input, the glance by a separate ``F.interpolate`` (bicubic, align_corners=True), the focus
  crop as a Python loop over the batch with ``.item()`` host syncs per sample, an ``nn.GRU`` classifier
  with its hidden state threaded by hand, deep supervision, ``loss.backward()``, SGD step; stage 3 samples
  the policy's actions around its mean (std 0.1), clamped to [0, 1].
- ``gfnet-fp32``: :meth:`gfnet.train.Trainer.train_step` (fused glance/focus ops on uint8 input,
  which normalise in the same pass; batched crop without host syncs).
- ``gfnet-bf16``: the same with bf16 autocast and channels-last encoders (the GPU configuration; on a
  CPU without native bf16 units it may be slower, and the table says so).

Each provider runs one warm-up step, then the providers take turns, one step each per round (a
shared machine's load swings hit all alike); each step is timed with gfnet.bench.common.time_call.
Reported: the median step time and its inter-quartile range, images/s, and the median of the
per-round speedups over the reference. ``run(device=None, quick=False)`` returns the rows; ``gfnet-bench train`` calls it.

    python bench/bench_train.py [--device cuda] [--quick] [--threads K] [--json out.json] [--md out.md]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from gfnet.bench.common import environment, resolve_device, time_call, write_outputs

__all__ = ["ReferenceTrainStep", "run", "markdown", "main"]

PROVIDERS = ("reference-fp32", "gfnet-fp32", "gfnet-bf16")


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
        return dict(arch="resnet18", image_size=64, patch_size=32, T=3, batch=8, classes=10, rounds=3)
    if device.type == "cuda":
        return dict(arch="resnet50", image_size=224, patch_size=96, T=5, batch=128, classes=1000, rounds=20)
    return dict(arch="resnet18", image_size=224, patch_size=96, T=3, batch=32, classes=1000, rounds=7)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def run(device=None, quick: bool = False) -> list[dict]:
    """Time the three providers on stage-1 and stage-3 steps; one row per (stage, provider)."""
    import gfnet
    from gfnet import ops
    from gfnet.train import TrainOptions, Trainer

    device = resolve_device(device)
    setup = _setup(device, quick)
    torch.manual_seed(0)
    base = gfnet.build_model(setup["arch"], patch_size=setup["patch_size"], T=setup["T"],
                             num_classes=setup["classes"])
    S, N = setup["image_size"], setup["batch"]
    images_u8 = torch.randint(0, 256, (N, 3, S, S), dtype=torch.uint8, device=device)
    mean = torch.tensor(ops.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(ops.IMAGENET_STD, device=device).view(1, 3, 1, 1)
    images_f32 = (images_u8.float() / 255.0 - mean) / std  # the same pixels, as the reference's loader gives them
    labels = torch.randint(0, setup["classes"], (N,), device=device)
    env = environment(device)
    env["cpu_model"] = _cpu_model()
    env["load_average_1min_start"] = os.getloadavg()[0]
    rows = []
    for stage in (1, 3):
        steps = {}
        for provider in PROVIDERS:
            net = copy.deepcopy(base).to(device)
            if provider == "reference-fp32":
                step = ReferenceTrainStep(net, stage, dsn_ratio=1.0)
                steps[provider] = (lambda s=step: s(images_f32, labels))
            else:
                amp = "bf16" if provider == "gfnet-bf16" else "none"
                trainer = Trainer(net, TrainOptions(stage=stage, epochs=1, amp=amp, dsn_ratio=1.0,
                                                    channels_last=amp == "bf16", progress=False))
                trainer._set_modes()
                steps[provider] = (lambda t=trainer: t.train_step(images_u8, labels)["loss"].item())
            steps[provider]()  # warm-up (allocator, oneDNN/cuDNN algorithm choice)
        # Round-robin: one step of each provider per round, so that a shared machine's load swings hit
        # every provider alike; speedups are medians of the per-round ratios.
        times = {p: [] for p in PROVIDERS}
        for _ in range(setup["rounds"]):
            for provider in PROVIDERS:
                times[provider].append(time_call(steps[provider], device, min_time=0.0, min_runs=1,
                                                 warmup=0)["median_s"])
        for provider in PROVIDERS:
            t = sorted(times[provider])
            q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
            ratio = statistics.median(r / x for r, x in zip(times["reference-fp32"], times[provider]))
            rows.append({**env, "suite": "train", "stage": stage, "provider": provider, "arch": setup["arch"],
                         "image_size": S, "patch_size": setup["patch_size"], "T": setup["T"], "batch": N,
                         "median_s": statistics.median(t), "iqr_s": q[2] - q[0], "runs": len(t),
                         "images_per_s": N / statistics.median(t), "speedup_vs_reference": ratio})
    end = os.getloadavg()[0]
    for row in rows:
        row["load_average_1min_end"] = end
    return rows


def markdown(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [f"Machine: {r0['device']} (`{r0['device_type']}`, {r0['cpu_model']}); torch {r0['torch']}; git {r0['git']}; "
             f"1-min load average {r0['load_average_1min_start']:.2f} at the start, "
             f"{r0['load_average_1min_end']:.2f} at the end",
             f"Setup: {r0['arch']} GFNet (GRU classifier), S={r0['image_size']}, P={r0['patch_size']}, "
             f"T={r0['T']}, batch {r0['batch']}; a whole optimisation step (forward of all T steps, backward, "
             "SGD) after one warm-up step per provider; providers take turns, one step each per round; median "
             "and inter-quartile range of the rounds; speedup = median of the per-round ratios",
             ("On a CPU the step is compute-bound: the reference's per-sample .item() syncs cost little there, "
              "so fp32 runs level; bf16 autocast is where a CPU with bf16 units gains. The sync-free batched "
              "crop and fused glance matter on a GPU." if r0["device_type"] == "cpu" else
              "GPU run: the sync-free batched crop, fused glance and bf16 autocast against the reference's "
              "loop."),
             "",
             "| stage | provider | step (s, median) | IQR (s) | images/s | speedup vs reference |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['provider']} | {r['median_s']:.3f} | {r['iqr_s']:.3f} | "
                     f"{r['images_per_s']:.1f} | {r['speedup_vs_reference']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda[:k] (default: cuda when present)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 resists a busy shared machine best)")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--md", default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.device, args.quick)
    table = markdown(rows)
    write_outputs(rows, table, args.json, args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
