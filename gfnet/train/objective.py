"""The training objectives as modules whose ``forward`` runs a whole T-step sequence.

GFNet is called step by step (:meth:`gfnet.GFNet.step`); DistributedDataParallel only synchronises the
gradients of what runs inside one ``forward`` call. So each objective is a small ``nn.Module`` around
the network whose ``forward`` runs the glance and every focus step and returns the loss: that module
is what gets wrapped in DDP.

- :class:`SequenceObjective` (stages 1 and 3): mean over the T steps of CE(classifier_t) +
  dsn_ratio * CE(backbone head on step t's pooled features) (GFNet, Section 3.3, "deep supervision").
- :class:`PPOObjective` (stage 2): PPO's clipped surrogate + value MSE - entropy bonus on a rollout.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gfnet.models.gfnet import GFNet, GFNetState, StepOutput
from gfnet.models.policy import ACTION_STD

__all__ = ["ACTION_MODES", "GlanceOutput", "run_glance", "SequenceObjective", "PPOObjective"]

#: How focus steps choose their patches in training: ``random`` uniform in [0, 1]^2 (stage 1),
#: ``sample`` from N(policy mean, std^2) clamped to [0, 1] (the reference's stage 3), ``mean`` the
#: policy's mean action (deterministic).
ACTION_MODES = ("random", "sample", "mean")


@dataclass
class GlanceOutput:
    """The glance in training: logits Tensor[N, classes] of the classifier (the reference trains the
    GRU's glance output whenever the classifier is a GRU, and the backbone head for the cascade),
    head_logits Tensor[N, classes] of the backbone head (deep supervision) and the step state."""

    logits: torch.Tensor
    head_logits: torch.Tensor
    state: GFNetState
    pooled: Optional[torch.Tensor] = None

    def as_step(self) -> StepOutput:
        """The glance as the first output of :meth:`GFNet.steps`."""
        return StepOutput(self.logits, self.state, self.pooled)


def run_glance(net: GFNet, images: torch.Tensor, glance_mode: Optional[str], grad: bool) -> GlanceOutput:
    """Step 1 as the reference's ``train.py`` runs it.

    It differs from ``net.step(0, ...)`` in one place only: for a GRU classifier whose evaluation glance
    comes from the backbone head (RegNet), training still puts the loss on the GRU's glance output, as
    the reference does. ``grad=False`` runs the global encoder and the classifier's glance step under
    ``torch.no_grad`` (a frozen global encoder: MobileNet-V3 and EfficientNet, and stage 2).
    """
    n = images.shape[0]
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx:
        pooled, fmap = net.model_prime(net.glance_input(images, glance_mode))
        fc_logits, fc_hidden = net.fc(pooled, net.fc.init_state(n, images.device), 0)
        head_logits = net.model_prime.head(pooled)
    logits = fc_logits if fc_logits is not None else head_logits
    state = GFNetState(fc_hidden, net.policy.init_hidden(n, images.device), fmap)
    return GlanceOutput(logits, head_logits, state, pooled)


class SequenceObjective(nn.Module):
    """Stages 1 and 3: the deep-supervised classification loss of a whole sequence.

    Args:
        net: the GFNet (its parameters are this module's, so DDP wraps them).
        dsn_ratio: weight of the deep-supervision terms (1 for ResNet/DenseNet/RegNet, 5 for
            MobileNet-V3/EfficientNet in the reference).
        train_global: whether the global encoder gets gradients (else its glance runs without).
        glance_mode: the glance's interpolation in training (the reference always used bicubic).
        action_std: the exploration standard deviation of ``action_mode="sample"``.

    Forward:
        images: Tensor[N, 3, S, S] (float normalised, or uint8 as the fused ops take it);
        labels: Tensor[N] int64; action_mode: one of :data:`ACTION_MODES`.
        Returns (loss: scalar Tensor, correct: Tensor[T] int64, the number of right top-1 predictions
        after each step, detached).
    """

    def __init__(self, net: GFNet, dsn_ratio: float, train_global: bool, glance_mode: Optional[str] = "bicubic",
                 action_std: float = ACTION_STD):
        super().__init__()
        self.net = net
        self.dsn_ratio = float(dsn_ratio)
        self.train_global = bool(train_global)
        self.glance_mode = glance_mode
        self.action_std = float(action_std)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, action_mode: str = "random"):
        if action_mode not in ACTION_MODES:
            raise ValueError(f"action_mode must be one of {ACTION_MODES}, got {action_mode!r}")
        net = self.net
        n = images.shape[0]
        glance = run_glance(net, images, self.glance_mode, grad=self.train_global)
        cls_losses = [F.cross_entropy(glance.logits.float(), labels)]
        dsn_losses = [F.cross_entropy(glance.head_logits.float(), labels)]
        correct = [(glance.logits.argmax(1) == labels).sum()]
        random = (lambda t, state: torch.rand(n, 2, device=images.device)) if action_mode == "random" else None
        std = self.action_std if action_mode == "sample" else 0.0
        focus = net.steps(images, actions=random, explore_std=std, glance=glance.as_step())
        next(focus)  # the glance, computed above as the reference's training computes it
        for out in focus:
            cls_losses.append(F.cross_entropy(out.logits.float(), labels))
            dsn_losses.append(F.cross_entropy(net.model.head(out.pooled).float(), labels))
            correct.append((out.logits.argmax(1) == labels).sum())
        loss = (sum(cls_losses) + self.dsn_ratio * sum(dsn_losses)) / net.T
        return loss, torch.stack(correct).detach()


class PPOObjective(nn.Module):
    """Stage 2: the PPO loss of the policy on one rollout (Schulman et al. 2017, Eq. 7 + value + entropy).

    loss = mean over steps and images of
    ``-min(r * A, clip(r, 1 - eps, 1 + eps) * A) + value_coef * (V - R)^2 - entropy_coef * H``,
    with r = exp(logpi(a) - logpi_old(a)), R the normalised discounted returns and A = R - V (V detached).

    Forward:
        feature_maps: Tensor[L, N, C, h, w] float32, the states the L = T-1 actions were taken from;
        actions: Tensor[L, N, 2]; old_logprobs: Tensor[L, N]; returns: Tensor[L, N] (normalised).
        Returns (loss scalar, stats dict of detached scalars: surrogate, value_loss, entropy).
    """

    def __init__(self, policy: nn.Module, clip: float = 0.2, value_coef: float = 0.5,
                 entropy_coef: float = 0.01, action_std: float = ACTION_STD):
        super().__init__()
        self.policy = policy
        self.clip, self.value_coef, self.entropy_coef = float(clip), float(value_coef), float(entropy_coef)
        self.action_std = float(action_std)

    def forward(self, feature_maps: torch.Tensor, actions: torch.Tensor, old_logprobs: torch.Tensor,
                returns: torch.Tensor):
        logprobs, values, entropy = self.policy.evaluate_sequence(feature_maps, actions, self.action_std)
        ratios = torch.exp(logprobs - old_logprobs)
        advantages = returns - values.detach()
        surrogate = torch.min(ratios * advantages,
                              torch.clamp(ratios, 1 - self.clip, 1 + self.clip) * advantages)
        value_loss = (values - returns).pow(2)
        loss = (-surrogate + self.value_coef * value_loss - self.entropy_coef * entropy).mean()
        stats = {"surrogate": surrogate.mean().detach(), "value_loss": value_loss.mean().detach(),
                 "entropy": entropy.mean().detach()}
        return loss, stats
