"""The demo over seeds and float roundings: does the method show every time, or only on one machine's luck?

    python -m gfnet.bench.demo_seeds --out bench/results/demo_seeds_cpu [--seeds 0 1 2 3 4] [--jobs 2]
        [--perturb-seeds 0] [--note "machine ..."]

Runs the full ``gfnet-demo`` (fp32, its defaults) once per seed, and, for ``--perturb-seeds``, again under
three perturbations that change the float rounding without changing the maths: 2 threads instead of 1
(OpenMP splits the reductions), channels-last encoders (other convolution kernels), and the plain-PyTorch
reference kernels of the glance and focus ops instead of gfnet's C++ ones. Each run is a subprocess writing
its own folder; ``--jobs`` run at a time (1 thread each, except the 2-thread variant). Writes
``OUT.json`` (every run's accuracies, verdict, timings and the machine) and ``OUT.md`` (the table README
quotes), atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

#: name -> (threads, DemoConfig overrides, ops backend or None): the perturbations of the float rounding.
VARIANTS = {
    "default": (1, {}, None),
    "2 threads": (2, {}, None),
    "channels-last": (1, {"channels_last": True}, None),
    "reference kernels": (1, {}, "torch"),
}


def _run_one(out: str, seed: int, variant: str) -> int:
    """One demo run in this process (the subprocess entry point)."""
    import contextlib
    import dataclasses

    from gfnet.demo import DemoConfig, run_demo
    from gfnet.ops import use_backend

    threads, overrides, backend = VARIANTS[variant]
    config = dataclasses.replace(DemoConfig(), seed=seed, **overrides)
    with use_backend(backend) if backend else contextlib.nullcontext():
        run_demo(out, config, progress=False, threads=threads)
    return 0


def cpu_name() -> str:
    """The CPU model and the flags that decide the float kernels (AVX2, AVX-512, bf16, AMX)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown CPU", "x86_64", ""):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"]
    shown = [f for f in wanted if f in flags]
    return f"{model} ({os.cpu_count()} cores; {', '.join(shown) or 'no AVX2'}"\
           f"{'; no AVX-512' if 'avx512f' not in flags else ''})"


def _write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _summary(run: dict) -> dict:
    with open(os.path.join(run["dir"], "results.json")) as f:
        r = json.load(f)
    base = r.get("baseline") or {}
    return {**{k: run[k] for k in ("seed", "variant", "returncode")},
            "learned": r["anytime_accuracy_learned_policy"], "random": r["anytime_accuracy_random_patches"],
            "T_steps_gain": r["claims"]["T_steps_gain_points"], "policy_gain": r["claims"]["policy_gain_points"],
            "verdict": r["verdict"], "baseline_acc": base.get("acc"), "seconds": r["seconds"],
            "cpu_seconds": r["cpu_seconds"], "threads": r["threads"]}


def markdown(rows: list, machine: str, note: str, revision: str) -> str:
    lines = [f"# gfnet-demo over seeds and float roundings ({machine})", "",
             f"Full-size demo, fp32, its defaults (`gfnet-demo --out DIR --seed S`); git {revision}. {note}".strip(),
             "Held-out top-1 (%) after each step (glance -> step 2 -> step 3) with the learned policy and with "
             "random patch positions; the demo counts the method as shown when step 3 beats the glance and the "
             "learned policy beats random patches by at least 10 points each.", "",
             "| seed | variant | learned policy | random patches | step 3 - glance | learned - random | verdict "
             "| full-res backbone | wall s |",
             "|---:|---|---|---|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['variant']} | {' -> '.join(f'{a:.1f}' for a in r['learned'])} | "
                     f"{' -> '.join(f'{a:.1f}' for a in r['random'])} | {r['T_steps_gain']:+.1f} | "
                     f"{r['policy_gain']:+.1f} | {r['verdict']} | "
                     f"{'' if r['baseline_acc'] is None else format(r['baseline_acc'], '.1f')} | {r['seconds']:.0f} |")
    gains = [r["T_steps_gain"] for r in rows]
    pgains = [r["policy_gain"] for r in rows]
    shown = sum(r["verdict"] == "shown" for r in rows)
    lines += ["", f"Shown in {shown} of {len(rows)} runs; step 3 - glance {min(gains):+.1f} to {max(gains):+.1f} "
                  f"points, learned - random {min(pgains):+.1f} to {max(pgains):+.1f} points."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gfnet.bench.demo_seeds", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="OUT.json and OUT.md are written (e.g. bench/results/demo_seeds_cpu)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--perturb-seeds", type=int, nargs="*", default=[0],
                   help="seeds also run under the perturbations (2 threads, channels-last, reference kernels)")
    p.add_argument("--jobs", type=int, default=2, help="demo runs at a time")
    p.add_argument("--work", default=None, help="folder for the runs' demo folders (default: a temporary one)")
    p.add_argument("--note", default="")
    p.add_argument("--one", nargs=3, metavar=("DIR", "SEED", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        return _run_one(args.one[0], int(args.one[1]), args.one[2])
    if not args.out:
        p.error("--out is required")
    work = args.work or tempfile.mkdtemp(prefix="gfnet-demo-seeds-")
    os.makedirs(work, exist_ok=True)
    try:  # the code measured: taken now, before the runs (the tree may change while they run)
        revision = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                  cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        revision = "unknown"
    plan = [(s, "default") for s in args.seeds]
    plan += [(s, v) for s in args.perturb_seeds for v in VARIANTS if v != "default"]
    pending, running, done = list(plan), [], []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed, variant = pending.pop(0)
            folder = os.path.join(work, f"seed{seed}-{variant.replace(' ', '-')}")
            log = open(folder + ".log", "w")
            proc = subprocess.Popen([sys.executable, "-m", "gfnet.bench.demo_seeds", "--one", folder, str(seed),
                                     variant], stdout=log, stderr=subprocess.STDOUT)
            running.append({"proc": proc, "log": log, "seed": seed, "variant": variant, "dir": folder})
        time.sleep(2)
        for run in list(running):
            if run["proc"].poll() is not None:
                run["log"].close()
                run["returncode"] = run["proc"].returncode
                running.remove(run)
                if run["returncode"] != 0:
                    print(f"seed {run['seed']} {run['variant']}: failed (exit {run['returncode']}), see "
                          f"{run['dir']}.log", file=sys.stderr)
                    continue
                done.append(_summary(run))
                print(f"seed {run['seed']} {run['variant']}: {done[-1]['verdict']}", flush=True)
    order = {(s, v): i for i, (s, v) in enumerate(plan)}
    done.sort(key=lambda r: order[(r["seed"], r["variant"])])
    import torch

    machine = cpu_name()
    payload = {"format": "gfnet-demo-seeds/1", "machine": machine, "torch": torch.__version__,
               "python": platform.python_version(), "git": revision, "note": args.note, "runs": done}
    _write_atomic(args.out + ".json", json.dumps(payload, indent=1) + "\n")
    _write_atomic(args.out + ".md", markdown(done, machine, args.note, revision))
    print(f"{args.out}.md, {args.out}.json")
    return 0 if len(done) == len(plan) else 1


if __name__ == "__main__":
    sys.exit(main())
