"""Batch-1 latency of a deployed GFNet, per step and per budget, in four runtimes; and the all-steps throughput
of a batch in the deployment runtimes against the reference's loop.

One setup shared by every provider: one randomly initialised GFNet (default MobileNet-V3-Large 1.00, S=224,
P=96, T=3, 1000 classes; batch-norm statistics randomised and the classifiers sharpened so that confidences
spread), N uint8 test images of
random pixels, and thresholds fitted with :func:`gfnet.budget.find_thresholds` on N other random images at the
budget points p (q = p/20). Random weights and pixels cost what trained ones cost, but their accuracy means
nothing: the budgets here are for timing only. Providers (:mod:`gfnet.deploy.latency`): ``eager PyTorch`` (the
baseline: gfnet's own steps, ``net.step`` with the fused ops), ``compiled PyTorch`` (``net.compile()``, compile
time reported apart), ``ONNX Runtime`` and ``ExecuTorch (XNNPACK)`` (the package of :func:`gfnet.export`,
uint8 input, export time reported apart). The backbone alone at full resolution S (a randomly initialised
MobileNet-V3-Large with its 1000-class head) is measured in each runtime as the paper's baseline.

Before timing, each provider's softmax of every step on 4 images is compared with eager PyTorch's (1e-4: the
runtimes' kernels round differently), and at every budget its exits and predictions with eager's on every image
whose confidence is not within 1e-4 of a threshold.

Cases, each with 1 thread (the phone setting) and with all cores (``--threads`` or the CPUs this process may
use): ``glance step``, ``focus step`` (policy, crop, local encoder, classifier), ``backbone alone S=224``,
``all T steps``, one image per call (``measure``: median of one call); ``budget p=K``: the N images one at a
time with early exit, row median = one image's (median stream time / N), with per-image mean, p50 and p99 in
``extra``, ``macs_share`` (the budget's expected Multiply-Adds / all T steps'), and ``mean_over_expected`` =
mean latency / (all-steps latency x macs_share): the target is <= 1.15. Last, ``--set throughput=True``
(default outside --quick): ResNet-50 GFNet (P=96, T=5) batch 16 through all T steps with all cores: the
reference's fp32 anytime loop (:func:`gfnet.bench.bench_anytime.reference_loop_anytime`, the baseline), gfnet
eager, and the packages' ``anytime`` in ONNX Runtime and ExecuTorch. Run: ``gfnet-bench latency [--quick]``.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from typing import Optional, Sequence

import torch

from gfnet.bench.common import OutputMismatch, check_close, make_rows, measure, resolve_device, use_threads

BASELINE = "eager PyTorch"
NAMES = {"eager": BASELINE, "compiled": "compiled PyTorch", "onnx": "ONNX Runtime",
         "executorch": "ExecuTorch (XNNPACK)"}
DEFAULT_POINTS = (5, 15, 25, 35)
#: Probabilities of the runtimes against eager PyTorch's: their convolution kernels sum in other orders.
PROB_ATOL = 1e-4
EXTRA_COLUMNS = ("mean_ms", "p50_ms", "p99_ms", "macs_share", "mean_over_expected", "exit_shares", "setup_s")
NOTES = ("Random weights and random uint8 pixels: latencies are real, accuracies are not (thresholds fitted on "
         "random images, for timing only). Batch 1 unless the case says otherwise. vs baseline: eager PyTorch's "
         "time / the row's (the reference loop's for the throughput case). mean_over_expected: mean latency at the "
         "budget / (all-steps latency x the budget's Multiply-Adds share), target <= 1.15. setup_s: export or "
         "compile seconds.")


def _randomise_batchnorm(net, seed: int) -> None:
    """Randomised batch-norm statistics, and the classifiers' weights scaled up (x20): a randomly initialised
    1000-class GFNet's confidences all sit near 1/1000, within the 1e-4 ambiguity of any threshold, which would
    leave the exit comparison with nothing to compare; sharpened, they spread over the budgets' thresholds."""
    from gfnet.bench.deploy_exports import _randomise_batchnorm as randomise

    randomise(net, seed)
    with torch.no_grad():
        for module in (net.fc, net.model_prime.head):
            for p in module.parameters():
                p.mul_(20.0)


def run(device=None, quick: bool = False, threads=None, arch: str = "mobilenetv3_large_100",
        patch_size: Optional[int] = None, T: Optional[int] = None, num_images: Optional[int] = None,
        points: Optional[Sequence[int]] = None, providers: Optional[Sequence[str]] = None,
        throughput: Optional[bool] = None, seed: int = 0, batch1: bool = True) -> list:
    """Rows of every case (see the module docstring). quick: P=64, T=2, 4 images, points 5/35, eager and ONNX
    Runtime only, 1 thread, no throughput case (under a minute; ExecuTorch's lowering and torch.compile take
    minutes). ``providers``: a subset of eager, compiled, onnx, executorch (eager, the baseline, always runs).
    ``batch1=False``: the throughput case alone (``--set batch1=False --set throughput=True``)."""
    device = resolve_device(device)
    if device.type != "cpu":
        raise ValueError("the latency suite measures CPU runtimes (ONNX Runtime's CPU provider, ExecuTorch's "
                         f"XNNPACK); got device {device}")
    from gfnet.deploy.exporter import missing_dependencies

    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    providers = list(providers or (("eager", "onnx") if quick else ("eager", "compiled", "onnx", "executorch")))
    unknown = [p for p in providers if p not in NAMES]
    if unknown:
        raise ValueError(f"unknown providers {unknown}; choose from {', '.join(NAMES)}")
    if "eager" not in providers:
        providers.insert(0, "eager")
    for fmt in ("onnx", "executorch"):
        if fmt in providers and missing_dependencies(fmt):
            raise ImportError(f"the latency suite's {NAMES[fmt]} provider needs {', '.join(missing_dependencies(fmt))}"
                              ": pip install 'gfnet[deploy]'")
    all_cores = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    thread_settings = [1] if quick else sorted({1, int(all_cores)})
    workdir = tempfile.mkdtemp(prefix="gfnet-bench-latency-")
    try:
        with use_threads(None):
            rows = _latency(device, quick, arch, patch_size or (64 if quick else 96), T or (2 if quick else 3),
                            num_images or (4 if quick else 32), tuple(points or ((5, 35) if quick else DEFAULT_POINTS)),
                            providers, thread_settings, seed, workdir) if batch1 else []
            if throughput if throughput is not None else not quick:
                rows += _throughput(device, providers, int(all_cores), seed, workdir)
        return rows
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _latency(device, quick, arch, patch_size, T, num_images, points, providers, thread_settings, seed, workdir):
    from gfnet import budget, build_model
    from gfnet.deploy.latency import backbone_runner, latency_stats, make_runner
    from gfnet.engine import step_flops
    from gfnet.models.encoder import build_backbone

    torch.manual_seed(seed)
    net = build_model(arch, patch_size=patch_size, T=T, num_classes=1000).eval()
    _randomise_batchnorm(net, seed)
    S = net.image_size
    flops = step_flops(net)
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, 3, S, S), dtype=torch.uint8, generator=g)
    train = torch.randint(0, 256, (max(num_images, 32), 3, S, S), dtype=torch.uint8, generator=g)
    train_probs = net.anytime_predict(train, batch_size=16).probs
    thresholds = {p: [float(v) for v in budget.find_thresholds(train_probs, None, budget.exit_proportions(p / 20, T))]
                  for p in points}
    val_probs = net.anytime_predict(images, batch_size=16).probs  # eager's softmax of every step
    backbone = build_backbone(net.config, 1000).eval()

    setup_s = {}
    packages = {}
    for fmt in ("onnx", "executorch"):
        if fmt in providers:
            from gfnet.deploy import export

            start = time.perf_counter()
            packages[fmt] = os.path.join(workdir, f"gfnet-{fmt}")
            export(net, packages[fmt], format=fmt, input_dtype="uint8", max_batch=16)
            setup_s[fmt] = time.perf_counter() - start
    compiled = None
    if "compiled" in providers:
        compiled = copy.deepcopy(net).compile()

    rows = []
    never = [budget.NO_EXIT_THRESHOLD] * (T - 1) + [budget.LAST_STEP_THRESHOLD]
    for n_threads in thread_settings:
        torch.set_num_threads(n_threads)
        runners, backbones = {}, {}
        for name in providers:
            if name in ("eager", "compiled"):
                runners[name] = make_runner(compiled if name == "compiled" else net, name, n_threads)
            else:
                runners[name] = make_runner(net, name, n_threads, package=packages[name])
            folder = os.path.join(workdir, f"backbone-{name}")  # exported once, loaded per thread setting
            os.makedirs(folder, exist_ok=True)
            backbones[name] = backbone_runner(backbone, name, S, n_threads, "uint8", net.config.mean, net.config.std,
                                              folder)
        singles = {name: [r.as_input(images[i:i + 1].numpy()) for i in range(num_images)]
                   for name, r in runners.items()}
        # warm-up (a compiled model compiles here) and the outputs compared before any timing
        for name, runner in runners.items():
            start = time.perf_counter()
            for i in range(min(4, num_images)):
                got = runner.probs_one(singles[name][i])
                check_close(f"latency {arch}: {NAMES[name]} against {BASELINE}, image {i}", torch.from_numpy(got),
                            val_probs[:, i], atol=PROB_ATOL, why="the runtimes' kernels sum in other orders")
            backbones[name].predict_one(singles[name][0])
            if name == "compiled" and n_threads == thread_settings[0]:
                setup_s[name] = time.perf_counter() - start
        conf = val_probs.max(-1).values  # [T, N]
        for p, row in thresholds.items():
            expected = budget.exit_steps(val_probs, row)
            near = ((conf - torch.tensor(row).view(-1, 1)).abs() < PROB_ATOL).any(0)
            if bool(near.all()):
                raise OutputMismatch(f"latency {arch} p={p}: every image's confidence lies within {PROB_ATOL:g} of a "
                                     "threshold: the exit comparison would compare nothing")
            for name, runner in runners.items():
                got = torch.tensor([runner.predict_one(im, row)[1] for im in singles[name]])
                bad = (got != expected) & ~near
                if bool(bad.any()):
                    raise OutputMismatch(f"latency {arch} p={p}: {NAMES[name]} exits {int(bad.sum())} images at "
                                         "other steps than eager PyTorch, beyond the 1e-4 ambiguity of a threshold")

        dtype = "uint8 in, fp32"
        min_time = 0.2 if quick else 1.0
        rounds = 1 if quick else 3
        first = {name: singles[name][0] for name in runners}
        cases = {
            f"glance step, batch 1, {n_threads} thread(s)": {n: (lambda r=r, x=first[n]: r.glance(x))
                                                           for n, r in runners.items()},
            f"focus step, batch 1, {n_threads} thread(s)": {n: (lambda r=r, x=first[n]: r.focus(x))
                                                          for n, r in runners.items()},
            f"backbone alone S={S}, batch 1, {n_threads} thread(s)": {
                n: (lambda b=b, x=first[n]: b.predict_one(x)) for n, b in backbones.items()},
            f"all {T} steps, batch 1, {n_threads} thread(s)": {n: (lambda r=r, x=first[n]: r.predict_one(x, never))
                                                            for n, r in runners.items()},
        }
        all_steps_ms = {}
        for case, fns in cases.items():
            timings = measure({NAMES[n]: fn for n, fn in fns.items()}, min_run_time=min_time, rounds=rounds)
            extra = {NAMES[n]: {"arch": arch, "S": S, "P": patch_size, "T": T, "setup_s": setup_s.get(n),
                                "mean_ms": None} for n in fns}
            if case.startswith("all"):
                all_steps_ms = {NAMES[n]: timings[NAMES[n]].median_s * 1e3 for n in fns}
            rows += make_rows("latency", f"{arch} P={patch_size} T={T}: {case}", timings, BASELINE, device=device,
                              dtype=dtype, batch=1, items=1, unit="images/s", extra=extra)
        for p, row in thresholds.items():
            streams = {NAMES[n]: (lambda r=r, xs=singles[n]: [r.predict_one(x, row) for x in xs])
                       for n, r in runners.items()}
            timings = measure(streams, min_run_time=0.0, rounds=rounds)
            steps = budget.exit_steps(val_probs, row)
            shares = torch.bincount(steps, minlength=T).double() / num_images
            macs_share = float((shares * torch.tensor(flops, dtype=torch.float64)).sum()) / float(flops[-1])
            extra = {}
            for n, r in runners.items():
                per_image = []
                for _ in range(rounds):
                    for x in singles[n]:
                        start = time.perf_counter()
                        r.predict_one(x, row)
                        per_image.append(time.perf_counter() - start)
                stats = latency_stats(per_image)
                mean_ms = timings[NAMES[n]].median_s * 1e3 / num_images
                extra[NAMES[n]] = {"arch": arch, "S": S, "P": patch_size, "T": T, "budget_point": p,
                                   "thresholds": row, "mean_ms": mean_ms, "p50_ms": stats["p50_ms"],
                                   "p99_ms": stats["p99_ms"], "macs_share": macs_share,
                                   "exit_shares": [round(float(v), 4) for v in shares],
                                   "expected_ms": all_steps_ms[NAMES[n]] * macs_share,
                                   "mean_over_expected": mean_ms / (all_steps_ms[NAMES[n]] * macs_share),
                                   "target_met": mean_ms / (all_steps_ms[NAMES[n]] * macs_share) <= 1.15,
                                   "setup_s": setup_s.get(n)}
            budget_rows = make_rows("latency", f"{arch} P={patch_size} T={T}: budget p={p}, {num_images} images one "
                                    f"at a time, {n_threads} thread(s)", timings, BASELINE, device=device,
                                    dtype=dtype, batch=1, items=num_images, unit="images/s", extra=extra)
            for r in budget_rows:  # one image's latency, not the stream's
                r.median_s /= num_images
                r.iqr_s /= num_images
            rows += budget_rows
    return rows


def _throughput(device, providers, all_cores: int, seed: int, workdir: str,
                arch: str = "resnet50", batch: int = 16) -> list:
    """ResNet-50 GFNet (P=96, T=5) batch 16, all T steps, all cores: the reference loop (baseline), gfnet eager,
    and the packages' anytime pass."""
    from gfnet import build_model
    from gfnet.bench.bench_anytime import reference_loop_anytime
    from gfnet.config import IMAGENET_MEAN, IMAGENET_STD
    from gfnet.deploy import export, load

    torch.set_num_threads(all_cores)
    torch.manual_seed(seed)
    net = build_model(arch, patch_size=96, T=5, num_classes=1000).eval()
    _randomise_batchnorm(net, seed)
    S = net.image_size
    g = torch.Generator().manual_seed(seed)
    uint8 = torch.randint(0, 256, (batch, 3, S, S), dtype=torch.uint8, generator=g)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = (uint8.float() / 255.0 - mean) / std
    reference = "reference loop (fp32)"
    fns = {reference: lambda: reference_loop_anytime(net, images),
           "gfnet eager (uint8 in, fp32)": lambda: net.anytime_predict(uint8).probs}
    setup_s = {}
    for fmt in ("onnx", "executorch"):
        if fmt in providers:
            start = time.perf_counter()
            folder = os.path.join(workdir, f"throughput-{fmt}")
            export(net, folder, format=fmt, input_dtype="uint8", max_batch=batch)
            setup_s[NAMES[fmt]] = time.perf_counter() - start
            pkg = load(folder, threads=all_cores)
            fns[NAMES[fmt]] = (lambda pkg=pkg: torch.from_numpy(pkg.anytime(uint8.numpy()).probs))
    ref = fns[reference]()
    for name, fn in fns.items():
        check_close(f"throughput {arch}: {name} against {reference}", fn(), ref, atol=PROB_ATOL, rtol=1e-3,
                    why="fused ops and the runtimes' kernels sum in other orders (50 layers, sharpened classifiers)")
    timings = measure(fns, min_run_time=1.0, rounds=3)
    extra = {name: {"arch": arch, "S": S, "P": 96, "T": 5, "setup_s": setup_s.get(name)} for name in fns}
    return make_rows("latency", f"{arch} P=96 T=5: all steps, batch {batch}, {all_cores} thread(s)", timings,
                     reference, device=device, dtype="fp32", batch=batch, items=batch, unit="images/s", extra=extra)
