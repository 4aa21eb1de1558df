"""Anytime inference throughput (images/s) per backbone: gfnet against the reference's loop.

The reference's evaluation loop resizes the glance with F.interpolate and crops each focus patch with
a Python loop over the batch (two host reads per image); gfnet runs the same networks with its fused
batched ops. Both use the same weights and batch. Run: ``gfnet-bench anytime`` or
``python -m gfnet.bench.bench_anytime``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import gfnet
from gfnet.bench.common import environment, resolve_device, time_call

BACKBONES = ["mobilenetv3_large_100", "regnety_600m", "efficientnet_b2", "resnet50", "densenet121"]
QUICK_BACKBONES = ["mobilenetv3_large_100", "resnet50"]


@torch.no_grad()
def reference_loop_anytime(net, images):
    """The reference's inference loop over the same modules: separate interpolate, per-image crops."""
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


def run(device=None, quick=False, batch_size=None, backbones=None) -> list[dict]:
    """One row per (backbone, provider): median seconds per batch, spread and images/s."""
    device = resolve_device(device)
    env = environment(device)
    batch = batch_size or (256 if device.type == "cuda" else (8 if quick else 32))
    rows = []
    for arch in backbones or (QUICK_BACKBONES if quick else BACKBONES):
        net = gfnet.build_model(arch, patch_size=96, T=5 if "mobilenet" not in arch else 3).to(device).eval()
        S = net.image_size
        images = torch.randn(batch, 3, S, S, device=device)
        uint8 = torch.randint(0, 256, (batch, S, S, 3), dtype=torch.uint8, device=device)
        providers = {
            "reference loop (fp32)": lambda: reference_loop_anytime(net, images),
            "gfnet (fp32)": lambda: net.anytime_predict(images),
            "gfnet (uint8 HWC in, fp32)": lambda: net.anytime_predict(uint8),
        }
        if device.type == "cuda":
            providers["gfnet (bf16 autocast)"] = lambda: net.anytime_predict(images, dtype="bf16")
            providers["gfnet (fp16 autocast)"] = lambda: net.anytime_predict(images, dtype="fp16")
        base = None
        for name, fn in providers.items():
            t = time_call(fn, device, min_time=0.5 if quick else 2.0, min_runs=2 if quick else 3)
            base = base or t["median_s"]
            rows.append({"suite": "anytime", "backbone": arch, "provider": name, "batch": batch,
                         "patch_size": net.patch_size, "T": net.T, "image_size": S, **t,
                         "images_per_s": batch / t["median_s"], "speedup_vs_reference": base / t["median_s"],
                         **env})
    return rows


if __name__ == "__main__":
    from gfnet.cli.bench import main

    main(["anytime"])
