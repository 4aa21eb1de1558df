"""Writing a network as a checkpoint in the reference's two layouts (see :mod:`gfnet.checkpoint`)."""
from __future__ import annotations

from collections import OrderedDict

from gfnet.atomic import atomic_save
from gfnet.checkpoint.keys import timm_to_pycls
from gfnet.models.meta import EVALUATION_FIELDS

__all__ = ["LAYOUTS", "REFERENCE_FIELDS", "REFERENCE_TRAIN_FIELDS", "checkpoint_dict", "save_checkpoint"]

#: The two layouts :func:`save_checkpoint` writes (see :mod:`gfnet.checkpoint`).
LAYOUTS = ("release", "reference-train")
REFERENCE_FIELDS = ("model_name", "patch_size", "model_prime_state_dict", "model_state_dict", "fc",
                    "policy", "model_flops", "policy_flops", "fc_flops", "flops",
                    "anytime_classification", "dynamic_threshold", "budgeted_batch_classification")
#: What the reference's train.py saves each epoch (its save_checkpoint call).
REFERENCE_TRAIN_FIELDS = ("epoch", "model_state_dict", "model_prime_state_dict", "fc", "acc", "best_acc",
                          "optimizer", "ppo_optimizer", "policy")


def checkpoint_dict(net, layout: str = "release", **meta) -> dict:
    """The checkpoint dict of ``net`` in ``layout`` (see :func:`save_checkpoint`)."""
    from gfnet import __version__
    from gfnet.flops import known_flops

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    prefix = "module." if layout == "release" else ""

    def encoder_state(encoder):
        state = OrderedDict((k, v.detach().cpu()) for k, v in encoder.net.state_dict().items())
        if net.config.family == "regnet":
            state = timm_to_pycls(state)
        return OrderedDict((prefix + k, v) for k, v in state.items())

    def plain(module):
        return OrderedDict((k, v.detach().cpu()) for k, v in module.state_dict().items())

    fields = {k: v for k, v in net.meta.evaluation().items() if v is not None}
    fields.update(meta)
    if layout == "release" and fields.get("flops") is None:
        fields.update(known_flops(net))
    # policy=None asks for the reference's "no trained policy yet" (its stage-1 files); the release layout
    # always carries the policy's weights, as inference.py loads them.
    no_policy = fields.pop("policy", ...) is None if "policy" in fields else net.meta.trained_policy is False
    policy = None if layout == "reference-train" and no_policy else plain(net.policy)
    obj = {
        "model_prime_state_dict": encoder_state(net.model_prime),
        "model_state_dict": encoder_state(net.model),
        "fc": plain(net.fc),
        "policy": policy,
    }
    if layout == "release":
        obj = {"model_name": net.arch, "patch_size": net.patch_size, **obj}
        for k in EVALUATION_FIELDS:
            obj[k] = fields.pop(k, None)
    else:
        for k in ("epoch", "acc", "best_acc", "optimizer", "ppo_optimizer"):
            obj[k] = fields.pop(k, None)
        # Extras the reference's train.py never reads, so that gfnet needs no --arch/--patch-size/--T.
        obj.update({"model_name": net.arch, "patch_size": net.patch_size})
    # Our own fields (the reference's code ignores them): T, classes, classifier kind, version, layout, and the
    # class folder names that the labels index (training data's; absent where the net was never trained here).
    if net.meta.classes is not None:
        obj["classes"] = [str(c) for c in net.meta.classes]
    obj.update({"T": net.T, "num_classes": net.num_classes, "image_size": int(net.config.image_size),
                "crop_pct": float(net.config.crop_pct),
                "classifier": "gru" if net.fc.is_rnn else "cascade", "gfnet_version": __version__,
                "layout": layout, "trained_policy": not no_policy})
    obj.update(fields)
    return obj


def save_checkpoint(net, path: str, layout: str = "release", **meta) -> None:
    """Save ``net`` atomically in one of the reference's two layouts.

    - ``layout="release"`` (default; what the reference's ``inference.py`` and ``gfnet-eval`` read):
      encoder state dicts with the ``module.`` prefix, model_name, patch_size and the flops fields
      (computed when neither ``meta`` nor ``net.meta`` holds them); ``anytime_classification``,
      ``dynamic_threshold`` and ``budgeted_batch_classification`` from ``meta`` or ``net.meta``
      (None when never evaluated).
    - ``layout="reference-train"`` (what the reference's ``train.py`` loads with ``--checkpoint_path``
      for stages 2/3 and with ``--resume``): un-prefixed encoder state dicts, fc, policy (None when
      ``policy=None`` is passed or ``net.meta.trained_policy`` is False), and epoch, acc, best_acc,
      optimizer, ppo_optimizer from ``meta`` (None when not given; the optimiser state dicts must be
      in train.py's parameter order, see :mod:`gfnet.train.weights`).

    RegNet encoders get pycls's names in both. Extra ``meta`` keys are stored too.
    """
    atomic_save(checkpoint_dict(net, layout=layout, **meta), path)
