"""A training run's state and its files: what is saved, what a resume restores, and the run folder.

:class:`RunState` is given the network, its optimisers, the gradient scaler, the options and the process
context (not the trainer): it holds the run's counters (epoch, step, best accuracy and epoch, history, run
id, option changes) and the mid-epoch position, opens the run folder (lock, one run per folder, the file to
resume from: :mod:`gfnet.train.run_folder`), restores a run from the one record of its checkpoint
(:class:`gfnet.checkpoint.CheckpointFile`, read once), and writes the epoch's checkpoint, the best file and
the mid-epoch state (:mod:`gfnet.train.preemption`) atomically.

The state that resuming restores: weights (with batch-norm statistics), the SGD and Adam states, the
gradient scaler, the epoch and step counters, the best accuracy and epoch, the history and every process's
random states; data order is a function of (seed, epoch) in the loaders.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from typing import Optional

import torch

from gfnet.atomic import atomic_save
from gfnet.checkpoint import CheckpointError, CheckpointFile, checkpoint_dict, load_weights, read_record
from gfnet.train.distributed import DistributedContext
from gfnet.train.preemption import MidEpoch
from gfnet.train.rng import capture_rng_state, restore_rng_state, seed_everything
from gfnet.train.run_folder import MID_EPOCH_NAME, RunFolder
from gfnet.train.weights import adam_state_to_reference, fresh_adam_state, load_sgd_state, sgd_state_to_reference

__all__ = ["BEST_NAME", "CHECKPOINT_NAME", "RunState"]

log = logging.getLogger("gfnet.train")

#: File names in the output folder (the reference's): the last epoch's and the best epoch's checkpoint.
CHECKPOINT_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"

#: Options a resumed run must share with the run it continues: they shape the weights or the optimiser's
#: parameter groups (the architecture, T and patch size are compared on the checkpoint's own fields).
_FIXED_ON_RESUME = ("stage", "train_global")
#: Options that only steer the display.
_UNREPORTED = ("progress", "log_every")


def _owned(value):
    """``value`` with every tensor copied (an optimiser keeps the tensors it is given: not a file's mapping)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _owned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_owned(v) for v in value)
    return value


class RunState:
    """The state of one training run and its files (see the module docstring).

    Args:
        net: the GFNet; optimizer / ppo_optimizer: the SGD of stages 1 and 3 and PPO's Adam of stage 2 (None
            where the stage has none); scaler: the gradient scaler; options: the resolved TrainOptions;
            ctx: the process's DistributedContext.
        out_dir: the run folder (None: nothing is written). save_best: keep ``model_best.pth.tar``.
        overwrite: a new run may replace the run in ``out_dir``. folder: the :class:`RunFolder` of ``out_dir``
            when the caller has one already (its records are reused: each file is read once).
    """

    def __init__(self, net, optimizer, ppo_optimizer, scaler, options, ctx: DistributedContext,
                 out_dir: Optional[str] = None, save_best: bool = True, overwrite: bool = False,
                 folder: Optional[RunFolder] = None):
        self.net, self.optimizer, self.ppo_optimizer, self.scaler = net, optimizer, ppo_optimizer, scaler
        self.options, self.ctx = options, ctx
        self.save_best, self.overwrite = save_best, overwrite
        self.set_out_dir(out_dir, folder)
        self.epoch = 0
        self.global_step = 0
        self.best_acc = 0.0
        self.best_epoch = 0
        self.run_id = uuid.uuid4().hex
        self.changes: list[dict] = []  # options changed by resumes: {"epoch", "option", "from", "to"}
        self.history: list[dict] = []
        self.data_backend: Optional[str] = None  # the training loader's ("dali", "torchvision")
        self.mid_epoch: Optional[MidEpoch] = None  # where a resumed run re-enters its epoch
        self._log_handler = None

    # ------------------------------------------------------------------ the run folder
    def set_out_dir(self, out_dir: Optional[str], folder: Optional[RunFolder] = None) -> None:
        """Write the run to ``out_dir`` (None: nowhere), through ``folder`` when the caller has its RunFolder."""
        self.out_dir = out_dir
        if folder is None and out_dir is not None:
            folder = RunFolder(out_dir, CHECKPOINT_NAME, BEST_NAME)
        self.folder = folder

    def open(self, resume) -> Optional[CheckpointFile]:
        """Lock the run folder and decide what to resume from (main process; the others follow its word).
        Returns the record of the file to resume from, None for a new run."""
        if isinstance(resume, CheckpointFile):
            resume = resume.path
        folder = self.folder
        if folder is None:
            if resume == "auto":
                raise ValueError("resume='auto' looks for the run in out_dir: give the trainer an out_dir")
            return None if resume is None else read_record(resume)
        answer = (None, None, None)
        if self.ctx.is_main:
            try:
                folder.acquire()
                answer = (folder.resolve_resume(resume, self.overwrite), None, None)
            except Exception as e:  # told to every process, so that none waits for the others forever
                answer = (None, type(e), str(e))
                if not self.ctx.enabled:
                    raise
        path, kind, message = self.ctx.all_gather_object(answer)[0]
        if kind is not None:
            raise (kind if issubclass(kind, Exception) else RuntimeError)(message)
        if path is None and resume == "auto" and self.ctx.is_main:
            log.info("--resume auto: %s holds no run yet; starting a new one", self.out_dir)
        return None if path is None else folder.record(path)

    def resume(self, ckpt: CheckpointFile) -> None:
        """Restore the run from ``ckpt`` (:meth:`load`), keep the best file the best epoch's, and let go of the
        records the run folder read (their files are mapped)."""
        self.load(ckpt)
        log.info("resumed from %s at epoch %d (step %d)", ckpt.path, self.epoch, self.global_step)
        if self.folder is not None and self.ctx.is_main and self.save_best:
            adopted = self.folder.reconcile_best(ckpt.path, self.folder.info(ckpt.path))
            if adopted is not None and adopted.best_acc >= self.best_acc:
                self.best_acc, self.best_epoch = adopted.best_acc, adopted.best_epoch
        if self.folder is not None:
            self.folder.forget()

    def close(self) -> None:
        """Close train.log, settle an ``overwrite`` (a run that stopped before its first checkpoint puts the
        earlier run back) and release the folder's lock."""
        self._close_log()
        if self.folder is not None:
            self.folder.settle_replaced()
            self.folder.forget()
            self.folder.release()

    # ------------------------------------------------------------------ resuming
    def load(self, ckpt) -> None:
        """Restore a run from a checkpoint written during training: gfnet's (either layout) or the
        reference train.py's (``ckpt``: its record, or a path, read once).

        Weights (with batch-norm statistics), the SGD / Adam states (re-indexed from the reference's
        parameter order where needed), the epoch and the best accuracy come from any of them; gfnet's
        files add the gradient scaler, the step counter, the history, the run's identity and best epoch
        and every process's RNG states. A reference file has none of these: the step counter and history
        restart empty and the random streams restart from seed + rank + epoch.

        What a resume cannot change (the architecture, patch size, T, classifier, classes, stage, whether
        the global encoder trains) must match, else ValueError naming every difference. Every other option
        that differs from the checkpoint's (epochs, learning rates, seed, batch size, ...) is logged, one line
        each, recorded in the checkpoint's ``train_state["changes"]``, and takes effect: the optimisers'
        hyper-parameters follow the new options, so the stored options and optimiser state never disagree.

        Raises:
            FileNotFoundError: no such file.
            CheckpointError: the file is not a gfnet or reference GFNet checkpoint, or holds no training state.
            ValueError: it belongs to a run that cannot continue as this one.
        """
        o, net = self.options, self.net
        if not isinstance(ckpt, CheckpointFile):
            ckpt = self.folder.record(ckpt) if self.folder is not None else read_record(ckpt)
        path, state = ckpt.path, ckpt.train_state
        if state is not None:  # gfnet's own files say what run they belong to: every difference at once
            differ = ckpt.differences(arch=net.arch, patch_size=net.patch_size, T=net.T,
                                      classifier="gru" if net.fc.is_rnn else "cascade", num_classes=net.num_classes,
                                      options={k: getattr(o, k) for k in _FIXED_ON_RESUME})
            if differ:
                raise ValueError(f"{path} cannot be resumed as this run: " + "; ".join(differ) + ". A resume "
                                 "continues the same run; to train a changed model, start a new run in another "
                                 "output folder")
        ckpt = ckpt.resolve(net.arch, net.patch_size, net.T)
        obj = ckpt.raw
        if ckpt.stage is None:
            raise CheckpointError(f"{path} holds no training state: --resume takes the checkpoint.pth.tar written "
                                  "during training (by gfnet-train or the reference's train.py); to start a stage "
                                  "from weights, use --checkpoint")
        if ckpt.stage != o.stage:
            raise ValueError(f"{path} is a stage-{ckpt.stage} run; this one is stage {o.stage}")
        if ckpt.num_classes != net.num_classes:
            raise ValueError(f"{path} classifies {ckpt.num_classes} classes, this run's net {net.num_classes}")
        self._adopt_stored_classes(path, ckpt.classes)
        if o.stage == 3 and obj["policy"] is None:
            raise ValueError(f"{path} is a stage-3 file without a policy: it cannot continue stage 3")
        if state is not None:
            self._report_changes(path, obj, state)
        load_weights(net, ckpt)
        if self.optimizer is not None:
            found = load_sgd_state(self.optimizer, _owned(obj.get("optimizer")), net, o.train_global, path)
            log.debug("%s: SGD state in the %s layout", path, found)
        if self.ppo_optimizer is not None:
            saved = obj.get("ppo_optimizer")
            if not isinstance(saved, dict) or "param_groups" not in saved:
                raise ValueError(f"{path} holds no PPO optimizer state ('ppo_optimizer' is "
                                 f"{type(saved).__name__}): --resume takes a stage-2 file")
            self.ppo_optimizer.load_state_dict(_owned(saved))
        if state is not None:
            self._apply_hyperparameters()
        if o.stage == 2 and int(obj["epoch"]) > 0:
            net.meta.trained_policy = True
        self.epoch = int(obj["epoch"])
        self.best_acc = float(obj["best_acc"]) if obj.get("best_acc") is not None else 0.0
        stored = ckpt.model_meta()
        net.meta.set_flops({k: v for k, v in stored.evaluation().items() if v is not None})
        if stored.anytime_classification is not None:
            net.meta.anytime_classification = stored.anytime_classification
        if state is None:
            log.warning("%s was written by the reference's train.py: it stores no step counter, history or "
                        "random states; random streams restart from seed %d + epoch", path, o.seed)
            self.global_step, self.history = 0, []
            seed_everything(o.seed + self.ctx.rank + 7919 * self.epoch)
            return
        mid = state.get("mid_epoch")  # a run stopped in the middle of an epoch (gfnet.train.preemption)
        self.mid_epoch = MidEpoch.from_state(mid, self.ctx, path) if isinstance(mid, dict) else None
        if self.mid_epoch is not None and self.ctx.is_main:
            log.info("%s: epoch %d continues after step %d", path, self.epoch + 1, self.mid_epoch.step)
        if state.get("scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.run_id = state.get("run_id") or self.run_id
        self.best_epoch = ckpt.run_info().best_epoch
        rng = state["rng"]
        if len(rng) == self.ctx.world_size:
            restore_rng_state(rng[self.ctx.rank])
        else:
            log.warning("%s was written by %d process(es), this run has %d: random streams restart from "
                        "seed %d + epoch", path, len(rng), self.ctx.world_size, o.seed)
            seed_everything(o.seed + self.ctx.rank + 7919 * self.epoch)

    def _adopt_stored_classes(self, path: str, stored) -> None:
        if stored is None:
            return
        mine = self.net.meta.classes
        if mine is not None and list(mine) != list(stored):
            from gfnet.data.index import class_list_difference

            raise ValueError(f"{path} was trained on other classes than this run's net: "
                             f"{class_list_difference(stored, mine)}")
        self.net.meta.classes = list(stored)

    def _report_changes(self, path: str, obj: dict, state: dict) -> None:
        stored = state.get("options") or {}
        now = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.options).items()}
        self.changes = list(state.get("changes") or [])
        epoch = int(obj.get("epoch") or 0)
        for key, value in now.items():
            if key in _UNREPORTED or key not in stored or stored[key] == value:
                continue
            if self.ctx.is_main:
                log.warning("resume: %s changes from %r to %r (from epoch %d on)", key, stored[key], value, epoch + 1)
            self.changes.append({"epoch": epoch, "option": key, "from": stored[key], "to": value})
        stored_backend = state.get("data_backend")
        if stored_backend and self.data_backend and stored_backend != self.data_backend:
            if self.ctx.is_main:
                log.warning("resume: data backend changes from %r to %r (from epoch %d on): the two decode and resize "
                            "images with different rounding, so the run will not equal an uninterrupted one bit for "
                            "bit", stored_backend, self.data_backend, epoch + 1)
            self.changes.append({"epoch": epoch, "option": "data_backend", "from": stored_backend,
                                 "to": self.data_backend})
        if int(state.get("world_size", self.ctx.world_size)) != self.ctx.world_size and self.ctx.is_main:
            log.warning("resume: processes change from %d to %d", state["world_size"], self.ctx.world_size)
        if epoch > 0 and self.options.epochs is not None and epoch > self.options.epochs and self.ctx.is_main:
            log.warning("resume: %s has trained %d epochs, more than --epochs %d", path, epoch, self.options.epochs)

    def _apply_hyperparameters(self) -> None:
        # A loaded optimiser state carries the old run's base learning rates, momentum and weight decay in
        # its parameter groups; the options of this run rule (they are what the checkpoint will store).
        o = self.options
        if self.optimizer is not None:
            for g in self.optimizer.param_groups:
                g["base_lr"] = o.fc_lr if g.get("name") == "fc" else o.backbone_lr
                g.update(momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
        if self.ppo_optimizer is not None:
            for g in self.ppo_optimizer.param_groups:
                g.update(lr=o.policy_lr, betas=tuple(o.policy_betas))

    # ------------------------------------------------------------------ the run's log (train.log)
    def open_log(self) -> None:
        """Send the run's log lines to ``out_dir/train.log`` too (main process)."""
        if self.out_dir is None or not self.ctx.is_main or self._log_handler is not None:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(self.out_dir, "train.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.DEBUG)
        log.addHandler(handler)
        # The run's train.log is one of the run's files: it must hold the run's lines even where the application
        # configured no logging. Only a logger nobody has set is given a level (an application's choice stays).
        if log.level == logging.NOTSET:
            log.setLevel(logging.DEBUG)
        self._log_handler = handler

    def _close_log(self) -> None:
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    # ------------------------------------------------------------------ saving
    def finish_epoch(self, record: dict, acc: float) -> bool:
        """Count the finished epoch whose accuracy is ``acc`` (its ``record`` gains acc and best_acc and joins the
        history); returns whether it is the best so far."""
        is_best = acc > self.best_acc
        self.best_acc = max(self.best_acc, acc)
        if is_best:
            self.best_epoch = self.epoch + 1
        record["acc"], record["best_acc"] = acc, self.best_acc
        self.epoch += 1
        self.history.append(record)
        return is_best

    def training_state(self) -> dict:
        """What resuming needs besides the weights (collective under DDP: every process must call it)."""
        rng = self.ctx.all_gather_object(capture_rng_state())
        return {
            "stage": self.options.stage,
            "options": {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in dataclasses.asdict(self.options).items()},
            "global_step": self.global_step,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng,
            "world_size": self.ctx.world_size,
            "history": self.history,
            "run_id": self.run_id,
            "best_epoch": self.best_epoch,
            "changes": self.changes,
            "data_backend": self.data_backend,
        }

    def checkpoint(self) -> dict:
        """The checkpoint of the current state, in ``options.save_layout``, plus the training state
        (collective under DDP)."""
        o, net = self.options, self.net
        state = self.training_state()
        state["train_transforms"] = dataclasses.asdict(net.config.train_transforms(o.transforms))
        fields = {"epoch": self.epoch, "best_acc": self.best_acc,
                  "acc": self.history[-1]["acc"] if self.history else None, "train_state": state}
        if o.save_layout == "release":
            fields["optimizer"] = self.optimizer.state_dict() if self.optimizer is not None else None
            fields["ppo_optimizer"] = self.ppo_optimizer.state_dict() if self.ppo_optimizer is not None else None
        else:
            # What the reference's train.py writes: its SGD's groups in its parameter order (stages 1, 3),
            # PPO's Adam (stage 2; stage 3 builds one that never steps, and --resume loads it), and no
            # policy in stage 1.
            fields["optimizer"] = (sgd_state_to_reference(self.optimizer, net, o.train_global)
                                   if self.optimizer is not None else None)
            if self.ppo_optimizer is not None:
                fields["ppo_optimizer"] = adam_state_to_reference(self.ppo_optimizer.state_dict())
            else:
                fields["ppo_optimizer"] = (fresh_adam_state(net, o.policy_lr, o.policy_betas)
                                           if o.stage == 3 else None)
            if o.stage == 1:
                fields["policy"] = None
        return checkpoint_dict(net, layout=o.save_layout, **fields)

    def save(self, is_best: bool = False) -> None:
        """Write the epoch's checkpoint atomically to ``out_dir`` (main process; collective under DDP).

        An improving epoch writes ``model_best.pth.tar`` first and ``checkpoint.pth.tar`` second, both
        the same content. So at any moment a kill may strike, the best file holds the best finished
        epoch: killed before the best file's rename, the folder is as after the previous epoch; killed
        between the two renames, the best file is one epoch ahead of the checkpoint (``resume="auto"``
        resumes from it; a resume from the older checkpoint adopts it, see
        :meth:`gfnet.train.run_folder.RunFolder.reconcile_best`). Once saved, a mid-epoch state is
        superseded and deleted, and an ``overwrite`` run's predecessor's files go.
        """
        if self.out_dir is None:
            return
        obj = self.checkpoint()
        if self.ctx.is_main:
            if is_best and self.save_best:
                atomic_save(obj, os.path.join(self.out_dir, BEST_NAME))
            atomic_save(obj, os.path.join(self.out_dir, CHECKPOINT_NAME))
            self.folder.discard_mid_epoch()  # superseded by this finished epoch
        self.ctx.barrier()
        if self.ctx.is_main:
            self.folder.settle_replaced()  # --overwrite: the earlier run's files go once this run has a checkpoint

    def save_mid_epoch(self, progress: MidEpoch) -> Optional[str]:
        """Write the state with ``progress`` atomically to ``out_dir/mid_epoch.pth.tar`` (main process;
        collective under DDP). Returns the path (None without an output folder: nothing is written)."""
        if self.out_dir is None:
            return None
        obj = self.checkpoint()
        obj["train_state"]["mid_epoch"] = progress.to_state(self.ctx)
        path = os.path.join(self.out_dir, MID_EPOCH_NAME)
        if self.ctx.is_main:
            atomic_save(obj, path)
        self.ctx.barrier()
        return path
