"""Accuracy against latency: the GFNet paper's deployment figure (top-1 accuracy against the mean inference
latency of one image, batch 1), from :func:`gfnet.deploy.latency.accuracy_latency_points` results.

:func:`plot_accuracy_latency` draws each source's budgets (accuracy against mean latency, p50-p99 as a bar) and
its full-resolution backbone alone (a star); :func:`read_accuracy_latency` reads one source.
"""
from __future__ import annotations

import json
import os
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from gfnet.viz.style import STEP_COLORS, PathLike, hex_color, save_figure

__all__ = ["read_accuracy_latency", "plot_accuracy_latency"]

FORMAT = "gfnet-accuracy-latency/1"


def read_accuracy_latency(source) -> dict:
    """One source as a dict of the ``gfnet-accuracy-latency/1`` format: an :class:`AccuracyLatency` (anything with
    ``to_dict()``), its dict, or a JSON file holding one (or a list of them: the first is taken; see
    :func:`plot_accuracy_latency` for several)."""
    if hasattr(source, "to_dict"):
        return source.to_dict()
    if isinstance(source, Mapping):
        d = dict(source)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(2, "no accuracy-latency results file", path)
        try:
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is no accuracy-latency results file ({type(e).__name__}: {e})") from None
        if isinstance(d, list) and d:
            d = d[0]
    if not isinstance(d, Mapping) or d.get("format") != FORMAT or "points" not in d:
        raise ValueError(f"not an accuracy-latency result (format {FORMAT!r} with points, as "
                         "gfnet.deploy.latency.accuracy_latency_points(...).to_dict() writes)")
    return dict(d)


def _sources(sources) -> List[Any]:
    if isinstance(sources, (str, os.PathLike, Mapping)) or hasattr(sources, "to_dict"):
        sources = [sources]  # one source; a file of it may still hold a list of results
    out = []
    for s in sources:
        if isinstance(s, (str, os.PathLike)) and os.path.isfile(os.fspath(s)):
            with open(os.fspath(s), encoding="utf-8") as fh:
                try:
                    loaded = json.load(fh)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{s} is no accuracy-latency results file ({e})") from None
            out.extend(loaded if isinstance(loaded, list) else [loaded])
        else:
            out.append(s)
    return out


def plot_accuracy_latency(sources, out_path: PathLike, labels: Optional[Sequence[str]] = None,
                          title: Optional[str] = None, dpi: int = 150,
                          figsize: Tuple[float, float] = (6.4, 4.4)) -> List[dict]:
    """Top-1 accuracy against mean batch-1 latency (ms) to PNG/SVG/PDF (by extension).

    For each source: its budgets as a line through (mean latency, accuracy), sorted by latency, with a bar from
    the p50 to the p99 latency at each; the full-resolution backbone alone as a star (same runtime and threads).

    Args:
        sources: one or several :class:`gfnet.deploy.latency.AccuracyLatency` results, their dicts, or JSON files
            holding one or a list of them.
        out_path: ``.png``, ``.svg`` or ``.pdf``. labels: legend names per source (default: label, runtime,
            threads).
    Returns:
        the dicts plotted.
    """
    from matplotlib.figure import Figure

    data = [read_accuracy_latency(s) for s in _sources(sources)]
    if not data:
        raise ValueError("nothing to plot: give at least one accuracy-latency result")
    if labels is not None and len(labels) != len(data):
        raise ValueError(f"{len(labels)} labels for {len(data)} sources")
    fig = Figure(figsize=figsize)
    ax = fig.add_subplot(1, 1, 1)
    palette = [hex_color(c) for c in STEP_COLORS]
    for i, d in enumerate(data):
        color = palette[i % len(palette)]
        name = labels[i] if labels is not None else \
            f"{d.get('label', 'GFNet')} ({d['runtime']}, {d.get('threads') or 'default'} thread(s))"
        points = sorted(d["points"], key=lambda p: p["mean_ms"])
        if points:
            xs = np.array([p["mean_ms"] for p in points])
            ys = np.array([p["accuracy"] for p in points])
            lo = xs - np.array([min(p["p50_ms"], p["mean_ms"]) for p in points])
            hi = np.array([max(p["p99_ms"], p["mean_ms"]) for p in points]) - xs
            ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o-", color=color, lw=2, ms=4, elinewidth=0.8, capsize=2,
                        label=f"{name}: budgets (mean; bar p50-p99)")
        base = d.get("backbone")
        if base:
            ax.plot([base["mean_ms"]], [base["accuracy"]], "*", color=color, ms=14, mec="black", mew=0.6,
                    label=f"{d['arch']} alone at {d['image_size']} px ({d['runtime']})")
    cpus = sorted({d.get("cpu", "") for d in data} - {""})
    ax.set_xlabel("mean latency per image, batch 1 (ms)")
    ax.set_ylabel("Top-1 accuracy (%)")
    ax.set_title(title or ("Accuracy vs. latency" + (f" on {', '.join(cpus)}" if cpus else "")), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, out_path, dpi)
    return data
