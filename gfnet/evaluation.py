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
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from gfnet import budget

__all__ = ["EvaluationResult", "RealExitRow", "checkpoint_summary", "collect_confidences", "evaluate_checkpoint",
           "DEFAULT_TRAIN_SUBSET", "DEFAULT_REAL_EXIT_POINTS"]

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
    time_ratio: float  # this run's time / the all-T (anytime) pass's time
    macs_ratio: float  # expected Multiply-Adds / all-T Multiply-Adds
    matches_simulation: bool  # predictions and exit steps equal the post-hoc simulation


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
    anytime_images_per_second: Optional[float] = None
    real_exit: list = field(default_factory=list)
    written: Optional[str] = None


def _read_raw(path: str) -> dict:
    """The checkpoint's dict as stored (weights included), on the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zips, text files, ...
        first = (str(e).splitlines() or [""])[0].split(". ")[0][:160]
        raise ValueError(f"{path} is not a gfnet or reference GFNet checkpoint (torch.load failed: "
                         f"{type(e).__name__}: {first})") from None
    if not isinstance(obj, dict) or "model_name" not in obj:
        raise ValueError(f"{path} is not a gfnet or reference GFNet checkpoint (no 'model_name' field)")
    return obj


def checkpoint_summary(path: str) -> dict:
    """The stored results of a checkpoint, read without building a model (eval mode 0).

    Returns:
        dict with ``model_arch`` and the reference's fields patch_size, flops, model_flops, policy_flops,
        fc_flops, anytime_classification, budgeted_batch_classification (None where not stored).
    """
    obj = _read_raw(path)
    summary = {"model_arch": obj.get("model_name")}
    summary.update({k: obj.get(k) for k in _SUMMARY_FIELDS})
    return summary


def _format_value(value) -> str:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value)


def collect_confidences(net, loader, dtype=None, limit: Optional[int] = None):
    """Run all T steps on every batch of ``loader`` and keep the compact softmax statistics.

    Args:
        net: a GFNet in eval mode; loader: iterable of (images, labels) on the model's device.
        dtype: autocast dtype (None/"fp32", "bf16", "fp16").
        limit: stop after this many images.
    Returns:
        ((max_probs Tensor[T, N] float32, preds Tensor[T, N] int64), targets Tensor[N] int64, seconds):
        on the CPU; ``seconds`` is the wall-clock time of the pass (data loading included).
    """
    max_probs, preds, targets = [], [], []
    seen = 0
    start = time.perf_counter()
    for images, labels in loader:
        if limit is not None and seen >= limit:
            break
        if limit is not None and seen + images.shape[0] > limit:
            images, labels = images[: limit - seen], labels[: limit - seen]
        probs = net.anytime_predict(images, dtype=dtype).probs
        mp, pr = budget.confidences(probs)
        max_probs.append(mp.cpu())
        preds.append(pr.cpu())
        targets.append(torch.as_tensor(labels).reshape(-1).cpu())
        seen += images.shape[0]
    seconds = time.perf_counter() - start
    if not targets:
        raise ValueError("the loader yielded no images")
    return (torch.cat(max_probs, 1), torch.cat(preds, 1)), torch.cat(targets).long(), seconds


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
                        log: Optional[Callable[[str], None]] = print) -> EvaluationResult:
    """Evaluate a GFNet checkpoint as the reference's inference.py eval modes 0, 1 and 2 do.

    Args:
        checkpoint: path of a .pth.tar checkpoint (reference or gfnet format).
        eval_mode: 0 (print stored results), 1 (stored thresholds on ROOT/val), 2 (fit on a training
            subset, evaluate on ROOT/val).
        data: the ImageNet-layout root (modes 1, 2).
        batch_size, device, dtype: of the model passes (dtype: None/"fp32", "bf16", "fp16").
        train_subset: training images for mode 2 (default min(len(train), 200000)).
        real_exit: also run budgeted_predict at ``real_exit_points`` and report images/s.
        backend: the data pipeline, "dali" or "torchvision".
        write: store the new results into the checkpoint (atomically).
        seed: seed of the training subset.
        log: where the report lines go (None: silent).
    Returns:
        :class:`EvaluationResult`.
    """
    say = log if log is not None else (lambda line: None)
    if eval_mode not in (0, 1, 2):
        raise ValueError(f"eval_mode must be 0, 1 or 2, got {eval_mode}")
    summary = checkpoint_summary(checkpoint)
    result = EvaluationResult(mode=eval_mode, summary=summary)
    if eval_mode == 0:
        for key, value in summary.items():
            say(f"{key}: {_format_value(value)}")
        return result
    if data is None:
        raise ValueError(f"eval mode {eval_mode} needs the dataset root (data=ROOT holding train/ and val/)")

    from gfnet.checkpoint import load_checkpoint
    from gfnet.data import make_loader
    from gfnet.engine import step_flops

    net = load_checkpoint(checkpoint)
    if device is not None:
        net = net.to(device)
    model_device = next(net.parameters()).device
    config = net.config
    flops = step_flops(net)
    loader_args = dict(batch_size=batch_size, image_size=config.image_size, crop_pct=config.crop_pct,
                       interpolation=config.dataset_interpolation, backend=backend, device=model_device,
                       num_threads=num_threads)

    stored = net.meta.get("dynamic_threshold")
    if eval_mode == 1 and stored is None:
        raise ValueError(f"{checkpoint} stores no dynamic_threshold: run eval mode 2 to fit thresholds first")

    train_confidences = train_targets = None
    if eval_mode == 2:
        train_loader = make_loader(data, train=False, split="train", **loader_args)
        subset = DEFAULT_TRAIN_SUBSET if train_subset is None else int(train_subset)
        if subset < 1:
            raise ValueError(f"train_subset must be >= 1, got {subset}")
        train_loader, result.num_train = _train_subset_loader(train_loader, subset, seed)
        say(f"fitting thresholds on {result.num_train} training images")
        train_confidences, train_targets, _ = collect_confidences(net, train_loader, dtype)

    val_loader = make_loader(data, train=False, **loader_args)
    val_confidences, val_targets, anytime_seconds = collect_confidences(net, val_loader, dtype)
    result.num_val = int(val_targets.numel())
    result.anytime_images_per_second = result.num_val / anytime_seconds
    result.anytime_classification = _anytime_accuracy(val_confidences, val_targets)

    thresholds, accuracies, costs = budget.budget_curve(
        train_confidences, train_targets, val_confidences, val_targets, flops,
        thresholds=None if eval_mode == 2 else torch.as_tensor(stored))
    result.dynamic_threshold = thresholds
    result.budgeted_batch_classification = [costs, accuracies]

    say(f"{net.arch}, patch {net.patch_size}, T={net.T}: {result.num_val} validation images")
    say("anytime_classification: " + _format_value(result.anytime_classification))
    say("flops per step count: " + _format_value(flops))
    say("budgeted batch classification (point: expected Multiply-Adds, top-1 %):")
    for p, (cost, accuracy) in enumerate(zip(costs, accuracies), start=1):
        say(f"  {p:2d}  {cost:.4g}  {accuracy:.2f}")

    if real_exit:
        all_steps = flops[-1]
        say(f"real early exit (all T steps: {result.anytime_images_per_second:.1f} images/s):")
        for p in real_exit_points:
            if not 1 <= p <= thresholds.shape[0]:
                raise ValueError(f"real-exit points must be in 1..{thresholds.shape[0]}, got {p}")
            row = thresholds[p - 1]
            out = net.budgeted_predict(val_loader, row, batch_size=batch_size, dtype=dtype, flops=flops)
            simulated = budget.exit_steps(val_confidences, row)
            simulated_preds = val_confidences[1].gather(0, simulated.view(1, -1)).squeeze(0)
            same = bool(torch.equal(out.exit_step, simulated) and torch.equal(out.preds, simulated_preds))
            accuracy = float((out.preds == out.targets).double().mean() * 100.0) if out.targets is not None else \
                float("nan")
            measured = RealExitRow(
                point=p, thresholds=row.tolist(), accuracy=accuracy, expected_macs=costs[p - 1],
                measured_macs=out.macs_per_image, images_per_second=out.images_per_second, seconds=out.seconds,
                time_ratio=out.seconds / anytime_seconds, macs_ratio=costs[p - 1] / all_steps,
                matches_simulation=same)
            result.real_exit.append(measured)
            say(f"  point {p:2d}: {measured.images_per_second:.1f} images/s, time ratio {measured.time_ratio:.3f} "
                f"vs Multiply-Adds ratio {measured.macs_ratio:.3f} (expected {measured.expected_macs:.4g}, "
                f"spent {measured.measured_macs:.4g} per image), top-1 {accuracy:.2f}%"
                + ("" if same else "  [differs from the post-hoc simulation]"))

    if write:
        from gfnet.checkpoint import atomic_save

        obj = _read_raw(checkpoint)
        obj["anytime_classification"] = result.anytime_classification
        obj["budgeted_batch_classification"] = result.budgeted_batch_classification
        if eval_mode == 2:
            obj["dynamic_threshold"] = thresholds.float()
        if obj.get("flops") is None:
            obj["flops"] = flops
        atomic_save(obj, checkpoint)
        result.written = os.fspath(checkpoint)
        say(f"wrote the results into {checkpoint}")
    return result
