"""Distributed evaluation throughput against the number of processes (``gfnet-bench eval``).

One setup shared by every row: a sample ImageNet-layout tree of real JPEGs (``gfnet.data.make_sample_tree``)
and a GFNet checkpoint saved once. Each row launches ``torchrun --nproc-per-node K`` (the launcher that
users run; gloo on the CPU, NCCL on GPUs) on this module's worker, which runs
:func:`gfnet.evaluation.evaluate_checkpoint` (eval mode 2 over all K processes) and reports the anytime
pass over the validation split: its wall-clock (all ranks start after a barrier; the slowest rank's time)
and the images it read; the start-up of torchrun and the model is not timed. The baseline is one process.
The timing runs inside the workers (each rank's wall-clock, synchronised by a barrier), so it cannot go
through the shared in-process harness; the rows are the same :class:`~gfnet.viz.bench_rows.Row`. Check: the
anytime accuracies of every process count must equal one process's exactly (the same images, each read once
over the shards); a mismatch raises :class:`~gfnet.bench.common.OutputMismatch` instead of writing rows.

Run: ``gfnet-bench eval [--quick] [--threads T]``. On a CPU the K processes share the
machine's cores (``threads`` per process, default cores // K), so the row shows what sharding costs or
gains there; on a GPU machine each process takes its own GPU.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile

__all__ = ["run"]

BASELINE = "torchrun x1"
EXTRA_COLUMNS = ("processes", "images", "images_per_s_summed_over_ranks")
NOTES = ("Distributed evaluation (eval mode 2) under torchrun, gloo on the CPU: K processes share the machine's "
         "cores (threads per process in the threads column).")

#: backbone, patch size, T of the checkpoint; quick runs use a cheaper backbone.
ARCH, QUICK_ARCH = ("mobilenetv3_large_100", 96, 3), ("resnet10t", 32, 3)
PROCESSES = (1, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(folder: str, quick: bool) -> tuple[str, str, int]:
    """The sample tree and checkpoint every row reads; returns (tree, checkpoint, validation images)."""
    import torch

    import gfnet
    from gfnet.data import make_sample_tree

    per_class = 4 if quick else 24
    tree = os.path.join(folder, "tree")
    make_sample_tree(tree, num_classes=4, train_per_class=2, val_per_class=per_class,
                     photo_size=(160, 120) if quick else (500, 375))
    arch, patch, T = QUICK_ARCH if quick else ARCH
    torch.manual_seed(0)
    net = gfnet.build_model(arch, patch_size=patch, T=T, num_classes=4).eval()
    checkpoint = os.path.join(folder, "bench.pth.tar")
    gfnet.save_checkpoint(net, checkpoint)
    return tree, checkpoint, 4 * per_class


def _launch(processes: int, tree: str, checkpoint: str, device: str, threads: int, batch: int,
            rounds: int, out: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={processes}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=gfnet-bench-eval",
           "-m", "gfnet.bench.bench_eval", "--worker", tree, checkpoint, device, str(threads), str(batch),
           str(rounds), out]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun with {processes} process(es) failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def run(device=None, quick: bool = False, threads=None, processes=PROCESSES) -> list:
    """One row per process count: the anytime pass of distributed evaluation, timed.

    Args:
        device: "cpu" or "cuda" (default: cuda when present); under torchrun each process takes its own GPU.
        quick: a smaller tree and backbone (smoke run).
        threads: torch threads per process (default: the CPUs this process may use // processes, >= 1).
        processes: the process counts to measure (the first is the baseline).
    Returns:
        :class:`~gfnet.viz.bench_rows.Row` per process count; extra: processes, images,
        images_per_s_summed_over_ranks, backbone, anytime_classification.
    """
    import torch

    from gfnet.bench.common import OutputMismatch, resolve_device
    from gfnet.viz.bench_rows import Row

    dev = resolve_device(device)
    if dev.type == "cuda" and max(processes) > torch.cuda.device_count():
        processes = tuple(k for k in processes if k <= torch.cuda.device_count())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    batch = 8 if quick else 16
    rounds = 2 if quick else 3
    measured = []
    with tempfile.TemporaryDirectory(prefix="gfnet-bench-eval-") as folder:
        tree, checkpoint, _ = _setup(folder, quick)
        arch = (QUICK_ARCH if quick else ARCH)[0]
        for k in processes:
            per_process = threads or max(1, cores // k)
            got = _launch(k, tree, checkpoint, dev.type, per_process, batch, rounds, os.path.join(folder, f"{k}.json"))
            if measured and got["anytime_classification"] != measured[0][2]["anytime_classification"]:
                raise OutputMismatch(f"eval: torchrun x{k} gives anytime accuracies {got['anytime_classification']}, "
                                     f"{BASELINE} {measured[0][2]['anytime_classification']}: the shards must read "
                                     "every image once")
            measured.append((k, per_process, got))
    rows = []
    for k, per_process, got in measured:
        seconds = statistics.median(got["seconds"])
        q = statistics.quantiles(got["seconds"], n=4) if len(got["seconds"]) >= 2 else [seconds] * 3
        rows.append(Row(suite="eval", case=f"anytime pass, eval mode 2, {arch}", provider=f"torchrun x{k}",
                        device=dev.type, dtype="float32", batch=batch,
                        threads=per_process if dev.type == "cpu" else None,
                        median_s=seconds, iqr_s=q[2] - q[0], runs=len(got["seconds"]),
                        throughput=got["images"] / seconds, unit="images/s", baseline=BASELINE, ratio=1.0,
                        extra={"processes": k, "images": got["images"],
                               "images_per_s_summed_over_ranks": statistics.median(got["summed_images_per_s"]),
                               "backbone": arch, "anytime_classification": got["anytime_classification"]}))
    for r in rows:  # the worker's rounds are not interleaved across process counts: ratio of medians
        r.ratio = r.throughput / rows[0].throughput
    return rows


def _worker(tree: str, checkpoint: str, device: str, threads: str, batch: str, rounds: str, out: str) -> int:
    """Under torchrun: ``rounds`` distributed evaluations; rank 0 writes the anytime pass's times as JSON."""
    import torch

    from gfnet.evaluation import evaluate_checkpoint
    from gfnet.train.distributed import init_distributed

    torch.set_num_threads(int(threads))
    ctx = init_distributed(device)
    try:
        seconds, summed, images = [], [], 0
        for _ in range(int(rounds) + 1):  # the first round warms up (oneDNN kernels, file cache)
            result = evaluate_checkpoint(checkpoint, 2, data=tree, batch_size=int(batch), device=ctx.device,
                                         backend="torchvision", num_threads=0, log=None, ctx=ctx)
            if ctx.is_main:
                seconds.append(result.anytime_seconds)
                summed.append(result.anytime_images_per_second)
                images = result.num_val
        if ctx.is_main:
            with open(out, "w") as f:
                json.dump({"seconds": seconds[1:], "summed_images_per_s": summed[1:], "images": images,
                           "anytime_classification": result.anytime_classification}, f)
    finally:
        ctx.close()
    return 0


if __name__ == "__main__":  # torchrun's entry point for the workers (``-m gfnet.bench.bench_eval --worker ...``)
    if sys.argv[1:2] != ["--worker"]:
        sys.exit("gfnet.bench.bench_eval runs as torchrun's worker; run the suite with `gfnet-bench eval`")
    sys.exit(_worker(*sys.argv[2:]))
