"""Glance and focus kernels: gfnet's fused ops against what the reference and other libraries do.

One setup per case (batch 256, S = 224, P = 96 / 128 / 144, uint8 HWC input as DALI hands it, or float32
NCHW input already normalised as the reference's DataLoader hands it), shared by every provider:

focus (the patch crop), each producing the same float32 Tensor[N, 3, P, P]:
- reference loop: the reference's get_patch, a Python loop over the batch with two ``.item()`` per sample,
  then (uint8 input) the separate /255 and normalisation passes of a standard pipeline;
- gfnet: ``gfnet.ops.focus_crop`` (C++ on the CPU, Triton on a GPU), one fused pass;
- roi_align: ``torchvision.ops.roi_align`` with one sample per bin at pixel centers (the same values);
- grid_sample: ``F.grid_sample`` on a grid through the pixel centers (the same values).
glance (the whole image to P x P, bicubic, align_corners=True):
- interpolate + normalise: ``F.interpolate`` and (uint8 input) separate conversion and normalisation;
- gfnet: ``gfnet.ops.glance_resize``, one fused pass.

Reported per row: median time and inter-quartile spread, patches (images) per second, the speed-up over the
reference, and the achieved bandwidth (the op's minimal bytes read + written over the time) next to the
device's measured copy bandwidth (a clone of a 256 MiB buffer). Timed with triton.testing.do_bench on a GPU
and with torch.utils.benchmark on the CPU.
Run: ``gfnet-bench kernels`` or ``python -m gfnet.bench.bench_kernels [--quick] [--device cpu]``.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

from gfnet import ops
from gfnet.bench.common import environment, resolve_device

BATCH = 256
IMAGE_SIZE = 224
PATCH_SIZES = (96, 128, 144)
MEAN, STD = ops.IMAGENET_MEAN, ops.IMAGENET_STD


def _timer(device: torch.device, quick: bool):
    """fn -> {"median_s", "iqr_s", "min_s", "runs"}: triton.testing.do_bench on a GPU (its spread is the
    20-80% quantile range), torch.utils.benchmark on the CPU (blocked_autorange: median, inter-quartile range
    and best block over at least min_run_time seconds)."""
    if device.type == "cuda":
        import triton.testing

        def measure(fn):
            q0, q20, q50, q80 = triton.testing.do_bench(fn, quantiles=[0.0, 0.2, 0.5, 0.8],
                                                        rep=50 if quick else 200)
            return {"median_s": q50 / 1e3, "iqr_s": (q80 - q20) / 1e3, "min_s": q0 / 1e3, "runs": None}
        return measure

    def measure(fn):
        fn()  # warm-up: first-call allocations and lazy imports are not what is measured
        m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) \
            .blocked_autorange(min_run_time=0.5 if quick else 2.0)
        return {"median_s": m.median, "iqr_s": m.iqr, "min_s": min(m.times), "runs": len(m.times)}
    return measure


def copy_bandwidth(device: torch.device, measure) -> float:
    """The device's copy bandwidth in bytes/s: a clone of a 256 MiB buffer reads and writes it once."""
    buf = torch.empty(64 * 2 ** 20, dtype=torch.float32, device=device).fill_(1.0)
    t = measure(lambda: buf.clone())["median_s"]
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


def focus_providers(images_in, actions, p, device):
    """Callables producing the same float32 Tensor[N, 3, P, P] patches from one input."""
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
        "gfnet": lambda: ops.focus_crop(images_in, actions, p, validate=False, **norm),
        "roi_align": roi,
        "grid_sample": grid,
    }


def glance_providers(images_in, p, device):
    uint8 = images_in.dtype == torch.uint8
    nchw = images_in.permute(0, 3, 1, 2) if uint8 else images_in
    norm = dict(mean=MEAN, std=STD) if uint8 else {}

    def ref():
        x = _normalise(nchw, device) if uint8 else nchw
        return F.interpolate(x, size=(p, p), mode="bicubic", align_corners=True)

    return {
        "interpolate + normalise": ref,
        "gfnet": lambda: ops.glance_resize(images_in, p, mode="bicubic", **norm),
    }


def _check_same(outputs: dict, atol: float) -> None:
    # Every provider computes the same patches; a benchmark of a wrong answer is worthless.
    items = list(outputs.items())
    name0, ref = items[0]
    for name, out in items[1:]:
        err = (out.float() - ref.float()).abs().max().item()
        if err > atol:
            raise AssertionError(f"provider {name!r} differs from {name0!r} by {err:.3g}")


def run(device=None, quick=False, batch_size=None, patch_sizes=None, threads=None) -> list[dict]:
    """One row per (op, input dtype, P, provider). quick: batch 32, P = 96 only, short timing.
    threads: CPU threads for every provider (default: torch's current setting)."""
    device = resolve_device(device)
    previous_threads = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        return _run(device, quick, batch_size, patch_sizes)
    finally:
        torch.set_num_threads(previous_threads)


def _run(device, quick, batch_size, patch_sizes) -> list[dict]:
    env = environment(device)
    measure = _timer(device, quick)
    batch = batch_size or (32 if quick else BATCH)
    sizes = patch_sizes or ((96,) if quick else PATCH_SIZES)
    copy_bw = copy_bandwidth(device, measure)
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = {
        "uint8 HWC": torch.randint(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 3), generator=g,
                                   dtype=torch.uint8).to(device),
        "float32 NCHW": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(device),
    }
    actions = torch.rand(batch, 2, generator=g).to(device)
    backend = ops.select_backend(inputs["uint8 HWC"])
    rows = []
    for in_name, images_in in inputs.items():
        in_bytes = images_in.element_size()
        for p in sizes:
            for op, providers, bytes_moved in (
                ("focus_crop", focus_providers(images_in, actions, p, device),
                 batch * 3 * p * p * (in_bytes + 4)),
                ("glance_resize", glance_providers(images_in, p, device),
                 batch * 3 * (IMAGE_SIZE ** 2 * in_bytes + p * p * 4)),
            ):
                # 1e-3: grid_sample recomputes each pixel position from normalised coordinates, a few ulps off.
                _check_same({k: f() for k, f in providers.items()}, atol=1e-3)
                timings = {name: measure(fn) for name, fn in providers.items()}
                ref_time = next(iter(timings.values()))["median_s"]
                for name, t in timings.items():
                    rows.append({
                        **env, "threads": torch.get_num_threads() if device.type == "cpu" else None,
                        "op": op, "dtype": in_name, "batch": batch, "image_size": IMAGE_SIZE,
                        "patch_size": p,
                        "provider": f"gfnet ({backend})" if name == "gfnet" else name,
                        "median_s": t["median_s"], "iqr_s": t["iqr_s"], "min_s": t["min_s"], "runs": t["runs"],
                        "patches_per_s": batch / t["median_s"],
                        "speedup_vs_reference": ref_time / t["median_s"],
                        "gbytes_per_s": bytes_moved / t["median_s"] / 1e9,
                        "copy_gbytes_per_s": copy_bw / 1e9,
                        "fraction_of_copy_bandwidth": bytes_moved / t["median_s"] / copy_bw,
                    })
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (the committed bench/results/kernels_<device>.md)."""
    head = ["op", "input", "P", "provider", "median ms", "IQR ms", "min ms", "patches/s", "vs reference",
            "GB/s", "of copy BW"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["op"], r["dtype"], str(r["patch_size"]), r["provider"], f"{r['median_s'] * 1e3:.2f}",
            f"{r['iqr_s'] * 1e3:.2f}", f"{r['min_s'] * 1e3:.2f}", f"{r['patches_per_s']:,.0f}",
            f"{r['speedup_vs_reference']:.1f}x",
            f"{r['gbytes_per_s']:.2f}", f"{100 * r['fraction_of_copy_bandwidth']:.0f}%"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, nargs="*", default=[None],
                        help="CPU thread counts to measure with (one table each); default: torch's setting")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--markdown", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    all_rows, sections = [], []
    for threads in args.threads:
        rows = run(device=args.device, quick=args.quick, threads=threads)
        all_rows += rows
        r = rows[0]
        sections.append(f"## {r['device']}\n\ntorch {r['torch']}, git {r['git']}, batch {r['batch']}, "
                        f"S = {r['image_size']}; device copy bandwidth {r['copy_gbytes_per_s']:.2f} GB/s "
                        f"(clone of 256 MiB).\n\n{markdown_table(rows)}\n")
        print(sections[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# Kernel benchmark (bench/bench_kernels.py)\n\n" + "\n".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
