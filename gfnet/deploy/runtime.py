"""Run a deployment package: budgeted early exit outside PyTorch.

``pkg = gfnet.deploy.load("pkg/")`` checks the manifest and every file's checksum, then opens the graphs in
the package's runtime: ONNX Runtime for ``.onnx`` packages (this path needs numpy and onnxruntime only: this
module imports no torch), ExecuTorch's ``executorch.runtime`` for ``.pte`` packages (whose Python bindings
take torch tensors, so that path imports torch).

``res = pkg.predict(images, thresholds)`` is the loop of the deployed GFNet (../shared/DESIGN.md,
"Deployment"): the glance graph on every image; an image leaves as soon as its max probability reaches its
step's threshold (the last step's everybody); the focus graph and the step's classifier graph run on the
images still there, which leave the batch as they exit. One image at a time is the latency path (no copy,
no bookkeeping beyond the step loop); a batch is split into runs of ``batch_size`` images (the throughput
path). Every image's result depends on it alone, as in :func:`gfnet.engine.budgeted_predict`.

The runtimes' kernels round differently from PyTorch's (and from each other), so an image whose max
probability lies within ``tolerance`` of a threshold, or whose patch corner ``a * (S - P)`` lies within
``crop_tolerance`` pixels of an integer (where ``floor`` can go either way), is reported in
``res.ambiguous``: its exit step or later patches may differ from another runtime's. Every other image
exits at the same step with the same prediction as gfnet's engine (tested for both formats).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from gfnet.deploy.manifest import PackageError, check_thresholds, read_manifest

__all__ = ["load", "Package", "DeployPrediction", "AnytimeOutput", "open_graphs", "DEFAULT_TOLERANCE",
           "CROP_TOLERANCE", "RUNTIME_HINTS"]

#: Max probabilities this close to a threshold are ambiguous: the largest difference between the runtimes'
#: probabilities and PyTorch's measured on the tests' models is ~1e-6; 1e-4 leaves a margin for trained
#: networks with larger logits.
DEFAULT_TOLERANCE = 1e-4
#: Patch corners ``a * (S - P)`` this close (pixels) to an integer are ambiguous: the runtimes' actions differ
#: from PyTorch's by ~1e-7, times S - P <= 204 pixels for the reference backbones.
CROP_TOLERANCE = 1e-3
#: What to install for each runtime (one line in every refusal).
RUNTIME_HINTS = {"onnx": "running an ONNX package needs onnxruntime: pip install onnxruntime "
                         "(or pip install 'gfnet[deploy]')",
                 "executorch": "running an ExecuTorch package needs executorch: pip install executorch==1.5.1 "
                               "(or pip install 'gfnet[deploy]')"}


class _OnnxGraphs:
    """Graphs as ONNX Runtime sessions (CPU execution provider unless ``providers`` says otherwise)."""

    def __init__(self, paths: Mapping[str, str], threads: Optional[int], providers: Optional[Sequence] = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError(RUNTIME_HINTS["onnx"]) from None
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # a package is 3+ sessions with a thread pool each, which take turns: pool threads that spin after
        # their session's run steal the cores from the next session's (MobileNet-V3 GFNet, batch 1, 2 threads
        # on the 2-core AVX2 EPYC: all steps 26.7 ms spinning, 10.5 ms not; 1 thread: 10.8 ms)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions, self.inputs = {}, {}
        for name, path in paths.items():
            session = ort.InferenceSession(path, sess_options=options,
                                           providers=list(providers or ["CPUExecutionProvider"]))
            self.sessions[name] = session
            self.inputs[name] = [i.name for i in session.get_inputs()]
        self.version = ort.__version__

    def run(self, name: str, arrays: Sequence[np.ndarray]) -> list:
        return self.sessions[name].run(None, dict(zip(self.inputs[name], arrays)))


class _ExecutorchGraphs:
    """Graphs as ExecuTorch methods (``executorch.runtime``; XNNPACK delegate and portable kernels)."""

    def __init__(self, paths: Mapping[str, str], threads: Optional[int]):
        try:
            import torch
            from executorch.runtime import Runtime
        except ImportError:
            raise ImportError(RUNTIME_HINTS["executorch"]) from None
        if threads is not None:
            # XNNPACK's thread pool is one per process: this sets it for every program loaded here
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(int(threads))
        runtime = Runtime.get()
        self._torch = torch
        self.methods = {}
        for name, path in paths.items():
            program = runtime.load_program(path)
            self.methods[name] = program.load_method("forward")
        from importlib.metadata import version

        self.version = version("executorch")

    def run(self, name: str, arrays: Sequence[np.ndarray]) -> list:
        from_numpy = self._torch.from_numpy
        outs = self.methods[name].execute([from_numpy(np.ascontiguousarray(a)) for a in arrays])
        return [o.numpy() for o in outs]


def open_graphs(runtime: str, paths: Mapping[str, str], threads: Optional[int] = None, providers=None):
    """The graphs of ``paths`` (name -> file) opened in ``runtime`` ("onnx" or "executorch"); ``.run(name,
    arrays)`` runs one on numpy arrays and returns its outputs as numpy arrays."""
    if runtime == "onnx":
        return _OnnxGraphs(paths, threads, providers)
    if runtime == "executorch":
        if providers is not None:
            raise ValueError("providers are ONNX Runtime's execution providers; an ExecuTorch package has none")
        return _ExecutorchGraphs(paths, threads)
    raise ValueError(f"unknown runtime {runtime!r}; packages are 'onnx' or 'executorch'")


@dataclass
class DeployPrediction:
    """The outcome of :meth:`Package.predict` (numpy arrays, in input order).

    preds: int64 [N], the prediction at the exit step (-1 for an invalid image). exit_step: int64 [N], 0-based.
    probs: float32 [N, classes], the softmax at the exit step. max_probs: float32 [N], the confidence tested.
    ambiguous: bool [N], images whose confidence lay within ``tolerance`` of a threshold they were tested
    against, or whose patch corner lay within ``crop_tolerance`` pixels of an integer (another runtime may
    exit them at another step or crop another patch). invalid: bool [N], non-finite outputs (NaN or inf
    pixels): they exit at once with prediction -1, as in gfnet's engine.
    macs_per_image: mean cumulative Multiply-Adds of the exit steps. seconds: wall-clock of the call.
    step_images: int64 [T], images that ran each step.
    """

    preds: np.ndarray
    exit_step: np.ndarray
    probs: np.ndarray
    max_probs: np.ndarray
    ambiguous: np.ndarray
    invalid: np.ndarray
    macs_per_image: float
    seconds: float
    step_images: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    thresholds: list = field(default_factory=list)


@dataclass
class AnytimeOutput:
    """Every step on every image (:meth:`Package.anytime`): probs float32 [T, N, classes], actions float32
    [T-1, N, 2] (the policy's, (row, column) in [0, 1])."""

    probs: np.ndarray
    actions: np.ndarray

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(-1)


class Package:
    """A loaded deployment package (:func:`load`). Attributes: ``folder``, ``manifest``, ``runtime`` ("onnx" or
    "executorch"), ``T``, ``image_size`` (S), ``patch_size`` (P), ``num_classes``, ``classes``, ``input_dtype``
    ("uint8" or "float32"), ``flops`` (cumulative Multiply-Adds per step count), ``max_batch``, ``threads``."""

    def __init__(self, folder: str, manifest: Mapping[str, Any], graphs, threads: Optional[int]):
        self.folder, self.manifest, self.graphs, self.threads = folder, dict(manifest), graphs, threads
        m = self.manifest
        self.runtime = m["runtime"]
        self.arch = m["arch"]
        self.T, self.image_size, self.patch_size = int(m["T"]), int(m["image_size"]), int(m["patch_size"])
        self.num_classes = int(m["num_classes"])
        self.classes = m.get("classes")
        self.input_dtype = m["input"]["dtype"]
        self.flops = [float(f) for f in m["flops"]]
        self.max_batch = m.get("max_batch")
        self.steps = list(m["steps"])
        self._span = np.float32(self.image_size - self.patch_size)

    def __repr__(self) -> str:
        return (f"<gfnet.deploy.Package {self.arch} S={self.image_size} P={self.patch_size} T={self.T} "
                f"{self.runtime} {self.input_dtype} at {self.folder}>")

    # ----------------------------------------------------------------------------- checks
    def thresholds(self, thresholds) -> list:
        """The T thresholds of ``thresholds`` (T numbers, or an int index into the manifest's budgets)."""
        return check_thresholds(thresholds, self.manifest)

    def check_images(self, images) -> np.ndarray:
        """The images as a C-contiguous numpy array [N, 3, S, S] of the package's input dtype, or ValueError."""
        array = np.asarray(images)
        S = self.image_size
        if array.ndim != 4 or array.shape[1:] != (3, S, S):
            raise ValueError(f"images must be an array [N, 3, {S}, {S}] (this package's S={S}); got shape "
                             f"{tuple(array.shape)}")
        if self.input_dtype == "uint8":
            if array.dtype != np.uint8:
                raise ValueError(f"this package takes uint8 pixels (0..255, normalised inside its graphs); got "
                                 f"{array.dtype}: pass the raw pixels, or export with input_dtype='float32'")
        elif array.dtype.kind != "f":
            raise ValueError(f"this package takes float32 images normalised with mean {self.manifest['mean']} and "
                             f"std {self.manifest['std']}; got {array.dtype}: normalise them, or export with "
                             "input_dtype='uint8'")
        elif array.dtype != np.float32:
            array = array.astype(np.float32)
        return np.ascontiguousarray(array)

    def _batch_size(self, batch_size: Optional[int], n: int) -> int:
        if batch_size is None:
            batch_size = min(max(n, 1), self.max_batch or 64)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if self.max_batch is not None and batch_size > self.max_batch:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.max_batch} images this package's graphs "
                             "were planned for (export with a larger max_batch)")
        return int(batch_size)

    # ----------------------------------------------------------------------------- graphs
    def glance(self, images: np.ndarray) -> list:
        """The glance graph: [probs, fc_state, policy_hidden, feature_map]."""
        return self.graphs.run("glance", [images])

    def focus(self, t: int, images: np.ndarray, feature_map, policy_hidden, fc_state) -> list:
        """Focus step t (1..T-1): the focus graph then step t's classifier graph:
        [probs, fc_state, policy_hidden, feature_map, action]."""
        pooled, fmap, hidden, action = self.graphs.run("focus", [images, feature_map, policy_hidden])
        probs, fc_state = self.graphs.run(self.steps[t], [pooled, fc_state])
        return [probs, fc_state, hidden, fmap, action]

    def _ambiguous_crop(self, action: np.ndarray, crop_tolerance: float) -> np.ndarray:
        position = action.astype(np.float32) * self._span
        return (np.abs(position - np.round(position)) < crop_tolerance).any(1)

    # ----------------------------------------------------------------------------- inference
    def anytime(self, images, batch_size: Optional[int] = None) -> AnytimeOutput:
        """All T steps on every image: :class:`AnytimeOutput` (the anytime table's input, and threshold fitting)."""
        images = self.check_images(images)
        n = images.shape[0]
        bs = self._batch_size(batch_size, n)
        probs = np.zeros((self.T, n, self.num_classes), dtype=np.float32)
        actions = np.zeros((self.T - 1, n, 2), dtype=np.float32)
        for start in range(0, n, bs):
            chunk = images[start:start + bs]
            stop = start + chunk.shape[0]
            p, fc_state, hidden, fmap = self.glance(chunk)
            probs[0, start:stop] = p
            for t in range(1, self.T):
                p, fc_state, hidden, fmap, action = self.focus(t, chunk, fmap, hidden, fc_state)
                probs[t, start:stop] = p
                actions[t - 1, start:stop] = action
        return AnytimeOutput(probs, actions)

    def predict(self, images, thresholds, batch_size: Optional[int] = None, tolerance: float = DEFAULT_TOLERANCE,
                crop_tolerance: float = CROP_TOLERANCE) -> DeployPrediction:
        """Budgeted early exit on ``images``.

        Args:
            images: numpy array [N, 3, S, S], uint8 pixels or normalised float32 as the package was exported
                (anything ``np.asarray`` takes).
            thresholds: T numbers (the last step always exits), or an int index into the manifest's
                ``dynamic_threshold`` (its 39 budgets, when the checkpoint had them).
            batch_size: images per graph call (default min(N, max_batch or 64)); exited images leave the batch.
            tolerance, crop_tolerance: what :attr:`DeployPrediction.ambiguous` reports (see the module docstring).
        Returns:
            :class:`DeployPrediction`.
        """
        thr = np.asarray(self.thresholds(thresholds), dtype=np.float64)
        images = self.check_images(images)
        n = images.shape[0]
        bs = self._batch_size(batch_size, n)
        T = self.T
        preds = np.full(n, -1, dtype=np.int64)
        exit_step = np.zeros(n, dtype=np.int64)
        probs_out = np.zeros((n, self.num_classes), dtype=np.float32)
        max_probs = np.zeros(n, dtype=np.float32)
        ambiguous = np.zeros(n, dtype=bool)
        invalid = np.zeros(n, dtype=bool)
        step_images = np.zeros(T, dtype=np.int64)
        start_time = time.perf_counter()
        for start in range(0, n, bs):
            chunk = images[start:start + bs]
            index = np.arange(start, start + chunk.shape[0])  # the input positions of the rows still running
            probs, fc_state, hidden, fmap = self.glance(chunk)
            for t in range(T):
                if t > 0:
                    probs, fc_state, hidden, fmap, action = self.focus(t, chunk, fmap, hidden, fc_state)
                    ambiguous[index] |= self._ambiguous_crop(action, crop_tolerance)
                step_images[t] += index.size
                bad = ~np.isfinite(probs).all(1)
                pred = probs.argmax(1)
                conf = probs[np.arange(index.size), pred]
                if t < T - 1:
                    leave = bad | (conf >= thr[t])
                    ambiguous[index] |= ~bad & (np.abs(conf.astype(np.float64) - thr[t]) <= tolerance)
                else:
                    leave = np.ones(index.size, dtype=bool)
                if leave.any():
                    out = index[leave]
                    preds[out] = np.where(bad[leave], -1, pred[leave])
                    exit_step[out] = t
                    probs_out[out] = probs[leave]
                    max_probs[out] = conf[leave]
                    invalid[out] = bad[leave]
                    if t == T - 1 or leave.all():
                        break
                    keep = ~leave
                    index, chunk = index[keep], chunk[keep]
                    fc_state, hidden, fmap = fc_state[keep], hidden[keep], fmap[keep]
        seconds = time.perf_counter() - start_time
        flops = np.asarray(self.flops, dtype=np.float64)
        return DeployPrediction(preds=preds, exit_step=exit_step, probs=probs_out, max_probs=max_probs,
                                ambiguous=ambiguous, invalid=invalid,
                                macs_per_image=float(flops[exit_step].mean()) if n else 0.0, seconds=seconds,
                                step_images=step_images, thresholds=thr.tolist())


def load(folder, threads: Optional[int] = None, verify: bool = True, providers: Optional[Sequence] = None) -> Package:
    """Open a deployment package written by :func:`gfnet.deploy.export` (``gfnet-export``).

    Args:
        folder: the package folder.
        threads: the runtime's intra-op threads (ONNX Runtime's ``intra_op_num_threads``; ExecuTorch's XNNPACK
            thread pool, one per process); None: the runtime's default.
        verify: check every file's sha256 against the manifest (default; a damaged or edited file is refused).
        providers: ONNX Runtime execution providers (default ``["CPUExecutionProvider"]``).
    Raises:
        PackageError (a ValueError): unreadable manifest, missing file, checksum mismatch (one line).
        ImportError: the package's runtime is not installed (the message says what to install).
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    folder = os.fspath(folder)
    manifest = read_manifest(folder, verify=verify)
    paths = {name: os.path.join(folder, graph["file"]) for name, graph in manifest["graphs"].items()}
    try:
        graphs = open_graphs(manifest["runtime"], paths, threads, providers)
    except ImportError:
        raise
    except Exception as e:  # the runtime refused a file whose checksum matched: written by an incompatible version
        raise PackageError(f"deployment package {folder}: {manifest['runtime']} cannot open its graphs "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); it was written with "
                           f"{manifest.get('versions')}: export it again with the installed versions") from None
    return Package(folder, manifest, graphs, threads)
