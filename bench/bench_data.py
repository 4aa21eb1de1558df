"""Images/s of the val and train input pipelines: DALI against the torchvision DataLoader.

One setup is shared by both providers: the same ImageNet-sized JPEGs (about 500x375, quality 90,
written by gfnet.data.make_sample_tree into a temporary folder), the same batch size, output size and
float output, and the same CPU budget (DALI's num_threads = the DataLoader's num_workers). Each
(pipeline, backend) pair runs one warm-up epoch (page cache, index cache, pipeline start), then
`repeats` timed epochs (the DataLoader keeps its workers between epochs; DALI builds an epoch's
pipeline in about 10 ms). Reported: median images/s over the epochs with the min and max, and the
median of the per-epoch ratios DALI / torchvision (epochs alternate between the two providers).

    python bench/bench_data.py [--device cuda] [--quick] [--images 512] [--json out.json] [--md out.md]

`run(device=None, quick=False)` returns the rows (stamped by gfnet.bench.common.environment, plus the
CPU model, DALI/torchvision/Pillow versions and the load average: the machine may be shared);
``gfnet-bench data`` calls it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from gfnet.bench.common import environment, resolve_device, write_outputs

PROVIDERS = ("torchvision", "dali")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({_cpus()} CPUs usable)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({_cpus()} CPUs usable)"


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _versions() -> dict:
    import PIL
    import torchvision

    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "pillow": PIL.__version__}
    try:
        import nvidia.dali

        out["dali"] = nvidia.dali.__version__
    except ImportError:
        out["dali"] = None
    return out


def _time_epoch(loader) -> tuple[float, int]:
    """(epoch seconds, images)."""
    start = time.perf_counter()
    n = 0
    for images, labels in loader:
        n += len(labels)
    if images.is_cuda:
        torch.cuda.synchronize(images.device)
    return time.perf_counter() - start, n


def run(device: str | None = None, quick: bool = False, images: int | None = None, batch_size: int = 64,
        image_size: int = 224, num_threads: int | None = None, repeats: int | None = None) -> list[dict]:
    """Time the val and train pipelines of both backends; one row per (pipeline, provider).

    The providers' epochs alternate (torchvision, dali, torchvision, ...), so that other load on a
    shared machine falls on both alike.

    Args:
        device: "cpu" (DALI's CPU pipeline) or "cuda[:k]" (DALI's mixed nvJPEG decoder; the
            DataLoader's batches are copied to the GPU); None: CUDA when present, else the CPU.
        quick: a smoke run (128 images, one timed epoch).
        images: images per split (default 512; 128 when quick).
        num_threads: DALI threads = DataLoader workers (default: the CPUs this process may use).
        repeats: timed epochs per row (default 5; 1 when quick).
    """
    from gfnet.data import make_loader, make_sample_tree

    dev = resolve_device(device)
    images = images or (128 if quick else 512)
    repeats = repeats or (1 if quick else 5)
    num_threads = num_threads or _cpus()
    classes = 8
    common = {**environment(dev), "device_name": _device_name(dev), "suite": "data", "versions": _versions(),
              "num_threads": num_threads, "batch": batch_size, "image_size": image_size, "dtype": "float32",
              "load_average_1min": os.getloadavg()[0]}
    rows = []
    with tempfile.TemporaryDirectory(prefix="gfnet-bench-data-") as root:
        per_class = max(1, images // classes)
        make_sample_tree(root, num_classes=classes, train_per_class=per_class, val_per_class=per_class,
                         photo_size=(500, 375), quality=90, seed=0)
        cache = os.path.join(root, ".cache")
        for pipeline in ("val", "train"):
            loaders = {p: make_loader(root, train=pipeline == "train", batch_size=batch_size, image_size=image_size,
                                      backend=p, num_threads=num_threads, device=dev, cache_dir=cache)
                       for p in PROVIDERS}
            for loader in loaders.values():
                _time_epoch(loader)  # warm-up: page cache, first pipeline build, worker imports
            rates = {p: [] for p in PROVIDERS}
            counts = {}
            for epoch in range(repeats):
                for p, loader in loaders.items():
                    loader.set_epoch(epoch + 1)
                    secs, counts[p] = _time_epoch(loader)
                    rates[p].append(counts[p] / secs)
            for p in PROVIDERS:
                rows.append({**common, "pipeline": pipeline, "provider": p, "images": counts[p], "repeats": repeats,
                             "images_per_s": statistics.median(rates[p]), "images_per_s_min": min(rates[p]),
                             "images_per_s_max": max(rates[p]),
                             "speedup": statistics.median(a / b for a, b in zip(rates[p], rates["torchvision"]))})
    common["load_average_1min_end"] = os.getloadavg()[0]
    for row in rows:
        row["load_average_1min_end"] = common["load_average_1min_end"]
    return rows


def markdown(rows: list[dict]) -> str:
    """A table of the rows, with the machine, versions and setup above it."""
    r0 = rows[0]
    v = r0["versions"]
    lines = [f"# Input pipelines: DALI vs the torchvision DataLoader ({r0['device_type']})", "",
             f"Machine: {r0['device_name']}; device type `{r0['device_type']}`; git {r0['git']}; "
             f"1-min load average {r0['load_average_1min']:.2f} at the start, {r0['load_average_1min_end']:.2f} "
             f"at the end",
             f"Versions: DALI {v['dali']}, torch {v['torch']}, torchvision {v['torchvision']}, "
             f"Pillow {v['pillow']}, Python {v['python']}",
             f"Setup: {r0['images']} JPEGs ~500x375 q90 per split (train: full batches only), batch {r0['batch']}, "
             f"output {r0['image_size']}x{r0['image_size']} float32 normalised; DALI num_threads = DataLoader "
             f"num_workers = {r0['num_threads']} (persistent workers); after a warm-up epoch, the median of "
             f"{r0['repeats']} epochs, the providers' epochs alternating; speedup = median of the per-epoch "
             f"ratios to torchvision",
             "",
             "| pipeline | provider | images/s (median) | min-max | speedup |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['pipeline']} | {r['provider']} | {r['images_per_s']:.0f} | "
                     f"{r['images_per_s_min']:.0f}-{r['images_per_s_max']:.0f} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda[:k] (default: cuda if present)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--md", default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    rows = run(args.device, args.quick, images=args.images, batch_size=args.batch_size,
               num_threads=args.num_threads, repeats=args.repeats)
    table = markdown(rows)
    write_outputs(rows, table, args.json, args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
