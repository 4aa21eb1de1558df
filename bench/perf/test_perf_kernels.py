"""The glance and focus kernels, timed at one small training-like batch (S = 224, P = 96).

Each benchmark first checks the kernel's output against a plain-PyTorch computation of the same values
(slicing for the crop, ``F.interpolate`` for the glance, ``F.grid_sample`` for the bilinear crop)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import SCALE, run_synced

from gfnet import ops
from gfnet.data import IMAGENET_MEAN, IMAGENET_STD

S, P = 224, 96
BATCH = 32 * SCALE


def _normalise(x):
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def _batch(device, uint8):
    if uint8:  # DALI's layout: HWC uint8
        return torch.randint(0, 256, (BATCH, S, S, 3), dtype=torch.uint8, device=device)
    return torch.randn(BATCH, 3, S, S, device=device)


@pytest.mark.parametrize("uint8", [True, False], ids=["uint8-hwc", "float-nchw"])
def test_focus_crop(benchmark, device, uint8):
    images = _batch(device, uint8)
    actions = torch.rand(BATCH, 2, device=device)
    norm = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD) if uint8 else {}
    run = run_synced(device)(lambda: ops.focus_crop(images, actions, P, validate=False, **norm))
    nchw = images.permute(0, 3, 1, 2) if uint8 else images
    corners = torch.floor(actions * (S - P)).long().tolist()
    want = torch.cat([nchw[i:i + 1, :, y:y + P, x:x + P] for i, (y, x) in enumerate(corners)])
    want = _normalise(want) if uint8 else want
    torch.testing.assert_close(run(), want, rtol=1e-5, atol=1e-5)
    benchmark(run)


@pytest.mark.parametrize("uint8", [True, False], ids=["uint8-hwc", "float-nchw"])
def test_glance_resize(benchmark, device, uint8):
    images = _batch(device, uint8)
    norm = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD) if uint8 else {}
    run = run_synced(device)(lambda: ops.glance_resize(images, P, **norm))
    nchw = images.permute(0, 3, 1, 2) if uint8 else images
    x = _normalise(nchw) if uint8 else nchw
    want = F.interpolate(x, (P, P), mode="bicubic", align_corners=True)
    torch.testing.assert_close(run(), want, rtol=1e-4, atol=1e-4)
    benchmark(run)


def test_focus_crop_bilinear(benchmark, device):
    images = _batch(device, uint8=False)
    centers = torch.rand(BATCH, 2, device=device)
    run = run_synced(device)(lambda: ops.focus_crop_bilinear(images, centers, P, validate=False))
    offsets = torch.arange(P, device=device, dtype=torch.float32) - (P - 1) / 2
    ys = centers[:, 0:1] * (S - 1) + offsets  # pixel-index coordinates, as the op's docstring defines them
    xs = centers[:, 1:2] * (S - 1) + offsets
    gy, gx = ys * (2.0 / (S - 1)) - 1.0, xs * (2.0 / (S - 1)) - 1.0
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    want = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    torch.testing.assert_close(run(), want, rtol=1e-4, atol=1e-4)
    benchmark(run)
