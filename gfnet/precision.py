"""Precision: the names gfnet accepts for a compute dtype, and the autocast context of each.

One table for every entry point (anytime and budgeted inference, training, benchmarks, the CLIs)."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional, Union

import torch

__all__ = ["AMP_DTYPES", "amp_dtype", "autocast", "default_amp", "native_bf16_cuda", "native_bf16_cpu_feature",
           "bf16_offer", "measure_bf16_slowdown", "emulated_bf16_note"]

#: The precisions a user names: gfnet-train --amp ("auto": the device's default, :func:`default_amp`) and
#: gfnet-demo --amp (its subset ``DEMO_AMP``); gfnet-eval --dtype takes the names of :data:`AMP_DTYPES`.
AMP_MODES = ("auto", "none", "bf16", "fp16")

# name -> the autocast dtype (None: no autocast, fp32)
AMP_DTYPES = {"fp32": None, "float32": None, "none": None, None: None, torch.float32: None,
              "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, torch.bfloat16: torch.bfloat16,
              "fp16": torch.float16, "float16": torch.float16, torch.float16: torch.float16}


def amp_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """The autocast dtype of ``dtype`` ("fp32"/None, "bf16", "fp16" or a torch dtype); None for fp32."""
    try:
        return AMP_DTYPES[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"dtype must be one of None, 'fp32', 'bf16', 'fp16' (or torch.float32/bfloat16/float16); "
                         f"got {dtype!r}") from None


def autocast(device: Union[torch.device, str], dtype, cache_enabled: bool = False):
    """torch.autocast for ``dtype`` on ``device``'s type, or a null context for fp32.

    The weight-cast cache is off by default, and inference (anytime, budgeted: eager steps, warm-up and
    CUDA-graph capture alike) always runs with this one autocast state: a capture must run with the cache off
    (a cast cached inside the graph's memory pool would outlive it), and a compiled model's guards see the
    autocast state, so a different one between eager calls and the capture recompiles inside the capture,
    which then fails. Inference casts each weight once per step, so the cache saves nothing there; training
    (several forward passes per step over the same weights) keeps its own autocast with the cache on.
    """
    amp = amp_dtype(dtype)
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=amp, cache_enabled=cache_enabled)


def native_bf16_cuda(device: Union[torch.device, str]) -> bool:
    """Whether the CUDA GPU ``device`` computes bf16 natively: compute capability 8.0 (Ampere) and newer.
    ``torch.cuda.is_bf16_supported()`` is no answer: it also counts the emulation that older cards run (far
    slower than their fp16). On ROCm, torch's own answer."""
    if torch.version.hip:
        return bool(torch.cuda.is_bf16_supported())
    major, _ = torch.cuda.get_device_capability(torch.device(device))
    return major >= 8


def default_amp(device: Union[torch.device, str]) -> str:
    """The mixed precision users expect on ``device`` when they ask for one without naming it: bf16 on GPUs
    that compute it natively (Ampere and newer) and on CPUs, fp16 on older GPUs."""
    device = torch.device(device)
    if device.type == "cuda" and not native_bf16_cuda(device):
        return "fp16"
    return "bf16"


def native_bf16_cpu_feature() -> Optional[str]:
    """The name of this CPU's native bf16 unit ("amx" for Intel AMX tiles, "avx512_bf16"), or None where it
    has none (bf16 autocast then emulates bf16 arithmetic and is usually slower than fp32).

    Asks torch's own probes (the ones oneDNN dispatches on); each is looked up with hasattr, so a torch
    without a probe reports that feature absent rather than failing."""
    probes = (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    for name, probe in probes:
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return name
    return None


#: The results files the offer quotes, under the benchmark suites' ``results`` folder (bench/results in a
#: source checkout): the speed of bf16 autocast against fp32 (ResNet-50 GFNet anytime inference, eager and
#: compiled, channels-last) and the demo's accuracy trained and evaluated in each precision.
BF16_SPEED_FILE, BF16_ACCURACY_FILE = "anytime_compile_cpu.json", "demo_bf16_cpu.json"


def _results_dir() -> Optional[str]:
    """bench/results of this installation (``gfnet.bench``'s folder), found without importing the suites."""
    import importlib.util
    import os

    try:
        spec = importlib.util.find_spec("gfnet.bench")
    except (ImportError, ValueError):
        return None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    return next((os.path.join(f, "results") for f in folders if os.path.isdir(os.path.join(f, "results"))), None)


def _read_results(name: str) -> Optional[dict]:
    import json
    import os

    folder = _results_dir()
    if folder is None:
        return None
    try:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def measured_bf16_figures() -> list:
    """What the bf16 offer quotes, read now from the results files (so a rerun benchmark is what is quoted):
    phrases such as "1.61x eager (fp32 0.533 s -> bf16 0.331 s per batch)" and the demo's mean accuracy per
    precision, each with the machine and file it comes from; [] where the files are absent or unreadable
    (an installed wheel has no bench/results)."""
    quotes = []
    speed = _read_results(BF16_SPEED_FILE)
    try:
        rows = {r["provider"]: r["median_s"] for r in speed["rows"]}
        pairs = [(how, rows[f"gfnet{c} (fp32, channels-last)"], rows[f"gfnet{c} (bf16 autocast, channels-last)"])
                 for how, c in (("eager", ""), ("compiled", " compiled")) if f"gfnet{c} (fp32, channels-last)" in rows]
        if pairs:
            case = speed["rows"][0]["case"]
            machine = speed["env"].get("device_name", "?")
            quotes.append(", ".join(f"{fp32 / bf16:.2f}x {how}" for how, fp32, bf16 in pairs)
                          + f" over fp32 ({case}, channels-last, on {machine}; bench/results/{BF16_SPEED_FILE})")
    except (TypeError, KeyError, IndexError, ZeroDivisionError):
        pass
    acc = _read_results(BF16_ACCURACY_FILE)
    try:
        by = {}
        for run in acc["runs"]:
            by.setdefault(run["train_and_eval"], []).append(float(run["anytime_accuracy_learned"][-1]))
        if by:
            means = ", ".join(f"{k} {sum(v) / len(v):.1f}% ({len(v)} run{'s' * (len(v) > 1)})" for k, v in by.items())
            quotes.append(f"gfnet-demo accuracy after the last step: {means} (git {acc.get('git', '?')}; "
                          f"bench/results/{BF16_ACCURACY_FILE})")
    except (TypeError, KeyError, IndexError, ValueError):
        pass
    return quotes


def bf16_offer(device: Union[torch.device, str, None], amp: Optional[str], option: str = "--amp bf16") -> Optional[str]:
    """The one line that the commands print when a run that could use this CPU's native bf16 units will run
    in fp32 because the user named no precision; None when there is nothing to offer.

    Args:
        device: where the run computes (None: the CPU).
        amp: the precision as the user gave it: "auto" or None (not chosen; fp32 on the CPU) offers bf16;
            an explicit choice ("none", "fp32", "bf16", "fp16") is respected silently.
        option: the command's way to ask for bf16 ("--amp bf16" in gfnet-train, "--dtype bf16" in gfnet-eval).
    Returns:
        The note, or None. bf16 is offered, never switched on: it changes the numbers a run produces. The
        figures it quotes are read from the results files when they are there (:func:`measured_bf16_figures`).
    """
    if amp not in ("auto", None):
        return None
    if torch.device(device if device is not None else "cpu").type != "cpu":
        return None
    feature = native_bf16_cpu_feature()
    if feature is None:
        return None
    figures = measured_bf16_figures()
    measured = ("; measured: " + "; ".join(figures)) if figures else \
        "; it changes the numbers a run produces (gfnet-bench anytime --compile measures its speed here)"
    return f"note: this CPU has native bf16 units ({feature}) and this run computes in fp32; {option} is available" \
        + measured


_BF16_NAMES = ("bf16", "bfloat16", torch.bfloat16)


def measure_bf16_slowdown(run: Callable[[], object], repeats: int = 2) -> float:
    """How many times slower ``run()`` is under CPU bf16 autocast than in fp32, measured now: the fastest of
    ``repeats`` timed calls in each precision, each after one untimed call (oneDNN builds its kernels then)."""
    best = {}
    for amp in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            run()
            times = []
            for _ in range(max(1, repeats)):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
        best[amp] = min(times)
    return best[True] / max(best[False], 1e-9)


def emulated_bf16_note(device: Union[torch.device, str, None], amp, option: str,
                       make_run: Callable[[], Callable[[], object]], what: str) -> Optional[str]:
    """The one line that the commands print, before the work starts, when a run asks for bf16 on a CPU without
    native bf16 units (where autocast emulates bf16, slower than fp32); None otherwise.

    Args:
        device: where the run computes (None: the CPU). amp: the precision as the user gave it.
        option: how the user asked ("--amp bf16", "--dtype bf16"), to say what to drop.
        make_run: builds (only where the note applies) one call of the run's kind of work, e.g. a glance step
            of its network at batch 1, which :func:`measure_bf16_slowdown` times in fp32 and under bf16 autocast.
        what: that work in words, for the note ("a training step of resnet50's glance at batch 1").
    Returns:
        The note with the factor measured just now on this machine, or None.
    """
    if amp not in _BF16_NAMES or torch.device(device if device is not None else "cpu").type != "cpu":
        return None
    if native_bf16_cpu_feature() is not None:
        return None
    factor = measure_bf16_slowdown(make_run(), repeats=1)
    return (f"note: this CPU has no native bf16 units (neither AVX512-BF16 nor AMX), so {option} emulates bf16 "
            f"and runs slower than fp32 here: measured just now, {what} took {factor:.1f}x its fp32 time under "
            f"bf16 autocast; leave out {option} for fp32 speed")
