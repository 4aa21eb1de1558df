"""Latency of a GFNet one image at a time, per budget, in a chosen runtime: the paper's accuracy-against-latency
figure (GFNet, T-PAMI 2023: top-1 accuracy against inference latency on a phone, batch 1).

- :func:`make_runner`: one interface over the four runtimes (``"eager"``: gfnet's own PyTorch steps, the fused
  ops and the modules as they are; ``"compiled"``: the same after :meth:`GFNet.compile`; ``"onnx"``: the
  exported package in ONNX Runtime; ``"executorch"``: the exported package in ExecuTorch with XNNPACK);
  ``runner.predict_one(image, thresholds) -> (prediction, exit step)``, ``runner.glance(image)``,
  ``runner.focus(image)`` (one step each, for per-step latency);
- :func:`backbone_runner`: the backbone alone at full resolution in the same runtime (the paper's baseline);
- :func:`accuracy_latency_points`: for each budget, every image classified one at a time with early exit, its
  latency measured; accuracy, expected Multiply-Adds, mean/p50/p99 latency; plus the backbone's point:
  :class:`AccuracyLatency` (``.to_dict()`` for JSON, ``.summary()`` for the paper's sentence), which
  :func:`gfnet.viz.plot_accuracy_latency` draws.

Latencies are wall-clock (``time.perf_counter``) around each image's whole classification, after a warm-up
(``warmup`` passes of every image at the first budget; a compiled model compiles there).
"""
from __future__ import annotations

import copy
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["RUNTIMES", "make_runner", "backbone_runner", "BackboneGraph", "LatencyPoint", "AccuracyLatency",
           "accuracy_latency_points", "latency_stats", "cpu_name"]

RUNTIMES = ("eager", "compiled", "onnx", "executorch")


#: Vector extensions named beside the CPU model (the runtimes' kernels pick their code by them).
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "asimd", "sve")


def cpu_name() -> str:
    """The CPU's model name and its vector extensions (/proc/cpuinfo), e.g. ``"AMD EPYC (avx2; no avx512f)"``,
    for stamping latencies with their machine."""
    name, flags = None, None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key = line.split(":", 1)[0].strip()
                if key == "model name" and name is None:
                    name = line.split(":", 1)[1].strip()
                elif key in ("flags", "Features") and flags is None:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    if not flags:
        return name
    have = [f for f in _ISA_FLAGS if f in flags]
    missing = [f for f in ("avx512f",) if f not in flags and "avx2" in flags]
    return f"{name} ({', '.join(have) or 'no avx2'}" + (f"; no {', '.join(missing)})" if missing else ")")


def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")


class _TorchRunner:
    """gfnet's PyTorch steps one image at a time (``net.step``: the fused glance/focus ops and the modules)."""

    def __init__(self, net, threads: Optional[int]):
        self.net, self.threads, self.T = net, threads, net.T

    def _softmax_max(self, logits):
        probs = F.softmax(logits.float(), 1)
        conf, pred = probs.max(1)
        return float(conf), int(pred), probs

    @torch.inference_mode()
    def predict_one(self, image: torch.Tensor, thresholds: Sequence[float]):
        """(prediction, exit step) of one image Tensor[1, 3, S, S] under ``thresholds`` (T floats)."""
        net = self.net
        out = net.step(0, image)
        for t in range(self.T):
            if t > 0:
                out = net.step(t, image, out.state)
            conf, pred, _ = self._softmax_max(out.logits)
            if t == self.T - 1 or conf >= thresholds[t]:
                return pred, t
        raise AssertionError("unreachable")

    @torch.inference_mode()
    def probs_one(self, image: torch.Tensor) -> np.ndarray:
        """float32 [T, classes]: every step's softmax for one image."""
        return np.stack([F.softmax(o.logits.float(), 1)[0].numpy() for o in self.net.steps(image)])

    @torch.inference_mode()
    def glance(self, image):
        return self.net.step(0, image)

    @torch.inference_mode()
    def focus(self, image, state=None):
        """Step 1 (a focus step: the policy, the crop, the local encoder, the classifier) from ``state`` (the
        glance's state; computed once and kept when None)."""
        if state is None:
            if getattr(self, "_state", None) is None:
                self._state = self.net.step(0, image).state
            state = self._state
        return self.net.step(1, image, state)

    def as_input(self, images: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(images))


class _PackageRunner:
    """An exported package (:func:`gfnet.deploy.load`) one image at a time."""

    def __init__(self, package):
        self.package, self.T = package, package.T
        self._state = None

    def predict_one(self, image: np.ndarray, thresholds: Sequence[float]):
        pkg = self.package
        probs, fc_state, hidden, fmap = pkg.glance(image)
        for t in range(self.T):
            if t > 0:
                probs, fc_state, hidden, fmap, _ = pkg.focus(t, image, fmap, hidden, fc_state)
            pred = int(probs[0].argmax())
            if t == self.T - 1 or probs[0, pred] >= thresholds[t]:
                return pred, t
        raise AssertionError("unreachable")

    def probs_one(self, image: np.ndarray) -> np.ndarray:
        return self.package.anytime(image).probs[:, 0]

    def glance(self, image):
        return self.package.glance(image)

    def focus(self, image, state=None):
        if state is None:
            if self._state is None:
                self._state = self.package.glance(image)
            state = self._state
        _, fc_state, hidden, fmap = state
        return self.package.focus(1, image, fmap, hidden, fc_state)

    def as_input(self, images: np.ndarray):
        return np.ascontiguousarray(images)


def make_runner(net, runtime: str, threads: Optional[int] = 1, input_dtype: str = "uint8",
                workdir: Optional[str] = None, package: Optional[str] = None):
    """A batch-1 runner of ``net`` in ``runtime`` (see the module docstring).

    Args:
        net: a :class:`gfnet.GFNet` (eval). "eager" runs it as it is; "compiled" runs it as it is when it was
            compiled (:meth:`GFNet.compile`), else a compiled copy.
        threads: intra-op threads (torch.set_num_threads for PyTorch, the runtimes' own setting); None: default.
        input_dtype: of the exported package ("uint8" or "float32"); the PyTorch runners take either.
        workdir: where the package is exported (default: a new temporary folder, ``runner.workdir``, which the
            caller removes); package: an existing package folder to load instead of exporting.
    """
    _check_runtime(runtime)
    if runtime in ("eager", "compiled"):
        if threads is not None:
            torch.set_num_threads(int(threads))
        if runtime == "compiled" and net.compiled is None:
            net = copy.deepcopy(net).compile()  # the caller's model stays as it is
        return _TorchRunner(net.eval(), threads)
    from gfnet.deploy import export, load

    if package is None:
        workdir = workdir or tempfile.mkdtemp(prefix="gfnet-latency-")
        package = os.path.join(workdir, f"{net.arch}-{runtime}")
        if not os.path.isdir(package):
            export(net, package, format=runtime, input_dtype=input_dtype, max_batch=64)
    runner = _PackageRunner(load(package, threads=threads))
    runner.workdir = workdir
    return runner


class BackboneGraph(nn.Module):
    """A full-resolution backbone as a deployed graph takes it: ``images`` [N, 3, S, S] (uint8 pixels, divided by
    255 and normalised in the graph, or normalised float32) -> probabilities [N, classes]."""

    def __init__(self, backbone: nn.Module, uint8: bool, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.backbone, self.uint8 = backbone, uint8
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32)
        if self.uint8:
            x = (x / 255.0 - self.mean) / self.std
        return F.softmax(self.backbone(x).float(), 1)


class _BackboneRunner:
    def __init__(self, fn, as_input):
        self.fn, self.as_input = fn, as_input

    def predict_one(self, image):
        return int(np.asarray(self.fn(image)).argmax())


def backbone_runner(backbone: nn.Module, runtime: str, image_size: int, threads: Optional[int] = 1,
                    input_dtype: str = "uint8", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                    workdir: Optional[str] = None):
    """The backbone alone (``backbone(images) -> logits`` at full resolution S) in ``runtime``: the baseline of
    the accuracy-against-latency figure. ``runner.fn(images)`` returns probabilities [N, classes]."""
    _check_runtime(runtime)
    module = BackboneGraph(backbone.eval(), input_dtype == "uint8", mean, std).eval()
    if runtime in ("eager", "compiled"):
        if threads is not None:
            torch.set_num_threads(int(threads))
        call = torch.compile(module) if runtime == "compiled" else module

        def run(images):
            with torch.inference_mode():
                return call(torch.from_numpy(np.ascontiguousarray(images))).numpy()
        return _BackboneRunner(run, np.ascontiguousarray)
    from gfnet.deploy.exporter import _trace, _write_executorch
    from gfnet.deploy.runtime import open_graphs

    workdir = workdir or tempfile.mkdtemp(prefix="gfnet-latency-")
    g = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (2, 3, image_size, image_size), dtype=torch.uint8, generator=g) \
        if input_dtype == "uint8" else torch.randn(2, 3, image_size, image_size, generator=g)
    path = os.path.join(workdir, "backbone" + (".onnx" if runtime == "onnx" else ".pte"))
    if not os.path.isfile(path):
        exported = _trace(module, (example,), 64)
        if runtime == "onnx":
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(exported, (), dynamo=True, input_names=["images"], output_names=["probs"],
                                  optimize=True, verbose=False).save(path, external_data=False)
        else:
            _write_executorch(exported, "backbone", 64, path)
    graphs = open_graphs(runtime, {"backbone": path}, threads=threads)
    runner = _BackboneRunner(lambda images: graphs.run("backbone", [np.ascontiguousarray(images)])[0],
                             np.ascontiguousarray)
    runner.workdir = workdir
    return runner


def latency_stats(seconds: Sequence[float]) -> dict:
    """mean, p50 and p99 (milliseconds) of per-image latencies in seconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        return {"mean_ms": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan")}
    return {"mean_ms": float(ms.mean()), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


@dataclass
class LatencyPoint:
    """One budget: its thresholds, the top-1 accuracy (%) of the runtime's predictions, the expected Multiply-Adds
    per image (of the exits measured), its share of all T steps', the exit shares, and the batch-1 latency."""

    budget: int
    thresholds: List[float]
    accuracy: float
    macs: float
    macs_share: float
    exit_shares: List[float]
    mean_ms: float
    p50_ms: float
    p99_ms: float


@dataclass
class AccuracyLatency:
    """The points of the accuracy-against-latency figure, in one runtime, batch 1.

    points: one :class:`LatencyPoint` per budget. all_steps: latency stats of every image through all T steps.
    backbone: {"accuracy", "mean_ms", "p50_ms", "p99_ms", "macs"} of the full-resolution backbone alone (None if
    none given). Machine: ``cpu``, ``threads``; ``runtime``; the model: ``arch``, ``image_size``, ``patch_size``,
    ``T``, ``flops``; ``images``: how many images each budget classified.
    """

    runtime: str
    threads: Optional[int]
    arch: str
    image_size: int
    patch_size: int
    T: int
    flops: List[float]
    images: int
    points: List[LatencyPoint] = field(default_factory=list)
    all_steps: dict = field(default_factory=dict)
    backbone: Optional[dict] = None
    cpu: str = field(default_factory=cpu_name)
    label: str = "GFNet"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["format"] = "gfnet-accuracy-latency/1"
        return out

    def latency_at_accuracy(self, accuracy: float) -> Optional[float]:
        """The GFNet's mean latency (ms) where its accuracy first reaches ``accuracy``, interpolated linearly
        between the neighbouring budgets on the accuracy-latency curve sorted by latency; None if no budget
        reaches it."""
        pts = sorted(self.points, key=lambda p: p.mean_ms)
        previous = None
        for p in pts:
            if p.accuracy >= accuracy:
                if previous is None or previous.accuracy >= p.accuracy:
                    return p.mean_ms
                w = (accuracy - previous.accuracy) / (p.accuracy - previous.accuracy)
                return previous.mean_ms + w * (p.mean_ms - previous.mean_ms)
            previous = p
        return None

    def summary(self) -> str:
        """The paper's sentence for this machine: at the backbone's accuracy, how much lower (or higher) the
        GFNet's mean latency is than the backbone's, or that the GFNet does not reach that accuracy."""
        where = f"batch 1, {self.threads or 'default'} thread(s), {self.runtime}, {self.cpu}"
        if not self.backbone:
            return f"no backbone point measured ({where})"
        acc, base = self.backbone["accuracy"], self.backbone["mean_ms"]
        lat = self.latency_at_accuracy(acc)
        if lat is None:
            best = max(self.points, key=lambda p: (p.accuracy, -p.mean_ms)) if self.points else None
            if best is None:
                return f"GFNet does not reach the backbone's accuracy ({acc:.1f}%): no budget measured ({where})"
            change = (1.0 - best.mean_ms / base) * 100.0
            return (f"GFNet does not reach the backbone's accuracy ({acc:.1f}%) at any budget measured; at its best "
                    f"accuracy ({best.accuracy:.1f}%) its mean latency is {best.mean_ms:.2f} ms against the "
                    f"backbone's {base:.2f} ms: {abs(change):.0f}% {'lower' if change >= 0 else 'higher'} ({where})")
        change = (1.0 - lat / base) * 100.0
        return (f"at the backbone's accuracy ({acc:.1f}%), GFNet's mean latency is {lat:.2f} ms against the "
                f"backbone's {base:.2f} ms: {abs(change):.0f}% {'lower' if change >= 0 else 'higher'} ({where})")


def _time_images(fn, images: Sequence, rounds: int, outputs: Optional[list] = None) -> np.ndarray:
    """Per-image wall-clock seconds of ``fn(image)``: the median over ``rounds`` passes of every image. The first
    pass's results are appended to ``outputs`` when given (no untimed pass is needed for them)."""
    times = np.zeros((max(rounds, 1), len(images)))
    for r in range(max(rounds, 1)):
        for i, image in enumerate(images):
            start = time.perf_counter()
            out = fn(image)
            times[r, i] = time.perf_counter() - start
            if r == 0 and outputs is not None:
                outputs.append(out)
    return np.median(times, axis=0)


def accuracy_latency_points(net, thresholds, images, labels, backbone: Optional[nn.Module] = None,
                            backbone_accuracy: Optional[float] = None, runtime: str = "onnx",
                            threads: Optional[int] = 1, rounds: int = 3, warmup: int = 1,
                            input_dtype: Optional[str] = None, workdir: Optional[str] = None,
                            budgets: Optional[Sequence[int]] = None, label: str = "GFNet",
                            warmup_images: Optional[int] = None) -> AccuracyLatency:
    """Accuracy and batch-1 latency of ``net`` at each budget, and of the full-resolution backbone, in ``runtime``.

    Args:
        net: a :class:`gfnet.GFNet` (eval mode; CPU).
        thresholds: Tensor/array [B, T] (e.g. ``net.meta.dynamic_threshold``, or rows of
            :func:`gfnet.budget.budget_curve`'s fitted thresholds), one row per budget.
        images: Tensor[N, 3, S, S] uint8 pixels (or float32 normalised with the backbone's mean/std); labels
            Tensor[N] (or array) of class indices.
        backbone: the backbone alone, an ``nn.Module`` taking normalised float32 [N, 3, S, S] and returning
            logits; with ``backbone_accuracy`` (its top-1 % on the same test images, measured by the caller) it
            gives the figure's baseline point, its latency measured here in the same runtime.
        runtime: "eager", "compiled", "onnx" or "executorch" (the package exported into ``workdir``).
        threads: intra-op threads (1: the phone setting); rounds: timed passes over the images per budget (each
            image's latency is its median over the rounds; the first pass's exits and predictions are scored);
            warmup: untimed passes first, over the first ``warmup_images`` images (default all).
        input_dtype: of the images (default: from their dtype). budgets: which rows of ``thresholds`` to
            measure (default all), numbered from 0 as ``LatencyPoint.budget``.
    Returns:
        :class:`AccuracyLatency`.
    """
    _check_runtime(runtime)
    images_t = torch.as_tensor(images).cpu()
    labels_np = np.asarray(torch.as_tensor(labels).cpu().numpy()).astype(np.int64).reshape(-1)
    if images_t.dim() != 4 or images_t.shape[0] != labels_np.size:
        raise ValueError(f"need images [N, 3, S, S] and N labels; got {tuple(images_t.shape)} and {labels_np.size}")
    if images_t.shape[0] == 0:
        raise ValueError("no images to measure")
    if input_dtype is None:
        input_dtype = "uint8" if images_t.dtype == torch.uint8 else "float32"
    if images_t.dtype != torch.uint8:
        images_t = images_t.float()
    table = np.asarray(torch.as_tensor(thresholds).detach().cpu().double().numpy(), dtype=np.float64)
    if table.ndim == 1:
        table = table[None]
    if table.ndim != 2 or table.shape[1] != net.T:
        raise ValueError(f"thresholds must be [budgets, T={net.T}], got shape {table.shape}")
    budgets = list(range(table.shape[0])) if budgets is None else [int(b) for b in budgets]
    if backbone is not None and backbone_accuracy is None:
        raise ValueError("give backbone_accuracy (its top-1 % on these test images) with the backbone")
    warmup_images = images_t.shape[0] if warmup_images is None else max(1, int(warmup_images))
    own_workdir = workdir is None and runtime in ("onnx", "executorch")
    workdir = tempfile.mkdtemp(prefix="gfnet-latency-") if own_workdir else workdir
    previous_threads = torch.get_num_threads()
    try:
        from gfnet.engine import step_flops

        flops = step_flops(net)
        runner = make_runner(net, runtime, threads, input_dtype, workdir)
        singles = [runner.as_input(images_t[i:i + 1].numpy()) for i in range(images_t.shape[0])]
        result = AccuracyLatency(runtime=runtime, threads=threads, arch=net.arch, image_size=net.image_size,
                                 patch_size=net.patch_size, T=net.T, flops=[float(f) for f in flops],
                                 images=len(singles), label=label)
        never = [1e8] * (net.T - 1) + [-1e8]
        for _ in range(warmup):
            for image in singles[:warmup_images]:
                runner.predict_one(image, never)
        result.all_steps = latency_stats(_time_images(lambda im: runner.predict_one(im, never), singles, rounds))
        for b in budgets:
            row = [float(v) for v in table[b]]
            outcome = []
            seconds = _time_images(lambda im: runner.predict_one(im, row), singles, rounds, outcome)
            preds = np.array([p for p, _ in outcome])
            steps = np.array([s for _, s in outcome])
            shares = np.bincount(steps, minlength=net.T) / len(singles)
            macs = float((shares * np.asarray(flops)).sum())
            result.points.append(LatencyPoint(budget=b, thresholds=row,
                                              accuracy=float((preds == labels_np).mean() * 100.0), macs=macs,
                                              macs_share=macs / float(flops[-1]),
                                              exit_shares=[float(s) for s in shares], **latency_stats(seconds)))
        if backbone is not None:
            base = backbone_runner(backbone, runtime, net.image_size, threads, input_dtype, net.config.mean,
                                   net.config.std, workdir)
            for _ in range(warmup):
                for image in singles[:warmup_images]:
                    base.predict_one(image)
            from gfnet.flops import count_macs

            x = torch.zeros(1, 3, net.image_size, net.image_size)
            result.backbone = {"accuracy": float(backbone_accuracy), "macs": float(count_macs(backbone.eval(), x)),
                               **latency_stats(_time_images(base.predict_one, singles, rounds))}
        return result
    finally:
        torch.set_num_threads(previous_threads)
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
