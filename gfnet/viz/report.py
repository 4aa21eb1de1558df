"""The README's pictures from a ``gfnet-demo`` output folder: the folder's layout is defined here, once.

:mod:`gfnet.demo` writes a folder with these file names and :func:`render_report` reads it (and
``gfnet-demo`` calls it to draw its own pictures), so the two cannot drift apart.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import torch

from gfnet.viz.bench_charts import plot_bench
from gfnet.viz.curves import BUDGET_KEYS, plot_budget_curve
from gfnet.viz.inputs import budget_thresholds
from gfnet.viz.patches import plot_patches
from gfnet.viz.style import PathLike

__all__ = ["CHECKPOINT_FILE", "RESULTS_FILE", "SAMPLES_FILE", "PATCHES_FILE", "BUDGET_CURVE_FILE",
           "LATENCY_FILE", "ACCURACY_LATENCY_FILE", "render_report"]

#: The trained GFNet, reference format, evaluation fields filled (:func:`gfnet.save_checkpoint`).
CHECKPOINT_FILE = "checkpoint.pth.tar"
#: Numbers of the run (JSON); the budget curve reads its optional ``label``, ``baseline`` and budget fields.
RESULTS_FILE = "results.json"
#: Images to draw: torch.save of {"images": Tensor[N, 3, S, S], "labels": Tensor[N], "class_names": [str]}.
SAMPLES_FILE = "samples.pt"
#: The pictures :func:`render_report` writes into the folder.
PATCHES_FILE = "patches.png"
BUDGET_CURVE_FILE = "budget_curve.png"
#: Batch-1 accuracy-latency results (optional): a JSON list of ``gfnet-accuracy-latency/1`` dicts, one per
#: runtime (:meth:`gfnet.deploy.latency.AccuracyLatency.to_dict`); drawn as :data:`ACCURACY_LATENCY_FILE`.
LATENCY_FILE = "latency.json"
ACCURACY_LATENCY_FILE = "accuracy_latency.png"


def render_report(demo_dir: PathLike, threshold_index: int = 19, max_images: int = 8, ncols: int = 4,
                  bench=None) -> dict:
    """The README's pictures from a ``gfnet-demo`` output folder.

    Expected layout of ``demo_dir``:

    - :data:`CHECKPOINT_FILE`: the trained GFNet in the reference format (:func:`gfnet.save_checkpoint`),
      with ``anytime_classification``, ``flops``, ``budgeted_batch_classification`` and
      ``dynamic_threshold`` filled in.
    - :data:`RESULTS_FILE` (optional): extra numbers for the budget curve, read by
      :func:`gfnet.viz.curves.budget_series`: ``label``, ``baseline`` (or ``backbone``) ``[macs, acc]`` of
      the backbone alone, and any of the fields above (they override the checkpoint's).
    - :data:`SAMPLES_FILE`: a dict saved with torch.save: ``images`` Tensor[N, 3, S, S] uint8 (or float
      normalised with ImageNet's mean/std), ``labels`` Tensor[N] int64 (optional), ``class_names`` list of
      str (optional). The first ``max_images`` are drawn.

    - :data:`LATENCY_FILE` (optional): accuracy against batch-1 latency per runtime, with the full-resolution
      backbone's point.

    Writes :data:`PATCHES_FILE` (thresholds: row ``threshold_index`` of ``dynamic_threshold``, 19 = equal
    exit shares, the middle row if the table is shorter; no exit is marked when there is no table),
    :data:`BUDGET_CURVE_FILE`, :data:`ACCURACY_LATENCY_FILE` when :data:`LATENCY_FILE` exists, and, when
    ``bench`` names result JSON files, ``bench.png`` (one suite) or ``bench_<suite>.png`` per suite. Returns
    {"patches": path, "budget_curve": path, "accuracy_latency": path or None, "bench": [paths]}.
    """
    from gfnet.checkpoint import load_checkpoint

    demo_dir = os.fspath(demo_dir)
    ckpt = os.path.join(demo_dir, CHECKPOINT_FILE)
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"no checkpoint at {ckpt}: is {demo_dir} a gfnet-demo output folder? "
                                "(write one with `gfnet-demo --out DIR`)")
    net = load_checkpoint(ckpt)
    meta = net.meta.as_dict()
    results_path = os.path.join(demo_dir, RESULTS_FILE)
    if os.path.isfile(results_path):
        with open(results_path) as f:
            results = json.load(f)
        if isinstance(results, Mapping):
            meta.update({k: v for k, v in results.items() if k in BUDGET_KEYS + ("flops", "label")})
    out = {"bench": []}
    samples_path = os.path.join(demo_dir, SAMPLES_FILE)
    if not os.path.isfile(samples_path):
        raise FileNotFoundError(f"{samples_path} is missing: save a dict with 'images' (Tensor[N, 3, S, S]) "
                                "and 'labels' there to draw the patches")
    samples = torch.load(samples_path, map_location="cpu", weights_only=True)
    if not isinstance(samples, Mapping) or "images" not in samples:
        raise ValueError(f"{samples_path} must hold a dict with 'images' (and optionally 'labels', "
                         "'class_names')")
    images = samples["images"][:max_images]
    labels = samples.get("labels")
    thresholds = None
    if meta.get("dynamic_threshold") is not None:
        rows = len(meta["dynamic_threshold"])
        thresholds = budget_thresholds(meta, threshold_index if 0 <= threshold_index < rows else rows // 2)
    out["patches"] = plot_patches(net, images, os.path.join(demo_dir, PATCHES_FILE), thresholds=thresholds,
                                  labels=None if labels is None else labels[:max_images],
                                  class_names=samples.get("class_names"), ncols=ncols).path
    curve = os.path.join(demo_dir, BUDGET_CURVE_FILE)
    plot_budget_curve([meta], curve)
    out["budget_curve"] = curve
    out["accuracy_latency"] = None
    latency = os.path.join(demo_dir, LATENCY_FILE)
    if os.path.isfile(latency):
        from gfnet.viz.latency import plot_accuracy_latency

        out["accuracy_latency"] = os.path.join(demo_dir, ACCURACY_LATENCY_FILE)
        plot_accuracy_latency(latency, out["accuracy_latency"])
    if bench:
        out["bench"] = plot_bench(bench, os.path.join(demo_dir, "bench.png"))
    return out
