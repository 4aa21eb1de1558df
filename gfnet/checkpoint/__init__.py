"""Checkpoint I/O: every kind of GFNet checkpoint in, the reference's two layouts out.

Three kinds of file exist in the wild, all dicts loaded with torch.load, all with the reference's
field names model_prime_state_dict, model_state_dict (the backbones), fc (the classifier) and policy:

- **release layout** (the reference's released files, read by its ``inference.py``; gfnet's default):
  backbone keys with the ``module.`` prefix (saved from nn.DataParallel), plus model_name, patch_size,
  model_flops, policy_flops, fc_flops, flops (one entry per step count, so T = len(flops)),
  anytime_classification, dynamic_threshold (Tensor[39, T]) and budgeted_batch_classification.
- **reference-train layout** (what the reference's ``train.py`` writes and reads back for stages 2/3
  and ``--resume``): un-prefixed backbone keys (it loads them strictly into bare backbones), fc,
  policy (None after stage 1), optimizer, ppo_optimizer (the optimisers' state dicts), epoch, acc,
  best_acc; no model_name, patch_size or T: those come from the caller.
- **gfnet's** files: either layout, plus fields of our own that the reference ignores (T, num_classes,
  classifier, gfnet_version, layout, train_state).

A file is read once, into one typed record (:class:`CheckpointFile`, :func:`read_record`), and that record
is what every entry point is handed (:func:`load_checkpoint`, ``gfnet-train --checkpoint/--resume`` with its
run folder and run state, ``gfnet-eval``, ``gfnet-viz``): it accepts any of the kinds above, with or without
the prefix, resolves the backbone, patch size and T from the file and the caller (:func:`read_checkpoint`,
:meth:`CheckpointFile.resolve`), names every disagreement with a run at once
(:meth:`CheckpointFile.differences`) and says what run a training file belongs to
(:meth:`CheckpointFile.run_info`). :func:`load_weights` is the one state-dict loader; a loaded network's
``net.meta`` is a :class:`~gfnet.models.meta.ModelMeta`. RegNet encoders use facebookresearch/pycls key
names in every layout; we build RegNet through timm and map the names with one table
(:data:`PYCLS_TIMM_KEYS`), each direction derived from it.

The package's modules: :mod:`~gfnet.checkpoint.record` (reading every layout into the record),
:mod:`~gfnet.checkpoint.fields` (the format's rules), :mod:`~gfnet.checkpoint.run` (what a training file
says about its run), :mod:`~gfnet.checkpoint.load` (weights into a network), :mod:`~gfnet.checkpoint.write`
(both layouts out), :mod:`~gfnet.checkpoint.keys` (key tables); files are written by :mod:`gfnet.atomic`
(re-exported here).
"""
from gfnet.atomic import STALE_TEMP_SECONDS, _host_tag, atomic_save, remove_stale_temps, replaceable_target
from gfnet.checkpoint.fields import CheckpointError, load_failure, torch_load
from gfnet.checkpoint.keys import (
    PYCLS_TIMM_KEYS,
    pycls_to_timm,
    reference_parameter_order,
    strip_module_prefix,
    timm_to_pycls,
)
from gfnet.checkpoint.load import load_checkpoint, load_weights
from gfnet.checkpoint.record import CheckpointFile, read_checkpoint, read_record, read_run_info
from gfnet.checkpoint.run import RunInfo
from gfnet.checkpoint.write import LAYOUTS, REFERENCE_FIELDS, REFERENCE_TRAIN_FIELDS, checkpoint_dict, save_checkpoint
from gfnet.models.meta import ModelMeta

__all__ = ["CheckpointError", "CheckpointFile", "LAYOUTS", "ModelMeta", "PYCLS_TIMM_KEYS", "REFERENCE_FIELDS",
           "REFERENCE_TRAIN_FIELDS", "RunInfo", "STALE_TEMP_SECONDS", "atomic_save", "checkpoint_dict",
           "load_checkpoint", "load_weights", "load_failure", "pycls_to_timm", "read_checkpoint", "read_record",
           "read_run_info", "reference_parameter_order", "remove_stale_temps", "replaceable_target",
           "save_checkpoint", "strip_module_prefix", "timm_to_pycls", "torch_load", "_host_tag"]
