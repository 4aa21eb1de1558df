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
  scatter) and replayed; partial batches (the tail of the stream) run eagerly. Each step runs eagerly at the
  full batch on its capture stream (the plan's device's, per thread) before its capture. The graphs, the slot
  buffers and kernel parameters they read, are kept with the model (:func:`prepare_budgeted`), keyed by
  everything they depend on, and captured thread-locally before the input stream starts whenever the image
  shape is known (a loader's stream: at each step's second full batch). :class:`BudgetedPrediction` says which
  steps replayed graphs; a failed capture runs its step eagerly for the rest of the call and is tried again on
  the next; a model compiled with CUDA graphs of its own (``mode="reduce-overhead"``) keeps those instead;
- the host waits on the device once per step: the exit statistics travel in one packed, pinned,
  asynchronous copy, host tensors (slot numbers, pageable input batches) go to the device through pinned
  memory, labels stay on the device until the end, and the next input batch is already in flight while the
  current one is scheduled.

Every image's prediction and exit step equal what ``net.anytime_predict`` followed by
:func:`gfnet.budget.exit_steps` gives: an image's computation never depends on its batch neighbours.
"""
from __future__ import annotations

import math
import numbers
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F

from gfnet._extension import extension
from gfnet.budget import check_thresholds
from gfnet.device import device_guard, to_device_async
from gfnet.models.gfnet import GFNetState
from gfnet.ops import keep_kernel_params
from gfnet.precision import amp_dtype, autocast

__all__ = ["BudgetedPrediction", "budgeted_predict", "prepare_budgeted", "release_budgeted", "step_flops"]


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
        graph_batches: Tensor[T] int64, the batches of each step that replayed its CUDA graph (the rest of
            step_batches ran eagerly: partial batches; with a loader's stream, each step's first full batch, which
            warms the step up for its capture; a step whose capture failed, for the rest of the call).
        cuda_graphs: Tensor[T] bool, the steps that replayed their CUDA graph (``graph_batches > 0``).
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
    graph_batches: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    cuda_graphs: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    invalid: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    @property
    def num_images(self) -> int:
        return int(self.preds.numel())


def step_flops(net) -> list:
    """Cumulative Multiply-Adds per step count (length T): stored, else counted (:func:`gfnet.flops.known_flops`)."""
    from gfnet.flops import known_flops

    flops = [float(f) for f in known_flops(net)["flops"]]
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
            return to_device_async(images, self._device), labels
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
        slots = to_device_async(slots_host, images.device)
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


#: The capture streams, per thread and device (see :func:`_capture_stream`).
_CAPTURE_STREAMS = threading.local()


def _capture_stream(device: torch.device):
    """This thread's capture stream on ``device``, made there on first use and shared by the plans that this thread
    makes for that device.

    Not one per plan: torch gives every stream that runs a cuBLAS call a workspace of its own (32 MiB on Hopper),
    keyed by the stream and kept for the life of the process (a captured graph may still read it), so a stream per
    plan would leave one workspace behind per plan made (up to the 32 streams of torch's pool per device, 1 GiB).
    Not one per process either: a thread runs one plan's steps at a time, but two threads capturing on one stream
    would record each other's work."""
    streams = _CAPTURE_STREAMS.__dict__.setdefault("by_device", {})
    stream = streams.get(device.index)
    if stream is None:
        stream = streams[device.index] = torch.cuda.Stream(device=device)
    return stream


class _CudaGraphs:
    """The CUDA-graph machinery of one plan, all on the plan's own device.

    - A capture stream on that device (the creating thread's, :func:`_capture_stream`): torch's default capture
      stream is made once, on whatever device is current at the first capture of the process, so that a later
      capture for another GPU would record an empty graph (and every replay would return stale outputs).
    - Eager warm-up runs on that stream (:meth:`warm`), so that what a capture needs per stream (cuBLAS
      workspaces, cuDNN's autotuned algorithms for the shape) exists before it starts.
    - One memory pool for the plan's T graphs (see :meth:`_StepRunner.capture`).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = _capture_stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    @staticmethod
    def available(device: torch.device) -> bool:
        return device.type == "cuda"

    def warm(self, fn):
        """``fn()`` run eagerly on the capture stream, after the work queued so far and before what follows."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = fn()
        current.wait_stream(self.stream)
        return out

    def capture(self, fn, writes=()):
        """Capture ``fn()`` (recorded, not run) in a CUDA graph on the plan's stream; returns (its output, a
        function that replays the graph on the current stream). ``writes``: the tensors ``fn`` writes (a
        recording changes nothing; only a stand-in that runs ``fn`` needs them)."""
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            out = fn()
        return out, graph.replay


#: The graph machinery of new plans (:class:`_CudaGraphs`); tests and ``gfnet-bench gpucheck --dry-run`` put a CPU
#: stand-in here (``gfnet.bench.standins.EmulatedGraphs``) to run the capture and replay logic without a GPU.
GRAPHS = _CudaGraphs


def _captures_its_own_graphs(net) -> Optional[str]:
    """The compile mode of a model whose compiled encoders capture their own CUDA graphs (inductor's cudagraph
    trees: mode "reduce-overhead" or "max-autotune"), else None."""
    compiled = getattr(net, "compiled", None)
    if not compiled or compiled.get("backend", "inductor") != "inductor":
        return None
    mode = compiled.get("mode")
    try:
        from torch._inductor import list_mode_options

        options = list_mode_options(mode) if mode is not None else {}
    except Exception:  # a torch without the table: judge by the names torch documents
        options = {"triton.cudagraphs": mode in ("reduce-overhead", "max-autotune")}
    if options.get("triton.cudagraphs"):
        return str(mode)
    return None


class _StepRunner:
    """Runs step t on a list of slots: gather, the model's step, exit statistics, scatter of the new state.

    A step's result is one packed Tensor[2, n] float32 on the device: row 0 the max softmax probability, row 1
    the prediction (exact in float32 for fewer than 2^24 classes). Images whose logits are not finite get
    probability +inf (they exit at once) and prediction -1.

    With CUDA graphs, a full batch of step t runs, in this order: eagerly on the plan's capture stream the first
    time (cuDNN autotunes the shape, Triton and torch.compile compile, workspaces are made), captured the next
    time and replayed from then on. A capture that fails is said once and the step runs eagerly for the rest of
    the call; the next call tries again.
    """

    def __init__(self, net, store: _SlotStore, device: torch.device, dtype, batch_size: int, cuda_graphs: bool,
                 pad_batches: bool = False):
        self.net, self.store, self.device, self.dtype = net, store, device, dtype
        self.batch_size = batch_size
        self.pad_batches = pad_batches
        self.machinery = GRAPHS(device) if cuda_graphs else None
        self.graphs: dict = {}  # step -> (static slots, static output, replay)
        self.warmed: set = set()  # steps run eagerly at the full batch on the capture stream
        self.failed: set = set()  # steps whose capture failed in this call
        self.replays = [0] * net.T  # graph replays per step, in this call
        self.kept: dict = {}  # what the graphs read by address and the plan must keep alive (kernel parameters)
        # the host side of the packed result: pinned, so that the copy is asynchronous
        pinned = device.type == "cuda"
        # (flat: a partial batch's [2, n] view must be contiguous, or the copy would go through a pageable temporary
        # and wait for the device)
        self.host = torch.empty(2 * batch_size, dtype=torch.float32, pin_memory=pinned)
        self.slots_staging = torch.empty(batch_size, dtype=torch.long, pin_memory=pinned)
        self.copied = torch.cuda.Event() if pinned else None

    @property
    def use_graphs(self) -> bool:
        return self.machinery is not None

    def new_call(self) -> None:
        """Start a budgeted_predict call: failed captures are tried again, replays counted afresh."""
        self.failed.clear()
        self.replays = [0] * self.net.T

    def _autocast(self):
        # one autocast state for every run of a step, eager, warm-up or captured (see gfnet.precision.autocast)
        return autocast(self.device, self.dtype)

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

    def _full_batch(self, t: int, slots: torch.Tensor) -> Optional[torch.Tensor]:
        """Step t on a full batch through the graph machinery (warm-up, capture, replay); None when the step
        runs eagerly instead (its capture failed in this call)."""
        if t in self.failed:
            return None
        graph = self.graphs.get(t)
        if graph is None and t in self.warmed:
            graph = self.capture(t)
        if graph is not None:
            static_slots, static_out, replay = graph
            static_slots.copy_(slots)
            replay()
            self.replays[t] += 1
            return static_out
        with self._autocast():
            packed = self.machinery.warm(lambda: self._body(t, slots))
        self.warmed.add(t)
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
            with keep_kernel_params(self.kept):
                packed = self._full_batch(t, slots)
        if packed is None and self.pad_batches and n < self.batch_size:
            # pad_batches: a partial batch (the stream's tail) repeats its last slot up to the full batch shape,
            # so that a compiled model never recompiles for it, and keeps the first n results
            fill = self.batch_size - n
            padded_host = torch.cat([slots_host, slots_host[-1:].expand(fill)])
            padded = torch.cat([slots, slots[-1:].expand(fill)])
            with self._autocast():
                packed = self._body(t, padded, padded_host, keep=n)[:, :n]
        if packed is None:
            with self._autocast():
                packed = self._body(t, slots, slots_host)
        if self.copied is None:
            return packed
        host = self.host[:2 * n].view(2, n)
        host.copy_(packed, non_blocking=True)
        self.copied.record()
        self.copied.synchronize()  # the one wait of the step
        return host

    def capture(self, t: int):
        """Capture step t in a CUDA graph on the full batch (the state rows must exist and the step must have run
        eagerly on the capture stream at this shape). Thread-local capture: other threads (DALI's) may use CUDA
        meanwhile. Returns (static slots, static output, replay), or None when the capture failed."""
        try:
            static_slots = torch.arange(self.batch_size, device=self.device)
            # One memory pool for the T graphs: between replays every live tensor is either a slot
            # buffer (allocated eagerly, outside the pool) or a graph's static output (kept alive
            # here, so never handed to another graph); only transient intermediates are shared,
            # and a replay's outputs are read (copied to the host) before the next replay.
            store = self.store
            writes = [x for x in (store.fc_hidden, store.policy_hidden, store.feature_map) if x is not None]
            with keep_kernel_params(self.kept), self._autocast():
                static_out, replay = self.machinery.capture(lambda: self._body(t, static_slots), writes)
            self.graphs[t] = (static_slots, static_out, replay)
            return self.graphs[t]
        except Exception as e:  # an op that cannot be captured: say so and run this step eagerly in this call
            warnings.warn(f"budgeted_predict: CUDA graph capture of step {t} failed ({type(e).__name__}: {e}); "
                          "running that step eagerly in this call (the next call tries again)", RuntimeWarning,
                          stacklevel=3)
            self.failed.add(t)
            return None


@dataclass
class _Plan:
    """What a budgeted run keeps between calls on the GPU: slot buffers, the captured graphs that read them, and
    (in ``runner.kept``) every other tensor those graphs read by address."""

    store: _SlotStore
    runner: _StepRunner
    warm: bool = False


_MAX_PLANS = 4


def _plan_key(net, device, batch_size, capacity, images: torch.Tensor, dtype, image_rows: bool, cuda_graphs: bool):
    # Graphs replay fixed addresses, shapes and strides: of the slot buffers (owned by the plan), and of every
    # parameter and buffer of the model (a moved, replaced or re-viewed tensor means a new plan; weights loaded
    # in place keep the plan, and its graphs read the new values).
    tensors = tuple((t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride())
                    for t in (*net.parameters(), *net.buffers()))
    layout = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    compiled = tuple(sorted((getattr(net, "compiled", None) or {}).items()))
    return (str(device), batch_size, capacity, tuple(images.shape[1:]), images.dtype, layout, amp_dtype(dtype),
            net.T, image_rows, cuda_graphs, compiled, GRAPHS, tensors)


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
    """Run every step on a full batch of copies of ``example`` (allocating the state rows on the current stream,
    compiling the kernels), then, with graphs, warm every step on the capture stream and capture the T graphs:
    all before any image of the stream is admitted (the rows hold nothing yet)."""
    store, runner = plan.store, plan.runner
    b = runner.batch_size
    slots_host = torch.arange(b, dtype=torch.long)
    channels_last = example.shape[1] == 3 and not example.is_contiguous() and \
        example.is_contiguous(memory_format=torch.channels_last)
    batch = example.expand(b, *example.shape[1:]).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    store.put_images(slots_host, batch)  # the slot rows take the stream's layout from this batch
    slots = slots_host.to(runner.device)
    with runner._autocast(), keep_kernel_params(runner.kept):
        for t in range(net.T):
            runner._body(t, slots)
    if runner.use_graphs:
        runner.new_call()
        for _ in range(2):  # warm-up on the capture stream, then capture (and one replay)
            for t in range(net.T):
                runner.run(t, slots_host)
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
    own_graphs = _captures_its_own_graphs(net)
    if cuda_graphs is None:
        # a model compiled with CUDA graphs of its own (inductor's) runs them; the engine's would nest them
        cuda_graphs = GRAPHS.available(device) and own_graphs is None
    if cuda_graphs and not GRAPHS.available(device):
        raise ValueError(f"cuda_graphs=True needs a CUDA device; got {device}")
    if cuda_graphs and own_graphs is not None:
        raise ValueError(f"cuda_graphs=True: this model was compiled with mode={own_graphs!r}, whose compiled "
                         "encoders capture CUDA graphs of their own, which the engine's graphs cannot nest; leave "
                         "cuda_graphs at None (the model's graphs then run), or compile with mode=None or "
                         "'max-autotune-no-cudagraphs' to have the engine capture whole steps")
    if image_storage is None:
        image_storage = "references" if device.type == "cpu" and not cuda_graphs else "rows"
    if image_storage not in ("rows", "references"):
        raise ValueError(f"image_storage must be 'rows' or 'references', got {image_storage!r}")
    if cuda_graphs and image_storage != "rows":
        raise ValueError("cuda_graphs=True needs image_storage='rows' (graphs capture fixed addresses)")
    return device, capacity, cuda_graphs, image_storage == "rows"


def _new_plan(net, device, dtype, batch_size, capacity, image_rows, cuda_graphs) -> _Plan:
    store = _SlotStore(capacity, image_rows=image_rows)
    return _Plan(store, _StepRunner(net, store, device, dtype, batch_size, cuda_graphs))


def release_budgeted(net) -> int:
    """Drop the plans that :func:`budgeted_predict` keeps with ``net`` (slot buffers, CUDA graphs and their memory
    pool); later calls make new ones. Returns how many were dropped. At most four are kept per model anyway (the
    least recently used goes first); ``gfnet-bench gpucheck`` reports what one holds."""
    plans = net.__dict__.pop("_budgeted_plans", None) or {}
    devices = {plan.runner.device for plan in plans.values()}
    for device in devices:  # nothing may still be reading the buffers when they are freed
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    count = len(plans)
    plans.clear()
    return count


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
        cuda_graphs: capture full-batch steps in CUDA graphs (default: on for CUDA devices, except for a model
            compiled with CUDA graphs of its own, ``net.compile(mode="reduce-overhead")``, whose graphs then run;
            True is refused for such a model). The graphs are kept with the model for later calls (see
            :func:`prepare_budgeted` to capture them in advance); a loader's stream captures each step at its
            second full batch, after an eager one.
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
    # with image rows the plan (kept with the model) is looked up at the first admitted batch, whose shape it needs
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
                    plan.runner.new_call()
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
    graph_batches = torch.tensor(plan.runner.replays if plan is not None else [0] * T, dtype=torch.long)
    flops_tensor = torch.tensor(flops, dtype=torch.float64)
    macs_spent = float(flops_tensor[exit_step].sum()) if n else 0.0
    return BudgetedPrediction(
        preds=preds, exit_step=exit_step, macs_spent=macs_spent, macs_per_image=macs_spent / max(n, 1),
        seconds=seconds, images_per_second=n / seconds if seconds > 0 else float("inf"),
        targets=stream.all_labels(),
        step_images=torch.tensor(scheduler.step_images, dtype=torch.long),
        step_batches=torch.tensor(scheduler.step_batches, dtype=torch.long),
        partial_batches=scheduler.partial_batches,
        graph_batches=graph_batches, cuda_graphs=graph_batches > 0, invalid=invalid)
