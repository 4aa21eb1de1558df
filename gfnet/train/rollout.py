"""Stage 2's experience: rollouts of the patch policy and their rewards (GFNet, Section 3.3).

The reward of focus step t is the gain in the softmax probability of the true class over step t-1
(the glance for t = 1); returns are discounted with gamma = 0.7 over the T-1 focus steps and
normalised per batch (over all steps and images, and over all processes under DDP).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gfnet.models.gfnet import GFNet
from gfnet.models.policy import ACTION_STD, Policy
from gfnet.train.objective import run_glance

__all__ = ["Rollout", "collect_rollout", "discount_returns", "normalise_returns"]


@dataclass
class Rollout:
    """One batch's experience, L = T-1 focus steps.

    feature_maps Tensor[L, N, C, h, w] float32 (the states the actions were taken from); actions
    Tensor[L, N, 2]; logprobs Tensor[L, N] under the policy that collected them (PPO's "old policy");
    rewards Tensor[L, N]; correct Tensor[T] int64 right top-1 predictions after each step.
    """

    feature_maps: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor
    rewards: torch.Tensor
    correct: torch.Tensor


@torch.no_grad()
def collect_rollout(net: GFNet, images: torch.Tensor, labels: torch.Tensor, action_std: float = ACTION_STD,
                    glance_mode: Optional[str] = "bicubic") -> Rollout:
    """Run the sequence with exploration and record what PPO needs.

    The policy that acts here is PPO's old policy: the reference keeps a copy ``policy_old`` that it
    sets equal to the policy after every update and acts with it, so acting with the policy's current
    weights before the update is the same thing; its log-probabilities are stored as the old ones.

    Args:
        net: the GFNet in eval mode (stage 2 freezes batch norm and dropout, as the reference does).
        images: Tensor[N, 3, S, S]; labels: Tensor[N] int64.
        action_std: exploration standard deviation (0.1 in the reference).
    """
    if net.T < 2:
        raise ValueError("stage 2 needs T >= 2: with T=1 there is no focus step for the policy to choose")
    glance = run_glance(net, images, glance_mode, grad=False)
    prob_prev = F.softmax(glance.logits.float(), 1).gather(1, labels[:, None])[:, 0]
    correct = [(glance.logits.argmax(1) == labels).sum()]
    fmaps, actions, logprobs, rewards = [glance.state.feature_map.float()], [], [], []
    focus = net.steps(images, explore_std=action_std, glance=glance.as_step())
    next(focus)  # the glance, computed above as the reference's training computes it
    for out in focus:
        logprobs.append(Policy.distribution(out.action_mean.float(), action_std).log_prob(out.actions.float()))
        actions.append(out.actions.float())
        prob = F.softmax(out.logits.float(), 1).gather(1, labels[:, None])[:, 0]
        rewards.append(prob - prob_prev)
        prob_prev = prob
        correct.append((out.logits.argmax(1) == labels).sum())
        fmaps.append(out.state.feature_map.float())
    fmaps.pop()  # the last step's map: no action is taken from it
    return Rollout(torch.stack(fmaps), torch.stack(actions), torch.stack(logprobs), torch.stack(rewards),
                   torch.stack(correct))


def discount_returns(rewards: torch.Tensor, gamma: float = 0.7) -> torch.Tensor:
    """Tensor[L, N] rewards -> Tensor[L, N] returns R_t = r_t + gamma * R_{t+1} (R_L = r_L)."""
    returns = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[t] + gamma * running
        returns[t] = running
    return returns


def normalise_returns(returns: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(R - mean) / (std + eps) over every entry of Tensor[L, N] (unbiased std, as torch.std).

    Under torch.distributed the mean and std are those of the global batch (all processes), so that
    training on k processes normalises like one process with the whole batch.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        r = returns.double()
        moments = torch.stack([r.new_tensor(float(r.numel())), r.sum(), (r * r).sum()])
        dist.all_reduce(moments)
        count, total, squares = moments.tolist()
        mean = total / count
        var = max(squares - count * mean * mean, 0.0) / max(count - 1, 1)
        return ((returns - mean) / (var ** 0.5 + eps)).to(returns.dtype)
    return (returns - returns.mean()) / (returns.std() + eps)
