"""Checkpoint evaluation: the reference ``inference.py``'s three eval modes, plus real early exit.

- mode 0: report what a checkpoint stores (no model is built, no data read);
- mode 1: anytime accuracies on ``ROOT/val`` and the budget curve with the checkpoint's stored
  ``dynamic_threshold``;
- mode 2: fit the 39 thresholds on a random subset of ``ROOT/train`` (evaluation transforms, as the
  reference; 200000 images there), then the anytime accuracies and the budget curve on ``ROOT/val``.

With ``write=True`` modes 1 and 2 store ``anytime_classification``, ``budgeted_batch_classification``
(and, in mode 2, ``dynamic_threshold``) into the checkpoint, atomically (temporary file + os.replace).
With ``real_exit=True`` they also run :func:`gfnet.engine.budgeted_predict` at a few budgets and
report measured images/s beside the expected Multiply-Adds.

Under torchrun (``ctx``: a :class:`gfnet.train.DistributedContext` of several processes) every rank
reads its shard of each split (contiguous runs of the file list, every image exactly once, the last
partial batch kept: :mod:`gfnet.data.sharding`) and computes its anytime outputs; rank 0 gathers them
with their dataset indices, puts them back in dataset order, fits the thresholds and computes the
accuracies once, so the numbers equal a single process's to float rounding. Real early exit runs on
every rank with its own scheduler over its shard; its images/s is the sum over the ranks. Only rank 0
reports and writes.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from gfnet import budget
from gfnet.engine import budgeted_predict

__all__ = ["EvaluationResult", "RealExitRow", "ShardOutputs", "checkpoint_summary", "collect_confidences",
           "collect_shard_outputs", "gather_outputs", "evaluate_checkpoint", "evaluate_package", "DEFAULT_TRAIN_SUBSET",
           "DEFAULT_REAL_EXIT_POINTS"]

#: The reference fits its thresholds on 200000 random training images.
DEFAULT_TRAIN_SUBSET = 200000
#: Budget points (p of q = p/20, 1..39) that --real-exit measures: low, middle and high budgets.
DEFAULT_REAL_EXIT_POINTS = (5, 20, 35)

_SUMMARY_FIELDS = ("patch_size", "flops", "model_flops", "policy_flops", "fc_flops", "anytime_classification",
                   "budgeted_batch_classification")


@dataclass
class RealExitRow:
    """One measured budget: point p (q = p/20), expected and measured cost, speed, agreement."""

    point: int
    thresholds: list
    accuracy: float
    expected_macs: float
    measured_macs: float
    images_per_second: float
    seconds: float
    time_ratio: float  # this run's time / the all-T (anytime) pass's time (over ranks: ratio of summed images/s)
    macs_ratio: float  # expected Multiply-Adds / all-T Multiply-Adds
    matches_simulation: bool  # predictions and exit steps equal the post-hoc simulation (on every rank)
    processes: int = 1  # ranks that ran it; images_per_second is their sum, seconds the slowest's


@dataclass
class EvaluationResult:
    """What :func:`evaluate_checkpoint` found (fields of the modes that ran; others None)."""

    mode: int
    summary: dict
    anytime_classification: Optional[list] = None
    dynamic_threshold: Optional[torch.Tensor] = None
    budgeted_batch_classification: Optional[list] = None
    num_val: int = 0
    num_train: int = 0
    anytime_images_per_second: Optional[float] = None  # summed over the ranks
    anytime_seconds: Optional[float] = None  # wall-clock of the validation pass (the slowest rank's)
    processes: int = 1
    real_exit: list = field(default_factory=list)
    written: Optional[str] = None


def _read_raw(path, **resolve):
    """The checkpoint as :func:`gfnet.checkpoint.read_checkpoint` reads it (weights included, on the CPU);
    ``path`` may be a record already read (nothing is read again)."""
    from gfnet.checkpoint import read_checkpoint

    return read_checkpoint(path, **resolve)


def checkpoint_summary(path, arch: Optional[str] = None, patch_size: Optional[int] = None,
                       T: Optional[int] = None) -> dict:
    """The stored results of a checkpoint (a file, or its :class:`~gfnet.checkpoint.CheckpointFile` already
    read), without building a model (eval mode 0).

    Returns:
        dict with ``model_arch`` and the reference's fields patch_size, flops, model_flops, policy_flops,
        fc_flops, anytime_classification, budgeted_batch_classification (None where not stored).
    """
    ckpt = _read_raw(path, arch=arch, patch_size=patch_size, T=T, require=False)
    summary = {"model_arch": ckpt.arch}
    summary.update({k: ckpt.raw.get(k) for k in _SUMMARY_FIELDS})
    if summary.get("patch_size") is None:
        summary["patch_size"] = ckpt.patch_size
    return summary


def _format_value(value) -> str:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value)


@dataclass
class ShardOutputs:
    """Compact anytime outputs of the images one process read (or, gathered, of all of them).

    Attributes:
        max_probs: Tensor[T, N] float32, the max softmax probability after each step (inf where the step's
            outputs are not finite: such an image exits at once, as in :func:`gfnet.engine.budgeted_predict`).
        preds: Tensor[T, N] int64, the prediction after each step (-1 where the outputs are not finite).
        targets: Tensor[N] int64 labels.
        indices: Tensor[N] int64, each image's position in the split's file list (the dataset order).
        seconds: wall-clock of the pass (data loading included); gathered: the slowest rank's.
        images_per_second: N / seconds; gathered: the sum over the ranks.
    All on the CPU.
    """

    max_probs: torch.Tensor
    preds: torch.Tensor
    targets: torch.Tensor
    indices: torch.Tensor
    seconds: float
    images_per_second: float

    @property
    def confidences(self):
        """(max_probs, preds): what :mod:`gfnet.budget` takes."""
        return self.max_probs, self.preds


def _indexed_batches(loader):
    """``(images, labels, indices Tensor[n] int64)`` for each batch of ``loader``.

    For a gfnet.data loader the indices are the files' positions in its split (the sharding plan of
    :func:`gfnet.data.sharding.shard_batches`, less the files that failed to decode while reading: the
    loader records those before it yields their batch), checked against the labels the loader yielded.
    Any other iterable of (images, labels) is one process's stream: positions 0, 1, 2, ...
    """
    index = getattr(loader, "index", None)
    if index is None or not hasattr(loader, "num_shards") or not hasattr(loader, "spec"):
        position = 0
        for images, labels in loader:
            n = images.shape[0]
            yield images, labels, torch.arange(position, position + n)
            position += n
        return
    from gfnet.data.sharding import shard_batches

    plan = shard_batches(len(index.files), loader.batch_size, loader.spec.train, loader.shard_id, loader.num_shards,
                         loader.seed, loader.epoch)
    order = np.concatenate(plan).tolist() if plan else []
    cursor, bad, known = 0, set(), -1
    for images, labels in loader:
        if len(loader.stats.skipped) != known:  # grows only when a file fails to decode
            bad = {path for path, _ in loader.stats.skipped}
            known = len(loader.stats.skipped)
        picked = []
        while len(picked) < len(labels):
            if cursor >= len(order):
                raise RuntimeError(f"{loader!r} yielded more images than its shard plan holds")
            i = order[cursor]
            cursor += 1
            if index.files[i] not in bad:
                picked.append(i)
        expected = torch.as_tensor([index.labels[i] for i in picked], dtype=torch.int64)
        if not torch.equal(expected, torch.as_tensor(labels).reshape(-1).cpu().long()):
            raise RuntimeError(f"{loader!r} yielded its images out of its shard plan's order: the dataset "
                               "indices of its outputs cannot be recovered")
        yield images, labels, torch.as_tensor(picked, dtype=torch.int64)


def collect_shard_outputs(net, loader, dtype=None, limit: Optional[int] = None) -> ShardOutputs:
    """Run all T steps on every batch of ``loader`` and keep the compact softmax statistics.

    Args:
        net: a GFNet in eval mode; loader: a gfnet.data loader (of any shard) or any iterable of
            (images, labels) on the model's device.
        dtype: autocast dtype (None/"fp32", "bf16", "fp16").
        limit: stop after this many images.
    Returns:
        :class:`ShardOutputs` of the images read, in the loader's order, with their dataset indices.
    """
    max_probs, preds, targets, indices = [], [], [], []
    seen = 0
    start = time.perf_counter()
    for images, labels, idx in _indexed_batches(loader):
        if limit is not None and seen >= limit:
            break
        if limit is not None and seen + images.shape[0] > limit:
            images, labels, idx = images[: limit - seen], labels[: limit - seen], idx[: limit - seen]
        probs = net.anytime_predict(images, dtype=dtype).probs
        mp, pr = budget.confidences(probs)
        invalid = ~torch.isfinite(probs).all(2)  # [T, n]: as budgeted_predict, exit at once and never a class
        if bool(invalid.any()):
            mp, pr = mp.masked_fill(invalid, float("inf")), pr.masked_fill(invalid, -1)
        max_probs.append(mp.cpu())
        preds.append(pr.cpu())
        targets.append(torch.as_tensor(labels).reshape(-1).cpu())
        indices.append(idx)
        seen += images.shape[0]
    seconds = time.perf_counter() - start
    if not targets:
        T = net.T
        return ShardOutputs(torch.empty(T, 0), torch.empty(T, 0, dtype=torch.int64), torch.empty(0, dtype=torch.int64),
                            torch.empty(0, dtype=torch.int64), seconds, 0.0)
    return ShardOutputs(torch.cat(max_probs, 1), torch.cat(preds, 1), torch.cat(targets).long(), torch.cat(indices),
                        seconds, seen / max(seconds, 1e-9))


def gather_outputs(ctx, shard: ShardOutputs) -> Optional[ShardOutputs]:
    """Every rank's :class:`ShardOutputs` on rank 0, concatenated and put in dataset order (collective).

    Args:
        ctx: a :class:`gfnet.train.DistributedContext` (one process: ``shard`` is returned as it is).
        shard: this rank's outputs.
    Returns:
        On rank 0 the outputs of all images, sorted by dataset index (seconds: the slowest rank's,
        images_per_second: the sum over ranks); None on the other ranks.
    Raises:
        RuntimeError: an image was read by two ranks (the shards overlap).
    """
    if ctx is None or ctx.world_size <= 1:
        return shard
    parts = ctx.gather_object(shard)
    if parts is None:
        return None
    indices = torch.cat([p.indices for p in parts])
    order = torch.argsort(indices)
    indices = indices[order]
    if indices.numel() > 1 and bool((indices[1:] == indices[:-1]).any()):
        raise RuntimeError("two processes read the same image: the shards overlap")
    return ShardOutputs(torch.cat([p.max_probs for p in parts], 1)[:, order],
                        torch.cat([p.preds for p in parts], 1)[:, order],
                        torch.cat([p.targets for p in parts])[order], indices,
                        max(p.seconds for p in parts), sum(p.images_per_second for p in parts))


def collect_confidences(net, loader, dtype=None, limit: Optional[int] = None):
    """Run all T steps on every batch of ``loader`` and keep the compact softmax statistics (one process).

    Args:
        net: a GFNet in eval mode; loader: iterable of (images, labels) on the model's device.
        dtype: autocast dtype (None/"fp32", "bf16", "fp16").
        limit: stop after this many images.
    Returns:
        ((max_probs Tensor[T, N] float32, preds Tensor[T, N] int64), targets Tensor[N] int64, seconds):
        on the CPU; ``seconds`` is the wall-clock time of the pass (data loading included).
    """
    out = collect_shard_outputs(net, loader, dtype, limit)
    if out.targets.numel() == 0:
        raise ValueError("the loader yielded no images")
    return out.confidences, out.targets, out.seconds


def _say_tables(say, header: str, anytime: list, flops, costs: list, accuracies: list) -> None:
    """The report of eval modes 1 and 2 (checkpoints and deployment packages alike): the anytime accuracies and
    the budgeted batch classification table."""
    say(header)
    say("anytime_classification: " + _format_value(anytime))
    say("flops per step count: " + _format_value(flops))
    say("budgeted batch classification (point: expected Multiply-Adds, top-1 %):")
    for p, (cost, accuracy) in enumerate(zip(costs, accuracies), start=1):
        say(f"  {p:2d}  {cost:.4g}  {accuracy:.2f}")


def _anytime_accuracy(confidences, targets) -> list:
    _, preds = confidences
    return [float((preds[k] == targets).double().mean() * 100.0) for k in range(preds.shape[0])]


def _train_subset_loader(loader, subset: int, seed: int):
    """Restrict an evaluation-transform loader over the train split to a seeded random subset of files
    (the reference's SubsetRandomSampler over 200000 random indices)."""
    index = loader.index
    n = len(index.files)
    if subset >= n:
        return loader, n
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=generator)[:subset].sort().values.tolist()
    loader.index = dataclasses.replace(index, files=[index.files[i] for i in chosen],
                                       labels=[index.labels[i] for i in chosen])
    loader.stats.valid = subset
    return loader, subset


def evaluate_checkpoint(checkpoint: str, eval_mode: int, data: Optional[str] = None, batch_size: int = 64,
                        device=None, dtype=None, train_subset: Optional[int] = None, real_exit: bool = False,
                        backend: str = "dali", write: bool = False, seed: int = 0,
                        real_exit_points: Sequence[int] = DEFAULT_REAL_EXIT_POINTS, num_threads: Optional[int] = None,
                        log: Optional[Callable[[str], None]] = print, arch: Optional[str] = None,
                        patch_size: Optional[int] = None, T: Optional[int] = None, ctx=None,
                        compile: bool = False, channels_last: bool = False) -> EvaluationResult:
    """Evaluate a GFNet checkpoint as the reference's inference.py eval modes 0, 1 and 2 do.

    Args:
        checkpoint: path of a .pth.tar checkpoint (reference or gfnet format).
        eval_mode: 0 (print stored results), 1 (stored thresholds on ROOT/val), 2 (fit on a training
            subset, evaluate on ROOT/val).
        data: the ImageNet-layout root (modes 1, 2).
        batch_size, device, dtype: of the model passes, per process (dtype: None/"fp32", "bf16", "fp16").
            Under torchrun, ``device`` is this process's (``ctx.device``) when None.
        train_subset: training images for mode 2 (default min(len(train), 200000)).
        real_exit: also run budgeted_predict at ``real_exit_points`` and report images/s.
        backend: the data pipeline, "dali" or "torchvision".
        write: store the new results into the checkpoint (atomically; rank 0 only).
        seed: seed of the training subset.
        log: where the report lines go (None: silent; only rank 0 reports).
        arch, patch_size, T: for files that do not name them (the reference train.py's); checked
            against the file's otherwise.
        ctx: a :class:`gfnet.train.DistributedContext` (from :func:`gfnet.train.init_distributed`) to
            evaluate over all its processes, each reading its shard; None: this process alone. Every
            process must call this function with the same arguments.
        compile: compile the encoders with torch.compile (:meth:`GFNet.compile`); the first batches of
            each pass take longer while they compile.
        channels_last: encoders in channels-last memory format (faster convolutions; results differ from the
            reference's contiguous ones by float rounding, which can move an image across a threshold).
    Returns:
        :class:`EvaluationResult`: complete on rank 0; on the other ranks only ``mode``, ``summary``,
        ``dynamic_threshold`` and (with ``real_exit``) ``real_exit`` are filled.
    """
    # --write replaces the file at the end: hold its run folder's lock meanwhile (a training run writing that
    # folder would otherwise get its newer epoch overwritten with results of these older weights)
    lock = _lock_for_write(checkpoint, ctx) if write and eval_mode in (1, 2) else None
    try:
        return _evaluate_checkpoint(checkpoint=checkpoint, eval_mode=eval_mode, data=data, batch_size=batch_size,
                                    device=device, dtype=dtype, train_subset=train_subset, real_exit=real_exit,
                                    backend=backend, write=write, seed=seed, real_exit_points=real_exit_points,
                                    num_threads=num_threads, log=log, arch=arch, patch_size=patch_size, T=T, ctx=ctx,
                                    compile=compile, channels_last=channels_last)
    finally:
        if lock is not None:
            lock.release()


def _evaluate_checkpoint(checkpoint: str, eval_mode: int, data: Optional[str] = None, batch_size: int = 64,
                         device=None, dtype=None, train_subset: Optional[int] = None, real_exit: bool = False,
                         backend: str = "dali", write: bool = False, seed: int = 0,
                         real_exit_points: Sequence[int] = DEFAULT_REAL_EXIT_POINTS, num_threads: Optional[int] = None,
                         log: Optional[Callable[[str], None]] = print, arch: Optional[str] = None,
                         patch_size: Optional[int] = None, T: Optional[int] = None, ctx=None,
                         compile: bool = False, channels_last: bool = False) -> EvaluationResult:
    """:func:`evaluate_checkpoint` without the lock."""
    rank, world = (0, 1) if ctx is None else (ctx.rank, ctx.world_size)
    main = rank == 0
    say = log if (log is not None and main) else (lambda line: None)
    if eval_mode not in (0, 1, 2):
        raise ValueError(f"eval_mode must be 0, 1 or 2, got {eval_mode}")
    from gfnet.checkpoint import read_record

    record = read_record(checkpoint)  # the one read: the summary, the network and a --write come from it
    summary = checkpoint_summary(record, arch=arch, patch_size=patch_size, T=T)
    result = EvaluationResult(mode=eval_mode, summary=summary, processes=world)
    if eval_mode == 0:
        for key, value in summary.items():
            say(f"{key}: {_format_value(value)}")
        return result
    if data is None:
        raise ValueError(f"eval mode {eval_mode} needs the dataset root (data=ROOT holding train/ and val/)")
    bad_points = [p for p in (real_exit_points if real_exit else ()) if not 1 <= p <= budget.BUDGET_POINTS]
    if bad_points:  # checked before any collective: a rank that fails alone would leave the others waiting
        raise ValueError(f"real-exit points must be in 1..{budget.BUDGET_POINTS}, got {bad_points}")

    from gfnet.checkpoint import load_checkpoint
    from gfnet.data import make_loader
    from gfnet.engine import step_flops

    net = load_checkpoint(record, arch=arch, patch_size=patch_size, T=T)
    _check_finite_weights(net, checkpoint)
    stored = net.meta.dynamic_threshold
    if eval_mode == 1:
        if stored is None:
            raise ValueError(f"{checkpoint} stores no dynamic_threshold: run eval mode 2 to fit thresholds first")
        stored = budget.check_threshold_table(stored, net.T, f"{checkpoint}'s dynamic_threshold")
    classes = _label_classes(net, data, checkpoint)
    if device is None and ctx is not None and world > 1:
        device = ctx.device
    if device is not None:
        net = net.to(device)
    model_device = next(net.parameters()).device
    if channels_last:
        net.to_channels_last()
    if compile:
        net.compile()
    config = net.config
    flops = step_flops(net)
    loader_args = dict(batch_size=batch_size, image_size=config.image_size, crop_pct=config.crop_pct,
                       interpolation=config.dataset_interpolation, backend=backend, device=model_device,
                       num_threads=num_threads, shard_id=rank, num_shards=world, classes=classes)


    train = None
    if eval_mode == 2:
        train_loader = make_loader(data, train=False, split="train", **loader_args)
        subset = DEFAULT_TRAIN_SUBSET if train_subset is None else int(train_subset)
        if subset < 1:
            raise ValueError(f"train_subset must be >= 1, got {subset}")
        # every rank draws the same seeded subset, then reads its shard of it
        train_loader, result.num_train = _train_subset_loader(train_loader, subset, seed)
        say(f"fitting thresholds on {result.num_train} training images"
            + (f" ({world} processes)" if world > 1 else ""))
        train = gather_outputs(ctx, collect_shard_outputs(net, train_loader, dtype))

    val_loader = make_loader(data, train=False, **loader_args)
    if ctx is not None:
        ctx.barrier()  # the ranks start the timed pass together: its wall-clock is the slowest rank's
    local_val = collect_shard_outputs(net, val_loader, dtype)
    val = gather_outputs(ctx, local_val)

    thresholds = None
    if main:
        for name, outputs in (("train", train), ("val", val)):
            if outputs is not None and outputs.targets.numel() == 0:
                raise ValueError(f"the {name} loader yielded no images")
        result.num_val = int(val.targets.numel())
        result.anytime_seconds = val.seconds
        result.anytime_images_per_second = val.images_per_second
        result.anytime_classification = _anytime_accuracy(val.confidences, val.targets)
        for name, outputs in (("training", train), ("validation", val)):
            invalid = 0 if outputs is None else int((outputs.preds < 0).any(0).sum())
            if invalid:
                say(f"warning: {invalid} {name} image(s) gave non-finite outputs (NaN or inf): counted as wrong, "
                    + ("left out of the threshold fit" if name == "training" else "never as a class"))
        fit = _finite_outputs(train) if train is not None else None
        thresholds, accuracies, costs = budget.budget_curve(
            fit.confidences if fit is not None else None, fit.targets if fit is not None else None,
            val.confidences, val.targets, flops, thresholds=None if eval_mode == 2 else stored)
        result.budgeted_batch_classification = [costs, accuracies]

        _say_tables(say, f"{net.arch}, patch {net.patch_size}, T={net.T}: {result.num_val} validation images"
                    + (f" on {world} processes" if world > 1 else ""), result.anytime_classification, flops, costs,
                    accuracies)
    if ctx is not None and world > 1 and real_exit:
        thresholds = ctx.broadcast_object(thresholds)  # every rank's scheduler needs them
    result.dynamic_threshold = thresholds

    if real_exit:
        all_steps = flops[-1]
        if main:
            say(f"real early exit (all T steps: {result.anytime_images_per_second:.1f} images/s"
                + (f", summed over {world} processes" if world > 1 else "") + "):")
        for p in real_exit_points:
            row = thresholds[p - 1]
            mine = _real_exit_on_shard(net, val_loader, row, batch_size, dtype, flops, local_val)
            parts = ctx.gather_object(mine) if ctx is not None and world > 1 else [mine]
            if not main:
                continue
            images = sum(m["images"] for m in parts)
            measured = RealExitRow(
                point=p, thresholds=row.tolist(),
                accuracy=100.0 * sum(m["correct"] for m in parts) / max(images, 1) if images else float("nan"),
                expected_macs=result.budgeted_batch_classification[0][p - 1],
                measured_macs=sum(m["macs_spent"] for m in parts) / max(images, 1),
                images_per_second=sum(m["images_per_second"] for m in parts),
                seconds=max(m["seconds"] for m in parts),
                time_ratio=result.anytime_images_per_second / max(sum(m["images_per_second"] for m in parts), 1e-12),
                macs_ratio=result.budgeted_batch_classification[0][p - 1] / all_steps,
                matches_simulation=all(m["same"] for m in parts), processes=world)
            result.real_exit.append(measured)
            say(f"  point {p:2d}: {measured.images_per_second:.1f} images/s, time ratio {measured.time_ratio:.3f} "
                f"vs Multiply-Adds ratio {measured.macs_ratio:.3f} (expected {measured.expected_macs:.4g}, "
                f"spent {measured.measured_macs:.4g} per image), top-1 {measured.accuracy:.2f}%"
                + ("" if measured.matches_simulation else "  [differs from the post-hoc simulation]"))

    if write and main:
        from gfnet.checkpoint import atomic_save

        # the file as read (loading copied its weights into the network; nothing changed them), under the lock
        # that keeps a training run from rewriting it meanwhile (evaluate_checkpoint)
        obj = dict(record.raw)
        obj["anytime_classification"] = result.anytime_classification
        obj["budgeted_batch_classification"] = result.budgeted_batch_classification
        if eval_mode == 2:
            obj["dynamic_threshold"] = thresholds.float()
        if obj.get("flops") is None:
            obj["flops"] = flops
        atomic_save(obj, checkpoint)
        result.written = os.fspath(checkpoint)
        say(f"wrote the results into {checkpoint}")
    if ctx is not None:
        ctx.barrier()  # no rank leaves (and closes the group) before rank 0 has written
    return result


def _lock_for_write(checkpoint: str, ctx):
    """The run-folder lock of the folder ``checkpoint`` (its link's target) lies in, taken by rank 0 when that
    folder is a training run's (it holds the lock file); None otherwise. Every rank learns rank 0's answer.

    Raises:
        RunFolderBusy: a training run (or another ``--write``) holds it.
    """
    from gfnet.train.run_folder import LOCK_NAME, RunFolder, RunFolderBusy

    main = ctx is None or ctx.rank == 0
    folder, lock, failure = os.path.dirname(os.path.realpath(checkpoint)), None, None
    if main and os.path.exists(os.path.join(folder, LOCK_NAME)):
        lock = RunFolder(folder)
        try:
            lock.acquire_lock_only(purpose="gfnet-eval --write")
        except RunFolderBusy as e:
            lock = None
            failure = (f"{checkpoint} is in a run folder that is in use ({str(e).split('(', 1)[-1].split(')')[0]}): "
                       "--write would replace a file that the run rewrites every epoch, with results of older "
                       "weights; wait until it ends, or evaluate a copy of the file")
    if ctx is not None and ctx.world_size > 1:
        failure = ctx.broadcast_object(failure)
    if failure:
        raise RunFolderBusy(failure)
    return lock


def _check_finite_weights(net, checkpoint: str) -> None:
    """Refuse a network with NaN or inf weights before any data is read: every output would be NaN."""
    bad = [name for name, t in net.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{checkpoint}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {', '.join(bad[:3])}), so "
                         "the network classifies nothing; evaluate the checkpoint of an epoch that trained finitely")


def _label_classes(net, data: str, checkpoint: str) -> list:
    """The class names that labels index: the checkpoint's (its training split's class folders); for files that
    name none, ``data/train``'s class folders (``data/val``'s where there is no train/), whose number must be the
    classifier's."""
    from gfnet.data import list_classes

    stored = net.meta.classes
    if stored is not None:
        return list(stored)
    split = "train" if os.path.isdir(os.path.join(data, "train")) else "val"
    found = list_classes(data, split)
    if len(found) != net.num_classes:
        raise ValueError(f"{os.path.join(data, split)} holds {len(found)} class folders, but {checkpoint} classifies "
                         f"{net.num_classes} classes and names none, so labels cannot be matched: evaluate on the data "
                         "it was trained on")
    return found


def _finite_outputs(outputs: ShardOutputs) -> Optional[ShardOutputs]:
    """``outputs`` without the images whose outputs were non-finite at some step (prediction -1): thresholds are
    fitted on confidences only. Raises ValueError when none is left."""
    keep = (outputs.preds >= 0).all(0)
    if bool(keep.all()):
        return outputs
    if not bool(keep.any()):
        raise ValueError("every training image gave non-finite outputs (NaN or inf): no threshold can be fitted")
    return dataclasses.replace(outputs, max_probs=outputs.max_probs[:, keep], preds=outputs.preds[:, keep],
                               targets=outputs.targets[keep], indices=outputs.indices[keep])


def _real_exit_on_shard(net, loader, row, batch_size, dtype, flops, local: ShardOutputs) -> dict:
    """Real early exit over this rank's shard with its own scheduler, checked against the post-hoc simulation
    of the same images (``local``: this rank's anytime outputs, in the loader's order).

    Returns a dict of plain numbers (gathered to rank 0): images, correct, macs_spent, seconds,
    images_per_second, same.
    """
    if local.targets.numel() == 0:  # more ranks than images: this one has none
        return dict(images=0, correct=0, macs_spent=0.0, seconds=0.0, images_per_second=0.0, same=True)
    out = budgeted_predict(net, loader, row, batch_size=batch_size, dtype=dtype, flops=flops)
    simulated = budget.exit_steps(local.confidences, row)
    simulated_preds = local.preds.gather(0, simulated.view(1, -1)).squeeze(0)
    same = bool(torch.equal(out.exit_step, simulated) and torch.equal(out.preds, simulated_preds))
    correct = int((out.preds == out.targets).sum()) if out.targets is not None else 0
    return dict(images=int(out.preds.numel()), correct=correct, macs_spent=float(out.macs_spent),
                seconds=float(out.seconds), images_per_second=float(out.images_per_second), same=same)


# ----------------------------------------------------------------------------- deployment packages
def _package_outputs(pkg, loader, batch_size: int):
    """Every step of a deployment package on every batch of ``loader``: (the compact statistics on the CPU, the
    seconds spent in the runtime alone)."""
    max_probs, preds, targets = [], [], []
    start = time.perf_counter()
    compute = 0.0
    for images, labels in loader:
        images = images.cpu().numpy()
        tick = time.perf_counter()
        out = pkg.anytime(images, batch_size=min(batch_size, pkg.max_batch or batch_size))
        compute += time.perf_counter() - tick
        probs = torch.from_numpy(out.probs)
        mp, pr = budget.confidences(probs)
        max_probs.append(mp)
        preds.append(pr)
        targets.append(torch.as_tensor(labels).reshape(-1).cpu().long())
    seconds = time.perf_counter() - start
    if not targets:
        raise ValueError("the loader yielded no images")
    n = sum(t.numel() for t in targets)
    return ShardOutputs(torch.cat(max_probs, 1), torch.cat(preds, 1), torch.cat(targets), torch.arange(n), seconds,
                        n / max(seconds, 1e-9)), compute


def evaluate_package(package: str, eval_mode: int, data: Optional[str] = None, batch_size: int = 64,
                     train_subset: Optional[int] = None, real_exit: bool = False, backend: str = "dali", seed: int = 0,
                     real_exit_points: Sequence[int] = DEFAULT_REAL_EXIT_POINTS, num_threads: Optional[int] = None,
                     threads: Optional[int] = None, log: Optional[Callable[[str], None]] = print) -> EvaluationResult:
    """Evaluate a deployment package (:func:`gfnet.deploy.export`) as :func:`evaluate_checkpoint` evaluates a
    checkpoint: mode 0 prints what its manifest stores; mode 1 runs the manifest's stored thresholds on
    ``data/val``; mode 2 fits the 39 thresholds on a random subset of ``data/train`` first. The images come from
    gfnet.data's loaders (the package's S, crop_pct and interpolation; uint8 or normalised float as it was
    exported), every step of every image through the package's runtime (:meth:`Package.anytime`); the tables are
    the checkpoint's. ``real_exit``: :meth:`Package.predict` at ``real_exit_points``, its exits compared with the
    post-hoc simulation on the same runtime's probabilities (equal except for images it reports ambiguous).

    ``threads``: the runtime's intra-op threads; ``num_threads``: the data pipeline's.
    """
    from gfnet.data import make_loader
    from gfnet.deploy import load, read_manifest

    say = log if log is not None else (lambda line: None)
    if eval_mode not in (0, 1, 2):
        raise ValueError(f"eval_mode must be 0, 1 or 2, got {eval_mode}")
    manifest = read_manifest(package, verify=False) if eval_mode == 0 else None
    if eval_mode == 0:
        summary = {"model_arch": manifest["arch"], "runtime": manifest["runtime"],
                   "input_dtype": manifest["input"]["dtype"], "image_size": manifest["image_size"],
                   "patch_size": manifest["patch_size"], "T": manifest["T"], "flops": manifest["flops"],
                   "anytime_classification": manifest.get("anytime_classification"),
                   "budgeted_batch_classification": manifest.get("budgeted_batch_classification")}
        for key, value in summary.items():
            say(f"{key}: {_format_value(value)}")
        return EvaluationResult(mode=0, summary=summary)
    if data is None:
        raise ValueError(f"eval mode {eval_mode} needs the dataset root (data=ROOT holding train/ and val/)")
    bad_points = [p for p in (real_exit_points if real_exit else ()) if not 1 <= p <= budget.BUDGET_POINTS]
    if bad_points:
        raise ValueError(f"real-exit points must be in 1..{budget.BUDGET_POINTS}, got {bad_points}")
    pkg = load(package, threads=threads)
    m = pkg.manifest
    stored = m.get("dynamic_threshold")
    if eval_mode == 1 and not stored:
        raise ValueError(f"{package} stores no dynamic_threshold (its checkpoint had none): run eval mode 2 to fit "
                         "thresholds")
    summary = {"model_arch": pkg.arch, "runtime": pkg.runtime, "input_dtype": pkg.input_dtype}
    result = EvaluationResult(mode=eval_mode, summary=summary)
    interpolation = m.get("interpolation") or {}
    loader_args = dict(batch_size=batch_size, image_size=pkg.image_size,
                       crop_pct=float(interpolation.get("crop_pct", 0.875)),
                       interpolation=interpolation.get("dataset", "bilinear"), backend=backend, device="cpu",
                       num_threads=num_threads, output="uint8" if pkg.input_dtype == "uint8" else "float")
    train = None
    if eval_mode == 2:
        train_loader = make_loader(data, train=False, split="train", **loader_args)
        subset = DEFAULT_TRAIN_SUBSET if train_subset is None else int(train_subset)
        if subset < 1:
            raise ValueError(f"train_subset must be >= 1, got {subset}")
        train_loader, result.num_train = _train_subset_loader(train_loader, subset, seed)
        say(f"fitting thresholds on {result.num_train} training images ({pkg.runtime} package)")
        train, _ = _package_outputs(pkg, train_loader, batch_size)
    val_loader = make_loader(data, train=False, **loader_args)
    val, val_compute = _package_outputs(pkg, val_loader, batch_size)
    result.num_val = int(val.targets.numel())
    result.anytime_seconds, result.anytime_images_per_second = val.seconds, val.images_per_second
    result.anytime_classification = _anytime_accuracy(val.confidences, val.targets)
    thresholds, accuracies, costs = budget.budget_curve(
        train.confidences if train is not None else None, train.targets if train is not None else None,
        val.confidences, val.targets, pkg.flops, thresholds=None if eval_mode == 2 else torch.as_tensor(stored))
    result.dynamic_threshold = thresholds
    result.budgeted_batch_classification = [costs, accuracies]
    _say_tables(say, f"{pkg.arch}, patch {pkg.patch_size}, T={pkg.T} ({pkg.runtime} package, {pkg.input_dtype} "
                f"input): {result.num_val} validation images", result.anytime_classification, pkg.flops, costs,
                accuracies)
    if real_exit:
        say(f"real early exit ({pkg.runtime}; all T steps: {result.num_val / max(val_compute, 1e-12):.1f} images/s in "
            "the runtime, data loading apart):")
        for p in real_exit_points:
            row = thresholds[p - 1]
            preds, steps, ambiguous, seconds, n = [], [], [], 0.0, 0
            for images, _ in val_loader:
                out = pkg.predict(images.cpu().numpy(), row.tolist(),
                                  batch_size=min(batch_size, pkg.max_batch or batch_size))
                preds.append(torch.from_numpy(out.preds))
                steps.append(torch.from_numpy(out.exit_step))
                ambiguous.append(torch.from_numpy(out.ambiguous))
                seconds += out.seconds
                n += out.preds.size
            preds, steps, ambiguous = torch.cat(preds), torch.cat(steps), torch.cat(ambiguous)
            simulated = budget.exit_steps(val.confidences, row)
            simulated_preds = val.preds.gather(0, simulated.view(1, -1)).squeeze(0)
            clear = ~ambiguous
            same = bool(torch.equal(steps[clear], simulated[clear])
                        and torch.equal(preds[clear], simulated_preds[clear]))
            spent = float(torch.as_tensor(pkg.flops, dtype=torch.float64)[steps].mean())
            measured = RealExitRow(point=p, thresholds=row.tolist(),
                                   accuracy=100.0 * float((preds == val.targets).double().mean()),
                                   expected_macs=costs[p - 1], measured_macs=spent,
                                   images_per_second=n / max(seconds, 1e-12), seconds=seconds,
                                   time_ratio=seconds / max(val_compute, 1e-12),
                                   macs_ratio=costs[p - 1] / pkg.flops[-1],
                                   matches_simulation=same)
            result.real_exit.append(measured)
            say(f"  point {p:2d}: {measured.images_per_second:.1f} images/s, time ratio {measured.time_ratio:.3f} "
                f"vs Multiply-Adds ratio {measured.macs_ratio:.3f}, top-1 {measured.accuracy:.2f}%"
                + (f", {int(ambiguous.sum())} ambiguous" if bool(ambiguous.any()) else "")
                + ("" if same else "  [differs from the post-hoc simulation]"))
    return result
