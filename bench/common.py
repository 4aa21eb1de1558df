"""The one timing harness of every benchmark suite, and the checks that run before it.

- :func:`measure`: median and inter-quartile range of each provider's call, timed with
  ``torch.utils.benchmark.Timer.blocked_autorange`` (which warms up, picks a block size so that timer
  overhead is negligible, and synchronises the accelerator around every block), in ``rounds``
  interleaved rounds: a shared machine's slow spell then hits every provider alike, and
  :func:`paired_ratios` compares providers round by round.
- :func:`make_rows`: the :class:`~gfnet.bench.rows.Row` of each provider of one case.
- :func:`check_close` / :class:`OutputMismatch`: every suite compares each provider's output with its
  baseline's *before* timing; a benchmark of a wrong answer is worthless.
- :func:`use_threads`: the ``--threads`` of every suite (torch's CPU thread pool, restored afterwards).
- :func:`cold_compile_cache`: the compiled modes' compilation timed from a cold cache.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

import torch
import torch.utils.benchmark as benchmark

from gfnet.bench.rows import Row

__all__ = ["Timing", "OutputMismatch", "resolve_device", "use_threads", "cold_compile_cache", "device_clock", "measure",
           "paired_ratios", "make_rows", "check_close"]


class OutputMismatch(AssertionError):
    """A provider's output differs from its baseline's beyond the suite's stated tolerance."""


@dataclass
class Timing:
    """One provider's measurement.

    median_s, iqr_s: of one call over all rounds (seconds). runs: timed blocks (a block averages
    ``number`` calls when one call is shorter than the timer can resolve well). round_medians: the
    median of each round, for paired comparisons. times: every block's per-call time.
    """

    median_s: float
    iqr_s: float
    runs: int
    round_medians: list
    times: list


def resolve_device(device=None) -> torch.device:
    """The device to measure on: the one asked for (checked), else CUDA when present, else the CPU
    (:func:`gfnet.device.resolve_device`, the one definition)."""
    from gfnet.device import resolve_device as resolve

    return resolve(device)


@contextlib.contextmanager
def use_threads(threads: Optional[int]) -> Iterator[int]:
    """Run the block with ``threads`` torch CPU threads (None: leave torch's setting); yields the count."""
    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def cold_compile_cache(enabled: bool = True) -> Iterator[None]:
    """Run the block with torch.compile's on-disk caches (inductor's compiled graphs and kernels) in a fresh
    temporary directory, removed afterwards: a suite's compile_s is then what a first run pays, not a hit of
    an earlier benchmark's cache. Also forgets dynamo's in-memory graphs of earlier suites."""
    if not enabled:
        yield
        return
    import torch._inductor.utils as inductor_utils

    fresh = getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache
    torch._dynamo.reset()
    with fresh():
        yield


def device_clock(device=None) -> Callable[[], float]:
    """The clock of a timed block on ``device``: ``time.perf_counter`` read after the device's queued work has
    finished, on a GPU (``torch.cuda.synchronize(device)``: the device measured, not the current one, so that
    ``--device cuda:1`` times kernels rather than their launches); the plain clock elsewhere."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return clock


def measure(fns: Mapping[str, Callable[[], object]], min_run_time: float, rounds: int = 1, device=None) -> dict:
    """Time each provider's call with ``torch.utils.benchmark.Timer.blocked_autorange``.

    Args:
        fns: provider name -> a callable doing one call (the same work for every provider).
        min_run_time: seconds of timed calls per provider and round (0: one warm-up and one timed call,
            for calls that take seconds).
        rounds: the providers take turns ``rounds`` times (round-robin), each turn a blocked_autorange.
        device: the device the calls compute on; each timed block starts and ends with its queued work done
            (:func:`device_clock`).
    Returns:
        provider -> :class:`Timing`.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    threads = torch.get_num_threads()
    clock = device_clock(device)
    timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=name, num_threads=threads, timer=clock)
              for name, fn in fns.items()}
    per_round: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, timer in timers.items():
            per_round[name].append(timer.blocked_autorange(min_run_time=min_run_time))
    out = {}
    for name, measurements in per_round.items():
        (merged,) = benchmark.Measurement.merge(measurements)
        out[name] = Timing(merged.median, merged.iqr, len(merged.times), [m.median for m in measurements],
                           list(merged.times))
    return out


def paired_ratios(timings: Mapping[str, Timing], baseline: str) -> dict:
    """provider -> speed-up over ``baseline``: the median over rounds of (baseline's round median /
    the provider's round median). Pairing by round cancels a load swing that spans one round."""
    base = timings[baseline].round_medians
    return {name: statistics.median(b / t for b, t in zip(base, timing.round_medians))
            for name, timing in timings.items()}


def make_rows(suite: str, case: str, timings: Mapping[str, Timing], baseline: str, *, device: torch.device,
              dtype: str, batch: int, items: int, unit: str, extra: Optional[Mapping[str, dict]] = None,
              providers: Optional[Mapping[str, str]] = None) -> list:
    """The rows of one case, in the providers' order.

    Args:
        items: work items per call (images, patches) for the throughput ``items / median_s`` in ``unit``.
        extra: provider -> suite-specific fields. providers: provider -> the name to show (default: itself).
    """
    ratios = paired_ratios(timings, baseline)
    shown = providers or {}
    threads = torch.get_num_threads() if device.type == "cpu" else None
    return [Row(suite=suite, case=case, provider=shown.get(name, name), device=device.type, dtype=dtype,
                batch=batch, threads=threads, median_s=t.median_s, iqr_s=t.iqr_s, runs=t.runs,
                throughput=items / t.median_s, unit=unit, baseline=shown.get(baseline, baseline),
                ratio=ratios[name], extra=dict((extra or {}).get(name, {})))
            for name, t in timings.items()]


def check_close(what: str, out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float = 0.0,
                why: str = "") -> float:
    """Raise :class:`OutputMismatch` unless ``|out - ref| <= atol + rtol * |ref|`` everywhere.

    Args:
        what: "provider X against baseline Y on case Z", for the message. why: the tolerance's reason.
    Returns:
        the largest absolute difference (for the record).
    """
    if out.shape != ref.shape:
        raise OutputMismatch(f"{what}: shape {tuple(out.shape)} against {tuple(ref.shape)}")
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    diff = (out - ref).abs()
    bad = diff > atol + rtol * ref.abs()
    if bool(bad.any()):
        raise OutputMismatch(f"{what}: {int(bad.sum())} of {bad.numel()} values differ beyond atol={atol:g}, "
                             f"rtol={rtol:g} (largest difference {float(diff.max()):.3g}){'; ' + why if why else ''}")
    return float(diff.max()) if diff.numel() else 0.0
