"""One training run on an ImageNet-layout folder: what ``gfnet-train`` does, callable from Python."""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.distributed

from gfnet.models.gfnet import GFNet, build_model
from gfnet.train.distributed import init_distributed
from gfnet.train.run_folder import RunFolder
from gfnet.train.trainer import Trainer, TrainOptions
from gfnet.train.weights import load_backbone_weights

__all__ = ["build_training_model", "train_imagefolder", "adopt_data_classes", "check_out_outside_data"]

log = logging.getLogger("gfnet.train")


def build_training_model(arch: Optional[str], patch_size: Optional[int], T: Optional[int], stage: int,
                         num_classes: Optional[int] = None, init_global: Optional[str] = None,
                         init_local: Optional[str] = None, checkpoint: Optional[str] = None,
                         classifier: Optional[str] = None) -> GFNet:
    """The network a stage starts from.

    Stage 1 builds ``arch`` and loads backbone initialisations (plain state dicts: torchvision/timm
    names, ``module.`` prefix allowed, RegNet pycls names mapped) into the global (``init_global``) and
    local (``init_local``) encoders; stages 2 and 3 continue from the previous stage's ``checkpoint``:
    any GFNet checkpoint (gfnet's, the reference's released files, the reference train.py's), whose
    backbone, patch size and T must match ``arch``, ``patch_size`` and ``T`` where both give them
    (files of the reference's train.py name none: then they come from here).
    """
    from gfnet.checkpoint import load_checkpoint

    if stage == 1 and not checkpoint:
        missing = [flag for flag, value in (("--arch", arch), ("--patch-size", patch_size), ("--T", T))
                   if value is None]
        if missing:
            raise ValueError(f"stage 1 from backbone weights builds a new GFNet: give {', '.join(missing)}")
        if num_classes is None:
            raise ValueError("stage 1 from backbones needs the number of classes")
        net = build_model(arch, patch_size=patch_size, T=T, num_classes=num_classes, classifier=classifier)
        for path, encoder, name in ((init_global, net.model_prime, "global"), (init_local, net.model, "local")):
            if path:
                info = load_backbone_weights(encoder, path, role=name)
                if info["skipped_head"]:
                    log.info("%s encoder: %s's head has another class count; kept a fresh head", name, path)
            else:
                log.warning("no --init-%s: the %s encoder starts from random weights (the reference "
                            "starts both encoders from ImageNet-trained backbones)", name, name)
        return net
    if not checkpoint:
        raise ValueError(f"stage {stage} continues a previous stage: give --checkpoint PATH "
                         "(the checkpoint.pth.tar or model_best.pth.tar of the stage before)")
    if init_global or init_local:
        raise ValueError("--init-global/--init-local only start stage 1; stages 2 and 3 take --checkpoint")
    net = load_checkpoint(checkpoint, arch=arch, patch_size=patch_size, T=T)
    # Evaluation results of an earlier stage describe other weights.
    for k in ("anytime_classification", "dynamic_threshold", "budgeted_batch_classification"):
        net.meta.pop(k, None)
    return net


def check_out_outside_data(data: str, out: str) -> None:
    """Refuse an output folder inside the dataset's ``train/`` or ``val/`` folder: the index would read it as a
    class folder (a model with one class too many, an empty class). Call it before the folder is created.

    Raises:
        ValueError: ``out`` is, or lies inside, ``data/train`` or ``data/val``.
    """
    out_real = os.path.realpath(out)
    for split in ("train", "val"):
        split_real = os.path.realpath(os.path.join(data, split))
        if out_real == split_real or out_real.startswith(split_real + os.sep):
            raise ValueError(f"--out {out} lies inside the dataset's {split}/ folder ({split_real}), where every "
                             f"folder is a class: choose an --out outside {os.path.join(data, split)}")


def adopt_data_classes(net: GFNet, found: list, where: str, source: str) -> None:
    """Check the training split's class folders ``found`` against the classes ``net`` classifies, and record
    them in ``net.meta["classes"]`` (checkpoints store them; evaluation labels every split by them).

    A net whose checkpoint names its classes must see exactly those folders (same names: a removed, renamed or
    added class would shift the labels or point past the classifier). A net that names none (the reference's
    files, gfnet files of earlier builds, a fresh net) takes ``found`` when its classifier has as many outputs.

    Args:
        net: the network a run starts from; found: sorted class folder names of the training split;
        where: the split folder (for messages); source: where the net comes from (for messages).
    Raises:
        ValueError: the classes differ (the message names them).
    """
    from gfnet.data import class_list_difference

    stored = net.meta.get("classes")
    if stored is not None:
        diff = class_list_difference(stored, found)
        if diff:
            raise ValueError(f"{where} does not hold the {len(stored)} classes that {source} classifies: {diff}. "
                             "Labels are positions in the class list, so a changed list would train or score "
                             "against the wrong classes: restore the class folders, or train a new stage-1 "
                             "model on these classes (in another --out)")
        return
    if len(found) != net.num_classes:
        raise ValueError(f"{where} holds {len(found)} class folders, but {source} classifies {net.num_classes} "
                         "classes (its file names none, so they cannot be matched by name): use the data it was "
                         "trained on, or train a new stage-1 model on these classes")
    net.meta["classes"] = [str(c) for c in found]


def train_imagefolder(data: str, arch: Optional[str], patch_size: Optional[int], T: Optional[int], stage: int,
                      out: str,
                      options: Optional[TrainOptions] = None, init_global: Optional[str] = None,
                      init_local: Optional[str] = None, checkpoint: Optional[str] = None,
                      resume: Optional[str] = None, backend: str = "dali", workers: Optional[int] = None,
                      device=None, validate: bool = True, uint8: bool = True, overwrite: bool = False,
                      stop_signals=("SIGTERM",)) -> list[dict]:
    """Train one stage on ``data/{train,val}/<class>/<image>`` and write checkpoints to ``out``.

    Works the same on one process and under ``torchrun`` (one process per GPU; each reads its shard;
    ``options.batch_size`` is the global batch, split evenly). ``uint8=True`` has the loader hand
    uint8 images to the fused glance/focus ops, which normalise them in their own pass.
    ``resume`` is None, a checkpoint path or "auto"; ``overwrite`` lets a new run replace the run that
    ``out`` holds (see :meth:`gfnet.train.Trainer.fit` and :mod:`gfnet.train.run_folder`).
    ``stop_signals``: on these (SIGTERM by default, as gfnet-train) the run finishes its step, saves
    ``out/mid_epoch.pth.tar`` and raises :class:`gfnet.train.preemption.Preempted` (every process alike;
    see :mod:`gfnet.train.preemption`); ``resume="auto"`` continues from there.

    ``resume`` (a checkpoint.pth.tar written during training, by gfnet-train or the reference's
    train.py) is the whole starting point: weights, optimiser states and epoch come from it, and
    ``checkpoint``/``init_*`` are not read. ``arch``, ``patch_size`` and ``T`` may be None where the
    starting file names them. The images are shaped by ``options.transforms`` (by default the
    reference train.py's 224 px bilinear crops for every backbone).

    Returns the per-epoch history (loss, train and validation anytime accuracy, images/s).
    """
    from gfnet.data import list_classes, make_loader

    options = options or TrainOptions(stage=stage)
    if options.stage != stage:
        options = TrainOptions(**{**options.__dict__, "stage": stage})
    check_out_outside_data(data, out)
    ctx = init_distributed(device)
    if ctx.is_main:  # refuse a taken folder or an unusable --resume before the model and data are built
        RunFolder(out).check(resume, overwrite)
    torch.manual_seed(options.seed)
    # the file the network is built from ("auto": the folder's newest training state; the trainer decides
    # again under the run folder's lock)
    resume_file = RunFolder(out).resolve_resume("auto") if resume == "auto" else resume
    train_classes = list_classes(data, "train")  # the labels' names: checked against the model's before any work
    if resume_file:
        from gfnet.checkpoint import load_checkpoint

        if checkpoint or init_global or init_local:
            log.info("--resume %s: weights come from it; --checkpoint/--init-* are not read", resume_file)
        net = load_checkpoint(resume_file, arch=arch, patch_size=patch_size, T=T)
        source = resume_file
    else:
        num_classes = len(train_classes) if stage == 1 and not checkpoint else None
        net = build_training_model(arch, patch_size, T, stage, num_classes, init_global, init_local, checkpoint)
        source = checkpoint or "the new network"
    adopt_data_classes(net, train_classes, os.path.join(data, "train"), source)
    resolved = options.resolved(net)
    spec = net.config.train_transforms(resolved.transforms)
    if resolved.batch_size % ctx.world_size:
        raise ValueError(f"batch size {resolved.batch_size} does not split over {ctx.world_size} processes")
    per_process = resolved.batch_size // ctx.world_size
    loader_args = dict(batch_size=per_process, image_size=spec.image_size, crop_pct=spec.crop_pct,
                       interpolation=spec.interpolation, backend=backend,
                       device=ctx.device, num_threads=workers, shard_id=ctx.rank, num_shards=ctx.world_size,
                       seed=options.seed, output="uint8" if uint8 else "float", classes=net.meta["classes"])
    train_loader = make_loader(data, train=True, **loader_args)
    val_loader = None
    if validate and os.path.isdir(os.path.join(data, "val")):
        val_loader = make_loader(data, train=False, **loader_args)
    trainer = Trainer(net, resolved, out_dir=out, ctx=ctx, overwrite=overwrite, stop_signals=stop_signals)
    try:
        return trainer.fit(train_loader, val_loader, resume=resume)
    finally:
        if ctx.enabled:
            torch.distributed.destroy_process_group()
