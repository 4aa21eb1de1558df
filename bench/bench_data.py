"""Images/s of the val and train input pipelines: DALI against the torchvision DataLoader (the baseline).

One setup is shared by both providers: the same ImageNet-sized JPEGs (about 500x375, quality 90,
written by gfnet.data.make_sample_tree into a temporary folder), the same batch size, output size and
float output, and the same CPU budget (DALI's num_threads = the DataLoader's num_workers = ``threads``).
Before timing, one epoch of each provider is read in lockstep and compared (below); that epoch also warms
the page cache, the index cache and the pipelines. Then the providers take turns, ``repeats`` rounds of
one epoch each (the DataLoader keeps its workers between epochs; DALI builds an epoch's pipeline in about
10 ms); the speed-up is the median of the per-round ratios. Run: ``gfnet-bench data [--quick] [--threads 2]``.
"""
from __future__ import annotations

import collections
import os
import tempfile

import torch

from gfnet.bench.common import OutputMismatch, check_close, make_rows, measure, resolve_device, use_threads
from gfnet.data import IMAGENET_STD

PROVIDERS = ("torchvision", "dali")
BASELINE = "torchvision"
#: Val pipelines decode with the same libjpeg-turbo and crop with the same geometry; only resampling
#: arithmetic differs (PIL rounds to 8 bits between its passes, DALI stays in float): at most about one
#: uint8 level in the tests (tests/test_data.py), two levels here to allow for the float output's
#: normalisation of DALI's unrounded values. Train pipelines draw their random crops with each backend's
#: own generator: only their labels (the same planned batches) are compared.
VAL_ATOL = 2.0 / 255.0 / min(IMAGENET_STD)
EXTRA_COLUMNS = ("images", "num_threads")
NOTES = ("JPEGs ~500x375 q90 per split (train: full batches only), output 224x224 float32 normalised; DALI "
         "num_threads = DataLoader num_workers (persistent workers).")


def _versions() -> dict:
    import PIL
    import torchvision

    try:
        import nvidia.dali

        dali = nvidia.dali.__version__
    except ImportError:
        dali = None
    return {"torchvision": torchvision.__version__, "pillow": PIL.__version__, "dali": dali}


def _check_epoch(loaders: dict, pipeline: str) -> int:
    """Read one epoch of both providers in lockstep and compare them (raises OutputMismatch); returns the
    number of images in the epoch."""
    n = 0
    base = loaders[BASELINE]
    for other_name, other in loaders.items():
        if other_name == BASELINE:
            continue
        base.set_epoch(0)
        other.set_epoch(0)
        batches = 0
        for (x0, y0), (x1, y1) in zip(base, other):
            what = f"data {pipeline}: {other_name} against {BASELINE}, batch {batches}"
            if not torch.equal(y0.cpu(), y1.cpu()):
                raise OutputMismatch(f"{what}: the labels differ (the backends must read the same planned batches)")
            if x0.shape != x1.shape or x0.dtype != x1.dtype:
                raise OutputMismatch(f"{what}: {tuple(x1.shape)} {x1.dtype} against {tuple(x0.shape)} {x0.dtype}")
            if pipeline == "val":
                check_close(what, x1, x0, atol=VAL_ATOL, why="one or two uint8 levels of resampling arithmetic")
            batches += 1
            n += len(y0)
        if batches != len(base) or batches != len(other):
            raise OutputMismatch(f"data {pipeline}: {other_name} gave {len(other)} batches, {BASELINE} {len(base)}")
    return n // (len(loaders) - 1)


def run(device=None, quick: bool = False, threads=None, images=None, batch_size: int = 64, image_size: int = 224,
        repeats=None) -> list:
    """Time the val and train pipelines of both backends; one row per (pipeline, provider).

    Args:
        device: "cpu" (DALI's CPU pipeline) or "cuda[:k]" (DALI's mixed nvJPEG decoder; the
            DataLoader's batches are copied to the GPU); None: CUDA when present, else the CPU.
        quick: 128 images, one timed round.
        threads: torch threads and DALI threads = DataLoader workers (default: the CPUs usable).
        images: images per split (default 512). repeats: timed rounds (default 5).
    """
    from gfnet.data import make_loader, make_sample_tree

    device = resolve_device(device)
    images = images or (128 if quick else 512)
    repeats = repeats or (1 if quick else 5)
    num_threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
                              (os.cpu_count() or 1))
    classes = 8
    rows = []
    with use_threads(threads), tempfile.TemporaryDirectory(prefix="gfnet-bench-data-") as root:
        per_class = max(1, images // classes)
        make_sample_tree(root, num_classes=classes, train_per_class=per_class, val_per_class=per_class,
                         photo_size=(500, 375), quality=90, seed=0)
        cache = os.path.join(root, ".cache")
        for pipeline in ("val", "train"):
            loaders = {p: make_loader(root, train=pipeline == "train", batch_size=batch_size, image_size=image_size,
                                      backend=p, num_threads=num_threads, device=device, cache_dir=cache)
                       for p in PROVIDERS}
            count = _check_epoch(loaders, pipeline)
            epochs = {p: 0 for p in PROVIDERS}

            def epoch(p):
                epochs[p] += 1
                loader = loaders[p]
                loader.set_epoch(epochs[p])
                last = collections.deque(loader, maxlen=1)  # read the epoch, keep only its last batch
                if last and last[0][0].is_cuda:
                    torch.cuda.synchronize(last[0][0].device)

            timings = measure({p: (lambda p=p: epoch(p)) for p in PROVIDERS}, min_run_time=0.0, rounds=repeats,
                              device=device)
            extra = {p: {"pipeline": pipeline, "images": count, "num_threads": num_threads,
                         "image_size": image_size, "versions": _versions()} for p in PROVIDERS}
            rows += make_rows("data", f"{pipeline} pipeline", timings, BASELINE, device=device, dtype="float32",
                              batch=batch_size, items=count, unit="images/s", extra=extra)
    return rows
