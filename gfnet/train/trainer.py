"""The three training stages of GFNet (Section 3.3 of the paper; ../shared/DESIGN.md), resumable, on one
or many processes.

- Stage 1 (warm-up): random patch positions, uniform in [0, 1]^2; both encoders (the global one only
  when the family trains it: ResNet, DenseNet, RegNet) and the classifier learn the deep-supervised loss
  (:class:`~gfnet.train.objective.SequenceObjective`).
- Stage 2 (policy): encoders and classifier frozen in eval mode; PPO on the policy, one update per
  batch (:mod:`gfnet.train.rollout`, :class:`~gfnet.train.objective.PPOObjective`), Adam lr 3e-4. Like
  the reference's train.py, PPO starts from a freshly initialised policy whatever the checkpoint holds;
  ``continue_policy=True`` continues the net's policy instead.
- Stage 3 (fine-tune): stage 1's loss with patches chosen by the learned (frozen) policy. The
  reference's ``train.py`` samples them from N(mean, 0.1^2) clamped to [0, 1] (its ``select_action``
  defaults to exploration and only validation passes ``training=False``); that is our default
  (``stage3_actions="sample"``); ``"mean"`` fine-tunes on the deterministic mean actions instead.

Optimisation as in the reference: SGD (Nesterov, momentum 0.9, weight decay) with one parameter
group per encoder and one for the classifier, each on a cosine schedule stepped once per epoch:
lr(e) = 0.5 * base * (1 + cos(pi * e / epochs)). Mixed precision: bf16 autocast, or fp16 autocast
with a gradient scaler. Under torchrun every process trains on its shard and DDP averages gradients.

Checkpoints come in the release layout (default) or, with ``save_layout="reference-train"``, in the
layout the reference's train.py continues from (:mod:`gfnet.checkpoint`); :meth:`Trainer.load_training_state`
resumes from either and from the reference train.py's own files. The run's state and files (save, resume,
best file, run folder, mid-epoch state) are :class:`gfnet.train.run_state.RunState`'s; the trainer trains.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from gfnet.flops import known_flops
from gfnet.models.gfnet import GFNet
from gfnet.precision import amp_dtype, autocast, default_amp
from gfnet.train.data_checks import check_data_classes, check_loader
from gfnet.train.distributed import DistributedContext
from gfnet.train.objective import PPOObjective, SequenceObjective
from gfnet.train.options import AMP_MODES, TrainOptions, cosine_lr
from gfnet.train.preemption import MidEpoch, Preempted, StopRequest, parse_signal, start_epoch
from gfnet.train.rng import seed_everything
from gfnet.train.rollout import collect_rollout, discount_returns, normalise_returns
from gfnet.train.run_folder import RunFolder
from gfnet.train.run_state import BEST_NAME, CHECKPOINT_NAME, RunState
from gfnet.train.weights import reset_policy, sgd_parameter_groups

__all__ = ["TrainOptions", "Trainer", "TrainingError", "AMP_MODES", "CHECKPOINT_NAME", "BEST_NAME", "cosine_lr"]

log = logging.getLogger("gfnet.train")


class TrainingError(RuntimeError):
    """Training cannot go on: the loss diverged, or the loader yields nothing to train on."""


@dataclass
class EpochStats:
    """Sums over one epoch of this process and, after :meth:`reduce`, of all processes."""

    loss_sum: float = 0.0
    images: int = 0
    correct: list = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        n = max(self.images, 1)
        return {"loss": self.loss_sum / n, "images": self.images,
                "train_acc": [100.0 * c / n for c in self.correct],
                "images_per_s": self.images / max(self.seconds, 1e-9), "seconds": self.seconds}


def _run_field(name: str, doc: str) -> property:
    """A Trainer attribute that is the run state's (:class:`~gfnet.train.run_state.RunState`)."""
    return property(lambda self: getattr(self.run, name), lambda self, value: setattr(self.run, name, value), doc=doc)


class Trainer:
    """Trains one stage of a GFNet; see the module docstring.

    Args:
        net: the GFNet (moved to ``ctx.device``; weights as the stage needs them: stage 1 from backbone
            initialisations, stages 2 and 3 from the previous stage's checkpoint).
        options: :class:`TrainOptions`.
        out_dir: where checkpoints (``checkpoint.pth.tar`` each epoch, ``model_best.pth.tar``) and
            ``train.log`` go (None: nothing is written).
        ctx: the process's :class:`~gfnet.train.distributed.DistributedContext` (None: one process on
            the device the net is on).
        save_best: also keep ``model_best.pth.tar`` (a copy of the best epoch's checkpoint).
        overwrite: let a new run replace the run that ``out_dir`` already holds (see
            :mod:`gfnet.train.run_folder`: without it :meth:`fit` refuses such a folder unless resuming).
        stop_signals: signals (names or numbers, e.g. ``("SIGTERM",)``) on which :meth:`fit` finishes the
            current step, saves the run in the middle of its epoch and raises
            :class:`~gfnet.train.preemption.Preempted` (see :mod:`gfnet.train.preemption`); empty: none
            is caught.
        folder: the :class:`~gfnet.train.run_folder.RunFolder` of ``out_dir`` that the caller already read
            (its records are reused, so that each file is read once); None: the trainer opens its own.

    The run's state and files are :attr:`run`'s (:class:`~gfnet.train.run_state.RunState`: what resuming
    restores, what is saved); ``epoch``, ``global_step``, ``best_acc``, ``best_epoch``, ``history``,
    ``run_id``, ``changes`` and ``data_backend`` are its fields.

    Guarantees with ``out_dir`` (see :meth:`fit` and :meth:`save`): one run per folder under a lock,
    checkpoints written atomically, ``model_best.pth.tar`` the best finished epoch's whenever the process
    is killed, nothing saved from an epoch whose loss or weights went non-finite.
    """

    epoch = _run_field("epoch", "Finished epochs.")
    global_step = _run_field("global_step", "Training steps taken (all epochs).")
    best_acc = _run_field("best_acc", "The best epoch's accuracy (%).")
    best_epoch = _run_field("best_epoch", "The epoch model_best.pth.tar holds (0: none yet).")
    history = _run_field("history", "One record per finished epoch.")
    run_id = _run_field("run_id", "The run's identity (stored in its checkpoints).")
    changes = _run_field("changes", "Options changed by resumes.")
    data_backend = _run_field("data_backend", "The training loader's backend, set by fit.")

    @property
    def out_dir(self) -> Optional[str]:
        """The run folder (None: nothing is written); set it before :meth:`fit` to write elsewhere."""
        return self.run.out_dir

    @out_dir.setter
    def out_dir(self, path: Optional[str]) -> None:
        self.run.set_out_dir(path)

    def __init__(self, net: GFNet, options: TrainOptions, out_dir: Optional[str] = None,
                 ctx: Optional[DistributedContext] = None, save_best: bool = True, overwrite: bool = False,
                 stop_signals: Sequence = (), folder: Optional[RunFolder] = None):
        device = next(net.parameters()).device
        self.ctx = ctx or DistributedContext(device=device)
        self.net = net.to(self.ctx.device)
        self.options = options.resolved(net)
        self.device = self.ctx.device
        if self.options.amp == "auto":
            amp = default_amp(self.device) if self.device.type == "cuda" else "none"
            self.options = dataclasses.replace(self.options, amp=amp)
        self.amp_dtype = amp_dtype(self.options.amp)
        if self.options.channels_last:
            net.to_channels_last()
        if self.options.compile and net.compiled is None:
            net.compile()
        known_flops(net)  # counted now where no checkpoint stored them (saved with every checkpoint)
        self.stop_signals = tuple(parse_signal(s) for s in stop_signals)
        self._stop = StopRequest((), self.ctx)  # fit() opens the real one
        self.options.check_for(net)
        if self.options.stage == 2 and not self.options.continue_policy:
            # The reference's stage 2 starts PPO from a new policy whatever the checkpoint holds (its
            # stage-1 files store none). Seeded alike on every process, before DDP wraps the objective.
            reset_policy(net, self.options.seed)
        self._configure_parameters()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.options.amp == "fp16")
        self.run = RunState(net, self.optimizer, self.ppo_optimizer, self.scaler, self.options, self.ctx, out_dir,
                            save_best=save_best, overwrite=overwrite, folder=folder)

    # ------------------------------------------------------------------ set-up
    def _configure_parameters(self) -> None:
        o, net = self.options, self.net
        for p in net.parameters():
            p.requires_grad_(False)
        self.optimizer = self.ppo_optimizer = None
        ddp_kwargs = dict(find_unused_parameters=o.find_unused_parameters)
        if self.device.type == "cuda":
            ddp_kwargs["device_ids"] = [self.device]
        if o.stage == 2:
            for p in net.policy.parameters():
                p.requires_grad_(True)
            self.objective = PPOObjective(net.policy, o.ppo_clip, o.value_coef, o.entropy_coef, o.action_std)
            self.ppo_optimizer = torch.optim.Adam(net.policy.parameters(), lr=o.policy_lr, betas=tuple(o.policy_betas))
        else:
            groups = [{"params": [p for _, p in named], "name": name,
                       "base_lr": o.fc_lr if name == "fc" else o.backbone_lr}
                      for name, named in sgd_parameter_groups(net, o.train_global)]
            for g in groups:
                for p in g["params"]:
                    p.requires_grad_(True)
                g["lr"] = g["base_lr"]
            self.optimizer = torch.optim.SGD(groups, lr=o.backbone_lr, momentum=o.momentum,
                                             nesterov=o.nesterov, weight_decay=o.weight_decay)
            self.objective = SequenceObjective(net, o.dsn_ratio, o.train_global, o.glance_mode, o.action_std)
        self.wrapped = (DistributedDataParallel(self.objective, **ddp_kwargs) if self.ctx.enabled
                        else self.objective)

    def _autocast(self):
        # gfnet.precision's autocast, with the weight-cast cache on (several passes per step share the weights)
        return autocast(self.device, self.amp_dtype, cache_enabled=True)

    def _set_modes(self) -> None:
        net, o = self.net, self.options
        net.eval()
        if o.stage != 2:
            net.model.train()
            net.fc.train()
            net.model_prime.train(o.train_global)

    def set_learning_rates(self, epoch: int) -> None:
        """Put each SGD group on its cosine schedule for ``epoch`` (stage 2's Adam keeps a constant lr)."""
        if self.optimizer is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = cosine_lr(g["base_lr"], epoch, self.options.epochs)

    @property
    def data_transforms(self):
        """The training data geometry that ``options.transforms`` names for this backbone
        (:class:`gfnet.config.DataTransforms`)."""
        return self.net.config.train_transforms(self.options.transforms)

    @property
    def action_mode(self) -> str:
        return {1: "random", 3: self.options.stage3_actions}.get(self.options.stage, "sample")

    # ------------------------------------------------------------------ steps
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """One optimisation step on a batch (the modules' train/eval modes are the caller's: see
        :meth:`train_epoch`). Returns {"loss": Tensor scalar, "correct": Tensor[T]} (not synchronised)."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.options.stage == 2:
            out = self._ppo_step(images, labels)
        else:
            with self._autocast():
                loss, correct = self.wrapped(images, labels, self.action_mode)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            out = {"loss": loss.detach(), "correct": correct}
        self.global_step += 1
        return out

    def _ppo_step(self, images, labels) -> dict:
        o = self.options
        with self._autocast():
            rollout = collect_rollout(self.net, images, labels, o.action_std, o.glance_mode)
        returns = normalise_returns(discount_returns(rollout.rewards, o.gamma))
        loss = None
        for _ in range(o.ppo_epochs):
            loss, stats = self.wrapped(rollout.feature_maps, rollout.actions, rollout.logprobs, returns)
            self.ppo_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.ppo_optimizer.step()
        return {"loss": loss.detach(), "correct": rollout.correct, "reward": rollout.rewards.sum(0).mean()}

    def train_epoch(self, loader: Iterable, epoch: int) -> dict:
        """One epoch over ``loader`` (``set_epoch`` is called when it has one). Returns the epoch's
        statistics over all processes: loss, train_acc per step (%), images, images_per_s, seconds.

        Raises:
            TrainingError: the loader yielded no image, or the loss went non-finite (checked at each
                logging step on one process and at the end of the epoch; with fp16 autocast, whose
                gradient scaler skips overflowing steps, only when every step overflowed), or a trained
                weight did. Nothing of the epoch is saved then.
        """
        from tqdm import tqdm

        resumed = self.run.mid_epoch if self.run.mid_epoch is not None and self.run.mid_epoch.epoch == epoch else None
        self.run.mid_epoch = None
        if resumed is not None:
            resumed.check_loader(loader)
        first = resumed.step if resumed is not None else 0  # a run stopped mid-epoch re-enters it there
        batches = start_epoch(loader, epoch, first)
        self.set_learning_rates(epoch)
        self._set_modes()
        T = self.net.T
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros(T, device=self.device, dtype=torch.int64)
        bad_steps = torch.zeros((), device=self.device, dtype=torch.int64)  # steps with a non-finite loss
        n_images = n_steps = 0
        earlier = 0.0  # seconds of the epoch before the run stopped
        if resumed is not None:
            n_images, n_steps, earlier = resumed.restore(loss_sum, correct, bad_steps)
        strict = self.options.amp != "fp16"
        try:
            total = len(loader)
        except TypeError:
            total = None
        bar = tqdm(total=total, initial=first,
                   desc=f"stage {self.options.stage} epoch {epoch + 1}/{self.options.epochs}",
                   disable=not (self.options.progress and self.ctx.is_main), dynamic_ncols=True, leave=False)
        start = last = time.perf_counter()
        last_images = 0
        for i, (images, labels) in enumerate(batches, start=first):
            out = self.train_step(images, labels)
            n = labels.shape[0]
            bad_steps += ~torch.isfinite(out["loss"])
            loss_sum += out["loss"].double() * n
            correct += out["correct"]
            n_images += n
            n_steps += 1
            bar.update(1)
            if (i + 1) % self.options.log_every == 0:
                # One process may stop here (the host synchronises anyway); under DDP every process
                # must agree, which the epoch's all-reduce below gives.
                if strict and not self.ctx.enabled and bad_steps.item():
                    bar.close()
                    self._diverged(epoch, f"the loss is {out['loss'].item()} at step {i + 1}")
                now = time.perf_counter()
                speed = (n_images - last_images) * self.ctx.world_size / max(now - last, 1e-9)
                last, last_images = now, n_images
                acc = " ".join(f"{100.0 * c / n_images:.1f}" for c in correct.tolist())
                postfix = {"loss": f"{loss_sum.item() / n_images:.4f}", "acc": acc, "img/s": f"{speed:.0f}"}
                bar.set_postfix(postfix)
                if self.ctx.is_main:
                    log.debug("epoch %d step %d: %s", epoch + 1, i + 1, postfix)
            if self._stop.after_step() and (total is None or i + 1 < total):  # (at the last step: after the save)
                bar.close()
                self._stop_mid_epoch(MidEpoch(
                    epoch, i + 1, total, getattr(loader, "batch_size", None), self.ctx.world_size, loss_sum.item(),
                    correct.tolist(), int(bad_steps.item()), n_images, n_steps, earlier + time.perf_counter() - start))
        bar.close()
        seconds = earlier + time.perf_counter() - start
        totals = torch.cat([loss_sum.view(1), torch.tensor([float(n_images), float(n_steps)], device=self.device,
                                                           dtype=torch.float64),
                            bad_steps.double().view(1), correct.double()])
        self.ctx.all_reduce_sum(totals)
        t = totals.tolist()
        images, steps, bad = int(t[1]), int(t[2]), int(t[3])
        if images == 0:
            raise TrainingError(f"epoch {epoch + 1} trained on no image: the training loader yielded no batch "
                                "(every file failed to decode?); nothing was saved")
        if bad and (strict or bad == steps):
            self._diverged(epoch, f"{bad} of {steps} steps had a non-finite loss (the epoch's mean: {t[0] / images})")
        if not self._weights_finite():
            self._diverged(epoch, "a trained weight is non-finite")
        return EpochStats(t[0], images, [int(c) for c in t[4:]], seconds).as_dict()

    def _stop_mid_epoch(self, progress: MidEpoch) -> None:
        """Save the run in the middle of its epoch and raise Preempted (every process; see
        :mod:`gfnet.train.preemption`); a run whose loss or weights went non-finite is not saved."""
        bad = self.ctx.all_reduce_sum(torch.tensor([progress.bad_steps], device=self.device)).item()
        if bad and self.options.amp != "fp16":
            self._diverged(progress.epoch, f"{bad} of the steps had a non-finite loss")
        if not self._weights_finite():
            self._diverged(progress.epoch, "a trained weight is non-finite")
        progress.signal = parse_signal(self._stop.agreed).name
        path = self.run.save_mid_epoch(progress)
        stopped = Preempted(self._stop.agreed, path, self.epoch, progress.step, progress.steps)
        if self.ctx.is_main:
            log.warning("%s", stopped)
        raise stopped

    def _weights_finite(self) -> bool:
        trained = [p for p in self.net.parameters() if p.requires_grad]
        return bool(torch.stack([torch.isfinite(p).all() for p in trained]).all()) if trained else True

    def _diverged(self, epoch: int, what: str) -> None:
        o = self.options
        rates = (f"policy lr {o.policy_lr}" if o.stage == 2
                 else f"backbone lr {o.backbone_lr}, classifier lr {o.fc_lr}")
        kept = (f"the last good checkpoint (epoch {self.epoch}) stays in {self.out_dir}"
                if self.out_dir is not None and self.epoch > 0 else "no checkpoint was written")
        raise TrainingError(f"training diverged in epoch {epoch + 1}: {what}. Nothing of this epoch was saved; "
                            f"{kept}. Lower the learning rates ({rates}) or check the data for NaN/Inf values")

    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> dict:
        """Anytime top-1 accuracy (%) after each step on ``loader`` (over all processes' shards).

        Stage 1 evaluates with random patch positions (its policy is untrained, as in the reference's
        validation); stages 2 and 3 with the policy's mean actions. Returns {"anytime_acc": [T], "images"}.
        """
        net = self.net
        was_training = {m: m.training for m in net.modules()}
        net.eval()
        correct = torch.zeros(net.T, device=self.device, dtype=torch.int64)
        n_images = 0
        try:
            for images, labels in loader:
                images, labels = images.to(self.device), labels.to(self.device)
                random = (lambda t, state, n=images.shape[0]: torch.rand(n, 2, device=self.device)) \
                    if self.options.stage == 1 else None
                with self._autocast():
                    for t, out in enumerate(net.steps(images, actions=random, glance_mode=self.options.glance_mode)):
                        correct[t] += (out.logits.argmax(1) == labels).sum()
                n_images += labels.shape[0]
        finally:
            for m, mode in was_training.items():
                m.training = mode
        totals = torch.cat([torch.tensor([n_images], device=self.device), correct])
        self.ctx.all_reduce_sum(totals)
        t = totals.tolist()
        return {"anytime_acc": [100.0 * c / max(t[0], 1) for c in t[1:]], "images": int(t[0])}

    # ------------------------------------------------------------------ the loop
    def fit(self, train_loader: Iterable, val_loader: Optional[Iterable] = None, resume: Optional[str] = None,
            callbacks: Sequence[Callable[[Trainer, dict], None]] = ()) -> list[dict]:
        """Train from ``self.epoch`` (or from a training checkpoint) to ``options.epochs``.

        Args:
            resume: None (a new run), a training checkpoint's path, or "auto": resume from ``out_dir``'s
                newest training state if it holds one, else start fresh. With ``out_dir``, a new run
                refuses a folder that holds another run unless the trainer was made with
                ``overwrite=True``; the folder is locked while the run lasts (see
                :mod:`gfnet.train.run_folder`).

        Every epoch: train, evaluate on ``val_loader`` when given, save (:meth:`save`: ``model_best.pth.tar``
        when the last step's accuracy improves, then ``checkpoint.pth.tar``) to ``out_dir``, then call each
        ``callback(trainer, epoch_record)``. Returns the history: one record per epoch. On one of
        ``stop_signals`` every process finishes its step, the run is saved in the middle of its epoch
        (``mid_epoch.pth.tar``) and Preempted is raised; resuming from that state continues the epoch at
        the next batch (:mod:`gfnet.train.preemption`).

        Raises:
            ValueError: the folder holds another run, the checkpoint belongs to a run with another model,
                stage or T, or the loader yields no full batch.
            TrainingError: the loss diverged (:meth:`train_epoch`).
            RunFolderBusy: another process trains into ``out_dir``.
            Preempted: a stop signal ended the run after its state was saved.
        """
        run, folder = self.run, self.run.folder
        self.data_backend = getattr(train_loader, "backend", None) or None
        self._stop = StopRequest(self.stop_signals, self.ctx)
        try:
            record = run.open(resume)
            resume = record.path if record is not None else None
            run.open_log()
            if record is not None:
                run.resume(record)
                del record  # its tensors map the file: let go
            else:
                seed_everything(self.options.seed + self.ctx.rank)
            check_data_classes(self.net, train_loader, val_loader)
            check_loader(train_loader, self.ctx.world_size)
            if self.ctx.is_main:
                log.info("stage %d, %d epoch(s), %d process(es) on %s, amp %s; options %s", self.options.stage,
                         self.options.epochs, self.ctx.world_size, self.device, self.options.amp,
                         dataclasses.asdict(self.options))
                spec = self.data_transforms
                log.info("data transforms %r: %d px, validation crop_pct %.4g, %s%s; checkpoint layout %r",
                         spec.name, spec.image_size, spec.crop_pct, spec.interpolation,
                         " (the reference train.py's)" if spec.name == "reference" else " (the backbone's inference "
                         "setting)", self.options.save_layout)
                if self.options.stage == 2:
                    log.info("stage 2 policy: %s", f"restored from {resume}" if resume else
                             "continued from the checkpoint" if self.options.continue_policy else
                             f"freshly initialised (seed {self.options.seed}), as the reference's train.py")
                if resume and self.epoch >= self.options.epochs:
                    log.warning("%s has already trained %d of %d epoch(s): nothing to do (raise --epochs to "
                                "train on)", resume, self.epoch, self.options.epochs)
            self._stop.open()  # the stop signals are caught from here on (collective under DDP)
            while self.epoch < self.options.epochs:
                epoch = self.epoch
                record = {"epoch": epoch + 1, **self.train_epoch(train_loader, epoch)}
                if self.optimizer is not None:
                    record["lr"] = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
                if val_loader is not None:
                    record["val_acc"] = self.evaluate(val_loader)["anytime_acc"]
                    acc = record["val_acc"][-1]
                else:
                    acc = record["train_acc"][-1]
                is_best = run.finish_epoch(record, acc)
                if self.options.stage == 2:
                    self.net.meta.trained_policy = True
                if val_loader is not None:
                    self.net.meta.anytime_classification = record["val_acc"]
                self.save(is_best)
                if self.ctx.is_main:
                    log.info("epoch %d/%d: %s", epoch + 1, self.options.epochs, _format_record(record))
                for cb in callbacks:
                    cb(self, record)
                if self.epoch < self.options.epochs and self._stop.settle():  # a signal during the epoch's end
                    stopped = Preempted(self._stop.agreed, folder.checkpoint_path if folder else None, self.epoch)
                    if self.ctx.is_main:
                        log.warning("%s", stopped)
                    raise stopped
            return self.history
        finally:
            failure = sys.exc_info()[1]
            self._stop.close(failed=failure is not None and not isinstance(failure, Preempted))
            run.close()  # a run that stopped before its first checkpoint puts the earlier run back; the lock goes

    # ------------------------------------------------------------------ the run's state (gfnet.train.run_state)
    def checkpoint(self) -> dict:
        """The checkpoint of the current state, plus the training state (collective under DDP)."""
        return self.run.checkpoint()

    def save(self, is_best: bool = False) -> None:
        """Write the epoch's checkpoint (and the best file) atomically: :meth:`RunState.save`."""
        self.run.save(is_best)

    def load_training_state(self, path) -> None:
        """Restore a run from a training checkpoint (a path or its record): :meth:`RunState.load`."""
        self.run.load(path)


def _format_record(record: dict) -> str:
    parts = [f"loss {record['loss']:.4f}", "train acc " + " ".join(f"{a:.1f}" for a in record["train_acc"])]
    if "val_acc" in record:
        parts.append("val acc " + " ".join(f"{a:.1f}" for a in record["val_acc"]))
    parts.append(f"{record['images_per_s']:.0f} img/s")
    return ", ".join(parts)
