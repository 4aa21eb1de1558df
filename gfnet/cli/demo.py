"""``gfnet-demo --out DIR``: GFNet learns to look at the right place, on the CPU, in minutes.

Builds the cluttered-digits task from scikit-learn's handwritten digits, trains a small backbone through
the three stages, evaluates anytime and budgeted accuracy and the learned policy against random patch
positions, and writes a report folder (logic: :mod:`gfnet.demo`).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Optional, Sequence

from gfnet.cli._errors import nonnegative_int, prepare_output_dir, run_command

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
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("gfnet-demo", lambda: _demo(args))


def _demo(args) -> int:
    from gfnet.demo import QUICK, DemoConfig, run_demo

    prepare_output_dir(args.out)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.INFO)
    config = QUICK if args.quick else DemoConfig()
    if args.seed is not None:
        config = dataclasses.replace(config, seed=args.seed)
    results = run_demo(args.out, config, progress=not args.no_progress, threads=args.threads or None, amp=args.amp)
    learned, rand = results["anytime_accuracy_learned_policy"], results["anytime_accuracy_random_patches"]
    print(f"\nGFNet demo ({config.arch}, P={config.patch_size}, T={config.T}, {config.canvas}px canvases), "
          f"held-out digits, {results['seconds']:.0f} s wall, {results['cpu_seconds']:.0f} CPU-s on "
          f"{results['threads']} thread(s), {results['precision']}:")
    print("  anytime accuracy, learned policy:  " + " -> ".join(f"{a:.1f}%" for a in learned))
    print("  anytime accuracy, random patches:  " + " -> ".join(f"{a:.1f}%" for a in rand))
    for name, claim in results["claims"].items():
        print(f"  {name}: {claim}")
    print(f"report: {args.out} (results.json, {', '.join(results['figures']) or 'no figures'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
