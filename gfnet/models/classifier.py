"""The classifier that aggregates the steps' pooled features (GFNet, Section 3.2)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

__all__ = ["Classifier"]


class Classifier(nn.Module):
    """GRU classifier (ResNet, DenseNet, RegNet) or cascade of linear layers (MobileNet-V3, EfficientNet).

    State is explicit and batch-first so that budgeted inference can compact and refill it:
    - GRU: Tensor[N, hidden_dim], zero at the glance (the reference restarts it there);
    - cascade: Tensor[N, T, feature_num], the pooled features of steps 0..t (zeros beyond), step t >= 1
      classifies their concatenation with its own ``fc_{t+1}``; the glance has no cascade output.
    Submodule names are the reference's (``rnn``, ``fc``; ``fc_2`` .. ``fc_5``), so its ``fc`` state
    dicts load unchanged; a cascade always has at least fc_2..fc_5 as in the reference.
    """

    def __init__(self, feature_num: int, num_classes: int, T: int, rnn: bool = True,
                 hidden_dim: Optional[int] = 1024):
        super().__init__()
        self.feature_num, self.num_classes, self.T, self.is_rnn = feature_num, num_classes, T, rnn
        if rnn:
            self.hidden_dim = hidden_dim
            self.rnn = nn.GRU(feature_num, hidden_dim)
            self.fc = nn.Linear(hidden_dim, num_classes)
        else:
            self.hidden_dim = None
            for k in range(2, max(T, 5) + 1):
                self.add_module(f"fc_{k}", nn.Linear(feature_num * k, num_classes))

    def init_state(self, n: int, device=None, dtype=torch.float32) -> torch.Tensor:
        if self.is_rnn:
            return torch.zeros(n, self.hidden_dim, device=device, dtype=dtype)
        return torch.zeros(n, self.T, self.feature_num, device=device, dtype=dtype)

    def forward(self, pooled: torch.Tensor, state: torch.Tensor, t: int):
        """Consume step ``t``'s features.

        Args:
            pooled: Tensor[N, feature_num]; state: as returned by :meth:`init_state` or the previous call.
        Returns:
            (logits Tensor[N, num_classes], or None for the cascade's glance; the new state)
        """
        if self.is_rnn:
            out, h = self.rnn(pooled.unsqueeze(0), state.unsqueeze(0).to(pooled.dtype))
            return self.fc(out[0]), h[0]
        parts = [state[:, :t], pooled.unsqueeze(1).to(state.dtype), state[:, t + 1:]]
        new_state = torch.cat(parts, 1)
        if t == 0:
            return None, new_state
        fc = getattr(self, f"fc_{t + 1}")
        return fc(new_state[:, : t + 1].flatten(1)), new_state
