"""Benchmark charts: ``gfnet-bench`` results as a table and bars of each row's speed-up over its baseline.

The rows are :class:`gfnet.bench.rows.Row` as the suites write them (``<suite>_<device>.json``): the case,
provider, median and spread, throughput and the speed-up over the case's baseline come from the row's own
fields; nothing is guessed.
"""
from __future__ import annotations

import os
import re
from typing import List, Sequence, Union

import numpy as np

from gfnet.viz.bench_rows import Results, Row, read_results
from gfnet.viz.style import STEP_COLORS, PathLike, hex_color, save_figure

__all__ = ["read_rows", "plot_bench"]


def read_rows(sources: Union[PathLike, Results, Sequence[Union[PathLike, Results, Row]]]) -> List[Row]:
    """Rows from results files (:func:`gfnet.bench.rows.read_results`), :class:`Results`, or rows as is."""
    if isinstance(sources, (str, os.PathLike, Results)):
        sources = [sources]
    rows: List[Row] = []
    for src in sources:
        if isinstance(src, Row):
            rows.append(src)
        elif isinstance(src, Results):
            rows.extend(src.rows)
        else:
            rows.extend(read_results(os.fspath(src)).rows)
    return rows


def _fmt_time(t: float) -> str:
    for div, name in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if t >= div:
            return f"{t / div:.3g} {name}"
    return f"{t / 1e-9:.3g} ns"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_bench(sources, out_path: PathLike, dpi: int = 120) -> List[str]:
    """Benchmark rows as a table and a bar chart of speed-ups, one PNG per suite.

    Args:
        sources: a results JSON path, a list of paths, :class:`Results` or rows (see :func:`read_rows`).
        out_path: a folder (then ``<folder>/<suite>.png`` per suite), or a file name ``NAME.png``: one
            suite writes it as is, several write ``NAME_<suite>.png`` each.
    Returns:
        the paths written, in suite order.
    """
    from matplotlib.figure import Figure

    rows = read_rows(sources)
    if not rows:
        raise ValueError("no bench rows to plot")
    suites = list(dict.fromkeys(r.suite for r in rows))
    out_path = os.fspath(out_path)
    is_dir = os.path.isdir(out_path) or out_path.endswith(os.sep) or not os.path.splitext(out_path)[1]
    written = []
    for suite in suites:
        srows = [r for r in rows if r.suite == suite]
        if is_dir:
            path = os.path.join(out_path, f"{_safe(suite)}.png")
        elif len(suites) == 1:
            path = out_path
        else:
            root, ext = os.path.splitext(out_path)
            path = f"{root}_{_safe(suite)}{ext}"
        cells = [[r.case, r.provider + (" (baseline)" if r.is_baseline else ""), _fmt_time(r.median_s),
                  _fmt_time(r.iqr_s), f"{r.throughput:,.1f} {r.unit}", f"{r.ratio:.2f}x"] for r in srows]
        devices = sorted({r.device for r in srows})
        n = len(srows)
        fig = Figure(figsize=(9.0, 1.2 + 0.28 * n + 0.9 + 0.32 * n))
        gs = fig.add_gridspec(2, 1, height_ratios=[0.5 + 0.28 * n, 0.6 + 0.32 * n])
        ax_t = fig.add_subplot(gs[0])
        ax_t.axis("off")
        header = ["case", "provider", "median", "IQR", "throughput", "vs baseline"]
        chars = [max(len(str(row[j])) for row in cells + [header]) + 2 for j in range(len(header))]
        tbl = ax_t.table(cellText=cells, colLabels=header, cellLoc="left", colLoc="left",
                         colWidths=[c / sum(chars) for c in chars], bbox=[0, 0, 1, 1])
        tbl.auto_set_font_size(False)
        tbl.set_fontsize(8)
        ax_t.set_title(f"gfnet-bench: {suite} ({', '.join(devices)})", fontsize=10)
        ax_b = fig.add_subplot(gs[1])
        names = [f"{r.provider} | {r.case}" for r in srows]
        vals = [r.ratio for r in srows]
        providers = list(dict.fromkeys(r.provider for r in srows if not r.is_baseline))
        palette = [hex_color(c) for c in STEP_COLORS if c != (127, 127, 127)]  # grey marks the baselines
        colors = ["#7f7f7f" if r.is_baseline else palette[providers.index(r.provider) % len(palette)]
                  for r in srows]
        ypos = np.arange(n)[::-1]
        ax_b.barh(ypos, vals, color=colors)
        ax_b.set_yticks(ypos, names, fontsize=7)
        ax_b.axvline(1.0, color="black", lw=0.8, ls="--")
        for y, v in zip(ypos, vals):
            ax_b.text(v, y, f" {v:.2f}x", va="center", fontsize=7)
        ax_b.set_xlabel("speed-up over the case's baseline (x)")
        ax_b.set_xlim(0, max(vals + [1.0]) * 1.18)
        fig.tight_layout()
        box = ax_t.get_position()  # the table spans the figure's width, not just the bar chart's axes
        ax_t.set_position([0.02, box.y0, 0.96, box.height])
        written.append(save_figure(fig, path, dpi))
    return written
