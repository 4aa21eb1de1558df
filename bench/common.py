"""What every benchmark suite shares: the environment stamp of a result row and a timer."""
from __future__ import annotations

import platform
import statistics
import subprocess
import time
from typing import Callable, Optional

import torch

__all__ = ["environment", "resolve_device", "time_call"]


def resolve_device(device: Optional[str] = None) -> torch.device:
    """The device to measure on: the one asked for, else CUDA when present, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=__file__.rsplit("/", 1)[0]).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    """Device name, library versions, thread count and git revision: stamped on every result row."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"
    return {"device": name, "device_type": device.type, "torch": torch.__version__,
            "python": platform.python_version(), "git": _git_revision()}


def time_call(fn: Callable[[], object], device: torch.device, min_time: float = 1.0,
              min_runs: int = 3, warmup: int = 1) -> dict:
    """Median and spread (inter-quartile range) of ``fn()``'s wall time, in seconds.

    CUDA work is synchronised around every call so that the time is the device's, not the launch's.
    """
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "iqr_s": q[2] - q[0], "runs": len(times)}


def write_outputs(rows: list, table: str, json_path: Optional[str] = None, md_path: Optional[str] = None) -> None:
    """Print a suite's table and write its rows (JSON) and table (markdown) where asked."""
    import json

    print(table)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(rows, fh, indent=1)
    if md_path:
        with open(md_path, "w") as fh:
            fh.write(table)
