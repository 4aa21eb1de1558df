"""What a training checkpoint says about its run (:class:`RunInfo`), read from its fields."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gfnet.checkpoint.fields import CheckpointError

__all__ = ["RunInfo", "best_epoch_of", "run_info"]


@dataclass(frozen=True)
class RunInfo:
    """What a training checkpoint says about its run.

    Attributes: path; run_id (None in files of earlier gfnet builds and the reference's); stage (0: the
    reference train.py's file, which does not say); epoch (finished epochs); epochs (the run's planned total);
    acc (of its last finished epoch); best_acc; best_epoch (the epoch whose weights ``model_best.pth.tar``
    should hold; 0: none yet); step (a mid-epoch state: the steps of epoch ``epoch + 1`` it has trained;
    None: the state at the end of epoch ``epoch``).
    """

    path: str
    run_id: Optional[str]
    stage: int
    epoch: int
    epochs: Optional[int]
    acc: Optional[float]
    best_acc: float
    best_epoch: int
    step: Optional[int] = None


def best_epoch_of(obj: dict) -> int:
    """The best epoch of a training checkpoint: stored by this gfnet, else derived from its history
    (the first epoch whose accuracy equals ``best_acc``)."""
    state = obj.get("train_state") or {}
    if state.get("best_epoch") is not None:
        return int(state["best_epoch"])
    best = obj.get("best_acc")
    for record in state.get("history") or []:
        if best is not None and record.get("acc") == best and best > 0:
            return int(record["epoch"])
    return 0


def run_info(path: str, obj) -> RunInfo:
    """The :class:`RunInfo` of the training checkpoint dict ``obj`` read from ``path``.

    Raises:
        CheckpointError: ``obj`` is not a checkpoint, or holds no training state.
    """
    if not isinstance(obj, dict) or "model_state_dict" not in obj:
        raise CheckpointError(f"{path} is not a gfnet or reference GFNet checkpoint (no 'model_state_dict' field)")
    state = obj.get("train_state")
    if not isinstance(state, dict):
        if "optimizer" in obj and "epoch" in obj:  # the reference train.py's own file: no run identity
            return RunInfo(path=path, run_id=None, stage=0, epoch=int(obj.get("epoch") or 0), epochs=None,
                           acc=obj.get("acc"), best_acc=float(obj.get("best_acc") or 0.0), best_epoch=0)
        raise CheckpointError(f"{path} holds no training state: it is not a checkpoint written during training "
                              "(by gfnet-train or the reference's train.py); to start a stage from its weights, "
                              "use --checkpoint")
    options = state.get("options") or {}
    mid = state.get("mid_epoch")
    return RunInfo(path=path, run_id=state.get("run_id"), stage=int(state.get("stage", 0)),
                   epoch=int(obj.get("epoch") or 0), epochs=options.get("epochs"), acc=obj.get("acc"),
                   best_acc=float(obj.get("best_acc") or 0.0), best_epoch=best_epoch_of(obj),
                   step=int(mid["step"]) if isinstance(mid, dict) else None)
