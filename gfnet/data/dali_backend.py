"""The NVIDIA DALI backend of :func:`gfnet.data.make_loader`.

The file bytes enter the pipeline through external sources, one planned batch at a time (the plan
of :mod:`gfnet.data.sharding`), so that shuffling, sharding and the partial last batch are exact and
a decoding failure is traced to its files. On a GPU the decoder is DALI's "mixed" one (nvJPEG, with
the hardware JPEG decoder where the GPU has one) and resizing runs on the GPU; on the CPU
(``device_id=None``) it is libjpeg-turbo and DALI's CPU resize, both on `num_threads` threads.

A reader thread reads each batch's files, checks them (:func:`gfnet.data.validate.inspect_encoded`,
replacing failures in training batches) and draws the training crops (:mod:`gfnet.data.augment`) a
few batches ahead, so the training thread only feeds the pipeline and takes its outputs. The
pipeline has no random operator of its own: it is built once per loader and kept across epochs
(only a decoding error, which leaves a DALI pipeline unusable, makes it built again), and its
output depends on the plan alone, so an interrupted run resumes exactly.

Training decodes only the crop window (``decoders.image_slice``: ROI decoding, pixel-identical to
cropping the full decode). Evaluation computes the reference's geometry (torchvision Resize(int)
then CenterCrop) inside the graph from the image's header shape, then resizes only the centre-crop
region: one resampling over ``roi = crop window / scale``, which samples exactly the pixels that
resize-then-crop would, without computing the part of the resized image that the crop throws away.
EXIF orientation is not applied (``adjust_orientation=False``), as PIL in the reference pipeline.
"""
from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from gfnet.data.augment import batch_augmentation
from gfnet.data.loader import ImageLoader, TransformSpec
from gfnet.data.sharding import PlannedBatch, ShardPlan, fill_batch
from gfnet.data.validate import read_checked
from gfnet.device import to_device_async

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray
except ImportError as exc:  # pragma: no cover - exercised only where DALI is absent
    raise ImportError(
        "backend='dali' needs NVIDIA DALI: `pip install nvidia-dali-cuda130` (or the build matching your "
        "CUDA, see https://docs.nvidia.com/deeplearning/dali/user-guide/docs/installation.html), "
        "or pass backend='torchvision'") from exc

_INTERP = {"nearest": types.INTERP_NN, "bilinear": types.INTERP_LINEAR,
           "bicubic": types.INTERP_CUBIC, "lanczos": types.INTERP_LANCZOS3}

#: Batches scheduled in the pipeline ahead of the one being returned.
_PREFETCH = 2
#: Batches the reader thread prepares ahead of the pipeline.
_READ_AHEAD = 3

_EMPTY_IMAGES = torch.empty(0)
_EMPTY_LABELS = torch.empty(0, dtype=torch.int64)


def _as_float(node):
    return fn.cast(node, dtype=types.FLOAT)


def _center_crop_roi(encoded, spec: TransformSpec):
    """Source-image ROI (start, end as [y, x] float) of the val centre crop, from the header shape.

    Same integers as torchvision: the shorter side becomes R = int(S / crop_pct), the longer
    int(R * long / short); the crop offset is round-half-to-even((size - S) / 2).
    """
    S, R = spec.image_size, spec.resize_size
    shape = fn.peek_image_shape(encoded, dtype=types.INT64, adjust_orientation=False)
    h, w = shape[0], shape[1]
    short = w + (h - w) * (h < w)
    new_long = (R * (h + w - short)) // short
    nh = R + (new_long - R) * (w <= h)
    nw = R + (new_long - R) * (w > h)

    def offset(d):
        k = d // 2  # round(d / 2) with Python's ties-to-even, in integers: k, or k + 1 when d odd and k odd
        return k + (d - 2 * k) * (k - 2 * (k // 2))

    ay, ax = offset(nh - S), offset(nw - S)
    sy, sx = _as_float(h) / _as_float(nh), _as_float(w) / _as_float(nw)
    start = fn.stack(_as_float(ay) * sy, _as_float(ax) * sx)
    end = fn.stack(_as_float(ay + S) * sy, _as_float(ax + S) * sx)
    return start, end


def build_pipeline(spec: TransformSpec, batch_size: int, num_threads: int, device_id: int | None):
    """A DALI pipeline fed through external sources, one batch per ``schedule_run``.

    Inputs: "encoded" (the file bytes, ``uint8[n]`` per image); in training also "anchor" and
    "shape" (``int32[2]``, the crop window's (left, top) and (width, height)) and "mirror"
    (``int32`` 0/1). Outputs one batch of ``[N, 3, S, S]`` float32 (normalised, CHW) or
    ``[N, S, S, 3]`` uint8 (HWC), on the GPU when `device_id` is not None. The prefetch queue depth
    is 1, so that every ``schedule_run`` runs exactly one fed batch; the caller keeps several
    scheduled.
    """
    mixed = device_id is not None
    decode = dict(device="mixed" if mixed else "cpu", output_type=types.RGB, adjust_orientation=False)
    if mixed:  # libjpeg's chroma upsampling, as the CPU decoder and PIL use
        decode["jpeg_fancy_upsampling"] = True
    interp = _INTERP[spec.interpolation]
    S = spec.image_size

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0,
                  prefetch_queue_depth=1, exec_dynamic=True)
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=True)
        mirror = None
        if spec.train:
            anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            images = fn.decoders.image_slice(encoded, anchor, shape, axis_names="WH", **decode)
            images = fn.resize(images, size=[S, S], interp_type=interp, antialias=True)
        else:
            start, end = _center_crop_roi(encoded, spec)
            images = fn.decoders.image(encoded, **decode)
            images = fn.resize(images, size=[S, S], roi_start=start, roi_end=end, roi_relative=False,
                               interp_type=interp, antialias=True)
        if spec.output == "float":
            return fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="CHW", mirror=mirror if mirror is not None else 0,
                mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std])
        if mirror is not None:
            images = fn.flip(images, horizontal=mirror)
        return images

    p = pipe()
    p.build()
    return p


def _dali_error_summary(exc: Exception) -> str:
    """The operator's own words from a DALI pipeline error (what follows "encountered:")."""
    text = str(exc)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and "pipeline object is no longer valid" not in ln]
    return " ".join(lines) or type(exc).__name__


@dataclass
class _ReadBatch:
    """A planned batch read from disk and checked: what the pipeline is fed."""

    batch: PlannedBatch
    indices: np.ndarray  # int64 files, in batch order
    arrays: list  # their bytes (uint8 arrays; kept alive while fed: external_source(no_copy=True))
    windows: np.ndarray | None = None  # training: int32[N, 4] (top, left, height, width)
    flips: np.ndarray | None = None  # training: bool[N]
    failures: list = field(default_factory=list)  # (index, reason)


class _Reader:
    """Runs ``assemble`` over the planned batches on a background thread, `ahead` batches ahead, in order."""

    _END = object()

    def __init__(self, assemble, batches: list[PlannedBatch], ahead: int):
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._work, args=(assemble, batches), name="gfnet-dali-reader",
                                        daemon=True)
        self._thread.start()

    def _work(self, assemble, batches):
        try:
            for batch in batches:
                if not self._put(assemble(batch)):
                    return
        except BaseException as exc:  # handed to the training thread, which raises it
            self._put(exc)
            return
        self._put(self._END)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> _ReadBatch | None:
        """The next read batch, or None after the last."""
        if self._ended:
            return None
        item = self._queue.get()
        if item is self._END:
            self._ended = True
            return None
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class DaliLoader(ImageLoader):
    """:class:`gfnet.data.loader.ImageLoader` over a DALI pipeline (see the module docstring)."""

    backend = "dali"

    def _device_id(self):
        return None if self.device.type == "cpu" else self.device.index

    def _new_pipeline(self):
        return build_pipeline(self.spec, self.batch_size, max(1, self.num_threads), self._device_id())

    def _load(self, i: int):
        """One file's bytes and size, or why it is skipped (read by the reader thread)."""
        path = self.index.files[i]
        data, check = read_checked(path)
        if data is None:
            return None, check
        return (np.frombuffer(data, dtype=np.uint8), check.width, check.height), None

    def _assemble(self, batch: PlannedBatch, plan: ShardPlan, bad: set) -> _ReadBatch:
        loaded, failures = fill_batch(batch, lambda: plan.spares(batch.epoch, batch.position), self._load, bad)
        bad.update(i for i, _ in failures)  # later batches of the epoch skip them without reading
        read = _ReadBatch(batch, np.array([i for i, _ in loaded], dtype=np.int64), [x[0] for _, x in loaded],
                          failures=failures)
        if self.spec.train and loaded:
            read.windows, read.flips = batch_augmentation(batch.seed, [(w, h) for _, (_, w, h) in loaded],
                                                          self.spec.scale, self.spec.ratio)
        return read

    def _feed(self, pipe, read: _ReadBatch) -> None:
        pipe.feed_input("encoded", read.arrays)
        if self.spec.train:
            pipe.feed_input("anchor", np.ascontiguousarray(read.windows[:, [1, 0]]))
            pipe.feed_input("shape", np.ascontiguousarray(read.windows[:, [3, 2]]))
            pipe.feed_input("mirror", read.flips.astype(np.int32))
        pipe.schedule_run()

    def _to_torch(self, out) -> torch.Tensor:
        spec = self.spec
        S = spec.image_size
        n = len(out)
        if spec.output == "float":
            images = torch.empty((n, 3, S, S), dtype=torch.float32, device=self.device)
        else:
            images = torch.empty((n, S, S, 3), dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(out.as_tensor(), images, cuda_stream=stream)
        if spec.output == "uint8":
            images = images.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: torch.channels_last
        return images

    def _failures(self, pairs) -> list[tuple[str, str]]:
        return [(self.index.files[i], reason) for i, reason in pairs]

    def _iterate(self, batches):
        if not batches:
            return
        plan = self.shard_plan()
        bad = set(batches[0].bad)  # known bad this epoch: grows as files fail
        reader = _Reader(lambda b: self._assemble(b, plan, bad), batches, _READ_AHEAD)
        # The kept pipeline is lent to one iteration at a time (another one, still open, gets its own).
        pipe, self._pipe = getattr(self, "_pipe", None), None
        try:
            yield from self._run(reader, plan, bad, pipe)
        finally:
            reader.close()

    def _run(self, reader: _Reader, plan: ShardPlan, bad: set, pipe):
        """Feed the reader's batches through `pipe` (built when None), yield their outputs, and
        give the pipeline back to the loader when the epoch ran to its end: it is kept across
        epochs, as nothing in it depends on the epoch."""
        scheduled: collections.deque[_ReadBatch] = collections.deque()  # fed, oldest first
        waiting: collections.deque[_ReadBatch] = collections.deque()  # to feed again after a failure
        retried: set = set()
        while True:
            while len(scheduled) <= _PREFETCH:  # the batch to return now, and _PREFETCH behind it
                read = waiting.popleft() if waiting else reader.get()
                if read is None:
                    break
                if not len(read.indices):  # evaluation: every file of the batch failed
                    yield _EMPTY_IMAGES, _EMPTY_LABELS, self._failures(read.failures)
                    continue
                scheduled.append(read)
                try:
                    if pipe is None:
                        pipe = self._new_pipeline()
                    self._feed(pipe, read)
                except RuntimeError:
                    break  # the pipeline is dead: its error is met below, at the oldest batch
            if not scheduled:
                # Run to the end with nothing left in flight: kept for the next epoch. (Left mid-epoch,
                # it is dropped: the outputs still queued in it would feed the next epoch.)
                self._pipe = pipe
                return
            read = scheduled[0]
            try:
                (out,) = pipe.outputs()
                images = self._to_torch(out)
            except RuntimeError:  # DALI's "Critical error in pipeline": the pipeline is dead
                pipe = None
                found = self._find_undecodable(read, retried)
                bad.update(found)
                again = [read] + list(scheduled)[1:] + list(waiting)
                scheduled.clear()
                waiting.clear()
                for r in again:  # fed again to a new pipeline; those holding a file just found bad, refilled
                    if any(i in found for i in r.indices.tolist()):
                        fixed = self._assemble(r.batch, plan, bad)
                        fixed.failures = (r.failures + [(i, found[i]) for i in r.indices.tolist() if i in found]
                                          + fixed.failures)
                        r = fixed
                    waiting.append(r)
                continue
            scheduled.popleft()
            # labels through pinned memory: a pageable copy would wait for the GPU's queue once per batch
            yield images, to_device_async(self._labels(read.indices), self.device), self._failures(read.failures)

    def _find_undecodable(self, read: _ReadBatch, retried: set) -> dict[int, str]:
        """The files of a batch that DALI fails on alone, with the reason; each run through a pipeline of one."""
        bad = {}
        probe = None
        for k, i in enumerate(read.indices.tolist()):
            one = _ReadBatch(read.batch, read.indices[k:k + 1], read.arrays[k:k + 1])
            if self.spec.train:
                one.windows, one.flips = read.windows[k:k + 1], read.flips[k:k + 1]
            try:
                if probe is None:
                    probe = build_pipeline(self.spec, 1, 1, self._device_id())
                self._feed(probe, one)
                probe.outputs()
            except RuntimeError as exc:
                bad[i] = "DALI cannot decode it: " + _dali_error_summary(exc)
                probe = None
        if not bad:
            key = tuple(read.indices.tolist())
            if key not in retried:  # no file fails alone: run the batch once more
                retried.add(key)
                return {}
            bad = {i: "DALI failed twice on the batch holding it, though on no file alone" for i in key}
        return bad
