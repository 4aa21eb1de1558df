"""Anytime inference throughput (images/s) per backbone: gfnet against the reference's loop.

The reference's evaluation loop (the baseline) resizes the glance with F.interpolate and crops each focus
patch with a Python loop over the batch (two host reads per image); gfnet runs the same networks with its
fused batched ops. All providers share the weights, the batch and the pixels (the uint8 provider reads the
same pixels before normalisation); the providers take turns in three rounds. Run:
``gfnet-bench anytime [--quick] [--threads 2]``.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

import gfnet
from gfnet.bench.common import check_close, cold_compile_cache, make_rows, measure, resolve_device, use_threads
from gfnet.data import IMAGENET_MEAN, IMAGENET_STD

BACKBONES = ["mobilenetv3_large_100", "regnety_600m", "efficientnet_b2", "resnet50", "densenet121"]
QUICK_BACKBONES = ["mobilenetv3_large_100", "resnet50"]
BASELINE = "reference loop (fp32)"
#: fp32 providers compute the same probabilities up to summation order (fused glance taps, normalisation
#: folded into the kernel): 1e-4 relative. Autocast providers are compared on the glance step only, 10 %
#: relative: in bf16/fp16 a policy action one ulp away moves a patch by a pixel, after which later steps
#: legitimately see other pixels.
FP32_RTOL, FP32_ATOL = 1e-4, 1e-6
AMP_RTOL, AMP_ATOL = 0.1, 1e-4
EXTRA_COLUMNS = ("compile_s",)  # seconds of the first (compiling) call, for the compiled modes
NOTES = ("Batch of random pixels through randomly initialised networks (the cost of a step does not depend on "
         "the pixels); P=96, T=5 (MobileNet-V3: T=3).")


@torch.no_grad()
def reference_loop_anytime(net, images):
    """The reference's inference loop over the same modules: separate interpolate, per-image crops.
    Returns Tensor[T, N, classes] softmax outputs."""
    P = net.patch_size
    S = images.shape[-1]
    prime = F.interpolate(images, size=[P, P], mode=net.glance_mode, align_corners=True)
    pooled, fmap = net.model_prime(prime)
    logits, fc_state = net.fc(pooled, net.fc.init_state(images.shape[0], images.device), 0)
    if logits is None or net.config.glance_head == "backbone":
        logits = net.model_prime.head(pooled)
    probs = [F.softmax(logits, 1)]
    hidden = net.policy.init_hidden(images.shape[0], images.device)
    for t in range(1, net.T):
        action, _, hidden = net.policy(fmap, hidden)
        corner = torch.floor(action * (S - P)).int()
        patches = torch.cat([images[i:i + 1, :, corner[i, 0].item():corner[i, 0].item() + P,
                                    corner[i, 1].item():corner[i, 1].item() + P]
                             for i in range(images.shape[0])])
        pooled, fmap = net.model(patches)
        logits, fc_state = net.fc(pooled, fc_state, t)
        probs.append(F.softmax(logits, 1))
    return torch.stack(probs)


def run(device=None, quick: bool = False, threads=None, batch_size=None, backbones=None,
        compile: bool = False) -> list:
    """One row per (backbone, provider). quick: batch 8 (32 on a GPU), two backbones, short timing. compile: also the
    modes eager fp32 and bf16 with channels-last encoders, compiled fp32 and compiled bf16 (:meth:`GFNet.compile`,
    channels-last), compilation timed apart."""
    device = resolve_device(device)
    with use_threads(threads), cold_compile_cache(compile):
        return _run(device, quick, batch_size, backbones, compile)


def default_batch(device: torch.device, quick: bool) -> int:
    """The batch of a run that names none: a GPU's full run uses the reference's evaluation batch (256);
    ``quick`` keeps its smoke-run sizes on every device (8 on a CPU, 32 on a GPU)."""
    if quick:
        return 32 if device.type == "cuda" else 8
    return 256 if device.type == "cuda" else 32


def _run(device, quick, batch_size, backbones, compile=False) -> list:
    batch = batch_size or default_batch(device, quick)
    rows = []
    if isinstance(backbones, str):  # --set backbones=resnet50,densenet121
        backbones = [name.strip() for name in backbones.split(",") if name.strip()]
    for arch in backbones or (QUICK_BACKBONES if quick else BACKBONES):
        torch.manual_seed(0)
        net = gfnet.build_model(arch, patch_size=96, T=5 if "mobilenet" not in arch else 3).to(device).eval()
        S = net.image_size
        g = torch.Generator().manual_seed(0)
        uint8 = torch.randint(0, 256, (batch, 3, S, S), dtype=torch.uint8, generator=g).to(device)
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        images = (uint8.float() / 255.0 - mean) / std  # the same pixels, as the reference's loader gives them
        providers = {
            BASELINE: lambda: reference_loop_anytime(net, images),
            "gfnet (fp32)": lambda: net.anytime_predict(images).probs,
            "gfnet (uint8 in, fp32)": lambda: net.anytime_predict(uint8).probs,
        }
        amp = []
        if device.type == "cuda" or compile:
            # the faster modes run channels-last encoders (oneDNN and cuDNN convolutions are faster with them:
            # the trainer's default); the plain fp32 rows above stay contiguous, as the reference runs
            cl = copy.deepcopy(net).to_channels_last()
            providers["gfnet (fp32, channels-last)"] = lambda: cl.anytime_predict(images).probs
            providers["gfnet (bf16 autocast, channels-last)"] = lambda: cl.anytime_predict(images, dtype="bf16").probs
            amp.append("gfnet (bf16 autocast, channels-last)")
        if device.type == "cuda":
            providers["gfnet (fp16 autocast, channels-last)"] = lambda: cl.anytime_predict(images, dtype="fp16").probs
            amp.append("gfnet (fp16 autocast, channels-last)")
        compile_s = {}
        if compile:
            compiled = copy.deepcopy(cl).compile()
            providers["gfnet compiled (fp32, channels-last)"] = lambda: compiled.anytime_predict(images).probs
            providers["gfnet compiled (bf16 autocast, channels-last)"] = \
                lambda: compiled.anytime_predict(images, dtype="bf16").probs
            amp.append("gfnet compiled (bf16 autocast, channels-last)")
            for name in ("gfnet compiled (fp32, channels-last)", "gfnet compiled (bf16 autocast, channels-last)"):
                start = time.perf_counter()
                providers[name]()  # the first call compiles: timed apart from the throughput
                compile_s[name] = time.perf_counter() - start
        ref = providers[BASELINE]()
        for name, fn in providers.items():
            what = f"anytime {arch}: {name} against {BASELINE}"
            if name in amp:
                check_close(what, fn()[0].float(), ref[0], atol=AMP_ATOL, rtol=AMP_RTOL)
            else:
                check_close(what, fn(), ref, atol=FP32_ATOL, rtol=FP32_RTOL)
        # Three interleaved rounds: a load spike of a shared machine then hits one round of every provider,
        # and the speed-ups (medians of per-round ratios) stay put.
        timings = measure(providers, min_run_time=0.3 if quick else 0.7, rounds=1 if quick else 3,
                          device=device)
        extra = {name: {"backbone": arch, "patch_size": net.patch_size, "T": net.T, "image_size": S,
                        "compile_s": compile_s.get(name)} for name in providers}
        dtypes = {name: ("bf16 autocast" if "bf16" in name else "fp16 autocast" if "fp16" in name
                         else "uint8 in, fp32" if "uint8" in name else "float32")
                  + (", compiled" if "compiled" in name else "")
                  + (", channels-last" if "channels-last" in name else "") for name in providers}
        for row in make_rows("anytime", f"{arch} S={S} P={net.patch_size} T={net.T}", timings, BASELINE,
                             device=device, dtype="float32", batch=batch, items=batch, unit="images/s",
                             extra=extra):
            row.dtype = dtypes[row.provider]
            rows.append(row)
    return rows
