"""Budgeted inference with real early exit and continuous batching.

The reference runs every image through all T steps and applies the exit thresholds afterwards.
:func:`budgeted_predict` stops computing for an image as soon as its max softmax probability reaches
the threshold of its current step, and fills the freed place with a new image from the input stream,
so that every step runs on a full batch and the wall-clock time follows the expected Multiply-Adds.

Division of labour:
- ``gfnet._C.EarlyExitScheduler`` (csrc/scheduler.cpp) owns the slot table, every image's step, the
  exit decisions, the slot lists to gather and scatter, and the stream order of results;
- this module owns the memory: one row per slot in tensors allocated once (the classifier state, the
  policy state, the last feature map, and on CUDA the full-resolution image); a step gathers its slots'
  rows, runs ``net.step`` at the batch shape B, scatters the new state back (``index_copy_``), computes
  the max probability and prediction on the device, and hands only those two Tensor[B] to the host;
- on the CPU the images are not copied at all: slots refer to the input batches, the glance runs on the
  admitted batch itself, and a focus step copies out only the P x P patches its policy chose (a full
  image copy costs about a tenth of a MobileNet step on a CPU; see ``_SlotStore``);
- on CUDA, the full-batch steps are captured once per step in CUDA graphs (gather, step, softmax,
  scatter) and replayed; partial batches (the tail of the stream) run eagerly.

Every image's prediction and exit step equal what ``net.anytime_predict`` followed by
:func:`gfnet.budget.exit_steps` gives: an image's computation never depends on its batch neighbours.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F

from gfnet.models.gfnet import _AMP_DTYPES, GFNetState

__all__ = ["BudgetedPrediction", "budgeted_predict", "step_flops"]


def _scheduler_class():
    try:
        from gfnet import _C
    except ImportError as e:  # a missing extension is an actionable error, never a silent slowdown
        raise ImportError("gfnet's C++ extension gfnet._C is missing or out of date; build it with "
                          "`python setup.py build_ext --inplace` (or `pip install --no-build-isolation -e .`)"
                          f": {e}") from e
    if not hasattr(_C, "EarlyExitScheduler"):
        raise ImportError("gfnet._C has no EarlyExitScheduler: the extension is out of date; rebuild it with "
                          "`python setup.py build_ext --inplace`")
    return _C.EarlyExitScheduler


@dataclass
class BudgetedPrediction:
    """The outcome of :func:`budgeted_predict`.

    Attributes:
        preds: Tensor[N] int64 (CPU), each image's prediction at the step it exited.
        exit_step: Tensor[N] int64 (CPU), the 0-based step at which each image exited.
        macs_spent: Multiply-Adds actually spent on the N images together (sum of flops[exit_step]).
        macs_per_image: macs_spent / N, comparable with :func:`gfnet.budget.evaluate`'s expected cost.
        seconds: wall-clock time of the whole run (data loading included when a loader is given).
        images_per_second: N / seconds.
        targets: Tensor[N] labels when the input was a loader of (images, labels), else None.
        step_images: images run at each step (Tensor[T] int64); step_batches: batches run at each step.
        partial_batches: batches smaller than the batch size (the tail of the stream).
        cuda_graphs: whether CUDA graphs ran the full batches.
    """

    preds: torch.Tensor
    exit_step: torch.Tensor
    macs_spent: float
    macs_per_image: float
    seconds: float
    images_per_second: float
    targets: Optional[torch.Tensor] = None
    step_images: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    step_batches: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    partial_batches: int = 0
    cuda_graphs: bool = False

    @property
    def num_images(self) -> int:
        return int(self.preds.numel())


def step_flops(net) -> list:
    """Cumulative Multiply-Adds per step count (length T): ``net.meta['flops']`` when a checkpoint
    stored them, else counted by :func:`gfnet.flops.compute_flops`."""
    flops = getattr(net, "meta", {}).get("flops")
    if flops is None:
        from gfnet.flops import compute_flops

        flops = compute_flops(net)["flops"]
    flops = [float(f) for f in flops]
    if len(flops) < net.T:
        raise ValueError(f"the model has T={net.T} steps but its flops list has {len(flops)} entries")
    return flops[: net.T]


class _ImageStream:
    """Images (and labels) taken a few at a time from a Tensor or an iterable of batches.

    A batch of the iterable is a Tensor of images or a tuple/list whose first two entries are
    (images, labels). take(k) returns at most k images of the current batch (never concatenates, so
    no image is copied twice).
    """

    def __init__(self, source, device: torch.device, chunk: int):
        if isinstance(source, torch.Tensor):
            if source.dim() != 4:
                raise ValueError(f"images must be Tensor[N, 3, S, S] (or uint8 [N, S, S, 3]), got shape "
                                 f"{tuple(source.shape)}")
            images = source
            source = (images[i:i + chunk] for i in range(0, images.shape[0], chunk))
        self._batches = iter(source)
        self._device = device
        self._images: Optional[torch.Tensor] = None
        self._labels: Optional[torch.Tensor] = None
        self._offset = 0
        self.labels: list = []
        self.has_labels: Optional[bool] = None

    def _next_batch(self) -> bool:
        for item in self._batches:
            labels = None
            if isinstance(item, (tuple, list)):
                if not item:
                    raise ValueError("the loader yielded an empty tuple; expected (images, labels)")
                images = item[0]
                labels = item[1] if len(item) > 1 else None
            else:
                images = item
            if not isinstance(images, torch.Tensor) or images.dim() != 4:
                raise ValueError("each batch must be Tensor[n, 3, S, S] images or an (images, labels) pair; got "
                                 f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
            if images.shape[0] == 0:
                continue
            if self.has_labels is None:
                self.has_labels = labels is not None
            elif self.has_labels != (labels is not None):
                raise ValueError("some batches of the loader have labels and others not")
            self._images = images.to(self._device, non_blocking=True)
            self._labels = None if labels is None else torch.as_tensor(labels).reshape(-1).cpu()
            self._offset = 0
            return True
        return False

    def take(self, count: int) -> Optional[torch.Tensor]:
        """Up to ``count`` images Tensor[k, ...] on the device, None when the stream is exhausted."""
        if self._images is None or self._offset >= self._images.shape[0]:
            if not self._next_batch():
                self._images = None
                return None
        start = self._offset
        stop = min(start + count, self._images.shape[0])
        self._offset = stop
        if self._labels is not None:
            self.labels.append(self._labels[start:stop])
        return self._images[start:stop]


def _gather_rows(buffer: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``buffer[rows]`` as a new contiguous Tensor[len(rows), ...].

    On the CPU, ``index_select`` copies large rows element by element (0.7 s for 64 images of
    3 x 224 x 224 on 2 cores, against 0.03 s for advanced indexing, which copies whole rows): pick by
    row size. On CUDA both are one kernel.
    """
    if buffer.device.type == "cpu" and buffer[0].numel() >= 4096:
        return buffer[rows]
    return buffer.index_select(0, rows)


class _SlotStore:
    """Per-slot rows: the recurrent state in tensors of ``capacity`` rows, allocated once on first use
    (shapes and dtypes come from the first step), and the full-resolution images.

    Images are kept in one of two ways:
    - ``image_rows`` (CUDA): copied into a Tensor[capacity, ...] and gathered per step, at a fixed
      address that CUDA graphs can capture (a gather of 64 images costs microseconds there);
    - by reference (CPU): each slot remembers (input batch, row) and nothing is copied; the glance reads
      the input batch itself when the step's slots are exactly the last admitted ones (the usual case),
      and focus steps copy out only the P x P patches. On a CPU the copy of a full image costs as much as
      a tenth of a MobileNet step, which real early exit cannot afford.
    """

    def __init__(self, capacity: int, image_rows: bool):
        self.capacity = capacity
        self.image_rows = image_rows
        self.images: Optional[torch.Tensor] = None
        self.image_refs: list = [None] * capacity
        self.last_admitted: Optional[tuple] = None  # (slot list, input batch) of the last admit
        self.fc_hidden: Optional[torch.Tensor] = None
        self.policy_hidden: Optional[torch.Tensor] = None
        self.feature_map: Optional[torch.Tensor] = None

    def _alloc_like(self, row: torch.Tensor) -> torch.Tensor:
        return torch.empty((self.capacity, *row.shape[1:]), dtype=row.dtype, device=row.device)

    def put_images(self, slots_host: torch.Tensor, images: torch.Tensor) -> None:
        """Admit ``images`` Tensor[k, ...] into the slots ``slots_host`` Tensor[k] int64 (CPU)."""
        if not self.image_rows:
            slot_list = slots_host.tolist()
            for row, slot in enumerate(slot_list):
                self.image_refs[slot] = (images, row)
            self.last_admitted = (slot_list, images)
            return
        slots = slots_host.to(images.device, non_blocking=True)
        if self.images is None:
            self.images = self._alloc_like(images)
            if not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
                # DALI's uint8 batches are NCHW views of NHWC memory: keep that layout (cheap copies,
                # and the crop kernels read it directly)
                self.images = self.images.contiguous(memory_format=torch.channels_last)
        elif images.shape[1:] != self.images.shape[1:] or images.dtype != self.images.dtype:
            raise ValueError(f"all images must share one shape and dtype: got {tuple(images.shape[1:])} "
                             f"{images.dtype} after {tuple(self.images.shape[1:])} {self.images.dtype}")
        self.images.index_copy_(0, slots, images)

    def glance_images(self, slots_host: torch.Tensor) -> torch.Tensor:
        """The full images of the slots (by-reference mode): the admitted batch itself when it is exactly
        these slots in this order, else a stack of the rows."""
        slot_list = slots_host.tolist()
        if self.last_admitted is not None and self.last_admitted[0] == slot_list:
            return self.last_admitted[1]
        return torch.stack([self.image_refs[slot][0][self.image_refs[slot][1]] for slot in slot_list])

    def patches(self, slots_host: torch.Tensor, corners: torch.Tensor, patch_size: int) -> torch.Tensor:
        """Raw P x P patches at integer top-left corners Tensor[k, 2] (row, column) of the slots' images
        (by-reference mode), in the images' dtype and layout convention: Tensor[k, 3, P, P] for NCHW
        images, Tensor[k, P, P, 3] for NHWC ones."""
        crops = []
        for slot, (row, col) in zip(slots_host.tolist(), corners.tolist()):
            batch, index = self.image_refs[slot]
            image = batch[index]
            if image.shape[0] == 3:  # NCHW (contiguous or a channels-last view)
                crops.append(image[:, row:row + patch_size, col:col + patch_size])
            else:  # NHWC
                crops.append(image[row:row + patch_size, col:col + patch_size])
        return torch.stack(crops)

    def release(self, slots_host: torch.Tensor) -> None:
        """Forget the images of exited slots (by-reference mode): their input batches can be freed."""
        if not self.image_rows:
            for slot in slots_host.tolist():
                self.image_refs[slot] = None

    def gather_state(self, slots: torch.Tensor) -> GFNetState:
        return GFNetState(_gather_rows(self.fc_hidden, slots), _gather_rows(self.policy_hidden, slots),
                          _gather_rows(self.feature_map, slots))

    def scatter_state(self, slots: torch.Tensor, state: GFNetState) -> None:
        if self.fc_hidden is None:
            self.fc_hidden = self._alloc_like(state.fc_hidden)
            self.policy_hidden = self._alloc_like(state.policy_hidden)
            self.feature_map = self._alloc_like(state.feature_map)
        self.fc_hidden.index_copy_(0, slots, state.fc_hidden.to(self.fc_hidden.dtype))
        self.policy_hidden.index_copy_(0, slots, state.policy_hidden.to(self.policy_hidden.dtype))
        self.feature_map.index_copy_(0, slots, state.feature_map.to(self.feature_map.dtype))


def _autocast(device: torch.device, dtype, cache_enabled: bool = True):
    if dtype not in _AMP_DTYPES:
        raise ValueError(f"dtype must be one of None, 'fp32', 'bf16', 'fp16' (or torch dtypes), got {dtype!r}")
    amp = _AMP_DTYPES[dtype]
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp, cache_enabled=cache_enabled)


class _StepRunner:
    """Runs step t on a list of slots: gather, net.step, exit statistics, scatter of the new state."""

    def __init__(self, net, store: _SlotStore, device: torch.device, dtype, batch_size: int, cuda_graphs: bool):
        self.net, self.store, self.device, self.dtype = net, store, device, dtype
        self.batch_size = batch_size
        self.use_graphs = cuda_graphs
        self.graphs: dict = {}
        self.eager_runs = [0] * net.T
        self.pool = None

    def _step_on_rows(self, t: int, slots: torch.Tensor):
        """net.step on the images and state gathered from the slot rows (device tensors only)."""
        images = _gather_rows(self.store.images, slots)
        state = None if t == 0 else self.store.gather_state(slots)
        return self.net.step(t, images, state)

    def _step_on_references(self, t: int, slots_host: torch.Tensor, slots: torch.Tensor):
        """net.step with images by reference: the glance on the admitted batch, a focus step on the
        patches alone. The policy runs here first (its action decides which pixels to copy); net.step
        then gets the P x P patches with actions 0, whose crop is the patch itself, so the patch and
        every later computation are those of net.step on the full images (GFNet.step, focus branch)."""
        net = self.net
        if t == 0:
            return net.step(0, self.store.glance_images(slots_host))
        state = self.store.gather_state(slots)
        action_mean, _, policy_hidden = net.policy(state.feature_map, state.policy_hidden)
        reference = self.store.image_refs[int(slots_host[0])][0]
        size = reference.shape[-1] if reference.shape[1] == 3 else reference.shape[-2]
        # gfnet.ops.focus_crop's corner: floor(a * (S - P)) in the actions' dtype (float32 in net.step)
        corners = torch.floor(action_mean.detach().float() * (size - net.patch_size)).int()
        corners = corners.clamp_(0, size - net.patch_size)
        patches = self.store.patches(slots_host, corners, net.patch_size)
        state = GFNetState(state.fc_hidden, policy_hidden, state.feature_map)
        return net.step(t, patches, state, actions=action_mean.new_zeros(patches.shape[0], 2))

    def _body(self, t: int, slots: torch.Tensor, slots_host: Optional[torch.Tensor] = None):
        """The whole step: returns (max_probs Tensor[n] float32, preds Tensor[n] int64) on the device."""
        if self.store.image_rows:
            out = self._step_on_rows(t, slots)
        else:
            out = self._step_on_references(t, slots_host, slots)
        probs = F.softmax(out.logits.float(), 1)
        # the same arg-max as AnytimePrediction.preds, and its probability as the confidence
        preds = probs.argmax(1)
        max_probs = probs.gather(1, preds.unsqueeze(1)).squeeze(1)
        if t < self.net.T - 1:  # after the last step nobody needs the state
            self.store.scatter_state(slots, out.state)
        return max_probs, preds

    def run(self, t: int, slots_host: torch.Tensor):
        slots = slots_host.to(self.device, non_blocking=True)
        full = slots_host.numel() == self.batch_size
        # CUDA graphs replay a captured full batch; the first batch of each step runs eagerly (it
        # allocates the state rows and warms up the kernels), partial batches always run eagerly.
        if self.use_graphs and full and self.eager_runs[t] > 0:
            graph = self.graphs.get(t)
            if graph is None:
                graph = self._capture(t, slots)
            if graph is not None:
                static_slots, static_out, cuda_graph = graph
                static_slots.copy_(slots)
                cuda_graph.replay()
                return static_out
        self.eager_runs[t] += 1
        with _autocast(self.device, self.dtype):
            return self._body(t, slots, slots_host)

    def _capture(self, t: int, slots: torch.Tensor):
        try:
            static_slots = slots.clone()
            # One memory pool for the T graphs: between replays every live tensor is either a slot
            # buffer (allocated eagerly, outside the pool) or a graph's static output (kept alive
            # here, so never handed to another graph); only transient intermediates are shared,
            # and a replay's outputs are read (copied to the host) before the next replay.
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            torch.cuda.synchronize(self.device)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph, pool=self.pool), \
                    _autocast(self.device, self.dtype, cache_enabled=False):
                static_out = self._body(t, static_slots)
            self.graphs[t] = (static_slots, static_out, cuda_graph)
            return self.graphs[t]
        except Exception as e:  # an op that cannot be captured: say so and keep going eagerly
            warnings.warn(f"budgeted_predict: CUDA graph capture of step {t} failed ({type(e).__name__}: {e}); "
                          "running that step eagerly", RuntimeWarning)
            self.use_graphs = False
            return None


@torch.inference_mode()
def budgeted_predict(net, images_or_loader: Union[torch.Tensor, Iterable], thresholds, batch_size: int = 64,
                     dtype=None, device=None, capacity: Optional[int] = None,
                     cuda_graphs: Optional[bool] = None, flops=None,
                     image_storage: Optional[str] = None) -> BudgetedPrediction:
    """Classify a stream of images with real early exit (budgeted batch classification).

    After each step, images whose max softmax probability is >= that step's threshold leave the batch
    with their prediction; the survivors' state stays in their slots and new images take the freed
    slots, so each step runs on a full batch of ``batch_size`` until the stream ends.

    Args:
        net: a :class:`gfnet.GFNet` in eval mode.
        images_or_loader: Tensor[N, 3, S, S] (normalised float, or uint8; uint8 [N, S, S, 3] too) or an
            iterable of batches, each images or (images, labels, ...) as gfnet.data's loaders yield;
            read lazily (streaming).
        thresholds: Tensor[T] (or a sequence) of exit thresholds, e.g. a row of a checkpoint's
            ``dynamic_threshold`` or :func:`gfnet.budget.find_thresholds`'s result; the last step always
            exits.
        batch_size: B, the fixed batch shape of every step.
        dtype: None/"fp32", "bf16" or "fp16" (autocast; the softmax runs in float32, as anytime_predict).
        device: where to run (default: the model's device); images are moved there.
        capacity: slots (default T * B, the least that keeps every batch full, see csrc/scheduler.cpp).
        cuda_graphs: capture full-batch steps in CUDA graphs (default: on for CUDA devices).
        flops: cumulative Multiply-Adds per step count (default :func:`step_flops`).
        image_storage: "rows" (images copied into per-slot rows on the device; needed by CUDA graphs) or
            "references" (no copy: slots refer to the input batches, focus steps copy only the patches);
            default "rows" on CUDA, "references" on the CPU.
    Returns:
        :class:`BudgetedPrediction`; ``preds`` and ``exit_step`` are in input order and equal, image by
        image, ``anytime_predict`` + :func:`gfnet.budget.exit_steps` with the same thresholds.
    """
    if net.training:
        raise RuntimeError("budgeted_predict needs eval mode: call net.eval() first")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    T = net.T
    thresholds = torch.as_tensor(thresholds).detach().flatten().cpu()
    if thresholds.numel() != T:
        raise ValueError(f"need one threshold per step (T={T}), got {thresholds.numel()}")
    if not thresholds.is_floating_point():
        thresholds = thresholds.double()
    model_device = next(net.parameters()).device
    device = torch.device(device) if device is not None else model_device
    if device != model_device and not (device.type == model_device.type and device.index is None):
        raise ValueError(f"the model lives on {model_device} but device={device}; move it first (net.to(device))")
    capacity = T * batch_size if capacity is None else int(capacity)
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device; got {device}")
    stream = _ImageStream(images_or_loader, device, batch_size)
    flops = step_flops(net) if flops is None else [float(f) for f in flops][:T]
    if len(flops) != T:
        raise ValueError(f"need the cumulative Multiply-Adds of each of the T={T} steps, got {len(flops)}")

    scheduler = _scheduler_class()(capacity, batch_size, thresholds)
    if image_storage is None:
        image_storage = "references" if device.type == "cpu" else "rows"
    if image_storage not in ("rows", "references"):
        raise ValueError(f"image_storage must be 'rows' or 'references', got {image_storage!r}")
    if cuda_graphs and image_storage != "rows":
        raise ValueError("cuda_graphs=True needs image_storage='rows' (graphs capture fixed addresses)")
    store = _SlotStore(capacity, image_rows=image_storage == "rows")
    runner = _StepRunner(net, store, device, dtype, batch_size, cuda_graphs)
    admit_step = scheduler.ADMIT

    start = time.perf_counter()
    while not scheduler.done():
        step, slots = scheduler.next_batch()
        if step == admit_step:
            images = stream.take(scheduler.wanted())
            if images is None:
                scheduler.end_stream()
                continue
            new_slots, _ = scheduler.admit(images.shape[0])
            store.put_images(new_slots, images)
            continue
        max_probs, preds = runner.run(step, slots)
        # the only device -> host traffic of a step: two Tensor[B]
        exited = scheduler.report(step, slots, max_probs.cpu(), preds.cpu())
        store.release(slots[exited])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    preds, exit_step = scheduler.results()
    n = preds.numel()
    flops_tensor = torch.tensor(flops, dtype=torch.float64)
    macs_spent = float(flops_tensor[exit_step].sum()) if n else 0.0
    targets = torch.cat(stream.labels) if stream.has_labels and stream.labels else None
    return BudgetedPrediction(
        preds=preds, exit_step=exit_step, macs_spent=macs_spent, macs_per_image=macs_spent / max(n, 1),
        seconds=seconds, images_per_second=n / seconds if seconds > 0 else float("inf"), targets=targets,
        step_images=torch.tensor(scheduler.step_images, dtype=torch.long),
        step_batches=torch.tensor(scheduler.step_batches, dtype=torch.long),
        partial_batches=scheduler.partial_batches, cuda_graphs=bool(runner.graphs))
