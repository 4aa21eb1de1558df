"""``GFNet.meta``: what a network knows about itself besides its weights and its configuration.

The fields carry the reference checkpoints' names (a release file stores the evaluation fields under them);
:mod:`gfnet.checkpoint` fills a :class:`ModelMeta` from a file it reads and writes its fields back. The
backbone, patch size, T, class count, classifier kind and evaluation geometry (``image_size``,
``crop_pct``) are not here: the network holds them (``net.arch``, ``net.patch_size``, ``net.T``,
``net.num_classes``, ``net.config``; a checkpoint's geometry is applied to ``net.config``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["EVALUATION_FIELDS", "ModelMeta"]

#: The reference's evaluation fields (what its inference.py and gfnet-eval read and write).
EVALUATION_FIELDS = ("model_flops", "policy_flops", "fc_flops", "flops", "anytime_classification",
                     "dynamic_threshold", "budgeted_batch_classification")


@dataclass
class ModelMeta:
    """The evaluation results, data and provenance of a GFNet (``net.meta``).

    Evaluation (None: not measured):
        flops: cumulative Multiply-Adds per step count, T entries (``flops[t]``: the first t+1 steps).
        model_flops, policy_flops, fc_flops: Multiply-Adds of one encoder pass, one policy call and one
            classifier call.
        anytime_classification: top-1 accuracy (%) after each step, T entries.
        dynamic_threshold: Tensor[39, T], the early-exit thresholds fitted for the reference's 39 budgets.
        budgeted_batch_classification: [Multiply-Adds list, accuracy list], one entry per budget.
    Data:
        classes: the class folder names that the labels index (the training split's); None where the
            network was never trained here and its file names none.
    Provenance (None: unknown, e.g. a network built here and never saved):
        trained_policy: False when the policy is not one that stage 2 trained (a stage-1 file, a file with
            policy None, a policy reset for stage 2); True or None otherwise.
        source_origin: the file's kind: "gfnet", "reference-release" or "reference-train".
        stage: the training stage that wrote the file, where the file tells.
        epoch, acc, best_acc: the file's training record (finished epochs, last and best accuracy).
        gfnet_version, layout: the gfnet build and layout ("release", "reference-train") that wrote it.
        extras: the other fields the file stores (e.g. extra keys given to ``save_checkpoint``), by name.
    """

    flops: Optional[list] = None
    model_flops: Optional[float] = None
    policy_flops: Optional[float] = None
    fc_flops: Optional[float] = None
    anytime_classification: Optional[list] = None
    dynamic_threshold: Any = None
    budgeted_batch_classification: Optional[list] = None
    classes: Optional[list] = None
    trained_policy: Optional[bool] = None
    source_origin: Optional[str] = None
    stage: Optional[int] = None
    epoch: Optional[int] = None
    acc: Optional[float] = None
    best_acc: Optional[float] = None
    gfnet_version: Optional[str] = None
    layout: Optional[str] = None
    extras: dict = field(default_factory=dict)

    def evaluation(self) -> dict:
        """The evaluation fields under the reference's names (None where not measured)."""
        return {k: getattr(self, k) for k in EVALUATION_FIELDS}

    def set_flops(self, counts: dict) -> None:
        """Take the Multiply-Add counts of :func:`gfnet.flops.compute_flops` (flops, model/policy/fc_flops)."""
        for k in ("flops", "model_flops", "policy_flops", "fc_flops"):
            if k in counts:
                setattr(self, k, counts[k])

    def clear_evaluation(self) -> None:
        """Forget the measured accuracies and thresholds (they describe other weights once training goes on;
        the Multiply-Add counts stay true)."""
        self.anytime_classification = self.dynamic_threshold = self.budgeted_batch_classification = None

    def as_dict(self) -> dict:
        """The fields that hold a value, under the checkpoint's names (extras included), e.g. for
        :func:`gfnet.viz.budget_series`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extras"}
        out = {k: v for k, v in out.items() if v is not None}
        return {**self.extras, **out}

    # ---- deprecated: the dict interface of earlier builds, read-only, for code not yet moved to the fields
    def get(self, key: str, default: Any = None) -> Any:
        """Deprecated: read the field ``key`` (a name of the checkpoint's) like ``dict.get``; use the attribute."""
        if key in _NAMES:
            value = getattr(self, key)
            return default if value is None else value
        return self.extras.get(key, default)

    def __getitem__(self, key: str) -> Any:
        """Deprecated: ``meta[key]`` of earlier builds (KeyError where the field holds nothing)."""
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value


_NAMES = frozenset(f.name for f in dataclasses.fields(ModelMeta)) - {"extras"}
