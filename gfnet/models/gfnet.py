"""The Glance-and-Focus Network: glance, focus steps, classifier and policy (GFNet, Section 3)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from gfnet import ops
from gfnet.config import BackboneConfig, get_config
from gfnet.models.classifier import Classifier
from gfnet.models.encoder import Encoder
from gfnet.models.meta import ModelMeta
from gfnet.models.policy import Policy
from gfnet.precision import autocast

__all__ = ["GFNet", "GFNetState", "Proposal", "StepOutput", "AnytimePrediction", "build_model"]


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

    def index(self, idx: torch.Tensor) -> GFNetState:
        """The state of the images ``idx`` (a LongTensor or bool mask over the batch)."""
        return GFNetState(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx])
                             for f in fields(self)})


@dataclass
class Proposal:
    """The policy's proposal for the next focus step: mean Tensor[N, 2] (the action at evaluation), value
    Tensor[N, 1] (the critic) and the policy's new hidden state Tensor[N, H_policy]."""

    mean: torch.Tensor
    value: torch.Tensor
    hidden: torch.Tensor


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
        self.meta = ModelMeta()  # evaluation results, classes, provenance (gfnet.models.meta)
        self.compiled: Optional[dict] = None  # the torch.compile settings of :meth:`compile`, once called

    @property
    def arch(self) -> str:
        return self.config.name

    @property
    def image_size(self) -> int:
        return self.config.image_size

    # ----------------------------------------------------------------------------- input contract
    def check_images(self, images, what: str = "images") -> None:
        """The one validation of an image batch, shared by every entry point (anytime and budgeted inference,
        the engine's stream, the commands): Tensor[N, 3, S, S] float or uint8, or uint8 Tensor[N, S, S, 3];
        square (the corner formula has one S) and at least P x P. Raises TypeError/ValueError saying what to do.
        Float dtypes other than the model's are converted by the fused ops, not refused."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor of images; got {type(images).__name__}")
        if images.dtype not in (torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"{what} must be uint8 or float (float16/bfloat16/float32/float64); got {images.dtype}")
        if images.dim() != 4:
            raise ValueError(f"{what} must be Tensor[N, 3, S, S] (or uint8 [N, S, S, 3]); got shape "
                             f"{tuple(images.shape)}")
        if images.shape[1] == 3:
            h, w = images.shape[2], images.shape[3]
        elif images.shape[3] == 3:
            h, w = images.shape[1], images.shape[2]
        else:
            raise ValueError(f"{what} must have 3 channels, as Tensor[N, 3, S, S] or [N, S, S, 3]; got shape "
                             f"{tuple(images.shape)}")
        if h != w:
            raise ValueError(f"{what} must be square (S x S; the patch corner is floor(a * (S - P)) with one S); got "
                             f"{h}x{w}: resize and centre-crop them first, as gfnet.data's loaders do")
        if h < self.patch_size:
            raise ValueError(f"{what} of {h}x{w} pixels are smaller than the patch size {self.patch_size}")

    # ----------------------------------------------------------------------------- step inputs
    def _norm_args(self, images: torch.Tensor):
        if images.dtype == torch.uint8:
            return dict(mean=self.config.mean, std=self.config.std)
        return {}

    def _input_dtype(self, images: torch.Tensor):
        # What the encoders take: the autocast dtype under autocast, else the parameters' dtype (float64,
        # float16 or bfloat16 images are converted in the fused op instead of failing in the convolution).
        if torch.is_autocast_enabled(images.device.type):
            return torch.get_autocast_dtype(images.device.type) if images.dtype == torch.uint8 else None
        param_dtype = next(self.parameters()).dtype
        return None if images.dtype == param_dtype else param_dtype

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

    def focus_corners(self, actions: torch.Tensor, image_size: int) -> torch.Tensor:
        """Tensor[N, 2] int32 top-left corners of the patches the actions pick, clamped into the image: the
        corners :meth:`focus_input` crops at (:func:`gfnet.ops.focus_corners`)."""
        return ops.focus_corners(actions, image_size, self.patch_size).clamp_(0, image_size - self.patch_size)

    # ----------------------------------------------------------------------------- step primitives
    def init_state(self, n: int, device=None) -> GFNetState:
        param = next(self.parameters())
        device = device if device is not None else param.device
        return GFNetState(self.fc.init_state(n, device, param.dtype),
                          self.policy.init_hidden(n, device, param.dtype))

    def propose(self, state: GFNetState) -> Proposal:
        """The policy's proposal from the previous step's feature map and the policy state."""
        mean, value, hidden = self.policy(state.feature_map, state.policy_hidden)
        return Proposal(mean, value, hidden)

    @staticmethod
    def explore(mean: torch.Tensor, explore_std: float) -> torch.Tensor:
        """The action taken: the mean (explore_std = 0, evaluation), or a sample of N(mean, explore_std^2)
        clamped to [0, 1] (training), detached."""
        if explore_std > 0:
            return (mean.detach() + explore_std * torch.randn_like(mean)).clamp(0.0, 1.0)
        return mean.detach()

    def encode_glance(self, glance: torch.Tensor, state: GFNetState) -> StepOutput:
        """Step 1 on a prepared glance batch Tensor[N, 3, P, P] (:meth:`glance_input`)."""
        pooled, fmap = self.model_prime(glance)
        logits, fc_hidden = self.fc(pooled, state.fc_hidden, 0)
        if self.config.glance_head == "backbone" or logits is None:
            logits = self.model_prime.head(pooled)
        return StepOutput(logits, GFNetState(fc_hidden, torch.zeros_like(state.policy_hidden), fmap), pooled)

    def encode_focus(self, t: int, patches: torch.Tensor, state: GFNetState, actions: torch.Tensor,
                     proposal: Optional[Proposal] = None) -> StepOutput:
        """Focus step ``t`` on a prepared patch batch Tensor[N, 3, P, P] (:meth:`focus_input`) cut at
        ``actions``; ``proposal`` is the policy's, when the policy chose them (its hidden state carries on)."""
        pooled, fmap = self.model(patches)
        logits, fc_hidden = self.fc(pooled, state.fc_hidden, t)
        policy_hidden = proposal.hidden if proposal is not None else state.policy_hidden
        return StepOutput(logits, GFNetState(fc_hidden, policy_hidden, fmap), pooled, actions,
                          proposal.mean if proposal is not None else None,
                          proposal.value if proposal is not None else None)

    # ----------------------------------------------------------------------------- steps
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
            return self.encode_glance(self.glance_input(images, glance_mode), state)
        proposal = None
        if actions is None:
            proposal = self.propose(state)
            actions = self.explore(proposal.mean, explore_std)
        actions = actions.detach()
        return self.encode_focus(t, self.focus_input(images, actions.float()), state, actions, proposal)

    def steps(self, images: torch.Tensor, steps: Optional[int] = None,
              actions: Union[None, torch.Tensor, Callable[[int, GFNetState], Optional[torch.Tensor]]] = None,
              explore_std: float = 0.0, glance_mode: Optional[str] = None,
              glance: Optional[StepOutput] = None) -> Iterator[StepOutput]:
        """The sequence of steps, one :class:`StepOutput` at a time: the loop every caller shares.

        Args:
            images: the full-resolution batch. steps: how many steps (default T).
            actions: None (the policy chooses), Tensor[steps-1, N, 2] (given positions), or a callable
                ``(t, state) -> Tensor[N, 2] or None`` (e.g. random positions in stage 1).
            explore_std, glance_mode: as :meth:`step`.
            glance: the glance's output when the caller computed it (training's glance differs, see
                gfnet.train.objective.run_glance); step 0 runs here otherwise.
        """
        steps = self.T if steps is None else steps
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps must be in 1..T={self.T}; got {steps}")
        out = glance if glance is not None else self.step(0, images, glance_mode=glance_mode)
        yield out
        for t in range(1, steps):
            if actions is None:
                a = None
            elif callable(actions):
                a = actions(t, out.state)
            else:
                a = actions[t - 1]
            out = self.step(t, images, out.state, actions=a, explore_std=explore_std)
            yield out

    # ----------------------------------------------------------------------------- inference
    @torch.no_grad()
    def anytime_predict(self, images: torch.Tensor, batch_size: Optional[int] = None,
                        dtype=None, steps: Optional[int] = None,
                        pad_batches: bool = False) -> AnytimePrediction:
        """Anytime prediction: the softmax after every step for every image.

        Args:
            images: Tensor[N, 3, S, S] (see the class docstring), on the module's device.
            batch_size: split N into chunks of this size (None: one batch).
            dtype: None/"fp32", "bf16" or "fp16" (autocast; the softmax is computed in float32).
            steps: run only the first ``steps`` steps (default T).
            pad_batches: run a chunk smaller than ``batch_size`` at the full batch shape (its last image
                repeated, the extra rows discarded), so that a compiled model sees one shape and never
                recompiles (see :meth:`compile` for when that pays). Default off.
        Returns:
            :class:`AnytimePrediction` with probs Tensor[T, N, classes] (float32) and actions
            Tensor[T-1, N, 2].
        """
        if self.training:
            raise RuntimeError("anytime_predict needs eval mode: call net.eval() first "
                               "(batch norm and dropout behave differently in training)")
        self.check_images(images)
        steps = self.T if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.T:
            raise ValueError(f"steps must be an int in 1..T={self.T}; got {steps!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None; got {batch_size!r}")
        autocast(images.device, dtype)  # an unknown dtype name is refused before any work
        n = images.shape[0]
        if n == 0:
            return AnytimePrediction(images.new_zeros(steps, 0, self.num_classes, dtype=torch.float32),
                                     images.new_zeros(steps - 1, 0, 2, dtype=torch.float32))
        bs = n if batch_size is None else batch_size
        pad = bool(pad_batches) and batch_size is not None
        probs, acts = [], []
        for start in range(0, n, bs):
            chunk = images[start:start + bs]
            m = chunk.shape[0]
            if pad and m < bs:
                chunk = torch.cat([chunk, chunk[-1:].expand(bs - m, *chunk.shape[1:])])
            p, a = [], []
            with autocast(chunk.device, dtype):
                for out in self.steps(chunk, steps):
                    p.append(F.softmax(out.logits[:m].float(), 1))
                    if out.actions is not None:
                        a.append(out.actions[:m].float())
            probs.append(torch.stack(p))
            acts.append(torch.stack(a) if a else chunk.new_zeros(0, chunk.shape[0], 2, dtype=torch.float32))
        return AnytimePrediction(torch.cat(probs, 1), torch.cat(acts, 1))

    def compile(self, mode: Optional[str] = None, dynamic: Optional[bool] = None, backend: str = "inductor",
                fullgraph: bool = False) -> GFNet:
        """Compile what every step runs with torch.compile: the global and local encoders (where the time
        goes), in place, so that :meth:`anytime_predict`, :func:`gfnet.engine.budgeted_predict` and training
        use them. Parameter names and checkpoints are unchanged; outputs equal eager ones to float rounding.

        Args:
            mode: torch.compile's mode (None, "reduce-overhead", "max-autotune", ...). "reduce-overhead" and
                "max-autotune" capture CUDA graphs of their own: :func:`gfnet.engine.budgeted_predict` then runs
                those and leaves its own (whole-step) graphs off.
            dynamic: None (default) lets torch mark the batch dimension dynamic when a second batch shape
                comes (a stream's tail, a last chunk): one more compilation, never one per shape; True compiles
                dynamic shapes from the start; False specialises on every shape. Measured end to end on the
                2-core development CPU (``gfnet-bench budget --compile``, MobileNet-V3 GFNet, batch 64, budget
                p=25; bench/results/budget_compile_cpu.md and budget_compile_2048_cpu.md), padding the partial
                batches to the full shape instead (``pad_batches=True`` of :meth:`anytime_predict` and
                :func:`gfnet.engine.budgeted_predict`) took 1.08x the default's time on 512 images (its padded
                rows are computed for nothing) and 1.00x on 2048, and saves the one recompilation (25-33 s
                there): the choice where compilations cost more than a stream's tail, or with ``dynamic=False``.
            backend: torch.compile's backend ("inductor"; "aot_eager" to check tracing without code generation).
            fullgraph: refuse graph breaks (the encoders have none).
        The first call of each encoder compiles it (tens of seconds on a CPU): time it apart from throughput.
        The two encoders share their code, so a second compiles little when they have one architecture.
        """
        for encoder in (self.model_prime, self.model):
            encoder.compile(mode=mode, dynamic=dynamic, backend=backend, fullgraph=fullgraph)
        self.compiled = {"mode": mode, "dynamic": dynamic, "backend": backend}
        return self

    def to_channels_last(self) -> GFNet:
        """Put the encoders in channels-last memory format (faster convolutions on GPUs and oneDNN)."""
        self.model_prime.to(memory_format=torch.channels_last)
        self.model.to(memory_format=torch.channels_last)
        return self


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
