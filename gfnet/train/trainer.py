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
resumes from either and from the reference train.py's own files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from gfnet.checkpoint import (
    LAYOUTS,
    CheckpointError,
    atomic_save,
    checkpoint_dict,
    load_weights,
    read_checkpoint,
    torch_load,
)
from gfnet.config import TRANSFORMS
from gfnet.device import configure_device
from gfnet.flops import compute_flops
from gfnet.models.gfnet import GFNet
from gfnet.models.policy import ACTION_STD
from gfnet.precision import amp_dtype, default_amp
from gfnet.train.distributed import DistributedContext
from gfnet.train.objective import PPOObjective, SequenceObjective
from gfnet.train.preemption import MidEpoch, Preempted, StopRequest, parse_signal, save_mid_epoch, start_epoch
from gfnet.train.rng import capture_rng_state, restore_rng_state, seed_everything
from gfnet.train.rollout import collect_rollout, discount_returns, normalise_returns
from gfnet.train.run_folder import RunFolder, read_run_info
from gfnet.train.weights import (
    adam_state_to_reference,
    fresh_adam_state,
    load_sgd_state,
    reset_policy,
    sgd_parameter_groups,
    sgd_state_to_reference,
)

__all__ = ["TrainOptions", "Trainer", "TrainingError", "AMP_MODES", "CHECKPOINT_NAME", "BEST_NAME", "cosine_lr"]

log = logging.getLogger("gfnet.train")

# "auto": on a GPU the mixed precision users expect (bf16 where the card has it, else fp16), fp32 on the CPU
AMP_MODES = ("auto", "none", "bf16", "fp16")
#: File names in the output folder (the reference's): the last epoch's and the best epoch's checkpoint.
CHECKPOINT_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"

#: Options a resumed run must share with the run it continues: they shape the weights or the optimiser's
#: parameter groups (the architecture, T and patch size are compared on the checkpoint's own fields).
_FIXED_ON_RESUME = ("stage", "train_global")
#: Options that only steer the display.
_UNREPORTED = ("progress", "log_every")


class TrainingError(RuntimeError):
    """Training cannot go on: the loss diverged, or the loader yields nothing to train on."""


@dataclass
class TrainOptions:
    """What to train and how. ``None`` fields take the backbone family's reference value from
    ``net.config.train`` (:class:`gfnet.config.TrainConfig`).

    Attributes:
        stage: 1, 2 or 3.
        epochs: epochs of this stage (reference: the family's ``epochs`` in stages 1 and 3, 15 in stage 2).
        batch_size: the global batch (all processes together; reference 256); only recorded here, the
            loader decides the batch it yields.
        backbone_lr / fc_lr: base learning rates of the encoders and of the classifier (fc_lr defaults to
            ``fc_stage1_lr`` in stage 1 and ``fc_stage3_lr`` in stage 3).
        weight_decay, momentum, nesterov: SGD's; dsn_ratio: deep-supervision weight; train_global: train
            the global encoder in stages 1 and 3.
        policy_lr, policy_betas, ppo_epochs, ppo_clip, gamma, value_coef, entropy_coef: PPO's (Adam
            3e-4, one epoch per batch, eps 0.2, discount 0.7, 0.5, 0.01).
        action_std: exploration standard deviation (0.1). stage3_actions: "sample" (the reference) or
            "mean". glance_mode: the glance's interpolation in training (the reference: bicubic).
        continue_policy: stage 2 continues from the net's policy; False (the reference's train.py)
            starts PPO from a freshly initialised policy (seeded by ``seed``), whatever the checkpoint holds.
        transforms: the training data's geometry (:meth:`gfnet.config.BackboneConfig.train_transforms`):
            "reference" (the reference train.py's, 224 px bilinear for every backbone) or "backbone"
            (the backbone's inference size and filter: EfficientNet-B2 260, B3 300 px, bicubic).
            :func:`~gfnet.train.session.train_imagefolder` builds its loaders from it; recorded in the
            checkpoint and the log.
        save_layout: checkpoint layout, "release" (the reference's inference.py and gfnet-eval read it)
            or "reference-train" (the reference's train.py continues from it: stages 2/3, --resume).
        amp: "auto" (default: bf16 autocast on GPUs that have it, fp16 with a GradScaler on older ones,
            none on the CPU), "none", "bf16" or "fp16".
        channels_last: encoders in channels-last memory format (default on: faster with oneDNN on CPUs,
            1.2-1.5x for ResNet-50 and MobileNet-V3 encoders on the 2-core development machine, and with
            cuDNN on GPUs; the weights, their names and checkpoints are unchanged).
        compile: compile the encoders with torch.compile (:meth:`GFNet.compile`; the first steps compile).
        seed: seeds every generator (process k gets seed + k) at the start of a fresh run.
        progress: show a tqdm bar (main process only). log_every: steps between bar/log updates
            (each update costs a host synchronisation).
        find_unused_parameters: DDP's flag; only needed for custom models with parameters that a
            forward does not reach.
    """

    stage: int = 1
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    backbone_lr: Optional[float] = None
    fc_lr: Optional[float] = None
    weight_decay: Optional[float] = None
    momentum: Optional[float] = None
    nesterov: Optional[bool] = None
    dsn_ratio: Optional[float] = None
    train_global: Optional[bool] = None
    policy_lr: float = 3e-4
    policy_betas: tuple = (0.9, 0.999)
    ppo_epochs: int = 1
    ppo_clip: float = 0.2
    gamma: float = 0.7
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    action_std: float = ACTION_STD
    stage3_actions: str = "sample"
    glance_mode: Optional[str] = "bicubic"
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    progress: bool = True
    log_every: int = 10
    find_unused_parameters: bool = False
    continue_policy: bool = False
    transforms: str = "reference"
    save_layout: str = "release"

    def resolved(self, net: GFNet) -> TrainOptions:
        """A copy with every ``None`` replaced by the backbone family's reference default."""
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.stage3_actions not in ("sample", "mean"):
            raise ValueError(f"stage3_actions must be 'sample' or 'mean', got {self.stage3_actions!r}")
        if self.transforms not in TRANSFORMS:
            raise ValueError(f"transforms must be one of {TRANSFORMS}, got {self.transforms!r}")
        if self.save_layout not in LAYOUTS:
            raise ValueError(f"save_layout must be one of {LAYOUTS}, got {self.save_layout!r}")
        tc = net.config.train
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("backbone_lr", "fc_lr", "weight_decay", "dsn_ratio", "policy_lr", "entropy_coef",
                     "value_coef"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (self.ppo_epochs >= 1 and self.log_every >= 1):
            raise ValueError(f"ppo_epochs and log_every must be >= 1, got {self.ppo_epochs}, {self.log_every}")
        if not (0 < self.action_std and 0 < self.ppo_clip and 0 <= self.gamma <= 1):
            raise ValueError(f"need action_std > 0, ppo_clip > 0, 0 <= gamma <= 1; got {self.action_std}, "
                             f"{self.ppo_clip}, {self.gamma}")
        defaults = dict(
            epochs=tc.policy_epochs if self.stage == 2 else tc.epochs, batch_size=tc.batch_size,
            backbone_lr=tc.backbone_lr, fc_lr=tc.fc_stage1_lr if self.stage == 1 else tc.fc_stage3_lr,
            weight_decay=tc.weight_decay, momentum=tc.momentum, nesterov=tc.nesterov,
            dsn_ratio=tc.dsn_ratio, train_global=tc.train_model_prime)
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """The reference's per-epoch cosine schedule: 0.5 * base * (1 + cos(pi * epoch / epochs))."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))


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

    The state that resuming restores: weights (with batch-norm statistics), the SGD and Adam states,
    the gradient scaler, the epoch and step counters, the best accuracy and epoch, the history and every
    process's RNG states; data order is a function of (seed, epoch) in the loaders.

    Guarantees with ``out_dir`` (see :meth:`fit` and :meth:`save`): one run per folder under a lock,
    checkpoints written atomically, ``model_best.pth.tar`` the best finished epoch's whenever the process
    is killed, nothing saved from an epoch whose loss or weights went non-finite.
    """

    def __init__(self, net: GFNet, options: TrainOptions, out_dir: Optional[str] = None,
                 ctx: Optional[DistributedContext] = None, save_best: bool = True, overwrite: bool = False,
                 stop_signals: Sequence = ()):
        device = next(net.parameters()).device
        self.ctx = ctx or DistributedContext(device=device)
        self.net = net.to(self.ctx.device)
        self.options = options.resolved(net)
        self.out_dir = out_dir
        self.save_best = save_best
        self.overwrite = overwrite
        self.device = self.ctx.device
        if self.options.amp == "auto":
            amp = default_amp(self.device) if self.device.type == "cuda" else "none"
            self.options = dataclasses.replace(self.options, amp=amp)
        self.amp_dtype = amp_dtype(self.options.amp)
        configure_device(self.device)  # cuDNN benchmark and TF32 on a GPU
        if self.options.channels_last:
            net.to_channels_last()
        if self.options.compile and net.compiled is None:
            net.compile()
        if net.meta.get("flops") is None:
            net.meta.update(compute_flops(net))
        self.epoch = 0
        self.global_step = 0
        self.best_acc = 0.0
        self.best_epoch = 0
        self.run_id = uuid.uuid4().hex
        self.changes: list[dict] = []  # options changed by resumes: {"epoch", "option", "from", "to"}
        self.history: list[dict] = []
        self.data_backend: Optional[str] = None  # the training loader's ("dali", "torchvision"), set by fit
        self._log_handler = None
        self.stop_signals = tuple(parse_signal(s) for s in stop_signals)
        self._stop = StopRequest((), self.ctx)  # fit() opens the real one
        self._mid_epoch: Optional[MidEpoch] = None  # where a resumed run re-enters its epoch
        self._check_policy_and_layout()
        if self.options.stage == 2 and not self.options.continue_policy:
            # The reference's stage 2 starts PPO from a new policy whatever the checkpoint holds (its
            # stage-1 files store none). Seeded alike on every process, before DDP wraps the objective.
            reset_policy(net, self.options.seed)
        self._configure_parameters()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.options.amp == "fp16")

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

    def _check_policy_and_layout(self) -> None:
        o, net = self.options, self.net
        untrained = net.meta.get("trained_policy") is False  # a checkpoint with policy None, or stage 1's
        if o.stage == 2 and o.continue_policy and untrained:
            raise ValueError("continue_policy (--continue-policy) continues a trained policy, and this net has "
                             "none (its checkpoint stores policy None or comes from stage 1): drop it to start "
                             "PPO from a fresh policy, as the reference does")
        if o.stage == 3 and untrained:
            raise ValueError("stage 3 fine-tunes with the policy that stage 2 trained, and this net has none (its "
                             "checkpoint stores policy None or comes from stage 1): start stage 3 from a stage-2 "
                             "checkpoint")
        if o.save_layout == "reference-train" and o.stage != 2 and o.train_global != net.config.train.train_model_prime:
            raise ValueError(
                f"the reference's train.py {'trains' if net.config.train.train_model_prime else 'freezes'} the global "
                f"encoder of {net.arch} and builds its optimizer accordingly; save_layout 'reference-train' "
                f"(--save-layout) needs train_global={net.config.train.train_model_prime} (--train-global "
                f"{'yes' if net.config.train.train_model_prime else 'no'})")

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

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

        resumed = self._mid_epoch if self._mid_epoch is not None and self._mid_epoch.epoch == epoch else None
        self._mid_epoch = None
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
        path = save_mid_epoch(self, progress)
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
        folder = RunFolder(self.out_dir, CHECKPOINT_NAME, BEST_NAME) if self.out_dir is not None else None
        self.data_backend = getattr(train_loader, "backend", None) or None
        self._stop = StopRequest(self.stop_signals, self.ctx)
        try:
            resume = self._open_run(folder, resume)
            self._open_log()
            if resume:
                self.load_training_state(resume)
                log.info("resumed from %s at epoch %d (step %d)", resume, self.epoch, self.global_step)
                if folder is not None and self.ctx.is_main and self.save_best:
                    self._reconcile_best(folder, resume)
            else:
                seed_everything(self.options.seed + self.ctx.rank)
            self._check_data_classes(train_loader, val_loader)
            self._check_loader(train_loader)
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
                is_best = acc > self.best_acc
                self.best_acc = max(self.best_acc, acc)
                if is_best:
                    self.best_epoch = epoch + 1
                record["acc"], record["best_acc"] = acc, self.best_acc
                self.epoch = epoch + 1
                self.history.append(record)
                if self.options.stage == 2:
                    self.net.meta["trained_policy"] = True
                if val_loader is not None:
                    self.net.meta["anytime_classification"] = record["val_acc"]
                self.save(is_best)
                if folder is not None and self.ctx.is_main:
                    folder.settle_replaced()  # --overwrite: the earlier run's files go once this run has a checkpoint
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
            self._close_log()
            if folder is not None:
                folder.settle_replaced()  # a run that stopped before its first checkpoint puts the earlier run back
                folder.release()

    def _open_run(self, folder: Optional[RunFolder], resume: Optional[str]) -> Optional[str]:
        """Lock the run folder and decide what to resume from (main process; the others follow its word)."""
        if folder is None:
            if resume == "auto":
                raise ValueError("resume='auto' looks for the run in out_dir: give the trainer an out_dir")
            return resume
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
        return path

    def _check_loader(self, loader: Iterable) -> None:
        try:
            batches = len(loader)
        except TypeError:  # no len(): train_epoch reports an empty epoch instead
            return
        if batches == 0:
            stats = getattr(loader, "stats", None)
            size = getattr(loader, "batch_size", None)
            have = f"{stats.valid} valid training images" if stats is not None else "the training images"
            raise ValueError(f"the training loader yields no batch: {have} make no full batch of {size} per "
                             f"process ({self.ctx.world_size} process(es)); lower the batch size or add images")

    def _reconcile_best(self, folder: RunFolder, source: str) -> None:
        info = read_run_info(source)
        adopted = folder.reconcile_best(source, info)
        if adopted is not None and adopted.best_acc >= self.best_acc:
            self.best_acc, self.best_epoch = adopted.best_acc, adopted.best_epoch

    # ------------------------------------------------------------------ checkpoints
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
        o = self.options
        state = self.training_state()
        state["train_transforms"] = dataclasses.asdict(self.data_transforms)
        fields = {"epoch": self.epoch, "best_acc": self.best_acc,
                  "acc": self.history[-1]["acc"] if self.history else None, "train_state": state}
        if o.save_layout == "release":
            fields["optimizer"] = self.optimizer.state_dict() if self.optimizer is not None else None
            fields["ppo_optimizer"] = self.ppo_optimizer.state_dict() if self.ppo_optimizer is not None else None
        else:
            # What the reference's train.py writes: its SGD's groups in its parameter order (stages 1, 3),
            # PPO's Adam (stage 2; stage 3 builds one that never steps, and --resume loads it), and no
            # policy in stage 1.
            fields["optimizer"] = (sgd_state_to_reference(self.optimizer, self.net, o.train_global)
                                   if self.optimizer is not None else None)
            if self.ppo_optimizer is not None:
                fields["ppo_optimizer"] = adam_state_to_reference(self.ppo_optimizer.state_dict())
            else:
                fields["ppo_optimizer"] = (fresh_adam_state(self.net, o.policy_lr, o.policy_betas)
                                           if o.stage == 3 else None)
            if o.stage == 1:
                fields["policy"] = None
        return checkpoint_dict(self.net, layout=o.save_layout, **fields)

    def save(self, is_best: bool = False) -> None:
        """Write the epoch's checkpoint atomically to ``out_dir`` (main process; collective under DDP).

        An improving epoch writes ``model_best.pth.tar`` first and ``checkpoint.pth.tar`` second, both
        the same content. So at any moment a kill may strike, the best file holds the best finished
        epoch: killed before the best file's rename, the folder is as after the previous epoch; killed
        between the two renames, the best file is one epoch ahead of the checkpoint (``resume="auto"``
        resumes from it; a resume from the older checkpoint adopts it, see
        :meth:`gfnet.train.run_folder.RunFolder.reconcile_best`).
        """
        if self.out_dir is None:
            return
        obj = self.checkpoint()
        if self.ctx.is_main:
            if is_best and self.save_best:
                atomic_save(obj, os.path.join(self.out_dir, BEST_NAME))
            atomic_save(obj, os.path.join(self.out_dir, CHECKPOINT_NAME))
            RunFolder(self.out_dir).discard_mid_epoch()  # superseded by this finished epoch
        self.ctx.barrier()

    def load_training_state(self, path: str) -> None:
        """Restore a run from a checkpoint written during training: gfnet's (either layout) or the
        reference train.py's.

        Weights (with batch-norm statistics), the SGD / Adam states (re-indexed from the reference's
        parameter order where needed), the epoch and the best accuracy come from any of them; gfnet's
        files add the gradient scaler, the step counter, the history, the run's identity and best epoch
        and every process's RNG states. A reference file has none of these: the step counter and history
        restart empty and the random streams restart from seed + rank + epoch.

        What a resume cannot change (the architecture, patch size, T, classifier, classes, stage, whether
        the global encoder trains) must match, else ValueError. Every other option that differs from the
        checkpoint's (epochs, learning rates, seed, batch size, ...) is logged, one line each, recorded in
        the checkpoint's ``train_state["changes"]``, and takes effect: the optimisers' hyper-parameters
        follow the new options, so the stored options and optimiser state never disagree.

        Raises:
            FileNotFoundError: no such file.
            CheckpointError: the file is not a gfnet or reference GFNet checkpoint, or holds no training state.
            ValueError: it belongs to a run that cannot continue as this one.
        """
        o, net = self.options, self.net
        # gfnet's own files say what run they belong to: name every difference at once, before the reader
        # (which checks the first it meets) sees the caller's values (mmap: no weight is read for this)
        peek = torch_load(path, mmap=True)
        if isinstance(peek, dict) and isinstance(peek.get("train_state"), dict) and "model_state_dict" in peek:
            self._check_same_model(path, peek)
        del peek
        ckpt = read_checkpoint(path, arch=net.arch, patch_size=net.patch_size, T=net.T)
        obj = ckpt.raw
        state = obj.get("train_state")
        if ckpt.stage is None:
            raise CheckpointError(f"{path} holds no training state: --resume takes the checkpoint.pth.tar written "
                                  "during training (by gfnet-train or the reference's train.py); to start a stage "
                                  "from weights, use --checkpoint")
        if ckpt.stage != o.stage:
            raise ValueError(f"{path} is a stage-{ckpt.stage} run; this one is stage {o.stage}")
        if ckpt.num_classes != net.num_classes:
            raise ValueError(f"{path} classifies {ckpt.num_classes} classes, this run's net {net.num_classes}")
        self._adopt_stored_classes(path, obj.get("classes"))
        if o.stage == 3 and obj["policy"] is None:
            raise ValueError(f"{path} is a stage-3 file without a policy: it cannot continue stage 3")
        if isinstance(state, dict):
            self._report_changes(path, obj, state)
        load_weights(net, ckpt)
        if self.optimizer is not None:
            found = load_sgd_state(self.optimizer, obj.get("optimizer"), net, o.train_global, path)
            log.debug("%s: SGD state in the %s layout", path, found)
        if self.ppo_optimizer is not None:
            saved = obj.get("ppo_optimizer")
            if not isinstance(saved, dict) or "param_groups" not in saved:
                raise ValueError(f"{path} holds no PPO optimizer state ('ppo_optimizer' is "
                                 f"{type(saved).__name__}): --resume takes a stage-2 file")
            self.ppo_optimizer.load_state_dict(saved)
        if isinstance(state, dict):
            self._apply_hyperparameters()
        if o.stage == 2 and int(obj["epoch"]) > 0:
            net.meta["trained_policy"] = True
        self.epoch = int(obj["epoch"])
        self.best_acc = float(obj["best_acc"]) if obj.get("best_acc") is not None else 0.0
        for k in ("flops", "model_flops", "policy_flops", "fc_flops", "anytime_classification"):
            if obj.get(k) is not None:
                net.meta[k] = obj[k]
        if not isinstance(state, dict):
            log.warning("%s was written by the reference's train.py: it stores no step counter, history or "
                        "random states; random streams restart from seed %d + epoch", path, o.seed)
            self.global_step, self.history = 0, []
            seed_everything(o.seed + self.ctx.rank + 7919 * self.epoch)
            return
        mid = state.get("mid_epoch")  # a run stopped in the middle of an epoch (gfnet.train.preemption)
        self._mid_epoch = MidEpoch.from_state(mid, self.ctx, path) if isinstance(mid, dict) else None
        if self._mid_epoch is not None and self.ctx.is_main:
            log.info("%s: epoch %d continues after step %d", path, self.epoch + 1, self._mid_epoch.step)
        if state.get("scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.run_id = state.get("run_id") or self.run_id
        self.best_epoch = read_run_info(path, obj).best_epoch
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
        mine = self.net.meta.get("classes")
        if mine is not None and list(mine) != list(stored):
            from gfnet.data.index import class_list_difference

            raise ValueError(f"{path} was trained on other classes than this run's net: "
                             f"{class_list_difference(stored, mine)}")
        self.net.meta["classes"] = list(stored)

    def _check_data_classes(self, *loaders) -> None:
        """The loaders' class names (gfnet.data loaders have ``classes``) must be the ones the net classifies:
        labels are positions in that list. A net that names none takes the training loader's."""
        from gfnet.data.index import class_list_difference

        for loader in loaders:
            names = getattr(loader, "classes", None)
            if names is None:
                continue
            known = self.net.meta.get("classes")
            if known is None:
                if len(names) != self.net.num_classes:
                    raise ValueError(f"the data has {len(names)} classes, the net classifies {self.net.num_classes}")
                self.net.meta["classes"] = list(names)
            elif list(names) != list(known):
                raise ValueError(f"the data's classes are not the {len(known)} that the net classifies: "
                                 f"{class_list_difference(known, names)}; build every loader with "
                                 "make_loader(..., classes=<the training split's>)")

    def _check_same_model(self, path: str, obj: dict) -> None:
        net, o = self.net, self.options
        stored_T = obj.get("T") if obj.get("T") is not None else (len(obj["flops"]) if obj.get("flops") else None)
        fc = obj.get("fc") or {}
        stored_classes = next((int(fc[k].shape[0]) for k in ("fc.weight", "fc_2.weight") if k in fc), None)
        stored_kind = "gru" if "fc.weight" in fc else ("cascade" if "fc_2.weight" in fc else None)
        stored_options = obj["train_state"].get("options") or {}
        pairs = [("architecture", obj.get("model_name"), net.arch),
                 ("patch size", obj.get("patch_size"), net.patch_size),
                 ("T", stored_T, net.T),
                 ("classifier", stored_kind, "gru" if net.fc.is_rnn else "cascade"),
                 ("classes", stored_classes, net.num_classes)]
        pairs += [(name, stored_options.get(name), getattr(o, name)) for name in _FIXED_ON_RESUME
                  if name in stored_options]
        differ = [f"{name} {have} (checkpoint) vs {want} (this run)" for name, have, want in pairs
                  if have is not None and have != want]
        if differ:
            raise ValueError(f"{path} cannot be resumed as this run: " + "; ".join(differ) + ". A resume "
                             "continues the same run; to train a changed model, start a new run in another "
                             "output folder")

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

    # ------------------------------------------------------------------ logging
    def _open_log(self) -> None:
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


def _format_record(record: dict) -> str:
    parts = [f"loss {record['loss']:.4f}", "train acc " + " ".join(f"{a:.1f}" for a in record["train_acc"])]
    if "val_acc" in record:
        parts.append("val acc " + " ".join(f"{a:.1f}" for a in record["val_acc"]))
    parts.append(f"{record['images_per_s']:.0f} img/s")
    return ", ".join(parts)
