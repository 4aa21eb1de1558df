"""Glance and focus kernels: gfnet's fused ops against what the reference and other libraries do.

One setup per case (batch 256, S = 224, P = 96 / 128 / 144, uint8 HWC input as DALI hands it, or float32
NCHW input already normalised as the reference's DataLoader hands it), shared by every provider:

focus (the patch crop), each producing the same float32 Tensor[N, 3, P, P]:
- reference loop (the baseline): the reference's get_patch, a Python loop over the batch with two
  ``.item()`` per sample, then (uint8 input) the separate /255 and normalisation passes of a standard pipeline;
- gfnet: ``gfnet.ops.focus_crop`` (the C++ kernel on the CPU, Triton on a GPU), one fused pass;
- roi_align: ``torchvision.ops.roi_align`` with one sample per bin at pixel centers (the same values);
- grid_sample: ``F.grid_sample`` on a grid through the pixel centers (the same values).
glance (the whole image to P x P, bicubic, align_corners=True):
- interpolate + normalise (the baseline): ``F.interpolate`` and (uint8 input) separate conversion and
  normalisation;
- gfnet: ``gfnet.ops.glance_resize``, one fused pass.

Every provider's output is compared with the baseline's before timing (tolerance below). Extra fields per
row: the achieved bandwidth (the op's minimal bytes read + written over the median time) next to the
device's measured copy bandwidth (a clone of a 256 MiB buffer).
Run: ``gfnet-bench kernels [--quick] [--device cpu] [--threads 2]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gfnet import ops
from gfnet.bench.common import check_close, make_rows, measure, resolve_device, use_threads
from gfnet.data import IMAGENET_MEAN as MEAN
from gfnet.data import IMAGENET_STD as STD

BATCH = 256
IMAGE_SIZE = 224
PATCH_SIZES = (96, 128, 144)
#: Every provider computes the same values; 1e-3 because grid_sample recomputes each pixel position from
#: normalised coordinates (a few ulps off the pixel centre) and interpolate's bicubic taps are summed in
#: another order than the fused kernel's.
ATOL = 1e-3
EXTRA_COLUMNS = ("gbytes_per_s", "fraction_of_copy_bandwidth")
NOTES = """\
uint8 HWC: a DALI-style `[N, 224, 224, 3]` uint8 batch; every provider produces the same normalised float32
NCHW patches (the reference loop and interpolate rows add the separate /255 + Normalize passes a standard
pipeline runs). float32 NCHW: an already-normalised batch, cropped or resized without normalisation, as the
reference code sees it. gbytes_per_s: the op's minimal bytes read + written over the median time; it can
exceed the copy bandwidth (clone of 256 MiB, in each row's extra) when the cropped rows hit the cache."""


def copy_bandwidth(device: torch.device, min_run_time: float) -> float:
    """The device's copy bandwidth in bytes/s: a clone of a 256 MiB buffer reads and writes it once."""
    buf = torch.empty(64 * 2 ** 20, dtype=torch.float32, device=device).fill_(1.0)
    t = measure({"clone": buf.clone}, min_run_time, device=device)["clone"].median_s
    return 2 * buf.numel() * buf.element_size() / t


def reference_loop_crop(images, actions, patch_size):
    """The reference's get_patch: a loop over the batch with two host reads per sample."""
    size = images.size(2)
    corners = torch.floor(actions * (size - patch_size)).int()
    patches = []
    for i in range(images.size(0)):
        y, x = corners[i, 0].item(), corners[i, 1].item()
        patches.append(images[i:i + 1, :, y:y + patch_size, x:x + patch_size])
    return torch.cat(patches, 0)


def _normalise(x, device):
    # A standard pipeline's separate passes: to float, /255, then Normalize.
    m = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    s = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return (x.float().div_(255.0) - m) / s


def focus_providers(images_in, actions, p, device, backend):
    """Callables producing the same float32 Tensor[N, 3, P, P] patches from one input; the baseline first."""
    uint8 = images_in.dtype == torch.uint8
    nchw = images_in.permute(0, 3, 1, 2) if uint8 else images_in  # the HWC batch seen as NCHW
    norm = dict(mean=MEAN, std=STD) if uint8 else {}
    n = images_in.shape[0]
    corners = torch.floor(actions * (IMAGE_SIZE - p))

    def ref():
        out = reference_loop_crop(nchw, actions, p)
        return _normalise(out, device) if uint8 else out

    def roi():
        from torchvision.ops import roi_align
        x = _normalise(nchw, device) if uint8 else nchw
        # aligned=True with a box of P x P pixels from the corner: one sample per bin, at the pixel center.
        boxes = torch.cat([torch.arange(n, device=device, dtype=torch.float32)[:, None], corners[:, 1:2],
                           corners[:, 0:1], corners[:, 1:2] + p, corners[:, 0:1] + p], 1)
        return roi_align(x, boxes, output_size=p, spatial_scale=1.0, sampling_ratio=1, aligned=True)

    def grid():
        x = _normalise(nchw, device) if uint8 else nchw
        steps = torch.arange(p, device=device, dtype=torch.float32)
        gy = (corners[:, 0:1] + steps) * (2.0 / (IMAGE_SIZE - 1)) - 1.0
        gx = (corners[:, 1:2] + steps) * (2.0 / (IMAGE_SIZE - 1)) - 1.0
        g = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        return F.grid_sample(x, g, mode="bilinear", align_corners=True)

    return {
        "reference loop": ref,
        f"gfnet ({backend})": lambda: ops.focus_crop(images_in, actions, p, validate=False, backend=backend,
                                                     **norm),
        "roi_align": roi,
        "grid_sample": grid,
    }


def glance_providers(images_in, p, device, backend):
    """Callables producing the same float32 Tensor[N, 3, P, P] glances; the baseline first."""
    uint8 = images_in.dtype == torch.uint8
    nchw = images_in.permute(0, 3, 1, 2) if uint8 else images_in
    norm = dict(mean=MEAN, std=STD) if uint8 else {}

    def ref():
        x = _normalise(nchw, device) if uint8 else nchw
        return F.interpolate(x, size=(p, p), mode="bicubic", align_corners=True)

    return {
        "interpolate + normalise": ref,
        f"gfnet ({backend})": lambda: ops.glance_resize(images_in, p, mode="bicubic", backend=backend, **norm),
    }


def run(device=None, quick: bool = False, threads=None, batch_size=None, patch_sizes=None) -> list:
    """One row per (op, input dtype, P, provider). quick: batch 32, P = 96 only, short timing."""
    device = resolve_device(device)
    with use_threads(threads):
        return _run(device, quick, batch_size, patch_sizes)


def _run(device, quick, batch_size, patch_sizes) -> list:
    min_run_time = 0.2 if quick else 2.0
    batch = batch_size or (32 if quick else BATCH)
    sizes = patch_sizes or ((96,) if quick else PATCH_SIZES)
    backend = "triton" if device.type == "cuda" else "cpp"
    copy_bw = copy_bandwidth(device, min_run_time)
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = {
        "uint8 HWC": torch.randint(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 3), generator=g,
                                   dtype=torch.uint8).to(device),
        "float32 NCHW": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(device),
    }
    actions = torch.rand(batch, 2, generator=g).to(device)
    rows = []
    for in_name, images_in in inputs.items():
        in_bytes = images_in.element_size()
        for p in sizes:
            for op, providers, bytes_moved in (
                ("focus_crop", focus_providers(images_in, actions, p, device, backend),
                 batch * 3 * p * p * (in_bytes + 4)),
                ("glance_resize", glance_providers(images_in, p, device, backend),
                 batch * 3 * (IMAGE_SIZE ** 2 * in_bytes + p * p * 4)),
            ):
                case = f"{op} P={p} {in_name}"
                baseline = next(iter(providers))
                ref = providers[baseline]()
                for name, fn in providers.items():
                    check_close(f"kernels {case}: {name} against {baseline}", fn(), ref, atol=ATOL)
                timings = measure(providers, min_run_time, device=device)
                extra = {name: {"op": op, "patch_size": p, "image_size": IMAGE_SIZE,
                                "gbytes_per_s": bytes_moved / t.median_s / 1e9,
                                "copy_gbytes_per_s": copy_bw / 1e9,
                                "fraction_of_copy_bandwidth": bytes_moved / t.median_s / copy_bw}
                         for name, t in timings.items()}
                rows += make_rows("kernels", case, timings, baseline, device=device, dtype=in_name, batch=batch,
                                  items=batch, unit="patches/s", extra=extra)
    return rows
