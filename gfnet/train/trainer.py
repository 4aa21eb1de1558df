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
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from gfnet.checkpoint import LAYOUTS, atomic_save, checkpoint_dict, load_weights, read_checkpoint
from gfnet.config import TRANSFORMS
from gfnet.device import configure_device
from gfnet.flops import compute_flops
from gfnet.models.gfnet import GFNet
from gfnet.models.policy import ACTION_STD
from gfnet.precision import amp_dtype, default_amp
from gfnet.train.distributed import DistributedContext
from gfnet.train.objective import PPOObjective, SequenceObjective
from gfnet.train.rng import capture_rng_state, restore_rng_state, seed_everything
from gfnet.train.rollout import collect_rollout, discount_returns, normalise_returns
from gfnet.train.weights import (adam_state_to_reference, fresh_adam_state, load_sgd_state, reset_policy,
                                  sgd_parameter_groups, sgd_state_to_reference)

__all__ = ["TrainOptions", "Trainer", "AMP_MODES", "CHECKPOINT_NAME", "BEST_NAME", "cosine_lr", "auto_resume_path"]

log = logging.getLogger("gfnet.train")

# "auto": on a GPU the mixed precision users expect (bf16 where the card has it, else fp16), fp32 on the CPU
AMP_MODES = ("auto", "none", "bf16", "fp16")
#: File names in the output folder (the reference's): the last epoch's and the best epoch's checkpoint.
CHECKPOINT_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"


def auto_resume_path(out_dir: str) -> Optional[str]:
    """``--resume auto``: the run folder's last checkpoint (``out_dir/checkpoint.pth.tar``) if there is one,
    else None (a fresh start).

    This is what makes ``torchrun --max-restarts N`` bring a job back after a lost worker: the launcher
    restarts every worker with the same arguments, and each finds the checkpoint of the last finished
    epoch (written atomically, so it is whole or absent). Every rank resolves it alike (the folder is
    shared by the ranks, as on one node or a cluster's shared file system).
    """
    path = os.path.join(out_dir, CHECKPOINT_NAME)
    return path if os.path.isfile(path) else None


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
            none on the CPU), "none", "bf16" or "fp16". channels_last: encoders in channels-last memory format.
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
    channels_last: bool = False
    seed: int = 0
    progress: bool = True
    log_every: int = 10
    find_unused_parameters: bool = False
    continue_policy: bool = False
    transforms: str = "reference"
    save_layout: str = "release"

    def resolved(self, net: GFNet) -> "TrainOptions":
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

    The state that resuming restores: weights (with batch-norm statistics), the SGD and Adam states,
    the gradient scaler, the epoch and step counters, the best accuracy, the history and every
    process's RNG states; data order is a function of (seed, epoch) in the loaders.
    """

    def __init__(self, net: GFNet, options: TrainOptions, out_dir: Optional[str] = None,
                 ctx: Optional[DistributedContext] = None, save_best: bool = True):
        device = next(net.parameters()).device
        self.ctx = ctx or DistributedContext(device=device)
        self.net = net.to(self.ctx.device)
        self.options = options.resolved(net)
        self.out_dir = out_dir
        self.save_best = save_best
        self.device = self.ctx.device
        if self.options.amp == "auto":
            amp = default_amp(self.device) if self.device.type == "cuda" else "none"
            self.options = dataclasses.replace(self.options, amp=amp)
        self.amp_dtype = amp_dtype(self.options.amp)
        configure_device(self.device)  # cuDNN benchmark and TF32 on a GPU
        if self.options.channels_last:
            net.to_channels_last()
        if net.meta.get("flops") is None:
            net.meta.update(compute_flops(net))
        self.epoch = 0
        self.global_step = 0
        self.best_acc = 0.0
        self.history: list[dict] = []
        self._log_handler = None
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
        statistics over all processes: loss, train_acc per step (%), images, images_per_s, seconds."""
        from tqdm import tqdm

        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        self.set_learning_rates(epoch)
        self._set_modes()
        T = self.net.T
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros(T, device=self.device, dtype=torch.int64)
        n_images = 0
        try:
            total = len(loader)
        except TypeError:
            total = None
        bar = tqdm(total=total, desc=f"stage {self.options.stage} epoch {epoch + 1}/{self.options.epochs}",
                   disable=not (self.options.progress and self.ctx.is_main), dynamic_ncols=True, leave=False)
        start = last = time.perf_counter()
        last_images = 0
        for i, (images, labels) in enumerate(loader):
            out = self.train_step(images, labels)
            n = labels.shape[0]
            loss_sum += out["loss"].double() * n
            correct += out["correct"]
            n_images += n
            bar.update(1)
            if (i + 1) % self.options.log_every == 0:
                now = time.perf_counter()
                speed = (n_images - last_images) * self.ctx.world_size / max(now - last, 1e-9)
                last, last_images = now, n_images
                acc = " ".join(f"{100.0 * c / n_images:.1f}" for c in correct.tolist())
                postfix = {"loss": f"{loss_sum.item() / n_images:.4f}", "acc": acc, "img/s": f"{speed:.0f}"}
                bar.set_postfix(postfix)
                if self.ctx.is_main:
                    log.debug("epoch %d step %d: %s", epoch + 1, i + 1, postfix)
        bar.close()
        seconds = time.perf_counter() - start
        totals = torch.cat([loss_sum.view(1), torch.tensor([float(n_images)], device=self.device,
                                                           dtype=torch.float64), correct.double()])
        self.ctx.all_reduce_sum(totals)
        t = totals.tolist()
        return EpochStats(t[0], int(t[1]), [int(c) for c in t[2:]], seconds).as_dict()

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
                with self._autocast():
                    out = net.step(0, images, glance_mode=self.options.glance_mode)
                    correct[0] += (out.logits.argmax(1) == labels).sum()
                    for t in range(1, net.T):
                        actions = torch.rand(images.shape[0], 2, device=self.device) \
                            if self.options.stage == 1 else None
                        out = net.step(t, images, out.state, actions=actions)
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
            callbacks: Sequence[Callable[["Trainer", dict], None]] = ()) -> list[dict]:
        """Train from ``self.epoch`` (or from a training checkpoint ``resume``) to ``options.epochs``.

        Every epoch: train, evaluate on ``val_loader`` when given, write ``checkpoint.pth.tar`` (and
        ``model_best.pth.tar`` when the last step's accuracy improves) to ``out_dir``, then call each
        ``callback(trainer, epoch_record)``. Returns the history: one record per epoch.
        """
        self._open_log()
        try:
            if resume:
                self.load_training_state(resume)
                log.info("resumed from %s at epoch %d (step %d)", resume, self.epoch, self.global_step)
            else:
                seed_everything(self.options.seed + self.ctx.rank)
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
                record["acc"], record["best_acc"] = acc, self.best_acc
                self.epoch = epoch + 1
                self.history.append(record)
                if self.options.stage == 2:
                    self.net.meta["trained_policy"] = True
                if val_loader is not None:
                    self.net.meta["anytime_classification"] = record["val_acc"]
                self.save(is_best)
                if self.ctx.is_main:
                    log.info("epoch %d/%d: %s", epoch + 1, self.options.epochs, _format_record(record))
                for cb in callbacks:
                    cb(self, record)
            return self.history
        finally:
            self._close_log()

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
                fields["ppo_optimizer"] = fresh_adam_state(self.net, o.policy_lr, o.policy_betas) if o.stage == 3 else None
            if o.stage == 1:
                fields["policy"] = None
        return checkpoint_dict(self.net, layout=o.save_layout, **fields)

    def save(self, is_best: bool = False) -> None:
        """Write ``checkpoint.pth.tar`` (and ``model_best.pth.tar``) atomically to ``out_dir`` (main process)."""
        if self.out_dir is None:
            return
        obj = self.checkpoint()
        if self.ctx.is_main:
            path = os.path.join(self.out_dir, CHECKPOINT_NAME)
            atomic_save(obj, path)
            if is_best and self.save_best:
                atomic_save(obj, os.path.join(self.out_dir, BEST_NAME))
        self.ctx.barrier()

    def load_training_state(self, path: str) -> None:
        """Restore a run from a checkpoint written during training: gfnet's (either layout) or the
        reference train.py's.

        Weights (with batch-norm statistics), the SGD / Adam states (re-indexed from the reference's
        parameter order where needed), the epoch and the best accuracy come from any of them; gfnet's
        files add the gradient scaler, the step counter, the history and every process's RNG states.
        A reference file has none of these: the step counter and history restart empty and the random
        streams restart from seed + rank + epoch.
        """
        o, net = self.options, self.net
        ckpt = read_checkpoint(path, arch=net.arch, patch_size=net.patch_size, T=net.T)
        obj = ckpt.raw
        state = obj.get("train_state")
        if ckpt.stage is None:
            raise ValueError(f"{path} holds no training state: --resume takes the checkpoint.pth.tar written "
                             "during training (by gfnet-train or the reference's train.py); to start a stage "
                             "from weights, use --checkpoint")
        if ckpt.stage != o.stage:
            raise ValueError(f"{path} is a stage-{ckpt.stage} run; this one is stage {o.stage}")
        if ckpt.num_classes != net.num_classes:
            raise ValueError(f"{path} classifies {ckpt.num_classes} classes, this run's net {net.num_classes}")
        if o.stage == 3 and obj["policy"] is None:
            raise ValueError(f"{path} is a stage-3 file without a policy: it cannot continue stage 3")
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
        if state.get("scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        rng = state["rng"]
        if len(rng) == self.ctx.world_size:
            restore_rng_state(rng[self.ctx.rank])
        else:
            log.warning("%s was written by %d process(es), this run has %d: random streams restart from "
                        "seed %d + epoch", path, len(rng), self.ctx.world_size, o.seed)
            seed_everything(o.seed + self.ctx.rank + 7919 * self.epoch)

    # ------------------------------------------------------------------ logging
    def _open_log(self) -> None:
        if self.out_dir is None or not self.ctx.is_main or self._log_handler is not None:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(self.out_dir, "train.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.DEBUG)
        log.addHandler(handler)
        if log.level == logging.NOTSET or log.level > logging.DEBUG:
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
