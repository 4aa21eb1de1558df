"""``gfnet-demo --out DIR``: GFNet learns to look at the right place, on the CPU, in minutes.

Builds the cluttered-digits task from scikit-learn's handwritten digits, trains a small backbone through
the three stages, evaluates anytime and budgeted accuracy and the learned policy against random patch
positions, and writes a report folder (logic: :mod:`gfnet.demo`).

Exit status: 0 when the run shows the method (step T beats the glance and the learned policy beats random
patches, each by the configured margin), 3 when it finished without showing it (said on stderr and in
results.json's ``verdict``), 2 for bad arguments, 1 for a failure at run time.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Optional, Sequence

from gfnet.cli._errors import UsageError, nonnegative_int, prepare_output_dir, run_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gfnet-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="report folder (checkpoint, results.json, figures, logs)")
    p.add_argument("--quick", action="store_true", help="a toy-sized run of the same pipeline (< 1 minute)")
    p.add_argument("--threads", type=nonnegative_int, default=1,
                   help="torch CPU threads (default 1: the demo's tiny convolutions are bound by per-op "
                        "overhead, and one thread avoids OpenMP's spinning barriers, which slow two threads "
                        "down several-fold on a busy machine; 0 = torch's choice)")
    p.add_argument("--seed", type=int, help="seed of the task and the training")
    p.add_argument("--amp", choices=("none", "bf16"), default="none",
                   help="precision of training and evaluation: none = fp32 (default; the numbers README quotes), "
                        "bf16 = bf16 autocast throughout (faster on CPUs with native bf16 units; its measured "
                        "accuracy effect: bench/results/demo_bf16_cpu.md)")
    p.add_argument("--latency", choices=("auto", "eager", "none"), default="auto",
                   help="the accuracy-against-latency figure (batch 1, 1 thread): auto = eager PyTorch and, where "
                        "gfnet[deploy] is installed, ONNX Runtime (default); eager = eager PyTorch only; none = skip")
    p.add_argument("--overwrite", action="store_true",
                   help="let this run replace what --out holds (by default a folder that is not empty is refused, "
                        "so that an earlier demo's results are never lost)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


#: Exit status of a run that finished but did not show the method (results.json: "verdict": "not shown").
NOT_SHOWN = 3


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("gfnet-demo", lambda: _demo(args))


def _demo(args) -> int:
    from gfnet.demo import QUICK, DemoConfig, run_demo

    prepare_output_dir(args.out)
    held = sorted(os.listdir(args.out))
    if held and not args.overwrite:
        raise UsageError(f"--out {args.out} is not empty ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}): "
                         "choose a new folder, or pass --overwrite to replace an earlier demo there")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.INFO)
    for name in ("onnxscript", "onnx_ir", "torch.onnx"):  # the latency figure's ONNX export narrates every pass
        logging.getLogger(name).setLevel(logging.WARNING)
    config = QUICK if args.quick else DemoConfig()
    if args.seed is not None:
        config = dataclasses.replace(config, seed=args.seed)
    results = run_demo(args.out, config, progress=not args.no_progress, threads=args.threads or None, amp=args.amp,
                       latency=args.latency)
    learned, rand = results["anytime_accuracy_learned_policy"], results["anytime_accuracy_random_patches"]
    print(f"\nGFNet demo ({config.arch}, P={config.patch_size}, T={config.T}, {config.canvas}px canvases), "
          f"held-out digits, {results['seconds']:.0f} s wall, {results['cpu_seconds']:.0f} CPU-s on "
          f"{results['threads']} thread(s), {results['precision']}:")
    print("  anytime accuracy, learned policy:  " + " -> ".join(f"{a:.1f}%" for a in learned))
    print("  anytime accuracy, random patches:  " + " -> ".join(f"{a:.1f}%" for a in rand))
    claims = results["claims"]
    print(f"  accuracy after T steps vs the glance:         {claims['accuracy_after_T_steps_vs_glance']}")
    print(f"  learned policy vs random patches at step T:  {claims['learned_policy_vs_random_patches_at_T']}")
    if results.get("baseline"):
        b = results["baseline"]
        print(f"  {config.arch} alone at full resolution:         {b['acc']:.1f}% at {b['macs'] / 1e6:.1f} MMACs "
              f"(GFNet, all {config.T} steps: {results['flops'][-1] / 1e6:.1f} MMACs)")
    lat = results.get("latency") or {}
    if lat.get("sentence"):
        print(f"  latency (batch 1, 1 thread, {lat['images']} held-out canvases, {lat['fastest_runtime']}): "
              f"{lat['sentence']}")
    if lat.get("skipped"):
        print(f"  latency: {lat['skipped']}")
    print(f"report: {args.out} (results.json, {', '.join(results['figures']) or 'no figures'})")
    if results["verdict"] == "shown":
        print(f"method shown: both gains are at least {claims['min_gain_points']:g} points")
        return 0
    print(f"gfnet-demo: warning: method NOT shown: each gain must be at least {claims['min_gain_points']:g} points "
          f"(results.json verdict 'not shown'); exit status {NOT_SHOWN}", file=sys.stderr)
    return NOT_SHOWN


if __name__ == "__main__":
    sys.exit(main())
