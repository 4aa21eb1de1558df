"""The one writer of every benchmark suite's results, and the environment stamp of a run.

A suite's ``run()`` returns a list of :class:`~gfnet.viz.bench_rows.Row` (the format is defined in
:mod:`gfnet.viz.bench_rows`, below both this writer and the chart that reads it); ``gfnet-bench`` stamps
the run with :func:`environment` and writes one file pair per suite with :func:`write_results`:

- ``<suite>_<device type>.json``: ``{"format": FORMAT, "suite", "env": {...}, "rows": [Row fields...]}``;
- ``<suite>_<device type>.md``: the same rows as a markdown table under the environment.

:func:`read_results` reads the JSON back into rows (``gfnet-viz bench`` draws from it).
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
from typing import Any, Optional, Sequence

from gfnet.checkpoint import replaceable_target
from gfnet.viz.bench_rows import FORMAT, Results, Row, read_results

__all__ = ["FORMAT", "Row", "Results", "environment", "git_describe", "check_writable", "result_paths",
           "write_results", "read_results", "markdown_table"]


def git_describe() -> str:
    """``git describe --always --dirty`` of the checkout this file lives in ("unknown" outside one)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device, note: Optional[str] = None) -> dict:
    """The stamp of a run: device name, versions, git revision, usable CPUs, load average, a free note.

    Args:
        device: a torch.device (or its string) the suite ran on.
        note: the machine's state in words (``"2-core CPU dev machine"``), stored as given.
    """
    import torch

    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device_name": name, "device_type": device.type, "cpus": cpus, "torch": torch.__version__,
            "triton": triton_version, "python": platform.python_version(), "git": git_describe(),
            "load_average": [round(v, 2) for v in os.getloadavg()], "note": note}


def check_writable(out_dir: str) -> None:
    """Create ``out_dir`` if needed and prove a file can be written there, before any measurement runs.

    Raises:
        PermissionError / OSError with a message naming the folder and what to do.
    """
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise type(e)(f"cannot write results to {out_dir} ({e.strerror or e}): pass a writable --out-dir") from e


def result_paths(out_dir: str, suite: str, device_type: str) -> dict:
    """{"json", "md", "png"}: where a suite's results on a device type go."""
    stem = os.path.join(out_dir, f"{suite}_{device_type}")
    return {"json": stem + ".json", "md": stem + ".md", "png": stem + ".png"}


def _atomic_write(path: str, text: str) -> None:
    # A reader (or a killed run) never sees half a file: write a temporary file beside it, then rename
    # (never over a named pipe or a device file that happens to have the name).
    replaceable_target(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                               suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fmt_seconds(t: float) -> str:
    if t >= 1.0:
        return f"{t:.3f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3f} ms"
    return f"{t * 1e6:.1f} us"


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def markdown_table(rows: Sequence[Row], extra_columns: Sequence[str] = ()) -> str:
    """The rows as a markdown table: the fixed fields, then the ``extra`` keys named in ``extra_columns``."""
    head = ["case", "provider", "dtype", "batch", "threads", "median", "IQR", "runs", "throughput",
            "vs baseline"] + list(extra_columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.case, r.provider + (" (baseline)" if r.is_baseline else ""), r.dtype, str(r.batch),
                 "" if r.threads is None else str(r.threads), _fmt_seconds(r.median_s), _fmt_seconds(r.iqr_s),
                 str(r.runs), f"{r.throughput:,.1f} {r.unit}", f"{r.ratio:.2f}x"]
        cells += [_fmt(r.extra.get(k)) for k in extra_columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(suite: str, env: dict, rows: Sequence[Row], extra_columns: Sequence[str], notes: str) -> str:
    e = env
    text = [f"# gfnet-bench {suite} ({e['device_type']})", "",
            f"Machine: {e['device_name']} ({e['cpus']} CPUs usable){'; ' + e['note'] if e.get('note') else ''}. "
            f"torch {e['torch']}, triton {e['triton']}, Python {e['python']}; git {e['git']}; "
            f"load average {e['load_average']} at the start, {e.get('load_average_end')} at the end.", ""]
    if notes:
        text += [notes.strip(), ""]
    text += ["Median and inter-quartile range of one call; vs baseline = the baseline's time / the row's "
             "(> 1: faster), the median of the per-round ratios where the providers took turns.", "",
             markdown_table(rows, extra_columns), ""]
    return "\n".join(text)


def write_results(out_dir: str, suite: str, env: dict, rows: Sequence[Row], extra_columns: Sequence[str] = (),
                  notes: str = "") -> dict:
    """Write ``<suite>_<device>.json`` and ``.md`` into ``out_dir``, each atomically; returns their paths.

    ``notes``: the suite's own words on how to read it (its module's ``NOTES``), put above the table.
    """
    if not rows:
        raise ValueError(f"suite {suite!r} produced no rows: nothing to write")
    os.makedirs(out_dir, exist_ok=True)
    paths = result_paths(out_dir, suite, env["device_type"])
    doc = {"format": FORMAT, "suite": suite, "env": env, "rows": [r.to_dict() for r in rows]}
    _atomic_write(paths["json"], json.dumps(doc, indent=1) + "\n")
    _atomic_write(paths["md"], _markdown(suite, env, rows, extra_columns, notes))
    return {"json": paths["json"], "md": paths["md"]}
