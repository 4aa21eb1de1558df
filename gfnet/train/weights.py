"""Weights and optimiser states for training: backbone initialisations, checkpoint weights, the
reference train.py's optimiser layout, and the fresh policy that stage 2 starts from.

The reference's ``train.py`` builds ``SGD([{model}, {model_prime}, {fc}])`` (``model_prime`` only for
the families that train it) over each module's full ``parameters()``, and ``Adam(policy.parameters())``
for PPO. gfnet's SGD has the same groups, but its classifier group leaves out the cascade heads that
never see data (fc_k for k > T) and RegNet's parameters come in timm's order rather than pycls's. An
optimiser state dict indexes parameters by position, so moving one between the two layouts is a
re-indexing by parameter name: :func:`remap_optimizer_state`.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Mapping, Optional, Sequence

import torch

from gfnet.checkpoint import (
    CheckpointFile,
    load_weights,
    pycls_to_timm,
    reference_parameter_order,
    strip_module_prefix,
    torch_load,
)
from gfnet.models.encoder import Encoder
from gfnet.models.gfnet import GFNet

__all__ = ["load_backbone_weights", "load_network_weights", "sgd_parameter_groups", "sgd_parameter_names",
           "remap_optimizer_state", "reset_policy"]

log = logging.getLogger("gfnet.train")

# gfnet's own keys in its SGD groups (the reference's train.py has neither).
_GFNET_GROUP_KEYS = ("base_lr", "name")


def _unwrap(obj, path: str, gfnet_field: str) -> Mapping[str, torch.Tensor]:
    # A GFNet checkpoint (any layout) holds both encoders: take the one asked for. Otherwise the common
    # containers of a backbone state dict: {"state_dict": ...}, {"model": ...}.
    if isinstance(obj, Mapping):
        if isinstance(obj.get("model_state_dict"), Mapping) and isinstance(obj.get("model_prime_state_dict"), Mapping):
            return obj[gfnet_field]
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ValueError(f"{path} holds no backbone state dict (expected a dict of tensors, or one under "
                     f"'state_dict' / 'model'); got {type(obj).__name__}")


def load_backbone_weights(encoder: Encoder, path: str, strict_head: bool = False, role: str = "local") -> dict:
    """Load a plain backbone checkpoint (torchvision/timm key names; ``module.`` prefix allowed; RegNet
    in pycls names mapped to timm's) into ``encoder``. From a GFNet checkpoint (any layout) the
    encoder of the same ``role`` is taken: ``"global"`` reads model_prime_state_dict, ``"local"``
    model_state_dict.

    The backbone's own head is skipped when its shape differs (an ImageNet head on a 10-class task)
    unless ``strict_head``. Returns {"missing": [...], "skipped_head": [...]}.

    Raises:
        FileNotFoundError: no file; ValueError: the file's weights do not fit this backbone.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no backbone weights at {path}")
    if role not in ("global", "local"):
        raise ValueError(f"role must be 'global' or 'local', got {role!r}")
    field = "model_prime_state_dict" if role == "global" else "model_state_dict"
    obj = torch_load(path, what="a backbone state dict nor a gfnet or reference GFNet checkpoint")
    state = strip_module_prefix(_unwrap(obj, path, field))
    if encoder.config.family == "regnet" and any(".f.a." in k or k.startswith("stem.conv") for k in state):
        state = pycls_to_timm(state)
    own = encoder.net.state_dict()
    head_prefix = encoder.config.head_attr + "."
    skipped = [k for k in state if k.startswith(head_prefix) and k in own and state[k].shape != own[k].shape]
    if skipped and strict_head:
        raise ValueError(f"{path}: head {skipped} has another number of classes than the model")
    state = OrderedDict((k, v) for k, v in state.items() if k not in skipped)
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                  if k in own and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state and k not in skipped]
    body_missing = [k for k in missing if not k.startswith(head_prefix)]
    if unexpected or mismatched or body_missing:
        raise ValueError(
            f"{path} does not fit backbone {encoder.config.name!r}: unexpected keys {unexpected[:5]}, "
            f"shape mismatches {mismatched[:5]}, missing keys {body_missing[:5]}. Is it this architecture's "
            "checkpoint (torchvision/timm names)?")
    encoder.net.load_state_dict(state, strict=False)
    return {"missing": missing, "skipped_head": skipped}


def load_network_weights(net: GFNet, ckpt) -> None:
    """Load the weights of a checkpoint (a :class:`~gfnet.checkpoint.CheckpointFile`, or a dict as
    torch.load returns it, either layout) into ``net``; ``policy: None`` keeps ``net``'s policy."""
    if not isinstance(ckpt, CheckpointFile):
        ckpt = CheckpointFile(path="<checkpoint dict>", raw=dict(ckpt), origin="", layout="",
                              prefixed=False, arch=net.arch, patch_size=net.patch_size, T=net.T,
                              num_classes=net.num_classes, classifier="gru" if net.fc.is_rnn else "cascade",
                              stage=None, trained_policy=ckpt.get("policy") is not None)
    load_weights(net, ckpt)


# ----------------------------------------------------------------------------- optimiser layouts
def _encoders(net: GFNet, train_global: bool):
    return [("model", net.model)] + ([("model_prime", net.model_prime)] if train_global else [])


def sgd_parameter_groups(net: GFNet, train_global: bool) -> list:
    """gfnet's SGD groups of stages 1 and 3: [(group name, [(parameter name, Parameter)])] for the local
    encoder, the global one (when ``train_global``) and the classifier's heads that step 1..T use.
    Parameter names are ``net.named_parameters()``'s."""
    params = dict(net.named_parameters())
    groups = [(name, [(f"{name}.{n}", p) for n, p in encoder.named_parameters()])
              for name, encoder in _encoders(net, train_global)]
    fc = []
    for n, _ in net.fc.named_parameters():
        # The cascade holds fc_2..fc_5 even for T < 5 (the reference's layout); heads beyond fc_T never
        # see data, so they stay out of the optimiser (and DDP needs no unused-parameter search).
        if not net.fc.is_rnn and int(n.split(".")[0].split("_")[1]) > net.T:
            continue
        fc.append((f"fc.{n}", params[f"fc.{n}"]))
    groups.append(("fc", fc))
    return groups


def sgd_parameter_names(net: GFNet, train_global: bool, layout: str = "gfnet") -> list:
    """Parameter names per SGD group, in optimiser order: ``layout="gfnet"`` as
    :func:`sgd_parameter_groups`, ``"reference-train"`` as the reference's train.py orders them
    (each backbone's own ``parameters()`` order, all cascade heads)."""
    if layout == "gfnet":
        return [[n for n, _ in group] for _, group in sgd_parameter_groups(net, train_global)]
    if layout != "reference-train":
        raise ValueError(f"layout must be 'gfnet' or 'reference-train', got {layout!r}")
    names = [[f"{name}.net.{n}" for n in reference_parameter_order(encoder)]
             for name, encoder in _encoders(net, train_global)]
    names.append([f"fc.{n}" for n, _ in net.fc.named_parameters()])
    return names


def remap_optimizer_state(state: Mapping, src_names: Sequence[Sequence[str]], dst_names: Sequence[Sequence[str]],
                          path: str = "the optimiser state", drop_group_keys: Sequence[str] = ()) -> dict:
    """Re-index an optimiser state dict from one parameter layout to another.

    Args:
        state: ``optimizer.state_dict()`` whose groups list their parameters in ``src_names`` order.
        src_names / dst_names: parameter names per group (same number of groups, same meaning: the
            i-th group of one is the i-th of the other); a name missing from ``dst_names`` loses its
            state (a cascade head the destination leaves out; it never had any), a name missing from
            ``src_names`` starts without state.
        drop_group_keys: group hyper-parameter keys to leave out (ours, that the other layout lacks).
    Returns:
        the state dict for an optimiser built over ``dst_names``.
    Raises:
        ValueError: the groups of ``state`` do not match ``src_names`` (the message names the sizes).
    """
    groups = state["param_groups"]
    have = [len(g["params"]) for g in groups]
    want = [len(g) for g in src_names]
    if have != want:
        raise ValueError(f"{path}: its optimizer has parameter groups of sizes {have}, this run expects {want} "
                         "(the same backbone, classifier and frozen/trained global encoder?)")
    by_name = {}
    for group, names in zip(groups, src_names):
        for index, name in zip(group["params"], names):
            if index in state["state"]:
                by_name[name] = state["state"][index]
    kept = {n for names in dst_names for n in names}
    lost = [n for n in by_name if n not in kept]
    if lost:
        log.debug("%s: no destination for the state of %s", path, lost[:5])
    new_state, new_groups, start = {}, [], 0
    for group, names in zip(groups, dst_names):
        indices = list(range(start, start + len(names)))
        for index, name in zip(indices, names):
            if name in by_name:
                new_state[index] = by_name[name]
        new_group = {k: v for k, v in group.items() if k != "params" and k not in drop_group_keys}
        new_group["params"] = indices
        new_groups.append(new_group)
        start += len(names)
    return {"state": new_state, "param_groups": new_groups}


def sgd_state_to_reference(optimizer: torch.optim.Optimizer, net: GFNet, train_global: bool) -> dict:
    """gfnet's SGD state dict in the layout that the reference train.py's optimiser loads."""
    return remap_optimizer_state(optimizer.state_dict(), sgd_parameter_names(net, train_global, "gfnet"),
                                 sgd_parameter_names(net, train_global, "reference-train"),
                                 drop_group_keys=_GFNET_GROUP_KEYS)


def load_sgd_state(optimizer: torch.optim.Optimizer, saved: Optional[Mapping], net: GFNet, train_global: bool,
                   path: str) -> str:
    """Load a stored SGD state dict, gfnet's or the reference train.py's layout, into gfnet's
    ``optimizer`` (built by :func:`sgd_parameter_groups`). Returns the layout found.

    The groups' own keys (``base_lr``, ``name``) are this run's: the stored learning rates are those of
    the last epoch, and the schedule sets them again at the start of the next.
    """
    if not isinstance(saved, Mapping) or "param_groups" not in saved:
        raise ValueError(f"{path} holds no SGD state ('optimizer' is {type(saved).__name__}): is it a "
                         "stage-2 file? --resume takes a file of the same stage")
    ours = [{k: g[k] for k in _GFNET_GROUP_KEYS if k in g} for g in optimizer.param_groups]
    if all("name" in g for g in saved["param_groups"]):
        layout, state = "gfnet", saved
        names = [g["name"] for g in saved["param_groups"]]
        if names != [g["name"] for g in ours]:
            raise ValueError(f"{path}: its optimizer trains {names}, this run {[g['name'] for g in ours]}: "
                             "give the same --train-global as the run that wrote it")
    else:
        layout = "reference-train"
        state = remap_optimizer_state(saved, sgd_parameter_names(net, train_global, "reference-train"),
                                      sgd_parameter_names(net, train_global, "gfnet"), path)
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, ours):
        group.update(own)
    return layout


def adam_state_to_reference(state: Mapping) -> dict:
    """An Adam state dict with its step counters as plain integers: current PyTorch keeps them as
    tensors and turns numbers back into tensors when it loads them, while the PyTorch releases of the
    reference's time (1.x) do arithmetic with them as numbers."""
    return {"state": {i: {k: (int(v.item()) if k == "step" and torch.is_tensor(v) else v) for k, v in s.items()}
                      for i, s in state["state"].items()},
            "param_groups": [dict(g) for g in state["param_groups"]]}


def fresh_adam_state(net: GFNet, lr: float, betas) -> dict:
    """The state dict of a new, never stepped Adam over the policy: what the reference's stage 3 saves
    as ``ppo_optimizer`` (it builds PPO's Adam but never updates it)."""
    return torch.optim.Adam(net.policy.parameters(), lr=lr, betas=tuple(betas)).state_dict()


def reset_policy(net: GFNet, seed: int) -> None:
    """Re-initialise ``net.policy`` as a newly built one (PyTorch's default initialisation of each
    layer), from a generator seeded with ``seed`` and without touching the global random state.

    Stage 2 of the reference's train.py starts PPO from such a policy: its stage-1 files store none."""
    from gfnet.models.policy import Policy

    config = net.config
    # Built on the CPU from the CPU generator alone, so that no device's random stream moves.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        fresh = Policy(config.feature_map_channels, config.state_dim(net.patch_size), config.policy_hidden_dim,
                       conv=config.policy_conv)
    with torch.no_grad():
        for name, value in fresh.state_dict().items():
            net.policy.state_dict()[name].copy_(value)
    net.meta.trained_policy = False
