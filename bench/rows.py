"""The one result format of every benchmark suite: :class:`Row`, the environment stamp, and the writer.

A suite's ``run()`` returns a list of :class:`Row`; ``gfnet-bench`` stamps the run with
:func:`environment` and writes one file pair per suite with :func:`write_results`:

- ``<suite>_<device type>.json``: ``{"format": FORMAT, "suite", "env": {...}, "rows": [Row fields...]}``;
- ``<suite>_<device type>.md``: the same rows as a markdown table under the environment.

:func:`read_results` reads the JSON back into rows (``gfnet-viz bench`` draws from it). Nothing here
imports torch at module level, so readers stay cheap.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

__all__ = ["FORMAT", "Row", "Results", "environment", "git_describe", "check_writable", "result_paths",
           "write_results", "read_results", "markdown_table"]

#: Written into every results file; :func:`read_results` refuses other formats by name.
FORMAT = "gfnet-bench/1"


@dataclass
class Row:
    """One measured (case, provider) pair.

    Attributes:
        suite: the suite's name (``kernels``, ``anytime``, ...).
        case: what is measured, in words (``focus_crop P=96 uint8 HWC``); rows of one case share one input.
        provider: who computes it (``reference loop``, ``gfnet (cpp)``, ...).
        device: the device type the row ran on (``cpu``, ``cuda``); the device's name is in the env stamp.
        dtype: the input/compute precision (``float32``, ``uint8 HWC``, ``bf16 autocast``).
        batch: images per call. threads: torch CPU threads during the measurement (None on a GPU).
        median_s, iqr_s: median and inter-quartile range of one call's wall time, in seconds.
        runs: timed calls behind them.
        throughput, unit: items per second at the median (``images/s``, ``patches/s``).
        baseline: the provider of this case every row is compared with (the case's first, by
            convention); ratio: its speed-up over the baseline (> 1: faster), the baseline's own row 1.0.
        extra: suite-specific numbers (bandwidth, Multiply-Adds ratios, ...), JSON-serialisable.
    """

    suite: str
    case: str
    provider: str
    device: str
    dtype: str
    batch: int
    threads: Optional[int]
    median_s: float
    iqr_s: float
    runs: int
    throughput: float
    unit: str
    baseline: str
    ratio: float
    extra: dict = field(default_factory=dict)

    @property
    def is_baseline(self) -> bool:
        return self.provider == self.baseline

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in names if n not in d and n != "extra")
        if missing:
            raise ValueError(f"a bench row lacks the field(s) {', '.join(missing)}")
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"a bench row has unknown field(s) {', '.join(unknown)}")
        return cls(**d)


@dataclass
class Results:
    """One results file: the suite, the environment stamp and the rows."""

    suite: str
    env: dict
    rows: list


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
    # A reader (or a killed run) never sees half a file: write a temporary file beside it, then rename.
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
             "(> 1: faster).", "", markdown_table(rows, extra_columns), ""]
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


def read_results(path: str) -> Results:
    """Read a results JSON written by :func:`write_results`.

    Raises:
        ValueError: the file is not a gfnet-bench results file of this format (says which it is).
    """
    with open(path) as fh:
        try:
            doc = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path} is not a {FORMAT} results file (format: {found!r}); rerun the suite with "
                         f"`gfnet-bench SUITE --out-dir DIR` to write one")
    try:
        rows = [Row.from_dict(r) for r in doc["rows"]]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    return Results(doc["suite"], doc["env"], rows)
