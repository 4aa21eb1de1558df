"""Budgeted batch classification: exit thresholds, their evaluation and the budget curve.

This is MSDNet's procedure (Huang et al., ICLR 2018, Section 4 "budgeted batch classification"), as
GFNet's reference evaluation uses it (../shared/DESIGN.md, "Evaluation"):

- For a target distribution of exits ``p[0..T-1]`` (summing to 1), the threshold of step k < T-1 is
  the max softmax probability of the ``floor(N * p[k])``-th most confident sample among those that have
  not exited at an earlier step; it stays 1e8 (nobody exits) when fewer samples remain; the last step's
  threshold is -1e8 (everybody left exits there).
- A sample exits at the first step whose max probability is >= that step's threshold.
- The expected cost is sum_k share_k * flops[k], ``flops[k]`` being the cumulative Multiply-Adds of
  steps 0..k.
- The budget curve takes q = p / 20 for p = 1..39 and exit proportions proportional to q^k, k = 1..T.

Everything here is vectorised over samples (one loop over the T steps) and gives the same numbers as the
reference's per-sample Python loops, including its float32 rounding of ``N * p[k]``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

__all__ = ["NO_EXIT_THRESHOLD", "LAST_STEP_THRESHOLD", "BUDGET_POINTS", "confidences", "separated_thresholds",
           "exit_proportions", "check_thresholds", "check_threshold_table",
           "find_thresholds", "exit_steps", "evaluate", "budget_curve"]

# The reference's sentinels: a threshold nobody reaches, and the last step's that everybody reaches.
NO_EXIT_THRESHOLD = 1e8
LAST_STEP_THRESHOLD = -1e8
# q = p / 20 for p = 1..39: 39 exit distributions, from "almost everybody exits at the glance" (q small)
# to "almost everybody runs all T steps" (q close to 2).
BUDGET_POINTS = 39

FlopsLike = Union[Sequence[float], torch.Tensor]


def _max_probs(probs):
    """(max_probs Tensor[T, N], preds Tensor[T, N]) of softmax outputs Tensor[T, N, classes], or of the
    pair itself: the procedures read nothing else, and the pair is C times smaller (200000 training
    images x 1000 classes x T=5 steps are 4 GB of float32 probabilities)."""
    if isinstance(probs, (tuple, list)):
        if len(probs) != 2 or probs[0].dim() != 2 or probs[0].shape != probs[1].shape:
            raise ValueError("a (max_probs, preds) pair must hold two Tensor[T, N] of one shape")
        return probs[0], probs[1]
    if probs.dim() != 3:
        raise ValueError(f"probs must be Tensor[T, N, classes] softmax outputs, got shape {tuple(probs.shape)}")
    max_probs, preds = probs.max(dim=2)
    # arg-max as AnytimePrediction.preds computes it (the first of tied maxima)
    return max_probs, probs.argmax(dim=2)


def _numbers(values, what: str) -> torch.Tensor:
    """``values`` as a floating tensor (integers become float64), or a ValueError that says what they are."""
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{what} must be numbers, not text ({values!r})")
    try:
        t = torch.as_tensor(values).detach()
    except (TypeError, ValueError, RuntimeError, OverflowError):
        kinds = sorted({type(v).__name__ for v in values}) if isinstance(values, (list, tuple)) else []
        raise ValueError(f"{what} must be numbers; got a {type(values).__name__}"
                         + (f" of {', '.join(kinds)}" if kinds else "")) from None
    if t.dtype == torch.bool or t.is_complex() or not (t.is_floating_point() or t.dtype in (
            torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{what} must be real numbers; got {t.dtype}")
    return t.cpu() if t.is_floating_point() else t.cpu().double()


def check_thresholds(values, T: Optional[int] = None, what: str = "thresholds") -> torch.Tensor:
    """Exit thresholds, one per step, as a 1-D floating tensor on the CPU (float dtypes kept, integers as
    float64): numbers (not text), no NaN (a NaN threshold switches early exit off: nothing compares >= NaN),
    ``T`` of them when ``T`` is given. ``what`` names them in the errors (ValueError)."""
    t = _numbers(values, what).flatten()
    if T is not None and t.numel() != T:
        raise ValueError(f"{what}: need one threshold per step (T={T}), got {t.numel()}")
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{what} must not be NaN (a NaN threshold would switch early exit off); got {t.tolist()}")
    return t


def check_threshold_table(table, T: Optional[int] = None, what: str = "the threshold table") -> torch.Tensor:
    """A table of exit thresholds (a checkpoint's ``dynamic_threshold``, Tensor[points, T]; any T when None)
    checked as :func:`check_thresholds` checks one row; a table with NaN names its rows (refit it: eval mode 2)."""
    t = _numbers(table, what)
    if t.dim() != 2 or (T is not None and t.shape[1] != T) or t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{what} must be a table of {T or 'T'} thresholds per budget (Tensor[points, "
                         f"{T or 'T'}]); got shape {tuple(t.shape)}")
    rows = torch.isnan(t).any(1).nonzero().flatten().tolist()
    if rows:
        raise ValueError(f"{what} holds NaN in {len(rows)} of its {t.shape[0]} rows (e.g. rows {rows[:5]}): such "
                         "thresholds switch early exit off; fit them again (gfnet-eval --eval-mode 2 --write)")
    return t


def confidences(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The compact form of softmax outputs Tensor[T, N, classes] that every function here accepts in
    their place: (max_probs Tensor[T, N], preds Tensor[T, N] int64)."""
    return _max_probs(probs)


def exit_proportions(q: float, T: int) -> torch.Tensor:
    """MSDNet's exit distribution for the budget parameter ``q``: p_k proportional to q^k, k = 1..T.

    Computed in float32 as the reference does (``exp(log(q) * k)``, then normalised), so that
    ``floor(N * p_k)`` rounds the same way.

    Returns:
        Tensor[T] float32 summing to 1.
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if not q > 0:
        raise ValueError(f"q must be positive, got {q}")
    q_tensor = torch.full((1,), float(q), dtype=torch.float32)
    k = torch.arange(1, T + 1, dtype=torch.float32)
    proportions = torch.exp(torch.log(q_tensor) * k)
    return proportions / proportions.sum()


def find_thresholds(probs: torch.Tensor, targets: Optional[torch.Tensor],
                    exit_proportions: FlopsLike) -> torch.Tensor:
    """Per-step confidence thresholds that make the given proportions of samples exit at each step.

    Args:
        probs: Tensor[T, N, classes] softmax outputs after each step (float32 as anytime_predict gives),
            or their :func:`confidences` pair.
        targets: Tensor[N] labels; unused by the procedure (kept for the reference's signature).
        exit_proportions: Tensor[T] (or a sequence) of the wanted exit shares, summing to 1.
    Returns:
        Tensor[T] thresholds in ``probs``' dtype; step k < T-1 gets the max probability of the
        floor(N * p[k])-th most confident not-yet-exited sample (1e8 when there are fewer, or when
        floor(N * p[k]) is 0); the last step gets -1e8.
    """
    del targets  # the reference's procedure never looks at the labels
    max_probs, _ = _max_probs(probs)
    n_steps, n_samples = max_probs.shape
    bad = int((~torch.isfinite(max_probs)).any(0).sum())
    if bad:  # a NaN would become a NaN threshold (topk ranks NaN first)
        raise ValueError(f"{bad} of {n_samples} samples have non-finite max probabilities (NaN or inf outputs): "
                         "leave them out of the fit; their confidence says nothing")
    proportions = torch.as_tensor(exit_proportions)
    if not proportions.is_floating_point():
        proportions = proportions.float()
    proportions = proportions.to("cpu")
    if proportions.numel() < n_steps - 1:
        raise ValueError(f"need {n_steps} exit proportions (one per step), got {proportions.numel()}")
    # The reference computes floor(n_samples * p[k]) with p[k] a float32 tensor: the product rounds
    # in float32, which decides the count for large N; reproduce it.
    out_counts = torch.floor(proportions * torch.tensor(float(n_samples), dtype=proportions.dtype)).long()
    thresholds = torch.full((n_steps,), NO_EXIT_THRESHOLD, dtype=max_probs.dtype, device=max_probs.device)
    exited = torch.zeros(n_samples, dtype=torch.bool, device=max_probs.device)
    for k in range(n_steps - 1):
        out_n = int(out_counts[k])
        remaining = max_probs[k][~exited]
        if 1 <= out_n <= remaining.numel():
            # the out_n-th largest among the remaining; ties do not matter: only the value is kept
            thresholds[k] = torch.topk(remaining, out_n, sorted=True).values[-1]
        exited |= max_probs[k] >= thresholds[k]
    thresholds[n_steps - 1] = LAST_STEP_THRESHOLD
    return thresholds


def exit_steps(probs: torch.Tensor, thresholds: FlopsLike) -> torch.Tensor:
    """The 0-based step at which each sample exits: the first k with max prob >= thresholds[k].

    Args:
        probs: Tensor[T, N, classes] (or its :func:`confidences` pair); thresholds: Tensor[T] (last one
            normally -1e8).
    Returns:
        Tensor[N] int64 on ``probs``' device; a sample that reaches no threshold (only possible when the
        last threshold is not -1e8, or with NaNs) gets T - 1, the step where it would stop anyway.
    """
    max_probs, _ = _max_probs(probs)
    thresholds = torch.as_tensor(thresholds, device=max_probs.device)
    if thresholds.numel() != max_probs.shape[0]:
        raise ValueError(f"need one threshold per step ({max_probs.shape[0]}), got {thresholds.numel()}")
    passes = max_probs >= thresholds.view(-1, 1)  # [T, N]
    passes[-1] = True
    # argmax on int returns the first maximal index: the first step that passes
    return passes.to(torch.uint8).argmax(dim=0)


def evaluate(probs: torch.Tensor, targets: torch.Tensor, flops: FlopsLike,
             thresholds: FlopsLike) -> tuple[float, float]:
    """Accuracy and expected cost of early exit with ``thresholds``.

    Args:
        probs: Tensor[T, N, classes] softmax outputs (or their :func:`confidences` pair);
            targets: Tensor[N] int labels.
        flops: cumulative Multiply-Adds of steps 0..k, length T.
        thresholds: Tensor[T].
    Returns:
        (top-1 accuracy in percent, expected Multiply-Adds per sample = sum_k share_k * flops[k]).
    """
    max_probs, preds = _max_probs(probs)
    n_steps, n_samples = max_probs.shape
    flops = torch.as_tensor(flops, dtype=torch.float64).flatten().cpu()
    if flops.numel() < n_steps:
        raise ValueError(f"need flops for each of the {n_steps} steps, got {flops.numel()}")
    targets = torch.as_tensor(targets, device=preds.device).long()
    steps = exit_steps((max_probs, preds), thresholds)
    exit_preds = preds.gather(0, steps.view(1, -1)).squeeze(0)
    correct = int((exit_preds == targets).sum())
    counts = torch.bincount(steps.cpu(), minlength=n_steps).double()
    expected_flops = float((counts / n_samples * flops[:n_steps]).sum())
    return correct * 100.0 / n_samples, expected_flops


def budget_curve(train_probs: torch.Tensor, train_targets: Optional[torch.Tensor], val_probs: torch.Tensor,
                 val_targets: torch.Tensor, flops: FlopsLike,
                 thresholds: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list, list]:
    """The budgeted-batch-classification curve over the reference's 39 exit distributions.

    Args:
        train_probs / train_targets: Tensor[T, N_train, classes] / Tensor[N_train] to fit the thresholds
            on (the reference uses 200000 training images); ignored when ``thresholds`` is given.
        val_probs / val_targets: Tensor[T, N_val, classes] / Tensor[N_val] to evaluate on.
        (Probabilities may be given as their :func:`confidences` pairs.)
        flops: cumulative Multiply-Adds per step count, length T.
        thresholds: Tensor[39, T] stored thresholds (eval mode 1) instead of fitting them (mode 2).
    Returns:
        (thresholds Tensor[39, T], accuracies list of 39 top-1 %, expected Multiply-Adds list of 39).
    """
    n_steps = _max_probs(val_probs)[0].shape[0]
    if thresholds is None:
        if train_probs is None:
            raise ValueError("budget_curve needs train_probs to fit thresholds, or stored thresholds")
        rows = [find_thresholds(train_probs, train_targets, exit_proportions(p / 20.0, n_steps)).cpu()
                for p in range(1, BUDGET_POINTS + 1)]
        thresholds = torch.stack(rows)
    thresholds = check_threshold_table(thresholds, n_steps, "thresholds")
    accuracies, costs = [], []
    for row in thresholds:
        accuracy, cost = evaluate(val_probs, val_targets, flops, row)
        accuracies.append(accuracy)
        costs.append(cost)
    return thresholds, accuracies, costs


def separated_thresholds(max_probs: torch.Tensor, shares) -> tuple[torch.Tensor, float]:
    """Thresholds that let about ``shares[k]`` of the images exit at step k (MSDNet's procedure: among those
    still there), each placed in the middle of the widest gap between neighbouring max probabilities near that
    quantile, so that float rounding differences (another batch composition, a compiled or graphed run) cannot
    move an image across a threshold. For checking real early exit against the post-hoc simulation.

    Args:
        max_probs: Tensor[T, N] max softmax probability after each step. shares: T-1 fractions.
    Returns:
        (thresholds Tensor[T] float64 with the last -1e8, the smallest distance of a still-running image's max
        probability to its step's threshold).
    """
    T, n = max_probs.shape
    remaining = torch.ones(n, dtype=torch.bool, device=max_probs.device)
    thresholds, margin = [], float("inf")
    for k in range(T - 1):
        values = max_probs[k][remaining].double().sort(descending=True).values
        target = min(max(int(round(shares[k] * n)), 1), values.numel() - 1)
        window = range(max(1, target - 2), min(values.numel(), target + 3))
        split = max(window, key=lambda i: values[i - 1] - values[i])
        threshold = float(values[split - 1] + values[split]) / 2
        thresholds.append(threshold)
        margin = min(margin, float((values - threshold).abs().min()))
        remaining &= max_probs[k].double() < threshold
    return torch.tensor(thresholds + [-1e8], dtype=torch.float64), margin
