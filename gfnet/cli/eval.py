"""`gfnet-eval`: the reference inference.py's eval modes, and real early exit.

    gfnet-eval --checkpoint PATH --eval-mode 0
    gfnet-eval --checkpoint PATH --eval-mode 1 --data ROOT [--real-exit] [--write]
    gfnet-eval --checkpoint PATH --eval-mode 2 --data ROOT [--train-subset N] [--real-exit] [--write]
    gfnet-eval --package DIR --eval-mode {0,1,2} [--data ROOT] [--threads N] [--real-exit]

Mode 0 prints what the checkpoint stores; mode 1 evaluates its stored thresholds on ROOT/val; mode 2 fits
the thresholds on a random subset of ROOT/train first. The logic is gfnet.evaluation.evaluate_checkpoint.
With --package, a deployment package (gfnet-export) is evaluated the same way, every image through its
runtime (ONNX Runtime or ExecuTorch): gfnet.evaluation.evaluate_package.

Under torchrun the same command runs on every process and node, each reading its shard:

    torchrun --nproc-per-node K -m gfnet.cli.eval --checkpoint PATH --eval-mode 2 --data ROOT --device cuda

rank 0 gathers the outputs in dataset order, fits the thresholds, prints and writes; the numbers equal
one process's. --batch-size is per process.

--write is off by default: an evaluation should not silently change a released checkpoint's published
numbers (for instance after evaluating on a subset or another dataset); ask for it explicitly. The file
is then replaced atomically (temporary file + os.replace); whether it can be is checked before any work,
a symbolic link is written through (the link stays) and the file keeps its permissions.
Errors: one line on stderr, exit status 2 for bad arguments or input, 1 for failures at run time.
"""
from __future__ import annotations

import argparse
import os
import sys

from gfnet.cli._errors import (
    UsageError,
    check_writable_file,
    nonnegative_int,
    parse_device,
    positive_int,
    run_command,
)
from gfnet.device import gpu_settings
from gfnet.evaluation import DEFAULT_REAL_EXIT_POINTS, DEFAULT_TRAIN_SUBSET, evaluate_checkpoint


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gfnet-eval", description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a .pth.tar checkpoint (gfnet's or the reference's, release or "
                        "train.py layout)")
    source.add_argument("--package", help="a deployment package folder (gfnet-export): evaluated in its runtime")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="--package: the runtime's intra-op threads (default: the runtime's own)")
    p.add_argument("--arch", default=None, help="backbone, for files that do not name it (the reference train.py's)")
    p.add_argument("--patch-size", type=int, default=None, help="patch size, for files that do not store it")
    p.add_argument("--T", type=int, default=None, help="sequence length, for files that do not store it")
    p.add_argument("--eval-mode", type=int, choices=(0, 1, 2), required=True,
                   help="0: print stored results; 1: stored thresholds on ROOT/val; "
                        "2: fit thresholds on a training subset, then evaluate on ROOT/val")
    p.add_argument("--data", default=None, help="ImageNet-layout root holding train/ and val/ (modes 1, 2)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch, per process")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:<k> (default: cpu; under torchrun 'cuda' is "
                   "each process's own GPU)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="autocast dtype (default fp32)")
    p.add_argument("--tf32", action="store_true",
                   help="on a GPU, let float32 matrix products and convolutions use TF32 tensor cores (faster, ~10 "
                        "mantissa bits; the reference's numbers were computed without). Default: full float32")
    p.add_argument("--compile", action="store_true",
                   help="compile the encoders with torch.compile (the first batches take longer while they compile)")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last encoders: 1.2-1.5x faster convolutions on CPUs with oneDNN and on GPUs, with "
                        "float-rounding differences from the reference's numbers (off by default for that reason)")
    p.add_argument("--train-subset", type=positive_int, default=None,
                   help=f"training images to fit thresholds on (mode 2; default min(len, {DEFAULT_TRAIN_SUBSET}))")
    p.add_argument("--seed", type=int, default=0, help="seed of the random training subset")
    p.add_argument("--real-exit", action="store_true",
                   help="also run real early exit (budgeted_predict) at a few budgets and report images/s")
    p.add_argument("--real-exit-points", type=int, nargs="+", default=list(DEFAULT_REAL_EXIT_POINTS),
                   help="budget points p (q = p/20, 1..39) that --real-exit measures")
    p.add_argument("--backend", choices=("dali", "torchvision"), default="dali", help="data pipeline")
    p.add_argument("--num-threads", type=nonnegative_int, default=None, help="data pipeline threads / workers")
    p.add_argument("--write", action="store_true",
                   help="store anytime_classification, budgeted_batch_classification (and in mode 2 "
                        "dynamic_threshold) into the checkpoint, atomically (off by default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command("gfnet-eval", lambda: _evaluate(args))


def _evaluate(args) -> int:
    if args.eval_mode in (1, 2) and args.data is None:
        raise ValueError(f"--eval-mode {args.eval_mode} needs --data ROOT")
    if args.package is not None:
        return _evaluate_package(args)
    if args.threads is not None:
        raise UsageError("--threads sets a deployment package's runtime threads: it goes with --package")
    parse_device(args.device)
    from gfnet.budget import BUDGET_POINTS

    outside = [p for p in args.real_exit_points if not 1 <= p <= BUDGET_POINTS]
    if args.real_exit and outside:
        raise ValueError(f"--real-exit-points must be in 1..{BUDGET_POINTS}, got {outside}")
    if args.write:
        if args.eval_mode == 0:
            raise ValueError("--write stores the results of eval modes 1 and 2; mode 0 computes none")
        check_writable_file(args.checkpoint, "checkpoint")  # before the work, not after it
    if args.eval_mode != 0:  # mode 0 computes nothing
        from gfnet.cli._notes import print_precision_notes

        print_precision_notes(args.device or "cpu", args.dtype, "--dtype bf16", args.arch, args.patch_size,
                              training=False)
    ctx = None
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.eval_mode != 0:  # launched by torchrun
            from gfnet.train.distributed import init_distributed

            ctx = init_distributed(args.device or "cpu")
        with gpu_settings(tf32=args.tf32, cudnn_benchmark=True):  # this run's, restored afterwards
            evaluate_checkpoint(args.checkpoint, args.eval_mode, data=args.data, batch_size=args.batch_size,
                                device=ctx.device if ctx is not None else args.device, dtype=args.dtype,
                                train_subset=args.train_subset, real_exit=args.real_exit, backend=args.backend,
                                write=args.write, seed=args.seed, real_exit_points=args.real_exit_points,
                                num_threads=args.num_threads, arch=args.arch, patch_size=args.patch_size, T=args.T,
                                ctx=ctx, log=print if int(os.environ.get("RANK", "0")) == 0 else None,
                                compile=args.compile, channels_last=args.channels_last)
    finally:
        if ctx is not None:
            ctx.close()
    return 0


def _evaluate_package(args) -> int:
    refused = [flag for flag, given in (("--write", args.write), ("--compile", args.compile),
                                        ("--channels-last", args.channels_last), ("--dtype", args.dtype is not None),
                                        ("--device", args.device not in (None, "cpu")), ("--arch", args.arch),
                                        ("--patch-size", args.patch_size), ("--T", args.T)) if given]
    if refused:
        raise UsageError(f"{', '.join(refused)} apply to checkpoints; a package runs as it was exported (its runtime "
                         "on the CPU, its manifest's model)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--package runs in one process; start it without torchrun")
    from gfnet.budget import BUDGET_POINTS
    from gfnet.evaluation import evaluate_package

    outside = [p for p in args.real_exit_points if not 1 <= p <= BUDGET_POINTS]
    if args.real_exit and outside:
        raise ValueError(f"--real-exit-points must be in 1..{BUDGET_POINTS}, got {outside}")
    evaluate_package(args.package, args.eval_mode, data=args.data, batch_size=args.batch_size,
                     train_subset=args.train_subset, real_exit=args.real_exit, backend=args.backend, seed=args.seed,
                     real_exit_points=args.real_exit_points, num_threads=args.num_threads, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
