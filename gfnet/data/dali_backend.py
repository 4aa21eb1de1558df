"""The NVIDIA DALI backend of :func:`gfnet.data.make_loader`.

The file bytes enter the pipeline through an external source, one planned batch at a time (the
plan of :mod:`gfnet.data.sharding`), so that shuffling, sharding and the partial last batch are exact
and a decoding failure is traced to its files. On a GPU the decoder is DALI's "mixed" one (nvJPEG,
with the hardware JPEG decoder where the GPU has one) and resizing runs on the GPU; on the CPU
(``device_id=None``) it is libjpeg-turbo and DALI's CPU resize, both on `num_threads` threads.

Evaluation computes the reference's geometry (torchvision Resize(int) then CenterCrop) inside the
graph from the image's header shape, then resizes only the centre-crop region: one resampling over
``roi = crop window / scale``, which samples exactly the pixels that resize-then-crop would, without
computing the part of the resized image that the crop throws away.
"""
from __future__ import annotations

import collections

import numpy as np
import torch

from gfnet.data.loader import ImageLoader, TransformSpec

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

#: Batches fed ahead of the one being returned (DALI's prefetch queue depth).
_PREFETCH = 2

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
    shape = fn.peek_image_shape(encoded, dtype=types.INT64)
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


def build_pipeline(spec: TransformSpec, batch_size: int, num_threads: int, device_id: int | None, seed: int,
                   prefetch: int = 2):
    """A DALI pipeline reading encoded images from the external source named "encoded".

    Its first ``schedule_run`` runs `prefetch` iterations: feed that many batches before it.
    Outputs one batch of ``[N, 3, S, S]`` float32 (normalised, CHW) or ``[N, S, S, 3]`` uint8 (HWC),
    on the GPU when `device_id` is not None.
    """
    decode_device = "cpu" if device_id is None else "mixed"
    interp = _INTERP[spec.interpolation]
    S = spec.image_size

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch, exec_dynamic=True)
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=True)
        mirror = None
        if spec.train:
            images = fn.decoders.image_random_crop(
                encoded, device=decode_device, output_type=types.RGB, random_area=list(spec.scale),
                random_aspect_ratio=list(spec.ratio), num_attempts=10)
            images = fn.resize(images, size=[S, S], interp_type=interp, antialias=True)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            start, end = _center_crop_roi(encoded, spec)
            images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
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


class DaliLoader(ImageLoader):
    """:class:`gfnet.data.loader.ImageLoader` over a DALI pipeline (see the module docstring)."""

    backend = "dali"

    def _device_id(self):
        return None if self.device.type == "cpu" else self.device.index

    def _pipeline_seed(self) -> int:
        return int(np.random.default_rng([self.seed, self.epoch, self.shard_id, 1]).integers(2**31 - 1))

    def _read(self, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], list[tuple[str, str]]]:
        """The bytes of a batch's files: (indices read, their arrays, (path, reason) of unreadable ones)."""
        kept, arrays, failures = [], [], []
        for i in batch.tolist():
            path = self.index.files[i]
            try:
                data = np.fromfile(path, dtype=np.uint8)
            except OSError as exc:  # moved or unreadable since the split was indexed
                failures.append((path, f"cannot read: {exc.strerror or exc}"))
                continue
            if data.size == 0:
                failures.append((path, "empty file (emptied since the split was indexed)"))
                continue
            kept.append(i)
            arrays.append(data)
        return np.array(kept, dtype=np.int64), arrays, failures

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

    def _iterate(self, batches):
        pending = list(batches)
        retried = set()
        while pending:
            failed = yield from self._run(pending)
            if failed is None:
                return
            # The pipeline died on batch `position`: find its bad files, then go on from the rest of it.
            position, kept = failed
            pending = pending[position + 1:]
            bad = self._find_undecodable(kept)
            if not bad:
                key = tuple(kept.tolist())
                if key not in retried:  # no file fails alone: run the batch once more
                    retried.add(key)
                    pending.insert(0, kept)
                    continue
                bad = {i: "DALI failed twice on the batch holding it, though on no file alone" for i in key}
            good = np.array([i for i in kept.tolist() if i not in bad], dtype=np.int64)
            if len(good):
                pending.insert(0, good)
            yield _EMPTY_IMAGES, _EMPTY_LABELS, [(self.index.files[i], reason) for i, reason in bad.items()]

    def _run(self, batches):
        """Yield the batches through one pipeline.

        Returns None when all went through, else (position of the batch the pipeline failed on,
        the indices it was fed); the pipeline is then dead.
        """
        inflight = collections.deque()  # (position, indices fed, arrays): no_copy=True needs them alive
        pos = 0

        def read_next():
            # The next batch with at least one readable file, and the failures met on the way.
            nonlocal pos
            failures = []
            while pos < len(batches):
                kept, arrays, bad = self._read(batches[pos])
                failures += bad
                pos += 1
                if len(kept):
                    return (pos - 1, kept, arrays), failures
            return None, failures

        while len(inflight) < _PREFETCH:
            item, failures = read_next()
            if failures:
                yield _EMPTY_IMAGES, _EMPTY_LABELS, failures
            if item is None:
                break
            inflight.append(item)
        if not inflight:
            return None
        # DALI's first schedule_run runs `prefetch` iterations, so the pipeline is made for what was read.
        pipe = build_pipeline(self.spec, self.batch_size, max(1, self.num_threads), self._device_id(),
                              self._pipeline_seed(), prefetch=len(inflight))
        try:
            for _, _, arrays in inflight:
                pipe.feed_input("encoded", arrays)
            pipe.schedule_run()
        except RuntimeError:
            return inflight[0][:2]
        while inflight:
            position, kept, _ = inflight[0]
            try:
                (out,) = pipe.outputs()
                images = self._to_torch(out)
            except RuntimeError:  # DALI's "Critical error in pipeline": the pipeline is dead
                return position, kept
            inflight.popleft()
            item, failures = read_next()
            if item is not None:
                try:
                    pipe.feed_input("encoded", item[2])
                    pipe.schedule_run()
                except RuntimeError:
                    yield images, self._labels(kept).to(self.device), failures
                    return (inflight[0] if inflight else item)[:2]
                inflight.append(item)
            yield images, self._labels(kept).to(self.device), failures
        return None

    def _find_undecodable(self, batch) -> dict[int, str]:
        """Run each file of a failed batch alone through the same pipeline; the failing ones, with the reason."""
        bad = {}
        for i in batch.tolist():
            kept, arrays, failures = self._read(np.array([i]))
            if failures:
                bad[i] = failures[0][1]
                continue
            pipe = build_pipeline(self.spec, 1, 1, self._device_id(), self._pipeline_seed(), prefetch=1)
            try:
                pipe.feed_input("encoded", arrays)
                pipe.schedule_run()
                pipe.outputs()
            except RuntimeError as exc:
                bad[i] = "DALI cannot decode it: " + _dali_error_summary(exc)
            del pipe
        return bad
