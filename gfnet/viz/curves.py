"""Accuracy against Multiply-Adds: the GFNet paper's main figure, from checkpoints or results files.

:func:`plot_budget_curve`: top-1 accuracy against Multiply-Adds: the budgeted batch classification curve,
the anytime points (one per step) and the backbone alone; :func:`budget_series` reads one source's numbers.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from gfnet.viz.style import STEP_COLORS, PathLike, hex_color, save_figure

__all__ = ["BUDGET_KEYS", "BudgetSeries", "budget_series", "plot_budget_curve"]


@dataclass
class BudgetSeries:
    """One model's accuracy/cost numbers, Multiply-Adds as raw counts (not scaled).

    budget_macs/budget_acc: the budgeted batch classification curve (39 points in the reference);
    anytime_macs/anytime_acc: one point per step (cumulative cost of steps 1..t, top-1 after step t);
    baseline: (macs, acc) of the backbone alone, or None.
    """

    label: str
    budget_macs: List[float] = field(default_factory=list)
    budget_acc: List[float] = field(default_factory=list)
    anytime_macs: List[float] = field(default_factory=list)
    anytime_acc: List[float] = field(default_factory=list)
    baseline: Optional[Tuple[float, float]] = None


def _floats(v) -> List[float]:
    if v is None:
        return []
    if isinstance(v, torch.Tensor):
        return [float(x) for x in v.detach().cpu().flatten().tolist()]
    return [float(x) for x in np.asarray(v, dtype=np.float64).flatten().tolist()]


def _point(v) -> Optional[Tuple[float, float]]:
    """(macs, acc) from [macs, acc] or a dict with macs/flops and acc/top1."""
    if v is None:
        return None
    if isinstance(v, Mapping):
        macs = next((v[key] for key in ("macs", "flops", "multiply_adds") if key in v), None)
        acc = next((v[key] for key in ("acc", "top1", "accuracy") if key in v), None)
        if macs is None or acc is None:
            raise ValueError(f"a baseline point needs macs (or flops) and acc (or top1); got keys {list(v)}")
        return float(macs), float(acc)
    vals = _floats(v)
    if len(vals) != 2:
        raise ValueError(f"a baseline point is (macs, acc), got {v!r}")
    return vals[0], vals[1]


BUDGET_KEYS = ("budgeted_batch_classification", "budget_curve", "anytime_classification", "baseline",
                "backbone")


def _budget_pair(v) -> Tuple[List[float], List[float]]:
    if isinstance(v, Mapping):
        macs = next((v[key] for key in ("macs", "flops", "expected_flops") if key in v), None)
        acc = next((v[key] for key in ("acc", "top1", "accuracy") if key in v), None)
        return _floats(macs), _floats(acc)
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], Mapping):
        return _budget_pair({key: [row[key] for row in v] for key in v[0]})
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return _floats(v[0]), _floats(v[1])
    arr = torch.as_tensor(v)
    if arr.dim() == 2 and arr.shape[0] == 2:
        return _floats(arr[0]), _floats(arr[1])
    raise ValueError("a budget curve is [macs list, acc list] (the reference's budgeted_batch_classification),"
                     " a dict with macs/flops and acc/top1 lists, or a list of such rows")


def _read_source(source) -> Tuple[Mapping[str, Any], str]:
    if hasattr(source, "meta") and hasattr(source.meta, "as_dict"):  # a GFNet: its ModelMeta's fields
        return source.meta.as_dict(), ""
    if hasattr(source, "meta") and isinstance(source.meta, Mapping):
        return source.meta, ""
    if isinstance(source, Mapping):
        return source, ""
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint or results file at {path}")
    stem = os.path.basename(path)
    for ext in (".pth.tar", ".json", ".pth", ".pt", ".tar"):
        if stem.endswith(ext):
            stem = stem[:-len(ext)]
            break
    if path.lower().endswith(".json"):
        with open(path) as f:
            obj = json.load(f)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is neither a results JSON nor a readable checkpoint "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict of results")
    return obj, stem


def budget_series(source, label: Optional[str] = None) -> BudgetSeries:
    """Read one source's accuracy/cost numbers.

    ``source``: a checkpoint path (reference format: ``budgeted_batch_classification`` = [macs list,
    acc list], ``anytime_classification`` = T accuracies, ``flops`` = T cumulative Multiply-Adds), a
    results ``.json`` path with the same fields, a loaded dict, or a net with ``.meta``. Results files
    may instead give ``budget_curve`` ([macs, acc], {"macs": [...], "acc": [...]} or rows of
    {"macs", "acc"}), and ``baseline`` (or ``backbone``) as [macs, acc] or {"macs", "acc"}. When the top
    level has none of these fields, the first dict-valued field that has them is read (for results
    files that nest them, e.g. under ``"eval"``).
    """
    d, stem = _read_source(source)
    if not any(key in d for key in BUDGET_KEYS):
        nested = next((v for v in d.values() if isinstance(v, Mapping) and any(k in v for k in BUDGET_KEYS)),
                      None)
        if nested is None:
            raise ValueError(f"{stem or 'source'}: no budget or anytime results in it (looked for "
                             f"{', '.join(BUDGET_KEYS)}; keys: {list(d)[:12]})")
        d = {**{k: v for k, v in d.items() if not isinstance(v, Mapping)}, **nested}
    curve = d.get("budgeted_batch_classification", d.get("budget_curve"))
    budget_macs, budget_acc = _budget_pair(curve) if curve is not None else ([], [])
    anytime_acc = _floats(d.get("anytime_classification"))
    anytime_macs = _floats(d.get("flops"))[:len(anytime_acc)]
    if len(anytime_macs) != len(anytime_acc):
        anytime_acc = anytime_acc[:len(anytime_macs)]
    if len(budget_macs) != len(budget_acc):
        raise ValueError(f"{stem or 'source'}: the budget curve has {len(budget_macs)} costs but "
                         f"{len(budget_acc)} accuracies")
    baseline = _point(d.get("baseline", d.get("backbone")))
    if label is None:
        label = d.get("label")
    if label is None and d.get("model_name") is not None:
        label = f"GFNet {d['model_name']}"
        if d.get("patch_size") is not None:
            label += f" (P={d['patch_size']}, T={d.get('T', len(_floats(d.get('flops'))))})"
    series = BudgetSeries(str(label or stem or "GFNet"), budget_macs, budget_acc, anytime_macs, anytime_acc,
                          baseline)
    if not (series.budget_macs or series.anytime_macs or series.baseline):
        raise ValueError(f"{series.label}: its budget, anytime and baseline fields are all empty "
                         "(was the checkpoint ever evaluated?)")
    return series


def _mac_unit(values: Sequence[float], unit: Optional[str]) -> Tuple[float, str]:
    """(divisor, axis name) for raw Multiply-Adds counts; values below 100 are taken as GMACs already."""
    units = {"G": (1e9, "GMACs"), "M": (1e6, "MMACs"), "K": (1e3, "KMACs"), "1": (1.0, "MACs")}
    if unit is not None:
        if unit not in units:
            raise ValueError(f"unit must be one of {sorted(units)}, got {unit!r}")
        return units[unit]
    top = max(values) if values else 0.0
    if top < 100:  # no CNN costs under 100 Multiply-Adds: these are already GMACs (as in the paper's plots)
        return 1.0, "GMACs"
    return units["G"] if top >= 1e8 else units["M"] if top >= 1e5 else units["1"]


def plot_budget_curve(sources, out_path: PathLike, labels: Optional[Sequence[str]] = None,
                      baseline=None, title: Optional[str] = None, unit: Optional[str] = None,
                      dpi: int = 150, figsize: Tuple[float, float] = (6.4, 4.4)) -> List[BudgetSeries]:
    """Top-1 accuracy against Multiply-Adds, the GFNet paper's main figure, to PNG/SVG/PDF (by extension).

    For each source: the budgeted batch classification curve (a line), the anytime points (markers
    numbered by step, dashed) and, if the source has one, the backbone alone (a star).

    Args:
        sources: one source or a list; each a checkpoint path, results JSON path, loaded dict or net
            (see :func:`budget_series` for the fields read).
        out_path: ``.png``, ``.svg`` or ``.pdf``.
        labels: legend names, one per source (default: from the source).
        baseline: the backbone alone: ``(macs, acc)``, ``(macs, acc, label)`` or a list of those.
        unit: "G", "M", "K" or "1" for the x axis (default by magnitude: GMACs from 1e8 Multiply-Adds).
    Returns:
        the :class:`BudgetSeries` plotted (Multiply-Adds unscaled).
    """
    from matplotlib.figure import Figure

    if isinstance(sources, (str, os.PathLike, Mapping)) or hasattr(sources, "meta"):
        sources = [sources]
    sources = list(sources)
    if not sources and baseline is None:
        raise ValueError("nothing to plot: give at least one checkpoint or results file")
    if labels is not None and len(labels) != len(sources):
        raise ValueError(f"{len(labels)} labels for {len(sources)} sources")
    series = [budget_series(s, None if labels is None else labels[i]) for i, s in enumerate(sources)]
    extra = []
    if baseline is not None:
        points = [baseline] if isinstance(baseline, tuple) or (
            isinstance(baseline, list) and baseline and not isinstance(baseline[0], (tuple, list))) \
            else list(baseline)
        for p in points:
            p = tuple(p)
            extra.append((float(p[0]), float(p[1]), str(p[2]) if len(p) > 2 else "backbone"))
    all_macs = [m for s in series for m in s.budget_macs + s.anytime_macs + ([s.baseline[0]] if s.baseline
                                                                            else [])] + [p[0] for p in extra]
    div, unit_name = _mac_unit(all_macs, unit)

    fig = Figure(figsize=figsize)
    ax = fig.add_subplot(1, 1, 1)
    palette = [hex_color(c) for c in STEP_COLORS]
    for i, s in enumerate(series):
        color = palette[i % len(palette)]
        if s.budget_macs:
            order = np.argsort(s.budget_macs)
            ax.plot(np.asarray(s.budget_macs)[order] / div, np.asarray(s.budget_acc)[order], "-", color=color,
                    lw=2, label=f"{s.label}: budgeted")
        if s.anytime_macs:
            xs = np.asarray(s.anytime_macs) / div
            ax.plot(xs, s.anytime_acc, "o--", color=color, lw=1, ms=6, mfc="white", mew=1.5,
                    label=f"{s.label}: anytime (steps 1..{len(xs)})")
            for t, (x, y) in enumerate(zip(xs, s.anytime_acc)):
                ax.annotate(str(t + 1), (x, y), textcoords="offset points", xytext=(4, -11), fontsize=8,
                            color=color)
        if s.baseline is not None:
            ax.plot([s.baseline[0] / div], [s.baseline[1]], "*", color=color, ms=13, mec="black", mew=0.6,
                    label=f"{s.label}: backbone alone")
    for j, (macs, acc, name) in enumerate(extra):
        ax.plot([macs / div], [acc], "*", color=palette[(len(series) + j) % len(palette)], ms=13, mec="black",
                mew=0.6, label=name)
    ax.set_xlabel(f"Multiply-Adds per image ({unit_name})")
    ax.set_ylabel("Top-1 accuracy (%)")
    ax.set_title(title or "Accuracy vs. Multiply-Adds (budgeted batch classification)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, out_path, dpi)
    return series
