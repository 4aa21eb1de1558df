"""The patch proposal network: an actor-critic with a recurrent state (GFNet, Section 3.2)."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["Policy", "ACTION_STD"]

# The reference samples training actions from N(mean, 0.1^2) per axis.
ACTION_STD = 0.1


class Policy(nn.Module):
    """Actor-critic reading the previous step's feature map.

    Submodule names and Sequential indices are the reference's ``ActorCritic`` ones, so that its
    ``policy`` state dicts load unchanged.

    Args:
        feature_map_channels: C of the feature map Tensor[N, C, h, w].
        state_dim: C * ceil(P/32)^2.
        hidden_dim: GRU width (1024 for ResNet/DenseNet, 256 otherwise).
        conv: Conv1x1(C->32) + Linear state encoder (True) or a two-layer MLP (False).
    """

    def __init__(self, feature_map_channels: int, state_dim: int, hidden_dim: int = 1024,
                 conv: bool = True):
        super().__init__()
        self.conv = conv
        self.hidden_dim = hidden_dim
        if conv:
            self.state_encoder = nn.Sequential(
                nn.Conv2d(feature_map_channels, 32, kernel_size=1, bias=False),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(state_dim * 32 // feature_map_channels, hidden_dim),
                nn.ReLU(),
            )
        else:
            self.state_encoder = nn.Sequential(
                nn.Linear(state_dim, 2048),
                nn.ReLU(),
                nn.Linear(2048, hidden_dim),
                nn.ReLU(),
            )
        self.gru = nn.GRU(hidden_dim, hidden_dim)
        self.actor = nn.Sequential(nn.Linear(hidden_dim, 2), nn.Sigmoid())
        self.critic = nn.Sequential(nn.Linear(hidden_dim, 1))

    def init_hidden(self, n: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """Zero GRU state Tensor[n, hidden_dim]: the policy restarts at the first focus step."""
        return torch.zeros(n, self.hidden_dim, device=device, dtype=dtype)

    def encode(self, feature_maps: torch.Tensor) -> torch.Tensor:
        """Tensor[..., C, h, w] feature maps -> Tensor[..., hidden_dim] encoded states."""
        lead = feature_maps.shape[:-3]
        x = feature_maps.reshape(-1, *feature_maps.shape[-3:])
        x = self.state_encoder(x if self.conv else x.flatten(1))
        return x.reshape(*lead, -1)

    def forward(self, feature_map: torch.Tensor, hidden: torch.Tensor):
        """One policy step.

        Args:
            feature_map: Tensor[N, C, h, w], the previous step's (detached) feature map.
            hidden: Tensor[N, hidden_dim] GRU state.
        Returns:
            (action_mean Tensor[N, 2] in (0, 1): (row, column); value Tensor[N]; hidden Tensor[N, hidden_dim])
        """
        x = self.encode(feature_map)
        out, h = self.gru(x.unsqueeze(0), hidden.unsqueeze(0).to(x.dtype))
        out = out[0]
        return self.actor(out), self.critic(out).squeeze(-1), h[0]

    def evaluate_sequence(self, feature_maps: torch.Tensor, actions: torch.Tensor, std: float = ACTION_STD):
        """Log-probabilities, values and entropies of a whole rollout (PPO's re-evaluation).

        Args:
            feature_maps: Tensor[L, N, C, h, w], the states the actions were taken from.
            actions: Tensor[L, N, 2].
        Returns:
            (logprob Tensor[L, N], value Tensor[L, N], entropy Tensor[L, N])
        """
        x = self.encode(feature_maps)
        h0 = torch.zeros(1, x.shape[1], self.hidden_dim, device=x.device, dtype=x.dtype)
        out, _ = self.gru(x, h0)
        mean = self.actor(out)
        dist = self.distribution(mean, std)
        return dist.log_prob(actions), self.critic(out).squeeze(-1), dist.entropy()

    @staticmethod
    def distribution(mean: torch.Tensor, std: float = ACTION_STD) -> torch.distributions.Distribution:
        """The exploration distribution: independent normals of standard deviation ``std`` per axis."""
        return torch.distributions.Independent(
            torch.distributions.Normal(mean, torch.full_like(mean, std)), 1)
