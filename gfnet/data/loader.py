"""`make_loader`: batches of ImageNet-layout images for GFNet training and evaluation.

The transforms are those of the reference code (GFNet-Pytorch), per backbone config:

- train: random-resized crop (area 8-100 %, aspect 3:4-4:3, 10 attempts) to S x S, horizontal flip
  with p=0.5 (torchvision's algorithm; the windows and flips are drawn on the host per batch, see
  :mod:`gfnet.data.augment`, so both backends cut the same windows and a resumed run repeats them);
- val: resize the shorter side to ``int(S / crop_pct)`` (the longer side to
  ``int(that * long / short)``, as torchvision's Resize), then the centre S x S crop (offsets
  ``round((size - S) / 2)``, as torchvision's CenterCrop).

Two backends share the file index (:mod:`gfnet.data.index`), the sharding
(:mod:`gfnet.data.sharding`) and this class's bookkeeping: ``"dali"`` (:mod:`gfnet.data.dali_backend`)
and ``"torchvision"`` (:mod:`gfnet.data.torchvision_backend`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from gfnet.config import IMAGENET_MEAN, IMAGENET_STD
from gfnet.data.index import SplitIndex, index_split
from gfnet.data.sharding import PlannedBatch, ShardPlan

log = logging.getLogger("gfnet.data")

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
OUTPUTS = ("float", "uint8")
BACKENDS = ("dali", "torchvision")

#: How many skipped paths one warning lists before it points at ``loader.stats.skipped``.
_MAX_PATHS_LOGGED = 50


def default_num_threads() -> int:
    """DALI threads or DataLoader workers per process: the CPUs this process may use, shared by the
    processes of this machine (``LOCAL_WORLD_SIZE``, set by torchrun), at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        local = 1
    return max(1, cpus // max(1, local))


@dataclass(frozen=True)
class TransformSpec:
    """What every backend computes from one file (see the module docstring)."""

    train: bool
    image_size: int
    resize_size: int  # val: the shorter side before the centre crop
    interpolation: str
    output: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


@dataclass
class LoaderStats:
    """Counts of one loader (one shard).

    Attributes:
        files_found: image-named files in the split (valid or not).
        valid: files that passed validation, over the whole split (all shards).
        skipped: (path, reason) of every file skipped: broken ones found when indexing the split,
            plus any that this shard's decoder failed on while reading (also dropped from later epochs).
        seen: images this loader has yielded since it was made (a training batch's replacements for
            files that failed to decode included).
        seen_this_epoch: images yielded in the current (or last finished) epoch.
        batches: batches yielded since the loader was made.
    """

    files_found: int = 0
    valid: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seen: int = 0
    seen_this_epoch: int = 0
    batches: int = 0

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


class ImageLoader:
    """Iterable of ``(images, labels)`` batches over one shard of one split; see :func:`make_loader`.

    Backends subclass it and implement ``_iterate(batches)``: given the epoch's
    :class:`gfnet.data.sharding.PlannedBatch` list, yield ``(images, labels, failures)`` per batch
    in order, failures being (path, reason) of files that could not be decoded; a training batch is
    refilled from the plan's spares (:func:`gfnet.data.sharding.fill_batch`), so every shard yields
    ``len(loader)`` full batches whatever fails to decode.
    """

    backend = ""

    def __init__(self, index: SplitIndex, spec: TransformSpec, batch_size: int, device: torch.device,
                 num_threads: int, shard_id: int, num_shards: int, seed: int):
        self.index = index
        self.spec = spec
        self.batch_size = batch_size
        self.device = device
        self.num_threads = num_threads
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.seed = seed
        self.epoch = 0
        self.start = 0  # the first batch of the epoch's plan that iterating yields
        self._bad: set[str] = set()  # paths that failed to decode at run time
        self.stats = LoaderStats(files_found=len(index.files) + len(index.skipped), valid=len(index.files),
                                 skipped=list(index.skipped))

    @property
    def classes(self) -> list[str]:
        """Sorted class folder names; a label indexes into it."""
        return self.index.classes

    @property
    def num_samples(self) -> int:
        """Images this shard yields per epoch (before any file fails to decode at run time)."""
        return sum(b.size for b in self._plan())

    def __len__(self) -> int:
        """Batches this shard yields per epoch."""
        return len(self._plan())

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Reshuffle for `epoch` (training); call before iterating, as with DistributedSampler.

        ``start``: iterating yields the epoch's batches from number ``start`` on (a run that stopped in
        the middle of the epoch resumes there): the batches before it are planned as usual and skipped
        without being read, and each later batch is the one an iteration from the start would yield
        (its files, replacements and augmentations depend only on the plan). ``len()`` stays the
        epoch's number of batches.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.epoch, self.start = int(epoch), int(start)

    def shard_plan(self) -> ShardPlan:
        """The plan of this loader's shard over its current file list."""
        return ShardPlan(len(self.index.files), self.batch_size, self.spec.train, self.shard_id, self.num_shards,
                         self.seed)

    def _plan(self) -> list[PlannedBatch]:
        bad = frozenset()
        if self._bad:  # files that failed to decode in an earlier epoch: left out (training: replaced)
            bad = frozenset(i for i, path in enumerate(self.index.files) if path in self._bad)
        return self.shard_plan().batches(self.epoch, bad)

    def __iter__(self):
        batches = self._plan()[self.start:]
        self.stats.seen_this_epoch = 0
        for images, labels, failures in self._iterate(batches):
            for path, reason in failures:
                self._record_failure(path, reason)
            if len(labels) == 0:
                if self.spec.train:  # yielding fewer batches would leave the other DDP ranks waiting
                    raise RuntimeError(
                        f"{self.index.split_dir}: shard {self.shard_id}/{self.num_shards} has no decodable image "
                        f"left to fill a training batch ({len(self.stats.skipped)} files skipped, see "
                        f"loader.stats.skipped); fix or remove the broken files")
                continue
            self.stats.seen += len(labels)
            self.stats.seen_this_epoch += len(labels)
            self.stats.batches += 1
            yield images, labels

    def _record_failure(self, path: str, reason: str) -> None:
        if path in self._bad:  # met again before the epoch ended (e.g. as another batch's spare)
            return
        log.warning("skipping %s: %s", path, reason)
        self.stats.skipped.append((path, reason))
        self._bad.add(path)

    def _iterate(self, batches):
        raise NotImplementedError

    def _labels(self, batch) -> torch.Tensor:
        return torch.as_tensor([self.index.labels[i] for i in batch.tolist()], dtype=torch.int64)

    def __repr__(self) -> str:
        s = self.spec
        return (f"{type(self).__name__}({self.index.split_dir!r}, train={s.train}, batch_size={self.batch_size}, "
                f"image_size={s.image_size}, output={s.output!r}, device={self.device}, "
                f"shard {self.shard_id}/{self.num_shards}, {len(self)} batches)")


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if isinstance(device, int):
        return torch.device("cuda", device)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be None, 'cpu', 'cuda', 'cuda:<k>' or an int; got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} asks for a GPU but torch sees none; pass device=None for the CPU")
    return dev


def _report_skipped(index: SplitIndex, shard_id: int) -> None:
    if shard_id != 0:  # every shard indexes the same files: one report is enough
        return
    if index.empty_classes:
        log.warning("%s: %d class(es) have no valid image here (no folder, or only broken files; their labels are "
                    "kept): %s",
                    index.split_dir, len(index.empty_classes), ", ".join(index.empty_classes[:_MAX_PATHS_LOGGED]))
    if not index.skipped:
        return
    lines = [f"  {p}: {r}" for p, r in index.skipped[:_MAX_PATHS_LOGGED]]
    more = len(index.skipped) - len(lines)
    if more > 0:
        lines.append(f"  ... and {more} more (all in loader.stats.skipped)")
    log.warning("%s: skipping %d broken file(s):\n%s", index.split_dir, len(index.skipped), "\n".join(lines))


def make_loader(root, train: bool, batch_size: int, image_size: int = 224, crop_pct: float = 0.875,
                interpolation: str = "bilinear", backend: str = "dali", device=None,
                num_threads: int | None = None, shard_id: int = 0, num_shards: int = 1, seed: int = 0,
                output: str = "float", split: str | None = None, cache_dir: str | None = None,
                classes=None) -> ImageLoader:
    """Batches of one split of an ImageNet-layout folder (``root/{train,val}/<class>/<image>``).

    Iterating yields ``(images, labels)``:

    - ``output="float"``: images ``Tensor[N, 3, S, S]`` float32, contiguous, normalised with the
      ImageNet mean/std (RGB channel order);
    - ``output="uint8"``: images ``Tensor[N, 3, S, S]`` uint8 RGB in ``torch.channels_last`` memory
      format, i.e. an NCHW view of NHWC memory (DALI's natural layout, no transpose pass); the
      gfnet.ops kernels normalise it in their fused pass. ``images.permute(0, 2, 3, 1)`` is the
      contiguous ``[N, S, S, 3]`` array;
    - labels ``Tensor[N]`` int64: the index of the image's class folder among the sorted class folders
      (torchvision's ImageFolder rule; an empty class folder keeps its index), or in ``classes`` when given.

    Images and labels are on `device`. Training drops each shard's last partial batch; evaluation
    keeps it, and reads every valid image exactly once across the shards.

    Broken files (empty, truncated, not an image) are found when the split is indexed (cached, see
    :mod:`gfnet.data.index`), reported once by path with a logging warning and skipped; grayscale,
    CMYK and PNG-content files are decoded as RGB, EXIF orientation is not applied (as in the
    reference's PIL pipeline). Files on which the two backends' decoders would disagree (a JPEG with
    a fatal marker inside its image data, an image over PIL's decompression-bomb limit, a 16-bit
    grayscale image) are skipped by both with the same reason when read
    (:func:`gfnet.data.validate.inspect_encoded`). A file that fails to decode while reading is
    reported once, skipped and left out of later epochs; the epoch goes on, and a training batch
    takes a replacement image instead (every shard yields ``len(loader)`` full batches, as DDP needs).
    ``loader.stats`` counts the images seen and the files skipped.

    Args:
        root: dataset root holding the split folders.
        train: training transforms and shuffling (split ``train``) or evaluation (split ``val``).
        batch_size: images per batch (per shard).
        image_size: S, the output side.
        crop_pct: evaluation resizes the shorter side to ``int(S / crop_pct)`` before the centre crop.
        interpolation: "bilinear", "bicubic", "nearest" or "lanczos" (antialiased when shrinking).
        backend: "dali" (NVIDIA DALI; on a GPU the nvJPEG "mixed" decoder and GPU resizing, on the CPU
            its CPU operators) or "torchvision" (PIL transforms in DataLoader worker processes).
        device: None or "cpu" for CPU tensors; "cuda", "cuda:<k>" or k for GPU k.
        num_threads: DALI threads, or DataLoader worker processes (default :func:`default_num_threads`:
            the CPUs this process may use divided by ``LOCAL_WORLD_SIZE``, the processes torchrun
            started on this machine).
        shard_id, num_shards: this process's shard (e.g. rank and world size).
        seed: seed of the shuffle and the augmentations (with the epoch, see ``set_epoch``).
        output: "float" or "uint8" (see above).
        split: split folder name (default "train" if `train` else "val").
        cache_dir: where the file index is cached (default :func:`gfnet.data.index.default_cache_dir`).
        classes: the class names the labels index (the model's: its training split's class folders); None: this
            split's own sorted class folders. Evaluate and validate with the training split's list, so that a
            split that lacks a class keeps every other class's label; a split folder with a class the list does
            not name is refused (ValueError naming it).

    Returns:
        An :class:`ImageLoader`: iterable, ``len()`` = batches per epoch, ``num_samples``,
        ``set_epoch(epoch)``, ``classes``, ``stats``.

    Raises:
        FileNotFoundError: the root or the split folder does not exist.
        ValueError: an argument is out of range, the split holds no valid image, or a class folder that
            ``classes`` does not name.
        ImportError: backend="dali" without DALI installed (the message says what to install).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if image_size < 1 or not 0 < crop_pct <= 1:
        raise ValueError(f"need image_size >= 1 and 0 < crop_pct <= 1; got {image_size}, {crop_pct}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}")
    dev = _resolve_device(device)
    if num_threads is None:
        num_threads = default_num_threads()
    index = index_split(root, split or ("train" if train else "val"), cache_dir=cache_dir, classes=classes)
    _report_skipped(index, shard_id)
    spec = TransformSpec(train=train, image_size=image_size, resize_size=int(image_size / crop_pct),
                         interpolation=interpolation, output=output)
    if backend == "dali":
        from gfnet.data.dali_backend import DaliLoader as cls
    else:
        from gfnet.data.torchvision_backend import TorchvisionLoader as cls
    return cls(index, spec, batch_size, dev, num_threads, shard_id, num_shards, seed)
