"""The deployed GFNet's steps as self-contained PyTorch modules of standard operators (what gets exported).

A deployed GFNet is three kinds of graph and a loop outside them (../shared/DESIGN.md, "Deployment"):

- :class:`GlanceGraph`: ``images -> (probs, fc_state, policy_hidden, feature_map)``: the glance resize to
  P x P inside the graph, the global encoder, the classifier's step 0 and the glance prediction;
- :class:`FocusGraph`: ``(images, feature_map, policy_hidden) -> (pooled, feature_map, policy_hidden,
  action)``: the policy on the previous step's feature map, the crop at ``floor(a * (S - P))`` computed in
  the graph, the local encoder. It does not depend on the step index, so one graph serves every focus step;
- :class:`ClassifierGraph`: ``(pooled, fc_state) -> (probs, fc_state)`` for focus step t. A GRU classifier
  (ResNet, DenseNet, RegNet) is the same at every step: one graph. A cascade (MobileNet-V3, EfficientNet)
  applies its own ``fc_{t+1}`` to the first t+1 pooled features: one small graph per step.

Why the policy opens the focus graph instead of closing the previous step: an image that exits after step
t never pays for the policy's proposal of step t+1, so a deployed budget's cost is the Multiply-Adds that
:func:`gfnet.flops.compute_flops` counts (the policy belongs to the step that uses its action). Why the step
index picks a classifier graph instead of entering the focus graph as an input: a cascade's step t uses other
weights of another shape, which a graph could only select by computing every ``fc_k`` (T-1 matrix products
of ``classes x k * features`` where one is needed) or by control flow that runtimes delegate poorly; one
encoder graph plus a small head per step keeps the encoder's weights in one file.

Everything is plain tensor arithmetic that torch.export, the ONNX exporter and ExecuTorch's XNNPACK lowering
take as it is: the glance resize is two matrix products with the matrix of the 2 or 4 taps of each output
pixel (the weights computed at export time exactly as gfnet._C's kernel computes them), the crop a gather
at the indices ``(row0 + i) * S + col0 + j``, the GRUs written as their gate equations. No gfnet custom op
(``gfnet::glance_resize``, ``gfnet::focus_crop``) appears in a graph.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GlanceGraph", "FocusGraph", "ClassifierGraph", "GlanceResize", "FocusCrop", "resize_taps",
           "resize_matrix", "gru_step", "step_graphs"]

_CUBIC_A = -0.75  # PyTorch's (and the reference's) bicubic coefficient


def resize_taps(in_size: int, out_size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The taps of an ``align_corners=True`` resize along one axis, as gfnet._C's glance kernel computes them
    (float32): source position ``o * (in - 1) / (out - 1)``, its floor clamped into the image, the fraction
    clamped to [0, 1]; bilinear takes 2 taps, bicubic 4 (Keys' kernel, A = -0.75, border-clamped indices).

    Returns:
        (index Tensor[out_size, taps] int64, weight Tensor[out_size, taps] float32).
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"glance mode must be 'bicubic' or 'bilinear'; got {mode!r}")
    f32 = torch.float32
    scale = (torch.tensor(in_size - 1, dtype=f32) / torch.tensor(out_size - 1, dtype=f32)) if out_size > 1 \
        else torch.tensor(0.0, dtype=f32)
    real = scale * torch.arange(out_size, dtype=f32)
    idx = torch.floor(real).to(torch.int64).clamp(0, in_size - 1)
    frac = (real - idx.to(f32)).clamp(0.0, 1.0)
    if mode == "bilinear":
        index = torch.stack([idx, (idx + 1).clamp(max=in_size - 1)], 1)
        weight = torch.stack([1.0 - frac, frac], 1)
        return index, weight
    a = torch.tensor(_CUBIC_A, dtype=f32)

    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weight = torch.stack([far(frac + 1), near(frac), near(1 - frac), far(2 - frac)], 1)
    index = torch.stack([(idx - 1 + k).clamp(0, in_size - 1) for k in range(4)], 1)
    return index, weight


def _normalise_buffers(module: nn.Module, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]):
    if mean is None:
        module.mean = module.std = None
        return
    module.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
    module.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)


def _to_input(x: torch.Tensor, module: nn.Module, uint8: bool) -> torch.Tensor:
    """The fused ops' epilogue: float32, then x / 255 for uint8 pixels and (x - mean) / std (in that order)."""
    x = x.to(torch.float32)
    if uint8:
        x = x / 255.0
        x = (x - module.mean) / module.std
    return x


def resize_matrix(in_size: int, out_size: int, mode: str) -> torch.Tensor:
    """Tensor[out_size, in_size] float32: the taps of :func:`resize_taps` as a matrix (row o holds output o's
    weights at its source indices; a border-clamped index repeated among the taps holds their sum)."""
    index, weight = resize_taps(in_size, out_size, mode)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float32)
    rows = torch.arange(out_size).unsqueeze(1).expand_as(index)
    matrix.index_put_((rows, index), weight, accumulate=True)
    return matrix


class GlanceResize(nn.Module):
    """``images`` Tensor[N, 3, S, S] (uint8 pixels or normalised float32) -> Tensor[N, 3, P, P] float32, equal
    to :func:`gfnet.ops.glance_resize` (interpolation of the raw values, then /255 and the normalisation for
    uint8) up to float summation order. Separable, in the order of gfnet._C's kernel: every row's output
    columns, then every output column's rows, each as one matrix product with the P x S matrix of the taps
    (:func:`resize_matrix`). Two dense products do ~4x the Multiply-Adds of the taps alone, but they run in the
    runtimes' matrix kernels (XNNPACK, MLAS); the gathers they replace ran in ExecuTorch's portable kernels and
    ONNX Runtime's Gather, measured 5x slower on the 2-core AVX2 machine (bicubic 224 -> 96 px, batch 1,
    1 thread: ONNX Runtime 2.53 -> 0.51 ms)."""

    def __init__(self, image_size: int, patch_size: int, mode: str, uint8: bool,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        super().__init__()
        self.S, self.P, self.uint8 = image_size, patch_size, uint8
        self.register_buffer("matrix", resize_matrix(image_size, patch_size, mode), persistent=False)  # [P, S]
        _normalise_buffers(self, mean if uint8 else None, std if uint8 else None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32)
        cols = F.linear(x, self.matrix)  # [N, 3, S, P]: each row's P output columns
        out = F.linear(cols.transpose(-1, -2), self.matrix).transpose(-1, -2)  # [N, 3, P, P]
        return _to_input(out, self, self.uint8)


class FocusCrop(nn.Module):
    """``(images Tensor[N, 3, S, S], actions Tensor[N, 2] float32) -> Tensor[N, 3, P, P] float32``: the patch
    whose top-left corner is ``floor(a * (S - P))`` (a[:, 0] the row, a[:, 1] the column), clamped into the
    image as gfnet's kernels clamp it, then converted as :func:`gfnet.ops.focus_crop` does (/255 and the
    normalisation for uint8). One gather over the flattened image planes."""

    def __init__(self, image_size: int, patch_size: int, uint8: bool, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None):
        super().__init__()
        self.S, self.P, self.uint8 = image_size, patch_size, uint8
        self.register_buffer("offsets", torch.arange(patch_size, dtype=torch.int64), persistent=False)
        _normalise_buffers(self, mean if uint8 else None, std if uint8 else None)

    def corners(self, actions: torch.Tensor) -> torch.Tensor:
        """Tensor[N, 2] int64: floor(a * (S - P)) in float32 (as :func:`gfnet.ops.focus_corners`), clamped."""
        corner = torch.floor(actions.to(torch.float32) * float(self.S - self.P))
        return corner.clamp(0.0, float(self.S - self.P)).to(torch.int64)

    def forward(self, images: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        S, P = self.S, self.P
        corner = self.corners(actions)
        rows = corner[:, 0:1] + self.offsets  # [N, P]
        cols = corner[:, 1:2] + self.offsets
        flat = (rows.unsqueeze(2) * S + cols.unsqueeze(1)).reshape(-1, 1, P * P).expand(-1, 3, P * P)
        patch = images.reshape(-1, 3, S * S).gather(2, flat).reshape(-1, 3, P, P)
        return _to_input(patch, self, self.uint8)


def gru_step(x: torch.Tensor, h: torch.Tensor, gru: nn.GRU) -> torch.Tensor:
    """One step of a one-layer ``nn.GRU`` written as its gate equations (PyTorch's order and its update
    ``h' = n + z * (h - n)``), so that every exporter takes it as matrix products and pointwise operations
    (x Tensor[N, input], h Tensor[N, hidden] -> Tensor[N, hidden])."""
    gi = F.linear(x, gru.weight_ih_l0, gru.bias_ih_l0)
    gh = F.linear(h, gru.weight_hh_l0, gru.bias_hh_l0)
    # slices, not chunk(3, 1): ExecuTorch's edge lowering specialises split_with_sizes to the traced batch size
    k = gru.hidden_size
    i_r, i_z, i_n = gi[:, :k], gi[:, k:2 * k], gi[:, 2 * k:]
    h_r, h_z, h_n = gh[:, :k], gh[:, k:2 * k], gh[:, 2 * k:]
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits.to(torch.float32), 1)


class GlanceGraph(nn.Module):
    """Step 1: ``images -> (probs Tensor[N, classes], fc_state, policy_hidden Tensor[N, H_policy] (zeros: the
    policy restarts at the first focus step), feature_map Tensor[N, C, h, w])``; fc_state is Tensor[N, H] for
    the GRU classifier, Tensor[N, T, F] for the cascade (the pooled features of the steps so far)."""

    def __init__(self, net, uint8: bool):
        super().__init__()
        cfg = net.config
        self.encoder, self.fc, self.policy_hidden_dim = net.model_prime, net.fc, net.policy.hidden_dim
        self.backbone_head = cfg.glance_head == "backbone" or not net.fc.is_rnn
        self.resize = GlanceResize(cfg.image_size, net.patch_size, net.glance_mode, uint8, cfg.mean, cfg.std)

    def forward(self, images: torch.Tensor):
        pooled, fmap = self.encoder(self.resize(images))
        n = pooled.shape[0]
        if self.fc.is_rnn:
            fc_state = gru_step(pooled, pooled.new_zeros(n, self.fc.hidden_dim), self.fc.rnn)
            logits = None if self.backbone_head else self.fc.fc(fc_state)
        else:
            fc_state = torch.cat([pooled.unsqueeze(1), pooled.new_zeros(n, self.fc.T - 1, self.fc.feature_num)], 1)
            logits = None
        if logits is None:
            logits = self.encoder.head(pooled)
        return _softmax(logits), fc_state, pooled.new_zeros(n, self.policy_hidden_dim), fmap


class FocusGraph(nn.Module):
    """A focus step before its classifier: ``(images, feature_map, policy_hidden) -> (pooled Tensor[N, F],
    feature_map, policy_hidden, action Tensor[N, 2])``: the policy's mean action from the previous step's
    feature map, the crop at that action, the local encoder."""

    def __init__(self, net, uint8: bool):
        super().__init__()
        cfg = net.config
        self.policy, self.encoder = net.policy, net.model
        self.crop = FocusCrop(cfg.image_size, net.patch_size, uint8, cfg.mean, cfg.std)

    def forward(self, images: torch.Tensor, feature_map: torch.Tensor, policy_hidden: torch.Tensor):
        policy = self.policy
        x = policy.state_encoder(feature_map if policy.conv else feature_map.flatten(1))
        hidden = gru_step(x, policy_hidden, policy.gru)
        action = policy.actor(hidden)
        pooled, fmap = self.encoder(self.crop(images, action))
        return pooled, fmap, hidden, action


class ClassifierGraph(nn.Module):
    """The classifier at focus step ``t`` (1..T-1): ``(pooled, fc_state) -> (probs, fc_state)``. ``t`` only
    matters for the cascade (its ``fc_{t+1}`` on the first t+1 features); the GRU's graph serves every step."""

    def __init__(self, net, t: Optional[int]):
        super().__init__()
        self.fc, self.t = net.fc, t
        if not net.fc.is_rnn and not (t is not None and 1 <= t < net.T):
            raise ValueError(f"a cascade classifier graph needs its step t in 1..{net.T - 1}; got {t!r}")

    def forward(self, pooled: torch.Tensor, fc_state: torch.Tensor):
        fc = self.fc
        if fc.is_rnn:
            hidden = gru_step(pooled, fc_state, fc.rnn)
            return _softmax(fc.fc(hidden)), hidden
        t = self.t
        state = torch.cat([fc_state[:, :t], pooled.unsqueeze(1), fc_state[:, t + 1:]], 1)
        head = getattr(fc, f"fc_{t + 1}")
        return _softmax(head(state[:, : t + 1].flatten(1))), state


def step_graphs(net, uint8: bool) -> dict:
    """name -> module of every graph a package holds: ``glance``, ``focus`` and the classifier graphs
    (``classify`` for a GRU classifier; ``classify_1`` .. ``classify_{T-1}`` for a cascade)."""
    graphs = {"glance": GlanceGraph(net, uint8)}
    if net.T > 1:
        graphs["focus"] = FocusGraph(net, uint8)
        if net.fc.is_rnn:
            graphs["classify"] = ClassifierGraph(net, None)
        else:
            for t in range(1, net.T):
                graphs[f"classify_{t}"] = ClassifierGraph(net, t)
    return {name: module.eval() for name, module in graphs.items()}
