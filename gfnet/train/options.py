"""What to train and how: :class:`TrainOptions` (the reference's values by default), and the per-epoch cosine
learning-rate schedule."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from gfnet.checkpoint import LAYOUTS
from gfnet.config import TRANSFORMS
from gfnet.models.gfnet import GFNet
from gfnet.models.policy import ACTION_STD
from gfnet.precision import AMP_MODES

__all__ = ["AMP_MODES", "TrainOptions", "cosine_lr"]

# "auto": on a GPU the mixed precision users expect (bf16 where the card has it, else fp16), fp32 on the CPU


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

    def check_for(self, net: GFNet) -> None:
        """ValueError when these (resolved) options cannot train ``net``: stage 3 or ``continue_policy`` without a
        trained policy, or ``save_layout="reference-train"`` with another ``train_global`` than the reference's."""
        o = self
        untrained = net.meta.trained_policy is False  # a checkpoint with policy None, or stage 1's
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


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """The reference's per-epoch cosine schedule: 0.5 * base * (1 + cos(pi * epoch / epochs))."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
