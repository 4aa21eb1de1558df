"""The rows ``gfnet-bench`` writes and ``gfnet-viz bench`` draws: one dataclass and its file format.

:class:`Row` is what every benchmark suite returns (bench/bench_*.py); the suites' writer
(:func:`gfnet.bench.rows.write_results`) stores them as ``{"format": FORMAT, "suite", "env", "rows"}`` and
:func:`read_results` reads them back. The format lives here, below both its writer (gfnet.bench) and its
reader (gfnet.viz.bench_charts) in the import layers, and imports nothing of gfnet.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["FORMAT", "Row", "Results", "read_results"]

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
        runs: timed blocks behind them (a block times one call, or averages several short ones).
        throughput, unit: items per second at the median (``images/s``, ``patches/s``).
        baseline: the provider of this case every row is compared with (the case's first, by
            convention); ratio: the row's speed-up over the baseline (> 1: faster; the median of the
            per-round ratios when the providers took turns), the baseline's own row 1.0.
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
