"""``gfnet-bench gpucheck``: one command that proves gfnet's GPU paths on a CUDA machine, within a time budget,
leaving every finished result on disk whatever happens.

A lent GPU gives a few minutes; the check turns them into results:

- the checks run in priority order (kernels, engine, training, compilation, then the quick benchmark suites), each
  with its own deadline, in a worker process: a check that crashes the process (a native abort, an illegal address)
  or runs past its deadline costs that check only (the worker is replaced); compilation, NCCL and the cuda tests get
  a fresh worker of their own;
- ``--budget-s`` bounds the whole run: a check whose estimated time no longer fits is skipped with that reason;
- ``DIR/gpucheck.json`` and ``DIR/gpucheck.md`` are rewritten atomically before and after every check (the planned
  checks listed as pending, the one in progress as running), so that a time limit, a hang or a kill leaves every
  finished result readable; SIGTERM records the interrupted check before exiting;
- nothing fails for what the machine lacks: without DALI, pytest or a second GPU, those checks skip with the reason.

``--dry-run`` runs the same checks on the CPU with their CPU stand-ins (Triton interpreted; the engine's CUDA graphs
emulated by gfnet.bench.standins, which refuses a capture where a real one fails); what only a GPU can show skips
with the reason.

    gfnet-bench gpucheck [--out DIR] [--budget-s S] [--dry-run] [--no-bench] [--only NAME ...] [--list]

Without --out the report goes to bench/results/gpucheck_<card> in the source checkout.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

__all__ = ["Check", "CheckResult", "CHECKS", "DEFAULT_BUDGET_S", "DEFAULT_DRY_BUDGET_S", "default_out", "main", "plan",
           "run_plan", "run_tied"]

#: Fitted to a 10-minute call that also installs gfnet first (`pip install --no-build-isolation --no-deps -e .`: the
#: C++ build, about a minute on a 16-core machine), with a margin.
DEFAULT_BUDGET_S = 480.0
#: The dry run's (CI runs it on 2 cores): the checks first, then the benchmark suites while it lasts.
DEFAULT_DRY_BUDGET_S = 240.0
#: Kept back from the budget for replacing a worker and writing the report.
RESERVE_S = 8.0
#: The longest a worker may take to start (import torch and gfnet, initialise the device).
WORKER_START_S = 120.0


class Skip(Exception):
    """Raised by a check that cannot run here; the message is the reason."""


@dataclass
class CheckResult:
    name: str
    status: str  # "passed", "failed", "skipped", and in a report written mid-run "pending" or "running"
    reason: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    group: str = ""
    estimate_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of the worker's threads during the check (on a shared machine, wall time is not)


@dataclass
class Context:
    """What every check gets: the device to run on, whether this is the CPU dry run, the output folder."""

    device: object
    dry_run: bool
    out_dir: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def need_cuda(self, what: str) -> None:
        if not self.cuda:
            raise Skip(f"{what} needs a CUDA GPU (dry run on the CPU)")

    def graphs(self, **kwargs):
        """The engine's CUDA graphs: the real ones on a GPU, the CPU stand-in in the dry run."""
        if self.cuda:
            return contextlib.nullcontext(None)
        from gfnet.bench.standins import emulated_graphs

        return emulated_graphs(**kwargs)


@dataclass(frozen=True)
class Check:
    """One check: ``estimate_s`` is the time it is expected to take on one H100 with its GPU sizes (a planning
    figure: it decides whether the check still fits the budget, and its deadline is a multiple of it); ``fresh``:
    run in a worker of its own (compilation caches, process groups, the test runner)."""

    name: str
    fn: Callable[[Context], dict]
    group: str
    estimate_s: float
    fresh: bool = False
    deadline: Optional[float] = None  # seconds; default from the estimate

    @property
    def deadline_s(self) -> float:
        return self.deadline if self.deadline is not None else max(2.5 * self.estimate_s, self.estimate_s + 30.0)

    def target(self) -> Optional[str]:
        """How a worker finds the function: None for the checks of this module (looked up by name), else
        ``module:qualname`` (checks defined elsewhere, e.g. by the tests)."""
        if CHECKS.get(self.name) is self:
            return None
        return f"{self.fn.__module__}:{self.fn.__qualname__}"


# ------------------------------------------------------------------------------------------------ helpers

def _images(n, size, dtype, layout, device, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    else:
        x = torch.rand((n, 3, size, size), generator=g).to(dtype)
    x = x.to(device)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "hwc":
        return x.permute(0, 2, 3, 1).contiguous()
    if layout == "nhwc_view":  # DALI's uint8 batches: an NCHW view of NHWC memory
        return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    if layout == "strided":  # every other row and column of a bigger buffer: really non-contiguous
        big = torch.zeros((n, 3, 2 * size, 2 * size + 1), dtype=x.dtype, device=device)
        big[:, :, ::2, 1::2] = x
        return big[:, :, ::2, 1::2]
    return x


def _tiny_net(arch="resnet10t", T=3, patch=32, classes=10, seed=0, classifier=None):
    import torch

    import gfnet
    torch.manual_seed(seed)
    net = gfnet.build_model(arch, patch_size=patch, T=T, num_classes=classes, classifier=classifier).eval()
    with torch.no_grad():  # sharper outputs: max probabilities spread over (0, 1)
        for module in net.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features == classes:
                module.weight.mul_(25.0)
    return net


def _engine_sizes(ctx):
    """(images, image size, batch) of the engine checks."""
    return (24, 40, 4) if ctx.dry_run else (256, 96, 32)


def _simulate(net, images, batch, dtype=None, shares=(0.3, 0.3)):
    """The post-hoc simulation the engine must equal: (thresholds, max-prob probs Tensor[T, N, C] on the CPU, exit
    steps, predictions), with thresholds in the widest gaps between confidences."""
    from gfnet import budget
    reference = net.anytime_predict(images, batch_size=batch, dtype=dtype)
    probs = reference.probs.float().cpu()
    thresholds, margin = budget.separated_thresholds(budget.confidences(probs)[0], shares)
    steps = budget.exit_steps(probs, thresholds)
    preds = reference.preds.cpu().gather(0, steps.view(1, -1)).squeeze(0)
    return thresholds, probs, steps, preds, margin


def _compare(key, out, probs, thresholds, steps, preds, exact: bool) -> dict:
    """A budgeted run against the simulation: image by image in fp32 (``exact``), else outside the ambiguity band
    of the budget suite (confidences that close to a threshold may fall on either side)."""
    from gfnet.bench.bench_budget import check_exits
    if exact:
        if not (__import__("torch").equal(out.exit_step, steps) and __import__("torch").equal(out.preds, preds)):
            bad = int(((out.exit_step != steps) | (out.preds != preds)).sum())
            raise AssertionError(f"{key}: {bad} of {steps.numel()} images exit or predict differently from the "
                                 "post-hoc simulation")
        return {"agree": 1.0}
    return {"agree": round(check_exits(key, out, probs, thresholds), 4)}


def _full_batches(out) -> int:
    return int(out.step_batches.sum()) - int(out.partial_batches)


@contextlib.contextmanager
def _no_capture_failures():
    """Turns the engine's 'CUDA graph capture ... failed' warning into a failure of the check."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    failed = [str(w.message) for w in caught if "capture" in str(w.message)]
    if failed:
        raise AssertionError("a CUDA graph capture failed: " + failed[0])


def _graphs_ran(key, out, stream_warm_up: bool = False) -> None:
    """Every full batch replayed its step's graph; a loader's stream: all but at most one per step (each step's
    first full batch runs eagerly, warming it up for its capture)."""
    full = _full_batches(out)
    eager = full - int(out.graph_batches.sum())
    allowed = int(out.step_batches.numel()) if stream_warm_up else 0
    if eager > allowed or (full > 0 and not bool(out.cuda_graphs[0])):
        raise AssertionError(f"{key}: CUDA graphs replayed {out.graph_batches.tolist()} batches per step; "
                             f"{eager} of {full} full batches ran eagerly (at most {allowed} may)")


# ------------------------------------------------------------------------------------------------ kernels

def check_kernels(ctx: Context) -> dict:
    """Every kernel against its reference: output dtypes, input layouts and dtypes."""
    import torch

    from gfnet import ops
    from gfnet.config import IMAGENET_MEAN as M
    from gfnet.config import IMAGENET_STD as S
    size, n = (32, 2) if ctx.dry_run else (224, 64)
    cases = 0
    tol = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (2 ** -7, 2 ** -7), torch.float16: (2 ** -10, 2 ** -10)}
    layouts = ((torch.uint8, "nchw"), (torch.uint8, "hwc"), (torch.float32, "channels_last"),
               (torch.float32, "strided"), (torch.bfloat16, "nchw"))
    out_dtypes = (torch.float32, torch.bfloat16) if ctx.dry_run else (torch.float32, torch.bfloat16, torch.float16)
    for in_dtype, layout in layouts:
        images = _images(n, size, in_dtype, layout, ctx.device, seed=cases)
        actions = torch.rand(n, 2, generator=torch.Generator().manual_seed(cases)).to(ctx.device)
        for out_dtype in out_dtypes:
            norm = dict(mean=M, std=S, out_dtype=out_dtype)
            got = ops.focus_crop(images, actions, size // 4, backend="triton", **norm)
            want = ops.focus_crop(images, actions, size // 4, backend="torch", **norm)
            if not torch.equal(got, want):
                raise AssertionError(f"focus_crop {in_dtype} {layout} -> {out_dtype}: not bit-identical, max diff "
                                     f"{(got.float() - want.float()).abs().max().item()}")
            atol, rtol = tol[out_dtype]
            for mode in ("bicubic", "bilinear"):
                got = ops.glance_resize(images, size // 5, mode=mode, backend="triton", **norm)
                want = ops.glance_resize(images, size // 5, mode=mode, backend="torch", **norm)
                torch.testing.assert_close(got, want, atol=atol, rtol=rtol,
                                           msg=lambda m: f"glance_resize {mode} {in_dtype} {layout} -> "
                                                         f"{out_dtype}: {m}")
            got = ops.focus_crop_bilinear(images, actions, size // 6, scale=0.8, backend="triton", **norm)
            want = ops.focus_crop_bilinear(images, actions, size // 6, scale=0.8, backend="torch", **norm)
            # grid_sample derives the sample position from a normalised grid, ((g + 1) / 2) * (S - 1), which
            # rounds differently from our pixel-space position: ~S * 2^-24 pixels, times a noise image's
            # slope of up to 1 / (255 * 0.225) per level-pixel... ~4 normalised units per pixel.
            atol = max(atol, 8.0 * size * 2.0 ** -24 * 4.4)
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol,
                                       msg=lambda m: f"focus_crop_bilinear {in_dtype} {layout} -> {out_dtype}: {m}")
            cases += 1
    return {"cases": cases, "image_size": size, "batch": n}


def check_uint8_division(ctx: Context) -> dict:
    """The reference's x / 255 equals the kernels' correctly rounded division on this device (ATen turns
    division by a Python scalar into a multiplication on CUDA)."""
    import torch

    from gfnet import ops
    values = torch.arange(256, dtype=torch.uint8, device=ctx.device).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    images = values.contiguous()
    actions = torch.zeros(1, 2, device=ctx.device)
    got = ops.focus_crop(images, actions, 16, backend="triton")
    want = ops.focus_crop(images, actions, 16, backend="torch")
    on_cpu = ops.focus_crop(images.cpu(), actions.cpu(), 16, backend="torch")
    if not torch.equal(got, want) or not torch.equal(want.cpu(), on_cpu):
        raise AssertionError("x / 255 differs between the kernel, the reference on this device and on the CPU: "
                             f"{int((got != want).sum())} and {int((want.cpu() != on_cpu).sum())} of 768 values")
    return {"values": 256}


def check_nan(ctx: Context) -> dict:
    """A NaN pixel stays NaN through every kernel and output dtype (canonical NaN bits included)."""
    import torch

    from gfnet import ops
    images = torch.rand(2, 3, 12, 12)
    bits = images.view(torch.int32)
    bits[0, 1, 3, 4] = 0x7FFFFFFF
    bits[1, 2, 6, 7] = -1
    bits[1, 0, 0, 0] = 0x7F800001
    images = images.to(ctx.device)
    actions = torch.tensor([[0.0, 0.3], [0.7, 0.9]], device=ctx.device)
    checked = 0
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name, call in (
                ("focus_crop", lambda b: ops.focus_crop(images, actions, 8, out_dtype=out_dtype, backend=b)),
                ("glance_resize", lambda b: ops.glance_resize(images, 7, out_dtype=out_dtype, backend=b)),
                ("focus_crop_bilinear",
                 lambda b: ops.focus_crop_bilinear(images, actions, 6, out_dtype=out_dtype, backend=b))):
            got, want = call("triton"), call("torch")
            if not want.isnan().any() or not torch.equal(got.isnan(), want.isnan()):
                raise AssertionError(f"{name} -> {out_dtype}: NaN pattern differs from the reference")
            checked += 1
    return {"cases": checked}


def check_bilinear_gradients(ctx: Context) -> dict:
    """gradcheck of the Triton backward (float64) and its report to torch.use_deterministic_algorithms."""
    import torch

    from gfnet import ops
    images = _images(2, 9, torch.float64, "nchw", ctx.device).requires_grad_()
    centers = torch.tensor([[0.31, 0.62], [0.55, 0.47]], dtype=torch.float64, device=ctx.device,
                           requires_grad=True)
    # fast_mode: a random projection of the Jacobian (a few evaluations instead of one per input element)
    ok = torch.autograd.gradcheck(lambda x, c: ops.focus_crop_bilinear(x, c, 4, scale=0.9, backend="triton"),
                                  (images, centers), eps=1e-6, atol=1e-6, fast_mode=True)
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        out = ops.focus_crop_bilinear(images, centers, 4, backend="triton")
        try:
            out.sum().backward()
        except RuntimeError as err:
            if "deterministic" not in str(err):
                raise
        else:
            raise AssertionError("the Triton backward ran under use_deterministic_algorithms(True) without a word")
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    return {"gradcheck": bool(ok)}


def check_channel_stride(ctx: Context) -> dict:
    """A planar batch (one [3, N, H, W] buffer seen as NCHW) whose channel stride passes 2^30 elements, so that
    channel 2's offset passes 2^31: every kernel against its reference on a dense copy of some images. The dry run
    maps a 2 GiB buffer lazily (only the pixels read are touched) and interprets the kernels."""
    import torch

    from gfnet import ops
    from gfnet.config import IMAGENET_MEAN as M
    from gfnet.config import IMAGENET_STD as S
    if ctx.dry_run:
        if platform.system() != "Linux":
            raise Skip("the dry run's 2 GiB buffer relies on Linux's lazy mapping")
        size, n = 24, 1
        stride = 2 ** 30 + 64
        storage = torch.empty(2 * stride + size * size, dtype=torch.uint8)
        planar = storage.as_strided((n, 3, size, size), (size * size, stride, size, 1))
        planar.copy_(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8))
        picked = [0]
    else:
        size = 128
        n = 2 ** 30 // (size * size) + 8  # N * H * W > 2^30
        buffer = torch.randint(0, 256, (3, n, size, size), dtype=torch.uint8, device=ctx.device)
        planar = buffer.permute(1, 0, 2, 3)
        picked = [0, 1, n - 2, n - 1]
    dense = planar[picked].contiguous()
    actions = torch.rand(n, 2, generator=torch.Generator().manual_seed(3)).to(ctx.device)
    worst = {}
    calls = {
        "focus_crop": lambda x, a, b: ops.focus_crop(x, a, size // 2, mean=M, std=S, backend=b, validate=False),
        "glance_resize": lambda x, a, b: ops.glance_resize(x, size // 2, mean=M, std=S, backend=b),
        "focus_crop_bilinear": lambda x, a, b: ops.focus_crop_bilinear(x, a, size // 2, scale=0.9, mean=M, std=S,
                                                                       backend=b, validate=False),
    }
    for name, call in calls.items():
        got = call(planar, actions, "triton")[picked]
        want = call(dense, actions[picked], "torch")
        worst[name] = float((got - want).abs().max())
        del got
        if worst[name] > 1e-4:
            raise AssertionError(f"{name} on a planar batch with channel stride {planar.stride(1)}: differs from the "
                                 f"reference by {worst[name]:.3g}")
    return {"channel_stride": planar.stride(1), "batch": n, "max_diff": worst}


def check_large_batch(ctx: Context) -> dict:
    """A batch past 2^31 bytes (16,500 uint8 HWC images of 224^2): the last samples' crops and glances equal the
    reference's."""
    import torch

    from gfnet import ops
    n, size = (8, 64) if ctx.dry_run else (16500, 224)
    big = _images(n, size, torch.uint8, "hwc", ctx.device) if ctx.dry_run else \
        torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, device=ctx.device)
    actions = torch.rand(n, 2, device=ctx.device)
    got = ops.focus_crop(big, actions, 32, backend="triton")[-3:]
    if not torch.equal(got, ops.focus_crop(big[-3:], actions[-3:], 32, backend="torch")):
        raise AssertionError(f"focus_crop on {n} images: the last samples differ from the reference")
    got = ops.glance_resize(big, 32, mode="bilinear", backend="triton")[-3:]
    torch.testing.assert_close(got, ops.glance_resize(big[-3:], 32, mode="bilinear", backend="torch"),
                               atol=2e-5, rtol=1e-5)
    return {"batch": n, "bytes": big.numel()}


def check_ptx_division(ctx: Context) -> dict:
    """This machine's Triton compiles every kernel variant for its own GPU (sm_80 and sm_90 besides on a GPU)
    with IEEE division (div.rn.f32, never div.full.f32)."""
    from gfnet.bench.kernel_compile import check_division, run_isolated
    if ctx.cuda:
        import torch
        major, minor = torch.cuda.get_device_capability(ctx.device)
        archs = sorted({10 * major + minor, 80, 90})
    else:
        archs = [90]
    results = run_isolated(archs, timeout=600, preexec_fn=_die_with_parent)
    failed = {k: v["error"] for k, v in results.items() if not v["ok"]}
    if failed:
        raise AssertionError(f"{len(failed)} kernel variant(s) do not compile: " + json.dumps(failed)[:2000])
    bad = check_division(results)
    if bad:
        raise AssertionError("; ".join(bad[:5]))
    return {"archs": archs, "variants": len(results)}


# ------------------------------------------------------------------------------------------------ engine

def check_budgeted_fp32(ctx: Context) -> dict:
    """Budgeted inference under CUDA graphs equals the post-hoc simulation image by image (fp32, uint8 HWC and
    float NCHW input), every full batch replaying its step's graph."""
    import torch

    from gfnet.device import gpu_settings
    from gfnet.engine import budgeted_predict
    net = _tiny_net(seed=1).to(ctx.device)
    n, size, batch = _engine_sizes(ctx)
    results = {}
    with gpu_settings(cudnn_benchmark=False):  # one convolution algorithm per shape in both runs: exact
        for in_dtype, layout in ((torch.uint8, "hwc"), (torch.float32, "nchw")):
            images = _images(n, size, in_dtype, layout, ctx.device, seed=7)
            thresholds, probs, steps, preds, margin = _simulate(net, images, batch)
            with ctx.graphs(), _no_capture_failures():
                out = budgeted_predict(net, images, thresholds, batch_size=batch, flops=[1.0, 2.0, 3.0])
            key = f"{str(in_dtype).replace('torch.', '')}/{layout}"
            results[key] = dict(_compare(key, out, probs, thresholds, steps, preds, exact=True),
                                graph_batches=out.graph_batches.tolist(), margin=margin)
            _graphs_ran(key, out)
    return results


def check_budgeted_amp(ctx: Context) -> dict:
    """Budgeted inference under CUDA graphs in bf16 (and fp16 on a GPU) against the simulation of the same
    precision, outside the budget suite's ambiguity band."""
    from gfnet.engine import budgeted_predict
    net = _tiny_net(seed=2).to(ctx.device)
    n, size, batch = _engine_sizes(ctx)
    import torch
    images = _images(n, size, torch.uint8, "hwc", ctx.device, seed=8)
    results = {}
    for dtype in ("bf16", "fp16") if ctx.cuda else ("bf16",):
        thresholds, probs, steps, preds, margin = _simulate(net, images, batch, dtype=dtype)
        with ctx.graphs(), _no_capture_failures():
            out = budgeted_predict(net, images, thresholds, batch_size=batch, dtype=dtype, flops=[1.0, 2.0, 3.0])
        results[dtype] = dict(_compare(dtype, out, probs, thresholds, steps, preds, exact=False),
                              graph_batches=out.graph_batches.tolist())
        _graphs_ran(dtype, out)
    return results


def check_engine_loader(ctx: Context) -> dict:
    """A loader's stream (pageable host batches with labels; cuDNN's benchmark mode on, as the commands run):
    every step runs eagerly once at the full batch, then captures and replays; no capture fails; exits and
    predictions as the simulation's."""
    import torch

    from gfnet.device import gpu_settings
    from gfnet.engine import budgeted_predict
    net = _tiny_net(seed=3).to(ctx.device)
    n, size, batch = _engine_sizes(ctx)
    host = _images(n, size, torch.uint8, "nhwc_view", "cpu", seed=9)
    labels = torch.arange(n) % 10
    with gpu_settings(cudnn_benchmark=True):
        thresholds, probs, steps, preds, _ = _simulate(net, host.to(ctx.device), batch, shares=(0.25, 0.25))
        batches = [(host[i:i + batch], labels[i:i + batch]) for i in range(0, n, batch)]
        with ctx.graphs(first_sight=True), _no_capture_failures():
            out = budgeted_predict(net, iter(batches), thresholds, batch_size=batch, flops=[1.0, 2.0, 3.0])
    details = _compare("loader", out, probs, thresholds, steps, preds, exact=False)
    if not torch.equal(out.targets, labels):
        raise AssertionError("the labels came back out of order")
    _graphs_ran("loader", out, stream_warm_up=True)
    return dict(details, graph_batches=out.graph_batches.tolist(), step_batches=out.step_batches.tolist())


def check_dali_layout(ctx: Context) -> dict:
    """DALI's uint8 layout (an NCHW view of NHWC memory) through the engine under graphs: the slot rows keep
    that layout; exits and predictions equal the simulation's."""
    import torch

    from gfnet.device import gpu_settings
    from gfnet.engine import budgeted_predict
    net = _tiny_net(seed=4).to(ctx.device)
    n, size, batch = _engine_sizes(ctx)
    images = _images(n, size, torch.uint8, "nhwc_view", ctx.device, seed=10)
    with gpu_settings(cudnn_benchmark=False):
        thresholds, probs, steps, preds, _ = _simulate(net, images, batch)
        with ctx.graphs(), _no_capture_failures():
            out = budgeted_predict(net, images, thresholds, batch_size=batch, flops=[1.0, 2.0, 3.0])
    plans = list(net.__dict__["_budgeted_plans"].values())
    if not plans[-1].store.images.is_contiguous(memory_format=torch.channels_last):
        raise AssertionError("the slot rows did not keep the NHWC memory of the stream")
    _graphs_ran("nhwc", out)
    return _compare("nhwc", out, probs, thresholds, steps, preds, exact=True)


def check_capture_with_thread(ctx: Context) -> dict:
    """Capture while another thread keeps the device busy (as DALI's threads do): thread-local capture lets it,
    and the results stay exact."""
    import torch

    from gfnet.device import gpu_settings
    from gfnet.engine import budgeted_predict
    net = _tiny_net(seed=5).to(ctx.device)
    n, size, batch = _engine_sizes(ctx)
    images = _images(n, size, torch.uint8, "hwc", ctx.device, seed=11)
    stop = threading.Event()
    launched = [0]

    def busy():
        stream = torch.cuda.Stream(ctx.device) if ctx.cuda else None
        a = torch.randn(256, 256, device=ctx.device)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            while not stop.is_set():
                a = (a @ a).clamp_(-1, 1)
                launched[0] += 1
                if not ctx.cuda:
                    time.sleep(0.001)
    with gpu_settings(cudnn_benchmark=False):
        thresholds, probs, steps, preds, _ = _simulate(net, images, batch)
        worker = threading.Thread(target=busy, daemon=True)
        worker.start()
        try:
            with ctx.graphs(), _no_capture_failures():
                out = budgeted_predict(net, images, thresholds, batch_size=batch, flops=[1.0, 2.0, 3.0])
        finally:
            stop.set()
            worker.join(30)
    _graphs_ran("with a busy thread", out)
    return dict(_compare("with a busy thread", out, probs, thresholds, steps, preds, exact=True),
                other_thread_ops=launched[0])


def check_plan_reload(ctx: Context) -> dict:
    """Weights loaded in place (load_state_dict) keep the plan and its graphs, which then compute with the new
    weights; a model whose tensors were replaced gets a new plan."""
    import torch

    from gfnet.device import gpu_settings
    from gfnet.engine import budgeted_predict
    net = _tiny_net(seed=6).to(ctx.device)
    other = _tiny_net(seed=7).to(ctx.device)
    n, size, batch = _engine_sizes(ctx)
    images = _images(n, size, torch.uint8, "hwc", ctx.device, seed=12)
    with gpu_settings(cudnn_benchmark=False), ctx.graphs():
        thresholds, *_ = _simulate(net, images, batch)
        budgeted_predict(net, images, thresholds, batch_size=batch, flops=[1.0, 2.0, 3.0])
        (plan,) = net.__dict__["_budgeted_plans"].values()
        net.load_state_dict(other.state_dict())
        thresholds, probs, steps, preds, _ = _simulate(net, images, batch)
        with _no_capture_failures():
            out = budgeted_predict(net, images, thresholds, batch_size=batch, flops=[1.0, 2.0, 3.0])
        if list(net.__dict__["_budgeted_plans"].values()) != [plan]:
            raise AssertionError("weights loaded in place made a new plan")
        details = _compare("after reload", out, probs, thresholds, steps, preds, exact=True)
        net.to(torch.float64).to(torch.float32)  # new tensors: a new plan
        budgeted_predict(net, images[:batch], thresholds, batch_size=batch, flops=[1.0, 2.0, 3.0])
        if len(net.__dict__["_budgeted_plans"]) != 2:
            raise AssertionError("a model with replaced tensors reused the old plan")
    return dict(details, graph_batches=out.graph_batches.tolist())


def check_plan_memory(ctx: Context) -> dict:
    """The memory a kept plan holds (slot rows, state rows, the graphs' pool) at batch 64, and that
    gfnet.engine.release_budgeted gives all of it back. A first plan is made and released before measuring: what
    the process keeps for every later plan (this thread's capture stream with its cuBLAS workspace, compiled
    kernels, kernel parameters) is reported apart; a second plan must then leave nothing behind (a capture stream
    per plan would leave a cuBLAS workspace each time)."""
    import weakref

    import torch

    from gfnet.engine import prepare_budgeted, release_budgeted
    net = _tiny_net(seed=8).to(ctx.device)
    size = 40 if ctx.dry_run else 224
    batch = 4 if ctx.dry_run else 64
    example = _images(1, size, torch.uint8, "hwc", ctx.device)

    def allocated():
        gc.collect()
        if not ctx.cuda:
            return 0, 0
        torch.cuda.synchronize(ctx.device)
        return torch.cuda.memory_allocated(ctx.device), torch.cuda.memory_reserved(ctx.device)

    start = allocated()
    with ctx.graphs():  # the first plan: what the process keeps afterwards is not the plan's
        prepare_budgeted(net, example, batch_size=batch)
    release_budgeted(net)
    base = allocated()
    with ctx.graphs():
        prepare_budgeted(net, example, batch_size=batch)
    (plan,) = net.__dict__["_budgeted_plans"].values()
    store = plan.store
    rows = sum(t.numel() * t.element_size() for t in (store.images, store.fc_hidden, store.policy_hidden,
                                                      store.feature_map) if t is not None)
    held = allocated()
    probe = weakref.ref(store.images)
    del plan, store
    if release_budgeted(net) != 1:
        raise AssertionError("release_budgeted did not report the one kept plan")
    left = allocated()
    if probe() is not None:
        raise AssertionError("release_budgeted left the slot rows alive")
    details = {"batch": batch, "image_size": size, "slot_and_state_rows_bytes": rows}
    if not ctx.cuda:
        return details
    held_bytes, left_bytes = held[0] - base[0], left[0] - base[0]
    if held_bytes < rows:
        raise AssertionError(f"the plan holds {held_bytes} bytes of device memory, less than its rows ({rows})")
    if left_bytes > 2 ** 20:
        raise AssertionError(f"release_budgeted gave back {held_bytes - left_bytes} of {held_bytes} bytes: "
                             f"{left_bytes} stay allocated")
    return dict(details, device_bytes_held=held_bytes, device_bytes_reserved_growth=held[1] - base[1],
                device_bytes_after_release=left_bytes, kept_by_the_process_after_a_first_plan=base[0] - start[0])


def check_host_syncs(ctx: Context) -> dict:
    """The host never waits for the GPU where it need not: a pageable host tensor's copy (labels, slot numbers,
    input batches) returns while a queued kernel still runs; a blocking copy (the control) waits for it."""
    ctx.need_cuda("waiting for the GPU (a host synchronisation)")
    import torch

    from gfnet.device import to_device_async
    from gfnet.engine import _ImageStream, _SlotStore
    net = _tiny_net(seed=9).to(ctx.device)
    device = ctx.device
    cycles = int(2e8)

    def busy_for():
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.cuda._sleep(cycles)
        torch.cuda.synchronize(device)
        return time.perf_counter() - start

    def host_time(fn):
        torch.cuda.synchronize(device)
        torch.cuda._sleep(cycles)
        start = time.perf_counter()
        fn()
        spent = time.perf_counter() - start
        torch.cuda.synchronize(device)
        return spent
    busy = busy_for()
    labels = torch.arange(256)
    images = torch.randint(0, 256, (64, 3, 96, 96), dtype=torch.uint8)
    on_device = images.to(device)
    store = _SlotStore(128, image_rows=True)
    store.put_images(torch.arange(64), on_device)
    stream = _ImageStream(net, [(images, labels[:64]), (images, labels[:64])], device, 64)
    paths = {
        "labels (to_device_async)": lambda: to_device_async(labels, device),
        "slot numbers of an admit": lambda: store.put_images(torch.arange(64, 128), on_device),
        "input batch and its prefetch": lambda: stream.take(64),
    }
    for fn in paths.values():  # once untimed: pinned blocks and kernels exist afterwards
        fn()
    stream = _ImageStream(net, [(images, labels[:64]), (images, labels[:64])], device, 64)
    times = {name: host_time(fn) for name, fn in paths.items()}
    control = host_time(lambda: labels.to(device))
    if control < 0.5 * busy:
        raise AssertionError(f"inconclusive: a blocking copy took {control:.3f} s against {busy:.3f} s of queued work")
    slow = {k: round(v, 4) for k, v in times.items() if v > 0.5 * busy}
    if slow:
        raise AssertionError(f"these waited for the queued kernel ({busy:.3f} s): {slow}")
    return {"queued_s": round(busy, 4), "blocking_copy_s": round(control, 4),
            "host_s": {k: round(v, 5) for k, v in times.items()}}


def check_second_gpu(ctx: Context) -> dict:
    """cuda:1 while cuda:0 is current: kernels launch on the tensors' device; the engine captures for cuda:0, then
    for cuda:1 in the same process (each plan on a stream of its own device), and both equal their simulation."""
    ctx.need_cuda("the second-GPU check")
    import torch

    from gfnet import ops
    from gfnet.engine import budgeted_predict
    if torch.cuda.device_count() < 2:
        raise Skip(f"needs two GPUs; this machine has {torch.cuda.device_count()}")
    torch.cuda.set_device(0)
    images = _images(4, 64, torch.uint8, "hwc", torch.device("cuda", 1))
    actions = torch.rand(4, 2, device="cuda:1")
    got = ops.focus_crop(images, actions, 32)
    torch.cuda.synchronize(1)
    if not torch.equal(got, ops.focus_crop(images, actions, 32, backend="torch")):
        raise AssertionError("focus_crop on cuda:1 differs from the reference")
    n, size, batch = _engine_sizes(ctx)
    details = {}
    for index in (0, 1):
        device = torch.device("cuda", index)
        net = _tiny_net(seed=10).to(device)
        stream_images = _images(n, size, torch.uint8, "hwc", device, seed=13)
        thresholds, probs, steps, preds, _ = _simulate(net, stream_images, batch)
        with _no_capture_failures():
            out = budgeted_predict(net, stream_images, thresholds, batch_size=batch, flops=[1.0, 2.0, 3.0])
        _graphs_ran(str(device), out)
        details[str(device)] = _compare(str(device), out, probs, thresholds, steps, preds, exact=True)
    return dict(details, devices=torch.cuda.device_count())


# ------------------------------------------------------------------------------------------------ training

def check_trainer_amp(ctx: Context) -> dict:
    """Trainer steps in bf16 and fp16 (GradScaler) on a tiny model: finite losses, weights that move. fp16's
    GradScaler starts at a scale of 2^16 and skips the steps whose scaled gradients overflow (halving the scale
    each time): up to 10 steps are run until the weights move, and the steps it took are reported."""
    import torch

    from gfnet.train import Trainer, TrainOptions
    from gfnet.train.distributed import DistributedContext
    losses = {}
    for amp in ("bf16", "fp16") if ctx.cuda else ("bf16",):
        net = _tiny_net().to(ctx.device).train()
        trainer = Trainer(net, TrainOptions(stage=1, epochs=1, amp=amp), ctx=DistributedContext(device=ctx.device))
        images = _images(8, 64, torch.uint8, "hwc", ctx.device, seed=3)
        labels = torch.randint(0, 10, (8,), device=ctx.device)
        before = {k: v.clone() for k, v in net.fc.state_dict().items()}

        def moved():
            return any(not torch.equal(before[k], v) for k, v in net.fc.state_dict().items())
        values = []
        while len(values) < 2 or (not moved() and len(values) < 10):
            values.append(float(trainer.train_step(images, labels)["loss"]))
        if not all(math.isfinite(v) for v in values):
            raise AssertionError(f"{amp}: non-finite loss {values}")
        if not moved():
            raise AssertionError(f"{amp}: the classifier's weights did not change in {len(values)} steps")
        losses[amp] = {"losses": values, "scale": trainer.scaler.get_scale() if trainer.scaler.is_enabled() else None}
    return losses


def check_train_stages(ctx: Context) -> dict:
    """Stage 2 (PPO on the policy) and stage 3 (fine-tuning with the policy's actions) steps: finite losses, the
    stage's own weights move and the frozen ones do not."""
    import torch

    from gfnet.train import Trainer, TrainOptions
    from gfnet.train.distributed import DistributedContext
    amp = "bf16" if ctx.cuda else "none"
    images = _images(8, 64, torch.uint8, "hwc", ctx.device, seed=4)
    labels = torch.randint(0, 10, (8,), device=ctx.device)
    details = {}
    for stage, trained, frozen in ((2, "policy", "model"), (3, "model", "policy")):
        net = _tiny_net(seed=11).to(ctx.device)
        trainer = Trainer(net, TrainOptions(stage=stage, epochs=1, amp=amp, continue_policy=True),
                          ctx=DistributedContext(device=ctx.device))
        trainer._set_modes()
        before = {name: {k: v.clone() for k, v in getattr(net, name).state_dict().items()}
                  for name in (trained, frozen)}
        values = [float(trainer.train_step(images, labels)["loss"]) for _ in range(2)]
        if not all(math.isfinite(v) for v in values):
            raise AssertionError(f"stage {stage}: non-finite loss {values}")
        moved = {name: any(not torch.equal(before[name][k], v) for k, v in getattr(net, name).state_dict().items()
                           if v.is_floating_point() and "running" not in k)
                 for name in (trained, frozen)}
        if not moved[trained] or moved[frozen]:
            raise AssertionError(f"stage {stage}: weights moved {moved} (expected {trained} only)")
        details[f"stage{stage}"] = {"losses": values, "amp": amp}
    return details


def check_nccl(ctx: Context) -> dict:
    """The process group at world size 1 (NCCL on a GPU, gloo on the CPU): collectives, and a DistributedDataParallel
    training step of the objective gfnet-train wraps."""
    import socket

    import torch
    import torch.distributed as dist

    from gfnet.train.objective import SequenceObjective
    backend = "nccl" if ctx.cuda else "gloo"
    if ctx.cuda and not dist.is_nccl_available():
        raise Skip("this torch has no NCCL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    kwargs = {"device_id": ctx.device} if ctx.cuda else {}
    dist.init_process_group(backend, rank=0, world_size=1, **kwargs)
    try:
        x = torch.arange(4.0, device=ctx.device)
        dist.all_reduce(x)
        gathered = [None]
        dist.all_gather_object(gathered, {"rank": 0})
        net = _tiny_net().to(ctx.device).train()
        objective = SequenceObjective(net, 1.0, True, "bicubic", 0.1)
        ddp = torch.nn.parallel.DistributedDataParallel(objective, device_ids=[ctx.device] if ctx.cuda else None,
                                                        find_unused_parameters=True)
        images = _images(4, 64, torch.uint8, "hwc", ctx.device, seed=5)
        labels = torch.randint(0, 10, (4,), device=ctx.device)
        out = ddp(images, labels)
        loss = out[0] if isinstance(out, (tuple, list)) else out["loss"] if isinstance(out, dict) else out
        loss.backward()
        grads = sum(p.grad is not None for p in net.parameters())
    finally:
        dist.destroy_process_group()
    if x.tolist() != [0.0, 1.0, 2.0, 3.0] or gathered != [{"rank": 0}] or not grads:
        raise AssertionError(f"collectives or DDP gave wrong results ({x.tolist()}, {gathered}, {grads} grads)")
    return {"backend": backend, "parameters_with_grads": grads}


# ------------------------------------------------------------------------------------------------ compilation

def check_compile_ops(ctx: Context) -> dict:
    """torch.compile over the ops: inductor (and reduce-overhead, CUDA graphs, on a GPU) equals eager."""
    import torch

    from gfnet import ops
    from gfnet.config import IMAGENET_MEAN as M
    from gfnet.config import IMAGENET_STD as S

    def step(images, actions):
        glance = ops.glance_resize(images, 24, mean=M, std=S)
        patch = ops.focus_crop(images, actions, 20, mean=M, std=S, validate=False)
        soft = ops.focus_crop_bilinear(images, actions, 16, mean=M, std=S, validate=False)
        return glance.mean((1, 2, 3)) + patch.mean((1, 2, 3)) + soft.mean((1, 2, 3))

    images = _images(4, 48, torch.uint8, "hwc", ctx.device)
    actions = torch.rand(4, 2, device=ctx.device)
    want = step(images, actions)
    modes = ["default"] + (["reduce-overhead"] if ctx.cuda else [])
    for mode in modes:
        torch._dynamo.reset()
        compiled = torch.compile(step, backend="inductor", mode=mode, fullgraph=True)
        for _ in range(3):  # reduce-overhead records its graph on a later call
            got = compiled(images, actions)
        torch.testing.assert_close(got, want, msg=lambda m: f"torch.compile mode={mode}: {m}")
    return {"modes": modes}


def check_compiled_model(ctx: Context) -> dict:
    """net.compile() in bf16 under the engine's graphs: anytime close to eager; budgeted inference replays every
    step's graph with no capture failing (one autocast state: no recompilation inside a capture) and equals the
    simulation on the compiled model's own probabilities outside the ambiguity band; another stream's batch sizes
    compile nothing new. The dry run compiles with dynamo's eager backend (its guards, not inductor's code)."""
    import copy

    import torch
    from torch._dynamo.utils import counters

    from gfnet.engine import budgeted_predict
    torch._dynamo.reset()
    eager = _tiny_net(seed=12).to(ctx.device)
    net = copy.deepcopy(eager).compile(backend="eager" if ctx.dry_run else "inductor")
    n, size, batch = _engine_sizes(ctx)
    images = _images(n, size, torch.uint8, "hwc", ctx.device, seed=14)
    want = eager.anytime_predict(images, batch_size=batch, dtype="bf16")
    thresholds, probs, steps, preds, margin = _simulate(net, images, batch, dtype="bf16")
    # inductor fuses what eager rounds to bf16 after every op: the sharp outputs of the check's model (logits of
    # tens) move by a few tenths, so single probabilities may move by more than a tenth near a tie; on average
    # they must not, and the predictions must agree but for near-ties
    diff = (probs - want.probs.float().cpu()).abs()
    worst, mean = float(diff.max()), float(diff.mean())
    agree = float((probs.argmax(-1) == want.probs.float().cpu().argmax(-1)).float().mean())
    if mean > 0.01 or agree < 0.97:
        raise AssertionError(f"compiled bf16 anytime_predict differs from eager: mean probability difference "
                             f"{mean:.3g} (at most 0.01), predictions agree on {agree:.3f} (at least 0.97)")
    with ctx.graphs(first_sight=False), _no_capture_failures():
        out = budgeted_predict(net, images, thresholds, batch_size=batch, dtype="bf16", flops=[1.0, 2.0, 3.0])
        details = _compare("compiled bf16", out, probs, thresholds, steps, preds, exact=False)
        _graphs_ran("compiled bf16", out)
        graphs = counters["stats"]["unique_graphs"]
        budgeted_predict(net, images[: n - 5], thresholds, batch_size=batch, dtype="bf16", flops=[1.0, 2.0, 3.0])
    # the batch dimension is dynamic after the first stream's tail; a tail batch of one may still specialise once
    again = counters["stats"]["unique_graphs"] - graphs
    if again > 1:
        raise AssertionError(f"compiled budgeted_predict compiled {again} new graphs for another stream's batch sizes")
    return dict(details, graph_batches=out.graph_batches.tolist(), anytime_max_diff=worst, anytime_mean_diff=mean,
                anytime_agree=agree, recompiled=again)


def check_compiled_training(ctx: Context) -> dict:
    """A compiled bf16 training step against the eager one (the dry run compiles with dynamo's eager backend)."""
    import torch

    import gfnet.models.gfnet as model_module
    from gfnet.train import Trainer, TrainOptions
    from gfnet.train.distributed import DistributedContext
    torch._dynamo.reset()
    losses = {}
    labels = torch.arange(8, device=ctx.device) % 10
    images = _images(8, 64, torch.uint8, "hwc", ctx.device, seed=12)
    compile_method = model_module.GFNet.compile
    for use_compile in (False, True):
        model = _tiny_net("resnet10t", T=3, seed=5).to(ctx.device).train()
        if use_compile and ctx.dry_run:
            model.compile(backend="eager")
        trainer = Trainer(model, TrainOptions(stage=1, epochs=1, amp="bf16", compile=use_compile, seed=3),
                          ctx=DistributedContext(device=ctx.device))
        torch.manual_seed(7)
        losses["compiled" if use_compile else "eager"] = float(trainer.train_step(images, labels)["loss"])
    assert model_module.GFNet.compile is compile_method
    if abs(losses["compiled"] - losses["eager"]) > 0.05 * abs(losses["eager"]):
        raise AssertionError(f"compiled bf16 training step: loss {losses['compiled']} against eager {losses['eager']}")
    return {"bf16_step_loss": losses}


def check_reduce_overhead(ctx: Context) -> dict:
    """A model compiled with mode="reduce-overhead" (inductor's own CUDA graphs) keeps its graphs: the engine's
    stay off by default and are refused when asked for; its budgeted exits equal the simulation on its own
    probabilities outside the ambiguity band. The dry run checks the engine's decision (running such a model needs
    inductor's CUDA graphs)."""
    import torch

    from gfnet import engine
    from gfnet.engine import budgeted_predict
    torch._dynamo.reset()
    net = _tiny_net(seed=13).to(ctx.device).compile(mode="reduce-overhead")
    n, size, batch = _engine_sizes(ctx)
    images = _images(n, size, torch.uint8, "hwc", ctx.device, seed=15)
    with ctx.graphs():
        if engine._setup(net, images, batch, None, None, None, None, None)[2]:
            raise AssertionError("the engine would nest its CUDA graphs around inductor's")
        try:
            budgeted_predict(net, images, [0.5, 0.5, -1e8], batch_size=batch, cuda_graphs=True, flops=[1, 2, 3])
        except ValueError as err:
            if "graphs of their own" not in str(err):
                raise
        else:
            raise AssertionError("cuda_graphs=True was accepted for a reduce-overhead model")
        if ctx.dry_run:
            return {"engine_graphs": False, "run": "skipped in the dry run: inductor's CUDA graphs need a GPU"}
        thresholds, probs, steps, preds, _ = _simulate(net, images, batch)
        out = budgeted_predict(net, images, thresholds, batch_size=batch, flops=[1.0, 2.0, 3.0])
    if bool(out.cuda_graphs.any()):
        raise AssertionError("the engine replayed graphs of its own for a reduce-overhead model")
    return dict(_compare("reduce-overhead", out, probs, thresholds, steps, preds, exact=False), engine_graphs=False)


# ------------------------------------------------------------------------------------------------ the rest

def check_cuda_tests(ctx: Context) -> dict:
    """The tests marked ``cuda``, with compiled kernels (conftest leaves the interpreter off on a GPU machine)."""
    ctx.need_cuda("the cuda-marked tests")
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tests = os.path.join(root, "tests")
    if not os.path.isdir(tests):
        raise Skip(f"no tests/ folder beside the installed package ({tests}); run from a source checkout")
    if importlib.util.find_spec("pytest") is None:
        raise Skip("pytest is not installed (an install with --no-deps): the cuda tests' paths are checked by "
                   "kernels, budgeted_fp32, engine_loader and dali here")
    files = []  # only the files that hold cuda tests: collecting the others costs time and needs nothing here
    for name in sorted(os.listdir(tests)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(tests, name)) as fh:
                if "pytest.mark.cuda" in fh.read():
                    files.append(os.path.join(tests, name))
    if not files:
        raise Skip(f"no test in {tests} carries the cuda mark")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # addopts emptied: the project's pytest options name plugins (pytest-benchmark) that a bare install lacks
    proc = run_tied([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-o",
                     "addopts=-ra", *files], capture_output=True, text=True, env=env, cwd=root, timeout=3600)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    if proc.returncode != 0:
        raise AssertionError("cuda tests failed:\n" + "\n".join(tail))
    return {"summary": tail[-1] if tail else "", "files": [os.path.basename(f) for f in files]}


def _need_dali() -> None:
    import importlib.util
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        raise Skip("DALI is not installed (`pip install nvidia-dali-cuda130`)")


def check_dali(ctx: Context) -> dict:
    """DALI's GPU pipeline (nvJPEG decode) against its CPU pipeline on a small real-JPEG tree; in the dry run,
    DALI's CPU pipeline against the PIL (torchvision) one, through the same comparison."""
    _need_dali()
    from gfnet.data import make_loader, make_sample_tree
    with tempfile.TemporaryDirectory() as root:
        make_sample_tree(root, num_classes=2, train_per_class=2, val_per_class=4)
        kwargs = dict(train=False, batch_size=4, image_size=64, output="uint8")
        first = make_loader(root, backend="dali", device=ctx.device, **kwargs)
        second = make_loader(root, backend="dali" if ctx.cuda else "torchvision", device="cpu", **kwargs)
        a = [(x.cpu(), y.cpu()) for x, y in first]
        b = [(x.cpu(), y.cpu()) for x, y in second]
    if len(a) != len(b):
        raise AssertionError(f"{len(a)} and {len(b)} batches")
    import torch
    worst = 0
    for (xa, ya), (xb, yb) in zip(a, b):
        if not torch.equal(ya, yb):
            raise AssertionError("labels differ between the pipelines")
        worst = max(worst, int((xa.int() - xb.int()).abs().max()))
    # decoders (nvJPEG, libjpeg-turbo, PIL) and resize filters round differently: a few levels at most
    limit = 8 if ctx.cuda else 40
    if worst > limit:
        raise AssertionError(f"the two decodes differ by up to {worst} levels (limit {limit})")
    return {"batches": len(a), "max_level_difference": worst,
            "compared": "DALI GPU vs DALI CPU" if ctx.cuda else "DALI CPU vs PIL"}


def _bench_check(suite: str) -> Callable[[Context], dict]:
    def check(ctx: Context) -> dict:
        import importlib

        from gfnet.bench.rows import environment as stamp
        from gfnet.bench.rows import write_results
        from gfnet.device import gpu_settings
        if suite == "data":
            _need_dali()
        module = importlib.import_module(f"gfnet.bench.bench_{suite}")
        with gpu_settings(cudnn_benchmark=True):  # as gfnet-bench runs the suites
            rows = module.run(device=str(ctx.device), quick=True)
        env = stamp(ctx.device, note="gfnet-bench gpucheck, quick variant" + (" (dry run)" if ctx.dry_run else ""))
        paths = write_results(os.path.join(ctx.out_dir, "bench"), suite, env, rows,
                              getattr(module, "EXTRA_COLUMNS", ()), getattr(module, "NOTES", ""))
        return {"rows": len(rows), "file": os.path.relpath(paths["md"], ctx.out_dir),
                "ratios": {f"{r.case} / {r.provider}": round(r.ratio, 3) for r in rows}}
    check.__doc__ = f"The quick variant of the {suite} benchmark suite (tables written beside the report)."
    return check


#: The checks in priority order: what a lent GPU must prove first comes first.
CHECKS: dict = {c.name: c for c in (
    Check("kernels", check_kernels, "kernels", 25),
    Check("uint8_division", check_uint8_division, "kernels", 3),
    Check("nan", check_nan, "kernels", 8),
    Check("bilinear_gradients", check_bilinear_gradients, "kernels", 6),
    Check("channel_stride", check_channel_stride, "kernels", 8),
    Check("large_batch", check_large_batch, "kernels", 6),
    Check("budgeted_fp32", check_budgeted_fp32, "engine", 12),
    Check("budgeted_amp", check_budgeted_amp, "engine", 10),
    Check("engine_loader", check_engine_loader, "engine", 6),
    Check("dali_layout", check_dali_layout, "engine", 4),
    Check("capture_with_thread", check_capture_with_thread, "engine", 5),
    Check("plan_reload", check_plan_reload, "engine", 5),
    Check("plan_memory", check_plan_memory, "engine", 4),
    Check("host_syncs", check_host_syncs, "engine", 3),
    Check("second_gpu", check_second_gpu, "engine", 10),
    Check("trainer_amp", check_trainer_amp, "training", 8),
    Check("train_stages", check_train_stages, "training", 8),
    Check("nccl", check_nccl, "training", 10, fresh=True),
    Check("ptx_division", check_ptx_division, "compilation", 30),
    Check("compile_ops", check_compile_ops, "compilation", 25, fresh=True),
    Check("compiled_model", check_compiled_model, "compilation", 45, fresh=True),
    Check("reduce_overhead", check_reduce_overhead, "compilation", 35, fresh=True),
    Check("compiled_training", check_compiled_training, "compilation", 45, fresh=True),
    Check("dali", check_dali, "data", 10),
    Check("cuda_tests", check_cuda_tests, "tests", 45, fresh=True),
)}
#: The quick benchmark suites, last: they run while the budget lasts.
BENCH_SUITES = (("kernels", 30), ("budget", 40), ("anytime", 60), ("train", 45), ("data", 30))
for _suite, _estimate in BENCH_SUITES:
    CHECKS[f"bench_{_suite}"] = Check(f"bench_{_suite}", _bench_check(_suite), "bench", _estimate)


def plan(names=None, bench: bool = True) -> list:
    """The checks to run, in priority order."""
    chosen = [c for c in CHECKS.values() if (names is None or c.name in names) and (bench or c.group != "bench")]
    return chosen


# ------------------------------------------------------------------------------------------------ running

def environment(device) -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": "cpu (dry run)", "driver": None, "triton": None, "gpus": 0}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["gpus"] = torch.cuda.device_count()
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = "unknown"
    return env


def run_check(ctx: Context, check: Check) -> CheckResult:
    """One check in this process: passed, skipped (with the reason) or failed (with the error and traceback)."""
    start, cpu = time.perf_counter(), time.process_time()
    try:
        details = check.fn(ctx) or {}
        result = CheckResult(check.name, "passed", details=details)
    except Skip as skip:
        result = CheckResult(check.name, "skipped", reason=str(skip))
    except Exception as err:  # every failure is recorded; the report lists them all
        result = CheckResult(check.name, "failed", reason=f"{type(err).__name__}: {err}"[:4000],
                             details={"traceback": traceback.format_exc()[-4000:]})
    result.seconds = round(time.perf_counter() - start, 3)
    result.cpu_s = round(time.process_time() - cpu, 3)
    result.group, result.estimate_s = check.group, check.estimate_s
    return result


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this worker when the parent dies (a SIGKILLed gpucheck leaves no orphan
    holding the GPU)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_tied(command: list, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` for a check's own child process (the test runner, a compiler), which dies with the
    worker: a worker killed at its check's deadline leaves no child behind holding the GPU or the CPUs."""
    return subprocess.run(command, preexec_fn=_die_with_parent, **kwargs)


def _worker_main(conn, dry_run: bool, out_dir: str) -> None:
    """A worker process: receives check names, answers with their results, until told to stop."""
    _die_with_parent()
    if os.getppid() == 1:  # the parent died before the line above took effect
        return
    if sys.platform.startswith("linux"):
        # a spawned process inherits "spawn" as its default; the checks' DataLoaders expect Linux's own (fork)
        import multiprocessing
        multiprocessing.set_start_method("fork", force=True)
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors
    import torch
    if dry_run:
        # oneDNN builds its convolution kernels anew for every batch shape (seconds each on a small CPU), and the
        # engine checks meet many (partial batches): the native convolutions compute the same values
        torch.backends.mkldnn.enabled = False
        # tiny models are bound by per-op overhead, where one thread is as fast as two, and OpenMP's spinning
        # barriers make two threads crawl on a shared machine
        torch.set_num_threads(1)
    device = torch.device("cpu") if dry_run else torch.device("cuda", torch.cuda.current_device())
    ctx = Context(device, dry_run, out_dir)
    conn.send({"environment": dict(environment(device), worker_pid=os.getpid())})
    while True:
        try:
            order = conn.recv()
        except (EOFError, OSError):
            return
        if order is None:
            return
        if order["target"] is None:
            check = CHECKS[order["name"]]
        else:
            import importlib
            module, qualname = order["target"].split(":")
            fn = importlib.import_module(module)
            for part in qualname.split("."):
                fn = getattr(fn, part)
            check = Check(order["name"], fn, order["group"], order["estimate_s"])
        conn.send(asdict(run_check(ctx, check)))


class _Worker:
    """The parent's handle on one worker process."""

    def __init__(self, dry_run: bool, out_dir: str, timeout: float):
        import multiprocessing
        context = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA
        self.conn, child = context.Pipe()
        # not a daemon: checks start processes of their own (DataLoader workers); the parent always stops or kills
        # it, and on Linux the kernel kills it if the parent dies first
        self.process = context.Process(target=_worker_main, args=(child, dry_run, out_dir), daemon=False,
                                       name="gfnet-gpucheck-worker")
        self.process.start()
        child.close()
        self.used = 0
        if not self.conn.poll(timeout):
            self.kill()
            raise TimeoutError(f"the check worker did not start within {timeout:.0f} s")
        try:
            self.environment = self.conn.recv()["environment"]
        except (EOFError, OSError):
            code = self.process.exitcode
            self.kill()
            raise RuntimeError(f"the check worker died while starting (exit code {code})") from None

    def run(self, check: Check, deadline: float) -> dict:
        self.used += 1
        self.conn.send({"name": check.name, "target": check.target(), "group": check.group,
                        "estimate_s": check.estimate_s})
        if not self.conn.poll(deadline):
            self.kill()
            raise TimeoutError(f"exceeded its deadline of {deadline:.0f} s (the worker was killed)")
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            code = self.process.exitcode
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise RuntimeError(f"the worker process died during the check ({how}): a crash in native code") from None

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.process.join(10)
        except (OSError, BrokenPipeError):
            pass
        self.kill()


def _atomic_write(path: str, text: str) -> None:
    """The report files, through gfnet's one atomic writer (a kill never leaves half a table)."""
    from gfnet.atomic import atomic_write_text

    atomic_write_text(path, text)


def markdown(results: list, env: dict, budget_s: Optional[float] = None, elapsed_s: Optional[float] = None) -> str:
    lines = [f"# gfnet GPU check: {env.get('device')}", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, Triton {env.get('triton')}, driver "
             f"{env.get('driver')}, Python {env.get('python')}"
             + (f"; {elapsed_s:.0f} s of a {budget_s:.0f} s budget" if budget_s is not None else ""),
             "", "| check | group | status | seconds | reason / details |", "|---|---|---|---|---|"]
    for r in results:
        note = r.reason.splitlines()[0] if r.reason else json.dumps(r.details, default=str)[:200]
        lines.append(f"| {r.name} | {r.group} | {r.status} | {r.seconds:.1f} | {note.replace('|', '/')} |")
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "skipped", "pending", "running")}
    summary = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    if counts["pending"] or counts["running"]:
        summary += f", {counts['running']} running, {counts['pending']} pending (the run has not finished)"
    lines += ["", summary]
    return "\n".join(lines) + "\n"


class _Report:
    """gpucheck.json and gpucheck.md, rewritten atomically whenever a check starts or ends."""

    def __init__(self, out: str, checks: list, dry_run: bool, budget_s: float, started: float):
        self.out, self.dry_run, self.budget_s, self.started = out, dry_run, budget_s, started
        self.env: dict = {"device": "unknown (no worker started yet)"}
        self.results = [CheckResult(c.name, "pending", group=c.group, estimate_s=c.estimate_s) for c in checks]

    def set(self, index: int, result: CheckResult) -> None:
        self.results[index] = result
        self.write()

    def write(self, complete: bool = False) -> None:
        elapsed = time.monotonic() - self.started
        report = {"format": "gfnet-gpucheck/2", "environment": self.env, "dry_run": self.dry_run,
                  "budget_s": self.budget_s, "elapsed_s": round(elapsed, 1), "complete": complete,
                  "checks": [asdict(r) for r in self.results]}
        _atomic_write(os.path.join(self.out, "gpucheck.json"), json.dumps(report, indent=1, default=str) + "\n")
        _atomic_write(os.path.join(self.out, "gpucheck.md"), markdown(self.results, self.env, self.budget_s, elapsed))


def run_plan(checks: list, out: str, dry_run: bool, budget_s: float, log=print) -> _Report:
    """Run ``checks`` in order within ``budget_s`` seconds, in worker processes; returns the written report."""
    started = time.monotonic()
    report = _Report(out, checks, dry_run, budget_s, started)
    report.write()
    worker: Optional[_Worker] = None
    current = {"index": None, "start": 0.0}

    def interrupted(signum, frame):
        index = current["index"]
        if index is not None:
            spent = time.perf_counter() - current["start"]
            c = checks[index]
            report.results[index] = CheckResult(c.name, "failed", reason=f"interrupted by signal {signum} after "
                                                f"{spent:.0f} s", seconds=round(spent, 3), group=c.group,
                                                estimate_s=c.estimate_s)
        report.write()
        if worker is not None:
            worker.kill()
        os._exit(128 + signum)
    previous = {s: signal.signal(s, interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index, check in enumerate(checks):
            left = budget_s - (time.monotonic() - started) - RESERVE_S
            if left < check.estimate_s:
                report.set(index, CheckResult(check.name, "skipped", group=check.group, estimate_s=check.estimate_s,
                                              reason=f"budget: {max(left, 0):.0f} s left of --budget-s "
                                                     f"{budget_s:.0f}, this check takes about {check.estimate_s:.0f} "
                                                     f"s on a GPU (run it alone with --only {check.name})"))
                log(f"  skipped {check.name:28s}          budget")
                continue
            # the dry run's CPU is slower than a GPU at some checks (Triton interpreted): its deadlines are looser
            loose = dry_run and check.deadline is None
            own = max(4 * check.deadline_s, 240.0) if loose else check.deadline_s
            deadline = min(own, left)
            current.update(index=index, start=time.perf_counter())
            report.set(index, CheckResult(check.name, "running", group=check.group, estimate_s=check.estimate_s))
            try:
                if worker is not None and (check.fresh or not worker.process.is_alive()):
                    worker.stop()
                    worker = None
                cut = deadline < own  # whether the budget, rather than the check's own deadline, limits this phase
                if worker is None:
                    start_limit = min(WORKER_START_S, max(left, 1.0))
                    cut = start_limit < WORKER_START_S
                    worker = _Worker(dry_run, out, start_limit)
                    report.env = worker.environment
                    deadline = min(own, budget_s - (time.monotonic() - started) - RESERVE_S)
                    cut = deadline < own
                result = CheckResult(**worker.run(check, max(deadline, 1.0)))
            except TimeoutError as err:
                if cut:  # stopped by the budget, not by its own deadline: no finding about the check
                    result = CheckResult(check.name, "skipped", group=check.group, estimate_s=check.estimate_s,
                                         reason=f"budget: --budget-s {budget_s:.0f} ran out during the check "
                                                f"({err}; its own deadline is {own:.0f} s; run it alone with "
                                                f"--only {check.name})")
                else:
                    result = CheckResult(check.name, "failed", reason=str(err), group=check.group,
                                         estimate_s=check.estimate_s)
                worker = None
            except RuntimeError as err:
                result = CheckResult(check.name, "failed", reason=str(err), group=check.group,
                                     estimate_s=check.estimate_s)
                worker = None
            result.seconds = round(time.perf_counter() - current["start"], 3)
            current["index"] = None
            report.set(index, result)
            first = result.reason.splitlines()[0] if result.reason else ""
            log(f"  {result.status:7s} {check.name:22s} {result.seconds:7.1f}s ({result.cpu_s:6.1f}s CPU)  {first}")
            if worker is not None and (result.status == "failed" or check.fresh):
                worker.stop()  # a failed check may leave the device in a bad state: the next one starts clean
                worker = None
        report.write(complete=True)
    finally:
        if worker is not None:
            worker.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return report


def _card_name() -> str:
    """The name of the GPU the workers will use (torch's current device); the parent runs no CUDA work itself."""
    import torch
    return torch.cuda.get_device_name(torch.cuda.current_device())


def default_out(card: str) -> str:
    """Where the report goes without --out: ``bench/results/gpucheck_<card>`` in the source checkout this module
    belongs to (installed with -e), else ``./gpucheck_<card>``; the card's name in lower case, words joined by _."""
    slug = "_".join("".join(ch if ch.isalnum() else " " for ch in card.lower()).split()) or "unknown"
    results = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")
    return os.path.join(results if os.path.isdir(results) else os.getcwd(), f"gpucheck_{slug}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gfnet-bench gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for gpucheck.json, gpucheck.md and the benchmark tables (default: "
                        "bench/results/gpucheck_<card> in the source checkout, e.g. gpucheck_nvidia_h100_80gb_hbm3; "
                        "gpucheck_cpu_dry_run for --dry-run)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"seconds the whole check may take (default {DEFAULT_BUDGET_S:.0f}: an install and the "
                             f"check in a 10-minute call; {DEFAULT_DRY_BUDGET_S:.0f} for --dry-run); checks that no "
                             "longer fit are skipped with that reason")
    parser.add_argument("--dry-run", action="store_true",
                        help="run on the CPU with the GPU paths' CPU stand-ins (Triton interpreted, CUDA graphs "
                             "emulated); what only a GPU shows is skipped with the reason")
    parser.add_argument("--no-bench", action="store_true", help="skip the quick benchmark suites")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these checks")
    parser.add_argument("--list", action="store_true", help="print the checks with their group and estimated "
                        "seconds on an H100, then exit")
    args = parser.parse_args(argv)
    if args.only:
        unknown = [n for n in args.only if n not in CHECKS]
        if unknown:
            parser.error(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    checks = plan(args.only, bench=not args.no_bench)
    if args.list:
        for c in checks:
            print(f"{c.name:22s} {c.group:12s} {c.estimate_s:5.0f} s{'  (fresh worker)' if c.fresh else ''}")
        groups = {}
        for c in checks:
            groups[c.group] = groups.get(c.group, 0.0) + c.estimate_s
        print("per group: " + ", ".join(f"{g} {s:.0f} s" for g, s in groups.items()))
        return 0
    if args.budget_s is None:
        args.budget_s = DEFAULT_DRY_BUDGET_S if args.dry_run else DEFAULT_BUDGET_S
    if args.budget_s <= RESERVE_S:
        parser.error(f"--budget-s must be more than {RESERVE_S:.0f} seconds")
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU is visible (torch.cuda.is_available() is False); use --dry-run to check on "
                         "the CPU")
    if args.out is None:
        card = "cpu dry run" if args.dry_run else _card_name()
        args.out = default_out(card)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out {args.out} is a file; give a folder")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        parser.error(f"--out {args.out}: its parent folder {parent} does not exist")
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        parser.error(f"--out {args.out} is not writable")
    print(f"gfnet gpucheck: {len(checks)} checks within {args.budget_s:.0f} s"
          + (" (dry run on the CPU)" if args.dry_run else ""), flush=True)
    report = run_plan(checks, out, args.dry_run, args.budget_s, log=lambda line: print(line, flush=True))
    env = report.env
    print(f"on {env.get('device')} (torch {env.get('torch')}, CUDA {env.get('cuda')}, Triton {env.get('triton')})")
    print(f"report in {out}")
    print("gpucheck: " + markdown(report.results, env).splitlines()[-1])
    return 1 if any(r.status == "failed" for r in report.results) else 0


if __name__ == "__main__":
    sys.exit(main())
