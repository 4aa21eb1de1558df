"""``gfnet-bench gpucheck``: one command that proves gfnet's GPU paths on a CUDA machine.

It runs, with compiled kernels: the ``cuda``-marked tests; the Triton kernels against their references for
fp32/bf16/fp16 outputs, uint8 NCHW/NHWC, float channels-last and strided input and a large batch; the bilinear
crop's gradients and its determinism flag; NaN through every kernel; torch.compile (inductor, and
reduce-overhead) over the ops; a model compiled with ``net.compile()`` (anytime, budgeted inference with CUDA
graphs replaying the compiled steps, a bf16 training step); budgeted inference under CUDA graphs for uint8
and float input in fp32/bf16/fp16, equal to the post-hoc simulation; trainer steps in bf16 and fp16; DALI's GPU
pipeline where DALI is installed; a second GPU where there is one; then the quick variant of every benchmark
suite. It writes ``DIR/gpucheck.json`` (one record per check: name, status passed/failed/skipped, reason,
seconds, details; and the card, driver, torch, CUDA and Triton versions) and ``DIR/gpucheck.md``, and exits 1
if a check failed.

``--dry-run`` runs the same checks on the CPU (Triton interpreted; CUDA-only checks recorded as skipped with
the reason), so that machines without a GPU keep the command working.

    gfnet-bench gpucheck --out DIR [--dry-run] [--no-bench] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable

__all__ = ["CheckResult", "CHECKS", "run_checks", "main"]


class Skip(Exception):
    """Raised by a check that cannot run here; the message is the reason."""


@dataclass
class CheckResult:
    name: str
    status: str  # "passed", "failed" or "skipped"
    reason: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


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


# ------------------------------------------------------------------------------------------------ checks

def check_cuda_tests(ctx: Context) -> dict:
    """The tests marked ``cuda`` (compiled kernels: conftest leaves the interpreter off on a GPU machine)."""
    ctx.need_cuda("the cuda-marked tests")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tests = os.path.join(root, "tests")
    if not os.path.isdir(tests):
        raise Skip(f"no tests/ folder beside the installed package ({tests}); run from a source checkout")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", tests],
                          capture_output=True, text=True, env=env, cwd=root, timeout=300)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    if proc.returncode != 0:
        raise AssertionError("cuda tests failed:\n" + "\n".join(tail))
    return {"summary": tail[-1] if tail else ""}


def check_kernels(ctx: Context) -> dict:
    """Every kernel against its reference: output dtypes, input layouts and dtypes, a large batch."""
    import torch

    from gfnet import ops
    from gfnet.config import IMAGENET_MEAN as M
    from gfnet.config import IMAGENET_STD as S
    backend = "triton"
    size, n = (96, 6) if ctx.dry_run else (224, 64)
    cases = 0
    tol = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (2 ** -7, 2 ** -7), torch.float16: (2 ** -10, 2 ** -10)}
    for in_dtype, layout in ((torch.uint8, "nchw"), (torch.uint8, "hwc"), (torch.float32, "channels_last"),
                             (torch.float32, "strided"), (torch.bfloat16, "nchw")):
        images = _images(n, size, in_dtype, layout, ctx.device, seed=cases)
        actions = torch.rand(n, 2, generator=torch.Generator().manual_seed(cases)).to(ctx.device)
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            norm = dict(mean=M, std=S, out_dtype=out_dtype)
            got = ops.focus_crop(images, actions, 48, backend=backend, **norm)
            want = ops.focus_crop(images, actions, 48, backend="torch", **norm)
            if not torch.equal(got, want):
                raise AssertionError(f"focus_crop {in_dtype} {layout} -> {out_dtype}: not bit-identical, max diff "
                                     f"{(got.float() - want.float()).abs().max().item()}")
            atol, rtol = tol[out_dtype]
            for mode in ("bicubic", "bilinear"):
                got = ops.glance_resize(images, 40, mode=mode, backend=backend, **norm)
                want = ops.glance_resize(images, 40, mode=mode, backend="torch", **norm)
                torch.testing.assert_close(got, want, atol=atol, rtol=rtol,
                                           msg=lambda m: f"glance_resize {mode} {in_dtype} {layout} -> "
                                                         f"{out_dtype}: {m}")
            got = ops.focus_crop_bilinear(images, actions, 32, scale=0.8, backend=backend, **norm)
            want = ops.focus_crop_bilinear(images, actions, 32, scale=0.8, backend="torch", **norm)
            # grid_sample derives the sample position from a normalised grid, ((g + 1) / 2) * (S - 1), which
            # rounds differently from our pixel-space position: ~S * 2^-24 pixels, times a noise image's
            # slope of up to 1 / (255 * 0.225) per level-pixel... ~4 normalised units per pixel.
            atol = max(atol, 8.0 * size * 2.0 ** -24 * 4.4)
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol,
                                       msg=lambda m: f"focus_crop_bilinear {in_dtype} {layout} -> {out_dtype}: {m}")
            cases += 1
    # a large batch: int64 offsets past 2^31 elements on the GPU
    big_n = 8 if ctx.dry_run else 16500
    big = torch.randint(0, 256, (big_n, 224, 224, 3), dtype=torch.uint8, device=ctx.device) if not ctx.dry_run \
        else _images(big_n, 64, torch.uint8, "hwc", ctx.device)
    actions = torch.rand(big_n, 2, device=ctx.device)
    got = ops.focus_crop(big, actions, 32, backend=backend)
    last = ops.focus_crop(big[-3:], actions[-3:], 32, backend="torch")
    if not torch.equal(got[-3:], last):
        raise AssertionError(f"focus_crop on {big_n} images: the last samples differ from the reference")
    return {"cases": cases, "large_batch": big_n, "large_batch_bytes": big.numel()}


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


def check_compile(ctx: Context) -> dict:
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


def check_budgeted(ctx: Context) -> dict:
    """Budgeted inference (CUDA graphs on a GPU) equals the post-hoc simulation, image by image, for uint8
    and float input in fp32/bf16/fp16."""
    import torch

    from gfnet import budget
    from gfnet.engine import budgeted_predict
    net = _tiny_net("resnet10t", T=3).to(ctx.device)
    n, size, batch = (40, 64, 8) if ctx.dry_run else (300, 96, 32)
    graphs = ctx.cuda
    dtypes = ("fp32", "bf16") + (("fp16",) if ctx.cuda else ())
    results = {}
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False  # the same convolution algorithm for the same shapes in both runs
    try:
        for in_dtype in (torch.uint8, torch.float32):
            images = _images(n, size, in_dtype, "hwc" if in_dtype == torch.uint8 else "nchw", ctx.device, seed=7)
            for dtype in dtypes:
                reference = net.anytime_predict(images, batch_size=batch, dtype=dtype)
                thresholds, margin = budget.separated_thresholds(budget.confidences(reference.probs)[0].cpu(),
                                                                 (0.3, 0.3))
                steps = budget.exit_steps(reference.probs.cpu(), thresholds)
                preds = reference.preds.cpu().gather(0, steps.view(1, -1)).squeeze(0)
                out = budgeted_predict(net, images, thresholds, batch_size=batch, dtype=dtype, cuda_graphs=graphs,
                                       image_storage="rows", flops=[1.0, 2.0, 3.0])
                same_steps = int((out.exit_step == steps).sum())
                same_preds = int((out.preds == preds).sum())
                key = f"{str(in_dtype).replace('torch.', '')}/{dtype}"
                results[key] = {"images": n, "same_exit_step": same_steps, "same_pred": same_preds,
                                "threshold_margin": margin, "cuda_graphs": out.cuda_graphs}
                if same_steps != n or same_preds != n:
                    raise AssertionError(f"{key}: budgeted_predict differs from the post-hoc simulation "
                                         f"({n - same_steps} exit steps, {n - same_preds} predictions; threshold "
                                         f"margin {margin:.3g})")
                if graphs and not out.cuda_graphs:
                    raise AssertionError(f"{key}: CUDA graphs did not run")
    finally:
        torch.backends.cudnn.benchmark = previous
    return results


def check_compiled_model(ctx: Context) -> dict:
    """net.compile() (inductor): anytime inference close to eager; budgeted inference (on a GPU with CUDA graphs
    replaying the compiled steps) equal to the post-hoc simulation on the compiled model's own probabilities,
    and no recompilation for a second stream's batch sizes; a compiled bf16 training step close to eager."""
    import copy

    import torch
    from torch._dynamo.utils import counters

    from gfnet import budget
    from gfnet.engine import budgeted_predict
    from gfnet.train import Trainer, TrainOptions
    from gfnet.train.distributed import DistributedContext
    torch._dynamo.reset()
    eager = _tiny_net("resnet10t", T=3).to(ctx.device)
    net = copy.deepcopy(eager).compile()
    n, size, batch = (21, 64, 8) if ctx.dry_run else (300, 96, 32)
    images = _images(n, size, torch.uint8, "hwc", ctx.device, seed=11)
    want = eager.anytime_predict(images, batch_size=batch)
    got = net.anytime_predict(images, batch_size=batch)
    torch.testing.assert_close(got.probs, want.probs, atol=2e-4, rtol=1e-3,
                               msg=lambda m: f"compiled anytime_predict against eager: {m}")
    thresholds, margin = budget.separated_thresholds(budget.confidences(got.probs)[0].cpu(), (0.3, 0.3))
    steps = budget.exit_steps(got.probs.cpu(), thresholds)
    preds = got.preds.cpu().gather(0, steps.view(1, -1)).squeeze(0)
    out = budgeted_predict(net, images, thresholds, batch_size=batch, cuda_graphs=ctx.cuda,
                           image_storage="rows", flops=[1.0, 2.0, 3.0])
    if not (torch.equal(out.exit_step, steps) and torch.equal(out.preds, preds)):
        raise AssertionError(f"compiled budgeted_predict differs from the simulation on the compiled model's "
                             f"probabilities ({int((out.exit_step != steps).sum())} exit steps; threshold margin "
                             f"{margin:.3g})")
    if ctx.cuda and not out.cuda_graphs:
        raise AssertionError("compiled budgeted_predict: CUDA graphs did not run")
    graphs = counters["stats"]["unique_graphs"]  # the tail's sizes met: the batch dimension is dynamic now
    budgeted_predict(net, images[: n - 5], thresholds, batch_size=batch, cuda_graphs=ctx.cuda,
                     image_storage="rows", flops=[1.0, 2.0, 3.0])
    if counters["stats"]["unique_graphs"] != graphs:
        raise AssertionError("compiled budgeted_predict compiled again for another stream's batch sizes")
    losses = {}
    labels = torch.arange(8, device=ctx.device) % 10
    train_images = _images(8, 64, torch.uint8, "hwc", ctx.device, seed=12)
    for use_compile in (False, True):
        model = _tiny_net("resnet10t", T=3, seed=5).to(ctx.device).train()
        trainer = Trainer(model, TrainOptions(stage=1, epochs=1, amp="bf16", compile=use_compile, seed=3),
                          ctx=DistributedContext(device=ctx.device))
        torch.manual_seed(7)
        losses["compiled" if use_compile else "eager"] = float(trainer.train_step(train_images, labels)["loss"])
    if abs(losses["compiled"] - losses["eager"]) > 0.05 * abs(losses["eager"]):
        raise AssertionError(f"compiled bf16 training step: loss {losses['compiled']} against eager {losses['eager']}")
    return {"images": n, "cuda_graphs": out.cuda_graphs, "graphs": graphs, "bf16_step_loss": losses}


def check_trainer(ctx: Context) -> dict:
    """Trainer steps in bf16 and fp16 (GradScaler) on a tiny model: finite losses, weights that move."""
    import torch

    from gfnet.train import Trainer, TrainOptions
    from gfnet.train.distributed import DistributedContext
    losses = {}
    modes = ("bf16", "fp16") if ctx.cuda else ("bf16",)
    for amp in modes:
        net = _tiny_net("resnet10t", T=3).to(ctx.device).train()
        trainer = Trainer(net, TrainOptions(stage=1, epochs=1, amp=amp), ctx=DistributedContext(device=ctx.device))
        images = _images(8, 64, torch.uint8, "hwc", ctx.device, seed=3)
        labels = torch.randint(0, 10, (8,), device=ctx.device)
        before = net.fc.state_dict()
        before = {k: v.clone() for k, v in before.items()}
        values = [float(trainer.train_step(images, labels)["loss"]) for _ in range(3)]
        if not all(torch.isfinite(torch.tensor(values))):
            raise AssertionError(f"{amp}: non-finite loss {values}")
        moved = any(not torch.equal(before[k], v) for k, v in net.fc.state_dict().items())
        if not moved:
            raise AssertionError(f"{amp}: the classifier's weights did not change")
        losses[amp] = values
    if not ctx.cuda:
        losses["fp16"] = "skipped: fp16 autocast training with GradScaler is a GPU configuration"
    return losses


def check_dali(ctx: Context) -> dict:
    """DALI's GPU pipeline (nvJPEG decode) against its CPU pipeline on a small real-JPEG tree; in the dry run,
    DALI's CPU pipeline against the PIL (torchvision) one, through the same comparison."""
    import importlib.util
    if importlib.util.find_spec("nvidia.dali") is None:
        raise Skip("DALI is not installed (`pip install nvidia-dali-cuda130`)")
    import torch

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


def check_second_gpu(ctx: Context) -> dict:
    """Tensors on cuda:1 while cuda:0 is current: every kernel launches on the tensors' device."""
    ctx.need_cuda("the second-GPU check")
    import torch

    from gfnet import ops
    if torch.cuda.device_count() < 2:
        raise Skip(f"needs two GPUs; this machine has {torch.cuda.device_count()}")
    torch.cuda.set_device(0)
    images = _images(4, 64, torch.uint8, "hwc", torch.device("cuda", 1))
    actions = torch.rand(4, 2, device="cuda:1")
    got = ops.focus_crop(images, actions, 32)
    torch.cuda.synchronize(1)
    if not torch.equal(got, ops.focus_crop(images, actions, 32, backend="torch")):
        raise AssertionError("focus_crop on cuda:1 differs from the reference")
    return {"devices": torch.cuda.device_count()}


def _bench_check(suite: str) -> Callable[[Context], dict]:
    def check(ctx: Context) -> dict:
        import importlib

        from gfnet.bench.rows import environment as stamp
        from gfnet.bench.rows import write_results
        module = importlib.import_module(f"gfnet.bench.bench_{suite}")
        rows = module.run(device=str(ctx.device), quick=True)
        env = stamp(ctx.device, note="gfnet-bench gpucheck, quick variant" + (" (dry run)" if ctx.dry_run else ""))
        paths = write_results(os.path.join(ctx.out_dir, "bench"), suite, env, rows,
                              getattr(module, "EXTRA_COLUMNS", ()), getattr(module, "NOTES", ""))
        return {"rows": len(rows), "file": os.path.relpath(paths["md"], ctx.out_dir),
                "ratios": {f"{r.case} / {r.provider}": round(r.ratio, 3) for r in rows}}
    check.__doc__ = f"The quick variant of the {suite} benchmark suite (tables written beside the report)."
    return check


CHECKS: dict = {
    "cuda_tests": check_cuda_tests,
    "kernels": check_kernels,
    "uint8_division": check_uint8_division,
    "bilinear_gradients": check_bilinear_gradients,
    "nan": check_nan,
    "compile": check_compile,
    "budgeted": check_budgeted,
    "compiled_model": check_compiled_model,
    "trainer": check_trainer,
    "dali": check_dali,
    "second_gpu": check_second_gpu,
}
BENCH_SUITES = ("kernels", "anytime", "budget", "train", "data")


def environment(device) -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": "cpu (dry run)", "driver": None, "triton": None}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = "unknown"
    return env


def run_checks(ctx: Context, names, log=print) -> list:
    results = []
    for name in names:
        check = CHECKS[name]
        start = time.perf_counter()
        try:
            details = check(ctx) or {}
            result = CheckResult(name, "passed", details=details)
        except Skip as skip:
            result = CheckResult(name, "skipped", reason=str(skip))
        except Exception as err:  # every failure is recorded; the report lists them all
            result = CheckResult(name, "failed", reason=f"{type(err).__name__}: {err}"[:4000],
                                 details={"traceback": traceback.format_exc()[-4000:]})
        result.seconds = round(time.perf_counter() - start, 3)
        results.append(result)
        first = result.reason.splitlines()[0] if result.reason else ""
        log(f"  {result.status:7s} {name:28s} {result.seconds:7.1f}s  {first}")
    return results


def markdown(results: list, env: dict) -> str:
    lines = [f"# gfnet GPU check: {env['device']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, Triton {env['triton']}, driver {env['driver']}, "
             f"Python {env['python']}", "", "| check | status | seconds | reason / details |", "|---|---|---|---|"]
    for r in results:
        note = r.reason.splitlines()[0] if r.reason else json.dumps(r.details, default=str)[:200]
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {note.replace('|', '/')} |")
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "skipped")}
    lines += ["", f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gfnet-bench gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpucheck.json, gpucheck.md and benchmark rows")
    parser.add_argument("--dry-run", action="store_true",
                        help="run on the CPU (Triton interpreted; CUDA-only checks skipped with the reason)")
    parser.add_argument("--no-bench", action="store_true", help="skip the quick benchmark suites")
    parser.add_argument("--only", nargs="*", default=None, help=f"run only these checks ({', '.join(CHECKS)})")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out {args.out} is a file; give a folder")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        parser.error(f"--out {args.out}: its parent folder {parent} does not exist")
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        parser.error(f"--out {args.out} is not writable")
    if args.dry_run:
        # before triton is imported: the kernels run on CPU tensors in the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible (torch.cuda.is_available() is False); use --dry-run to check on the CPU")
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    ctx = Context(device, args.dry_run, out)
    names = args.only if args.only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS and not n.startswith("bench_")]
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    if not args.no_bench and not args.only:
        for suite in BENCH_SUITES:
            CHECKS[f"bench_{suite}"] = _bench_check(suite)
            names.append(f"bench_{suite}")
    for name in names:
        if name.startswith("bench_") and name not in CHECKS:
            CHECKS[name] = _bench_check(name[len("bench_"):])
    env = environment(device)
    print(f"gfnet gpucheck on {env['device']} (torch {env['torch']}, CUDA {env['cuda']}, Triton {env['triton']})")
    results = run_checks(ctx, names)
    report = {"environment": env, "dry_run": args.dry_run, "checks": [asdict(r) for r in results]}
    with open(os.path.join(out, "gpucheck.json"), "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    with open(os.path.join(out, "gpucheck.md"), "w") as fh:
        fh.write(markdown(results, env))
    failed = [r.name for r in results if r.status == "failed"]
    print(f"report in {out}")
    print("gpucheck: " + markdown(results, env).splitlines()[-1])  # the closing line: N passed, N failed, ...
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
