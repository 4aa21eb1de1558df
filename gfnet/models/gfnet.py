"""The Glance-and-Focus Network: glance, focus steps, classifier and policy (GFNet, Section 3)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gfnet import ops
from gfnet.config import BackboneConfig, get_config
from gfnet.models.classifier import Classifier
from gfnet.models.encoder import Encoder
from gfnet.models.policy import Policy

__all__ = ["GFNet", "GFNetState", "StepOutput", "AnytimePrediction", "build_model"]

_AMP_DTYPES = {"fp32": None, "float32": None, None: None, torch.float32: None,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, torch.bfloat16: torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16, torch.float16: torch.float16}


@dataclass
class GFNetState:
    """Per-image recurrent state between steps; every field is batch-first.

    fc_hidden: classifier state (Tensor[N, H] for the GRU, Tensor[N, T, F] for the cascade);
    policy_hidden: Tensor[N, H_policy]; feature_map: the last step's Tensor[N, C, h, w] (None before
    the glance).
    """

    fc_hidden: torch.Tensor
    policy_hidden: torch.Tensor
    feature_map: Optional[torch.Tensor] = None

    def index(self, idx: torch.Tensor) -> "GFNetState":
        """The state of the images ``idx`` (a LongTensor or bool mask over the batch)."""
        return GFNetState(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx])
                             for f in fields(self)})


@dataclass
class StepOutput:
    """What one step produced: logits Tensor[N, classes] and the new state; for focus steps also the
    actions used Tensor[N, 2] and, when the policy ran, its mean action and value estimate.
    ``pooled`` is the encoder's pooled feature vector (deep supervision uses it)."""

    logits: torch.Tensor
    state: GFNetState
    pooled: torch.Tensor
    actions: Optional[torch.Tensor] = None
    action_mean: Optional[torch.Tensor] = None
    value: Optional[torch.Tensor] = None


@dataclass
class AnytimePrediction:
    """probs: Tensor[T, N, classes] softmax after each step; actions: Tensor[T-1, N, 2] mean actions."""

    probs: torch.Tensor
    actions: torch.Tensor

    @property
    def preds(self) -> torch.Tensor:
        """Tensor[T, N] arg-max class after each step."""
        return self.probs.argmax(-1)


class GFNet(nn.Module):
    """A Glance-and-Focus Network.

    Attributes (the reference's names): ``model_prime`` the global encoder, ``model`` the local
    encoder, ``fc`` the classifier, ``policy`` the patch proposal network.

    Args:
        config: the backbone configuration (:mod:`gfnet.config`).
        patch_size: P, the glance size and focus patch size (96, 128 or 144 in the paper).
        T: maximum number of steps (1 glance + T-1 focus steps).
        num_classes: number of classes.

    Input contract: ``images`` Tensor[N, 3, S, S] float, normalised with ImageNet's mean and std as in
    the reference, or raw uint8 ([N, 3, S, S] or DALI's [N, S, S, 3]) which the fused kernels normalise
    on the fly. Any device; the module must live on the same one.
    """

    def __init__(self, config: BackboneConfig, patch_size: int = 96, T: int = 5, num_classes: int = 1000):
        super().__init__()
        if T < 1:
            raise ValueError(f"T must be >= 1 (one glance and T-1 focus steps), got {T}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        self.config = config
        self.patch_size, self.T, self.num_classes = int(patch_size), int(T), int(num_classes)
        self.glance_mode = config.prime_interpolation
        self.model_prime = Encoder(config, num_classes)
        self.model = Encoder(config, num_classes)
        self.fc = Classifier(config.feature_num, num_classes, T, rnn=config.fc_rnn,
                             hidden_dim=config.fc_hidden_dim)
        self.policy = Policy(config.feature_map_channels, config.state_dim(patch_size),
                             config.policy_hidden_dim, conv=config.policy_conv)
        self.meta: dict = {"model_name": config.name, "patch_size": self.patch_size}

    @property
    def arch(self) -> str:
        return self.config.name

    @property
    def image_size(self) -> int:
        return self.config.image_size

    # ----------------------------------------------------------------------------- step inputs
    def _norm_args(self, images: torch.Tensor):
        if images.dtype == torch.uint8:
            return dict(mean=ops.IMAGENET_MEAN, std=ops.IMAGENET_STD)
        return {}

    def _input_dtype(self, images: torch.Tensor):
        if images.dtype == torch.uint8:
            return torch.float32 if not torch.is_autocast_enabled(images.device.type) else \
                torch.get_autocast_dtype(images.device.type)
        return None

    def glance_input(self, images: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
        """The glance: the whole image resized to P x P (align_corners=True), Tensor[N, 3, P, P]."""
        return ops.glance_resize(images, self.patch_size, mode=mode or self.glance_mode,
                                 out_dtype=self._input_dtype(images), **self._norm_args(images))

    def focus_input(self, images: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Full-resolution patches at top-left corners floor(actions * (S - P)), Tensor[N, 3, P, P]."""
        # validate=False: the actions come from a sigmoid or a clamp, and checking them would cost a
        # host sync per step on CUDA; the kernels clamp the corners anyway.
        return ops.focus_crop(images, actions, self.patch_size, out_dtype=self._input_dtype(images),
                              validate=False, **self._norm_args(images))

    # ----------------------------------------------------------------------------- steps
    def init_state(self, n: int, device=None) -> GFNetState:
        param = next(self.parameters())
        device = device if device is not None else param.device
        return GFNetState(self.fc.init_state(n, device, param.dtype),
                          self.policy.init_hidden(n, device, param.dtype))

    def step(self, t: int, images: torch.Tensor, state: Optional[GFNetState] = None,
             actions: Optional[torch.Tensor] = None, explore_std: float = 0.0,
             glance_mode: Optional[str] = None) -> StepOutput:
        """Run step ``t`` (0: the glance; 1..T-1: focus steps) on a batch.

        Args:
            t: step index. images: the full-resolution batch (see the class docstring).
            state: the previous step's state (None at t=0 starts a fresh one).
            actions: Tensor[N, 2] in [0, 1] to use instead of the policy (stage-1 training uses random
                ones); None runs the policy on ``state.feature_map``.
            explore_std: > 0 samples the action from N(mean, explore_std^2) and clamps it to [0, 1]
                (training); 0 takes the mean (evaluation).
            glance_mode: overrides the glance's interpolation (the reference trained with bicubic).
        """
        if not 0 <= t < self.T:
            raise ValueError(f"step t={t} is outside 0..{self.T - 1}")
        if state is None:
            if t != 0:
                raise ValueError("a focus step needs the previous step's state")
            state = self.init_state(images.shape[0], images.device)
        if t == 0:
            pooled, fmap = self.model_prime(self.glance_input(images, glance_mode))
            logits, fc_hidden = self.fc(pooled, state.fc_hidden, 0)
            if self.config.glance_head == "backbone" or logits is None:
                logits = self.model_prime.head(pooled)
            new_state = GFNetState(fc_hidden, torch.zeros_like(state.policy_hidden), fmap)
            return StepOutput(logits, new_state, pooled)
        mean = value = None
        policy_hidden = state.policy_hidden
        if actions is None:
            mean, value, policy_hidden = self.policy(state.feature_map, state.policy_hidden)
            if explore_std > 0:
                actions = (mean.detach() + explore_std * torch.randn_like(mean)).clamp(0.0, 1.0)
            else:
                actions = mean
        actions = actions.detach()
        pooled, fmap = self.model(self.focus_input(images, actions.float()))
        logits, fc_hidden = self.fc(pooled, state.fc_hidden, t)
        return StepOutput(logits, GFNetState(fc_hidden, policy_hidden, fmap), pooled, actions, mean, value)

    # ----------------------------------------------------------------------------- inference
    def _autocast(self, device: torch.device, dtype):
        amp = _AMP_DTYPES[dtype]
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp)

    @torch.no_grad()
    def anytime_predict(self, images: torch.Tensor, batch_size: Optional[int] = None,
                        dtype=None, steps: Optional[int] = None) -> AnytimePrediction:
        """Anytime prediction: the softmax after every step for every image.

        Args:
            images: Tensor[N, 3, S, S] (see the class docstring), on the module's device.
            batch_size: split N into chunks of this size (None: one batch).
            dtype: None/"fp32", "bf16" or "fp16" (autocast; the softmax is computed in float32).
            steps: run only the first ``steps`` steps (default T).
        Returns:
            :class:`AnytimePrediction` with probs Tensor[T, N, classes] (float32) and actions
            Tensor[T-1, N, 2].
        """
        if self.training:
            raise RuntimeError("anytime_predict needs eval mode: call net.eval() first "
                               "(batch norm and dropout behave differently in training)")
        steps = self.T if steps is None else steps
        n = images.shape[0]
        bs = n if batch_size is None else batch_size
        probs, acts = [], []
        for start in range(0, n, bs):
            chunk = images[start:start + bs]
            p, a = [], []
            with self._autocast(chunk.device, dtype):
                out = self.step(0, chunk)
                p.append(F.softmax(out.logits.float(), 1))
                for t in range(1, steps):
                    out = self.step(t, chunk, out.state)
                    p.append(F.softmax(out.logits.float(), 1))
                    a.append(out.actions.float())
            probs.append(torch.stack(p))
            acts.append(torch.stack(a) if a else chunk.new_zeros(0, chunk.shape[0], 2, dtype=torch.float32))
        return AnytimePrediction(torch.cat(probs, 1), torch.cat(acts, 1))

    def to_channels_last(self) -> "GFNet":
        """Put the encoders in channels-last memory format (faster convolutions on GPUs and oneDNN)."""
        self.model_prime.to(memory_format=torch.channels_last)
        self.model.to(memory_format=torch.channels_last)
        return self

    def budgeted_predict(self, images_or_loader, thresholds, batch_size: int = 64, **kwargs):
        """Real early exit with continuous batching: see :func:`gfnet.engine.budgeted_predict`."""
        from gfnet.engine import budgeted_predict

        return budgeted_predict(self, images_or_loader, thresholds, batch_size=batch_size, **kwargs)


def build_model(arch: str, patch_size: int = 96, T: int = 5, num_classes: int = 1000,
                classifier: Optional[str] = None) -> GFNet:
    """Build a randomly initialised GFNet.

    Args:
        arch: a reference backbone name (``resnet50``, ``densenet121``, ``densenet169``,
            ``densenet201``, ``regnety_600m``, ``regnety_800m``, ``regnety_1.6g``,
            ``mobilenetv3_large_100``, ``mobilenetv3_large_125``, ``efficientnet_b2``,
            ``efficientnet_b3``) or any timm CNN name (configuration derived from the backbone).
        patch_size: P. T: maximum sequence length. num_classes: classes.
        classifier: "gru" or "cascade" for timm backbones (default: by family).
    """
    return GFNet(get_config(arch, classifier), patch_size=patch_size, T=T, num_classes=num_classes)
