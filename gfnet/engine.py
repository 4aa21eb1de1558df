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
  scatter) and replayed; partial batches (the tail of the stream) run eagerly. The graphs, and the slot
  buffers they read, are kept with the model (:func:`prepare_budgeted`), keyed by everything they depend on,
  and captured thread-locally before the input stream starts whenever the image shape is known;
- the host waits on the device once per step: the exit statistics travel in one packed, pinned,
  asynchronous copy, labels stay on the device until the end, and the next input batch is already in
  flight while the current one is scheduled.

Every image's prediction and exit step equal what ``net.anytime_predict`` followed by
:func:`gfnet.budget.exit_steps` gives: an image's computation never depends on its batch neighbours.
"""
from __future__ import annotations

import math
import numbers
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F

from gfnet._extension import extension
from gfnet.budget import check_thresholds
from gfnet.device import device_guard
from gfnet.models.gfnet import GFNetState
from gfnet.precision import amp_dtype, autocast

__all__ = ["BudgetedPrediction", "budgeted_predict", "prepare_budgeted", "step_flops"]


def _scheduler_class():
    return extension("EarlyExitScheduler").EarlyExitScheduler


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
        invalid: Tensor[N] bool, images whose logits were not finite (NaN or inf pixels): they exit at the
            glance with prediction -1, and a warning says how many.
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
    invalid: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

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
    no image is copied twice). Every batch is checked with ``net.check_images``; labels must match the images
    one to one. On CUDA the next batch is fetched and its copy to the device started while the current one is
    consumed; labels stay where they are until :meth:`all_labels` gathers them once at the end.
    """

    def __init__(self, net, source, device: torch.device, chunk: int):
        self._net = net
        if isinstance(source, torch.Tensor):
            net.check_images(source)
            images = source
            source = (images[i:i + chunk] for i in range(0, images.shape[0], chunk))
        self._source = source
        self._batches = None
        self._device = device
        self._prefetch = device.type == "cuda"
        self._ahead: Optional[tuple] = None
        self._images: Optional[torch.Tensor] = None
        self._labels: Optional[torch.Tensor] = None
        self._offset = 0
        self._count = 0
        self.labels: list = []
        self.has_labels: Optional[bool] = None

    def _fetch(self) -> Optional[tuple]:
        """The next non-empty batch as (images on the device, labels or None), or None at the end."""
        if self._batches is None:
            self._batches = iter(self._source)  # starts the loader (DALI's threads) on first use only
        for item in self._batches:
            labels = None
            if isinstance(item, (tuple, list)):
                if not item:
                    raise ValueError("the loader yielded an empty tuple; expected (images, labels)")
                images = item[0]
                labels = item[1] if len(item) > 1 else None
            else:
                images = item
            self._net.check_images(images, what=f"batch {self._count} of the loader")
            self._count += 1
            if images.shape[0] == 0:
                continue
            if labels is not None:
                labels = torch.as_tensor(labels).reshape(-1)
                if labels.numel() != images.shape[0]:
                    raise ValueError(f"batch {self._count - 1} of the loader holds {images.shape[0]} images but "
                                     f"{labels.numel()} labels; each image needs exactly one label")
            if self.has_labels is None:
                self.has_labels = labels is not None
            elif self.has_labels != (labels is not None):
                raise ValueError("some batches of the loader have labels and others not")
            return images.to(self._device, non_blocking=True), labels
        return None

    def _next_batch(self) -> bool:
        batch = self._ahead if self._ahead is not None else self._fetch()
        self._ahead = None
        if batch is None:
            return False
        self._images, self._labels = batch
        self._offset = 0
        if self._prefetch:
            self._ahead = self._fetch()
        return True

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

    def all_labels(self) -> Optional[torch.Tensor]:
        """Tensor[N] of every label taken, on the CPU (one transfer at the end), or None without labels."""
        if not self.has_labels or not self.labels:
            return None
        return torch.cat([labels.to(self.labels[0].device) for labels in self.labels]).cpu()


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


class _StepRunner:
    """Runs step t on a list of slots: gather, the model's step, exit statistics, scatter of the new state.

    A step's result is one packed Tensor[2, n] float32 on the device: row 0 the max softmax probability, row 1
    the prediction (exact in float32 for fewer than 2^24 classes). Images whose logits are not finite get
    probability +inf (they exit at once) and prediction -1.
    """

    def __init__(self, net, store: _SlotStore, device: torch.device, dtype, batch_size: int, cuda_graphs: bool,
                 pad_batches: bool = False):
        self.net, self.store, self.device, self.dtype = net, store, device, dtype
        self.batch_size = batch_size
        self.pad_batches = pad_batches
        self.use_graphs = cuda_graphs
        self.graphs: dict = {}
        self.pool = None
        self.replays = 0
        # the host side of the packed result: pinned, so that the copy is asynchronous
        pinned = device.type == "cuda"
        self.host = torch.empty((2, batch_size), dtype=torch.float32, pin_memory=pinned)
        self.slots_staging = torch.empty(batch_size, dtype=torch.long, pin_memory=pinned)
        self.copied = torch.cuda.Event() if pinned else None

    def _step_on_rows(self, t: int, slots: torch.Tensor):
        """The model's step on the images and state gathered from the slot rows (device tensors only)."""
        images = _gather_rows(self.store.images, slots)
        state = None if t == 0 else self.store.gather_state(slots)
        return self.net.step(t, images, state)

    def _step_on_references(self, t: int, slots_host: torch.Tensor, slots: torch.Tensor):
        """The model's step with images by reference: the glance on the admitted batch; a focus step copies
        out only the P x P patches at the corners the policy proposes, then encodes them (the model's own
        primitives, so every value is the one ``net.step`` computes on the full images)."""
        net = self.net
        if t == 0:
            return net.step(0, self.store.glance_images(slots_host))
        state = self.store.gather_state(slots)
        proposal = net.propose(state)
        actions = net.explore(proposal.mean, 0.0)
        reference = self.store.image_refs[int(slots_host[0])][0]
        size = reference.shape[-1] if reference.shape[1] == 3 else reference.shape[-2]
        corners = net.focus_corners(actions.float(), size)
        raw = self.store.patches(slots_host, corners, net.patch_size)
        # a P x P image cropped at corner 0 is itself: the fused op only converts and normalises it
        patches = net.focus_input(raw, actions.new_zeros(raw.shape[0], 2, dtype=torch.float32))
        return net.encode_focus(t, patches, state, actions, proposal)

    def _body(self, t: int, slots: torch.Tensor, slots_host: Optional[torch.Tensor] = None,
              keep: Optional[int] = None) -> torch.Tensor:
        """The whole step: returns the packed Tensor[2, n] float32 on the device. ``keep``: only the first
        ``keep`` rows are real (the rest pad the batch to its full shape): only their state is stored."""
        if self.store.image_rows:
            out = self._step_on_rows(t, slots)
        else:
            out = self._step_on_references(t, slots_host, slots)
        logits = out.logits.float()
        probs = F.softmax(logits, 1)
        # the same arg-max as AnytimePrediction.preds, and its probability as the confidence
        preds = probs.argmax(1)
        max_probs = probs.gather(1, preds.unsqueeze(1)).squeeze(1)
        invalid = ~torch.isfinite(logits).all(1)
        packed = torch.stack([torch.where(invalid, math.inf, max_probs),
                              torch.where(invalid, -1.0, preds.float())])
        if t < self.net.T - 1:  # after the last step nobody needs the state
            if keep is None:
                self.store.scatter_state(slots, out.state)
            else:
                self.store.scatter_state(slots[:keep], out.state.index(slice(0, keep)))
        return packed

    def run(self, t: int, slots_host: torch.Tensor) -> torch.Tensor:
        """Run step t on the slots; returns the packed result on the host (Tensor[2, n] float32)."""
        n = slots_host.numel()
        if self.copied is not None:  # through pinned memory: an asynchronous copy (the previous step's wait
            staged = self.slots_staging[:n]  # guarantees that the last copy out of this buffer is done)
            slots = staged.copy_(slots_host).to(self.device, non_blocking=True)
        else:
            slots = slots_host
        packed = None
        if self.use_graphs and n == self.batch_size:
            graph = self.graphs.get(t)
            if graph is None and self.store.fc_hidden is not None:
                graph = self.capture(t)
            if graph is not None:
                static_slots, static_out, cuda_graph = graph
                static_slots.copy_(slots)
                cuda_graph.replay()
                self.replays += 1
                packed = static_out
        if packed is None and self.pad_batches and n < self.batch_size:
            # pad_batches: a partial batch (the stream's tail) repeats its last slot up to the full batch shape,
            # so that a compiled model never recompiles for it, and keeps the first n results
            fill = self.batch_size - n
            padded_host = torch.cat([slots_host, slots_host[-1:].expand(fill)])
            padded = torch.cat([slots, slots[-1:].expand(fill)])
            with autocast(self.device, self.dtype):
                packed = self._body(t, padded, padded_host, keep=n)[:, :n]
        if packed is None:
            with autocast(self.device, self.dtype):
                packed = self._body(t, slots, slots_host)
        if self.copied is None:
            return packed
        host = self.host[:, :n]
        host.copy_(packed, non_blocking=True)
        self.copied.record()
        self.copied.synchronize()  # the one wait of the step
        return host

    def capture(self, t: int):
        """Capture step t in a CUDA graph on the full batch (the state rows must exist: run any batch first).
        Thread-local capture: other threads (DALI's) may use CUDA meanwhile."""
        try:
            static_slots = torch.arange(self.batch_size, device=self.device)
            # One memory pool for the T graphs: between replays every live tensor is either a slot
            # buffer (allocated eagerly, outside the pool) or a graph's static output (kept alive
            # here, so never handed to another graph); only transient intermediates are shared,
            # and a replay's outputs are read (copied to the host) before the next replay.
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            torch.cuda.synchronize(self.device)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph, pool=self.pool, capture_error_mode="thread_local"), \
                    autocast(self.device, self.dtype, cache_enabled=False):
                static_out = self._body(t, static_slots)
            self.graphs[t] = (static_slots, static_out, cuda_graph)
            return self.graphs[t]
        except Exception as e:  # an op that cannot be captured: say so and keep going eagerly
            warnings.warn(f"budgeted_predict: CUDA graph capture of step {t} failed ({type(e).__name__}: {e}); "
                          "running the steps eagerly", RuntimeWarning, stacklevel=2)
            self.use_graphs = False
            return None


@dataclass
class _Plan:
    """What a budgeted run keeps between calls on the GPU: slot buffers and the captured graphs that read them."""

    store: _SlotStore
    runner: _StepRunner
    warm: bool = False


_MAX_PLANS = 4


def _plan_key(net, device, batch_size, capacity, images: torch.Tensor, dtype, image_rows: bool, cuda_graphs: bool):
    # Graphs replay fixed addresses: of the slot buffers (owned by the plan), and of every parameter and buffer
    # of the model (a moved or replaced tensor means a new plan).
    tensors = tuple((p.data_ptr(), p.dtype) for p in net.parameters()) + \
        tuple((b.data_ptr(), b.dtype) for b in net.buffers())
    layout = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    return (str(device), batch_size, capacity, tuple(images.shape[1:]), images.dtype, layout, amp_dtype(dtype),
            net.T, image_rows, cuda_graphs, tensors)


def _plan_for(net, key, make) -> _Plan:
    plans = net.__dict__.setdefault("_budgeted_plans", OrderedDict())
    plan = plans.get(key)
    if plan is None:
        plan = make()
        plans[key] = plan
        while len(plans) > _MAX_PLANS:
            plans.popitem(last=False)
    plans.move_to_end(key)
    return plan


def _warm_up(plan: _Plan, net, example: torch.Tensor) -> None:
    """Run every step once on a full batch of copies of ``example`` (allocating the state rows and compiling
    the kernels), then capture the T graphs: all before any image of the stream is admitted."""
    store, runner = plan.store, plan.runner
    b = runner.batch_size
    slots = torch.arange(b, dtype=torch.long)
    channels_last = example.shape[1] == 3 and not example.is_contiguous() and \
        example.is_contiguous(memory_format=torch.channels_last)
    batch = example.expand(b, *example.shape[1:]).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    store.put_images(slots, batch)  # the slot rows take the stream's layout from this batch
    with autocast(runner.device, runner.dtype):
        for t in range(net.T):
            runner._body(t, slots.to(runner.device))
    if runner.use_graphs:
        for t in range(net.T):
            if runner.capture(t) is None:
                break
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    plan.warm = True


def _check_thresholds(thresholds, T: int) -> torch.Tensor:
    return check_thresholds(thresholds, T, "thresholds")


def _setup(net, images_or_loader, batch_size, dtype, device, capacity, cuda_graphs, image_storage):
    """Checks shared by budgeted_predict and prepare_budgeted; returns (device, capacity, cuda_graphs,
    image_rows)."""
    if net.training:
        raise RuntimeError("budgeted inference needs eval mode: call net.eval() first")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    amp_dtype(dtype)
    model_device = next(net.parameters()).device
    device = torch.device(device) if device is not None else model_device
    if device != model_device and not (device.type == model_device.type and device.index is None):
        raise ValueError(f"the model lives on {model_device} but device={device}; move it first (net.to(device))")
    device = model_device
    if capacity is None:
        capacity = net.T * batch_size
    elif isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or \
            not batch_size <= capacity <= net.T * batch_size:
        # checked before anything is allocated (a table of 10**9 slots would exhaust the memory): the scheduler needs
        # a batch's worth of slots, and never fills more than T * batch_size (csrc/scheduler.cpp)
        raise ValueError(f"capacity must be an int from batch_size to T * batch_size "
                         f"({batch_size}..{net.T * batch_size}; more slots are never used), got {capacity!r}")
    capacity = int(capacity)
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device; got {device}")
    if image_storage is None:
        image_storage = "references" if device.type == "cpu" else "rows"
    if image_storage not in ("rows", "references"):
        raise ValueError(f"image_storage must be 'rows' or 'references', got {image_storage!r}")
    if cuda_graphs and image_storage != "rows":
        raise ValueError("cuda_graphs=True needs image_storage='rows' (graphs capture fixed addresses)")
    return device, capacity, cuda_graphs, image_storage == "rows"


def _new_plan(net, device, dtype, batch_size, capacity, image_rows, cuda_graphs) -> _Plan:
    store = _SlotStore(capacity, image_rows=image_rows)
    return _Plan(store, _StepRunner(net, store, device, dtype, batch_size, cuda_graphs))


@torch.no_grad()  # as anytime_predict: a compiled model then shares its graphs between the two
def prepare_budgeted(net, example: torch.Tensor, batch_size: int = 64, dtype=None, capacity: Optional[int] = None,
                     cuda_graphs: Optional[bool] = None, image_storage: Optional[str] = None) -> None:
    """Allocate the slot buffers and capture the CUDA graphs of :func:`budgeted_predict` ahead of time (e.g.
    outside a timed region, or before a DALI pipeline starts), for images shaped like ``example`` (Tensor[k, ...]
    with the stream's per-image shape, dtype and layout; its first image fills the warm-up batch). Later calls
    with the same settings reuse them. Nothing to do on the CPU (no graphs, no buffers)."""
    device, capacity, cuda_graphs, image_rows = _setup(net, example, batch_size, dtype, None, capacity, cuda_graphs,
                                                       image_storage)
    net.check_images(example, what="example")
    if not image_rows:
        return
    example = example[:1].to(device)
    with device_guard(device):
        key = _plan_key(net, device, batch_size, capacity, example, dtype, image_rows, cuda_graphs)
        plan = _plan_for(net, key, lambda: _new_plan(net, device, dtype, batch_size, capacity, image_rows,
                                                     cuda_graphs))
        if not plan.warm:
            _warm_up(plan, net, example)


@torch.no_grad()  # as anytime_predict: a compiled model then shares its graphs between the two
def budgeted_predict(net, images_or_loader: Union[torch.Tensor, Iterable], thresholds, batch_size: int = 64,
                     dtype=None, device=None, capacity: Optional[int] = None,
                     cuda_graphs: Optional[bool] = None, flops=None,
                     image_storage: Optional[str] = None, pad_batches: bool = False) -> BudgetedPrediction:
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
            exits. NaN is refused.
        batch_size: B, the fixed batch shape of every step.
        dtype: None/"fp32", "bf16" or "fp16" (autocast; the softmax runs in float32, as anytime_predict).
        device: where to run (default: the model's device); images are moved there.
        capacity: slots (default T * B, the least that keeps every batch full, see csrc/scheduler.cpp).
        cuda_graphs: capture full-batch steps in CUDA graphs (default: on for CUDA devices). The graphs are
            kept with the model for later calls (see :func:`prepare_budgeted` to capture them in advance).
        flops: cumulative Multiply-Adds per step count (default :func:`step_flops`).
        image_storage: "rows" (images copied into per-slot rows on the device; needed by CUDA graphs) or
            "references" (no copy: slots refer to the input batches, focus steps copy only the patches);
            default "rows" on CUDA, "references" on the CPU.
        pad_batches: run the partial batches at the end of the stream at the full batch shape (their last
            slot repeated; the extra rows are discarded), so that a compiled model (:meth:`GFNet.compile`)
            never recompiles for them. Default off: measured, one dynamic-shape recompilation beats
            computing the padding rows (see :meth:`GFNet.compile`).
    Returns:
        :class:`BudgetedPrediction`; ``preds`` and ``exit_step`` are in input order and equal, image by
        image, ``anytime_predict`` + :func:`gfnet.budget.exit_steps` with the same thresholds.
    """
    T = net.T
    device, capacity, cuda_graphs, image_rows = _setup(net, images_or_loader, batch_size, dtype, device, capacity,
                                                       cuda_graphs, image_storage)
    thresholds = _check_thresholds(thresholds, T)
    flops = step_flops(net) if flops is None else [float(f) for f in flops][:T]
    if len(flops) != T:
        raise ValueError(f"need the cumulative Multiply-Adds of each of the T={T} steps, got {len(flops)}")
    if isinstance(images_or_loader, torch.Tensor) and images_or_loader.shape[0] > 0 and image_rows:
        # the image shape is known: buffers and graphs are ready before the stream starts
        prepare_budgeted(net, images_or_loader[:1], batch_size, dtype, capacity, cuda_graphs, "rows")
    stream = _ImageStream(net, images_or_loader, device, batch_size)
    scheduler = _scheduler_class()(capacity, batch_size, thresholds)
    admit_step = scheduler.ADMIT
    plan = None if image_rows else _new_plan(net, device, dtype, batch_size, capacity, image_rows, cuda_graphs)
    pad = bool(pad_batches)
    if plan is not None:
        plan.runner.pad_batches = pad

    with device_guard(device):
        start = time.perf_counter()
        while not scheduler.done():
            step, slots = scheduler.next_batch()
            if step == admit_step:
                images = stream.take(scheduler.wanted())
                if images is None:
                    scheduler.end_stream()
                    continue
                if plan is None:  # the first batch tells the image shape (a loader's stream)
                    key = _plan_key(net, device, batch_size, capacity, images, dtype, image_rows, cuda_graphs)
                    plan = _plan_for(net, key, lambda: _new_plan(net, device, dtype, batch_size, capacity,
                                                                 image_rows, cuda_graphs))
                    plan.runner.pad_batches = pad
                new_slots, _ = scheduler.admit(images.shape[0])
                plan.store.put_images(new_slots, images)
                continue
            packed = plan.runner.run(step, slots)
            exited = scheduler.report(step, slots, packed[0], packed[1].long())
            plan.store.release(slots[exited])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start

    preds, exit_step = scheduler.results()
    n = preds.numel()
    invalid = preds < 0
    if bool(invalid.any()):
        warnings.warn(f"budgeted_predict: {int(invalid.sum())} image(s) gave non-finite logits (NaN or inf pixels), "
                      f"e.g. stream positions {invalid.nonzero().flatten()[:5].tolist()}; they are reported with "
                      "prediction -1 (see BudgetedPrediction.invalid)", RuntimeWarning, stacklevel=2)
    flops_tensor = torch.tensor(flops, dtype=torch.float64)
    macs_spent = float(flops_tensor[exit_step].sum()) if n else 0.0
    return BudgetedPrediction(
        preds=preds, exit_step=exit_step, macs_spent=macs_spent, macs_per_image=macs_spent / max(n, 1),
        seconds=seconds, images_per_second=n / seconds if seconds > 0 else float("inf"),
        targets=stream.all_labels(),
        step_images=torch.tensor(scheduler.step_images, dtype=torch.long),
        step_batches=torch.tensor(scheduler.step_batches, dtype=torch.long),
        partial_batches=scheduler.partial_batches,
        cuda_graphs=plan is not None and plan.runner.replays > 0, invalid=invalid)
