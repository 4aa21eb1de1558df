"""Deployment on tiny models: the in-graph resize and crop against gfnet's ops, the step graphs against the model,
the package's refusals (checksums, manifest, inputs), atomic export under SIGKILL, gfnet-export, gfnet-eval
--package, the latency points and their figure, and the latency suite's output check."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import gfnet
from gfnet import budget, ops
from gfnet.config import get_config
from gfnet.deploy import PackageError, load, read_manifest
from gfnet.deploy.graphs import FocusCrop, GlanceResize, step_graphs
from gfnet.models import GFNet

from helpers import module_blocker, randomise_batchnorm

pytest.importorskip("onnxruntime", reason="the deployment tests need gfnet[deploy]")
pytest.importorskip("onnxscript", reason="the deployment tests need gfnet[deploy]")

pytestmark = pytest.mark.usefixtures("native_cpu_convolutions")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
S, P, T, CLASSES = 64, 32, 3, 4


def tiny_net(arch="resnet10t", classifier="gru", seed=0, steps=T):
    """A small timm backbone at S=64 (a GRU classifier by default), outputs sharpened so that thresholds split
    the images."""
    torch.manual_seed(seed)
    net = GFNet(get_config(arch, classifier).replace(image_size=S), patch_size=P, T=steps,
                num_classes=CLASSES).eval()
    randomise_batchnorm(net, seed)
    with torch.no_grad():
        for module in (net.fc, net.model_prime.head):
            for p in module.parameters():
                p.mul_(10.0)
    return net


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GRU-classifier GFNet, its checkpoint (with a budget table) and its ONNX package (uint8 input)."""
    root = tmp_path_factory.mktemp("deploy")
    net = tiny_net()
    train = net.anytime_predict(pixels(32, 1)).probs
    net.meta.dynamic_threshold = torch.stack(
        [budget.find_thresholds(train, None, budget.exit_proportions(p / 20, T)) for p in range(1, 40)])
    checkpoint = root / "tiny.pth.tar"
    gfnet.save_checkpoint(net, str(checkpoint))
    folder = root / "pkg"
    net.meta.classes = ["ant", "bee", "cat", "dog"]  # a model's class names travel into the manifest
    gfnet.export(net, str(folder), format="onnx", input_dtype="uint8", max_batch=8)
    return net, str(checkpoint), str(folder)


def pixels(n, seed, size=S):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the graphs
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size,patch", [(64, 32), (97, 40), (224, 96), (33, 1)])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_in_graph_resize_equals_the_glance_op(mode, size, patch, dtype):
    x = pixels(2, 7, size)
    norm = dict(mean=MEAN, std=STD) if dtype == "uint8" else {}
    if dtype == "float32":
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(8))
    out = GlanceResize(size, patch, mode, dtype == "uint8", MEAN, STD)(x)
    # gfnet._C's kernel computes the same taps and weights; the graph's matrix products sum them (and the
    # matrix's zeros) in their own blocked order: float32 rounding on values up to ~3 after the normalisation
    assert torch.allclose(out, ops.glance_resize(x, patch, mode=mode, **norm), rtol=0, atol=4e-6)
    # and the definition itself: F.interpolate(align_corners=True), then the normalisation
    ref = ops.glance_resize(x, patch, mode=mode, backend="torch", **norm)
    assert torch.allclose(out, ref, rtol=0, atol=2e-5)  # the reference sums 16 taps in another order


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_in_graph_crop_equals_the_focus_op_at_every_corner(dtype):
    size, patch = 97, 40
    x = pixels(3, 9, size) if dtype == "uint8" else torch.randn(3, 3, size, size)
    norm = dict(mean=MEAN, std=STD) if dtype == "uint8" else {}
    crop = FocusCrop(size, patch, dtype == "uint8", MEAN, STD)
    span = size - patch
    # actions on pixel boundaries (k / span, where floor is decided by the last bit), at the borders and between
    grid = torch.tensor([0.0, 1.0, 0.5, 1 / span, 13 / span, (span - 1) / span, 0.9999999, 1e-7])
    for a in grid:
        for b in grid.flip(0):
            actions = torch.tensor([[a, b], [b, a], [a, a]], dtype=torch.float32)
            expected = ops.focus_crop(x, actions, patch, **norm)
            assert torch.equal(crop(x, actions), expected), (float(a), float(b))


@pytest.mark.parametrize("arch,classifier", [("resnet10t", "gru"), ("resnet10t", "cascade"),
                                             ("test_efficientnet", None)])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_step_graphs_compute_what_the_model_computes(arch, classifier, dtype):
    net = tiny_net(arch, classifier)
    x = pixels(5, 3)
    if dtype == "float32":
        x = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    ref = net.anytime_predict(x)
    graphs = step_graphs(net, dtype == "uint8")
    assert "gfnet" not in str(graphs)
    with torch.no_grad():
        probs, fc_state, hidden, fmap = graphs["glance"](x)
        out, actions = [probs], []
        for t in range(1, T):
            pooled, fmap, hidden, action = graphs["focus"](x, fmap, hidden)
            probs, fc_state = graphs["classify" if net.fc.is_rnn else f"classify_{t}"](pooled, fc_state)
            out.append(probs)
            actions.append(action)
    # the same modules and the same operations (the GRUs written as their gate equations): float rounding only
    assert torch.allclose(torch.stack(out), ref.probs, atol=1e-6)
    assert torch.allclose(torch.stack(actions), ref.actions, atol=1e-6)


def test_a_graph_with_a_gfnet_op_is_refused():
    from gfnet.deploy.exporter import check_no_custom_ops

    class UsesTheOp(torch.nn.Module):
        def forward(self, images, actions):
            return ops.focus_crop(images, actions, 8)

    exported = torch.export.export(UsesTheOp(), (torch.randn(2, 3, 16, 16), torch.rand(2, 2)))
    with pytest.raises(RuntimeError, match="gfnet::focus_crop|gfnet.focus_crop"):
        check_no_custom_ops(exported, "a test graph")


# ----------------------------------------------------------------------------- the package
def test_manifest_describes_the_package(tiny):
    net, checkpoint, folder = tiny
    m = read_manifest(folder)
    assert (m["arch"], m["image_size"], m["patch_size"], m["T"], m["num_classes"]) == ("resnet10t", S, P, T, CLASSES)
    assert m["input"]["dtype"] == "uint8" and m["mean"] == list(MEAN) and m["std"] == list(STD)
    assert m["glance_mode"] == net.glance_mode and m["steps"] == [None, "classify", "classify"]
    assert m["classes"] == ["ant", "bee", "cat", "dog"]
    assert m["flops"] == pytest.approx(gfnet.flops.compute_flops(net)["flops"])
    assert np.allclose(m["dynamic_threshold"], net.meta.dynamic_threshold.double().numpy())
    assert set(m["files"]) == {g["file"] for g in m["graphs"].values()} == set(os.listdir(folder)) - {"manifest.json"}
    for name, digest in m["files"].items():
        import hashlib

        assert hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest() == digest
    for key in ("gfnet", "torch", "onnx", "onnxscript", "onnxruntime", "python"):
        assert m["versions"][key], key
    assert m["verified"]["max_abs_difference"]["glance"] < 1e-4


def _damaged(tiny, tmp_path, how):
    _, _, folder = tiny
    copy = tmp_path / "pkg"
    shutil.copytree(folder, copy)
    how(str(copy))
    return str(copy)


def _flip_a_byte(folder):
    path = os.path.join(folder, "focus.onnx")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("damage,message", [
    (_flip_a_byte, "focus.onnx does not match its checksum"),
    (lambda f: open(os.path.join(f, "manifest.json"), "w").write('{"format": "gfnet-deploy/1", "run'),
     "cannot read its manifest.json"),
    (lambda f: os.unlink(os.path.join(f, "glance.onnx")), "glance.onnx is missing"),
    (lambda f: os.unlink(os.path.join(f, "manifest.json")), "has no manifest.json"),
    (lambda f: json.dump({**json.load(open(os.path.join(f, "manifest.json"))), "format": "gfnet-deploy/0"},
                         open(os.path.join(f, "manifest.json") + ".new", "w"))
     or os.replace(os.path.join(f, "manifest.json") + ".new", os.path.join(f, "manifest.json")), "has format"),
])
def test_a_damaged_package_is_refused_in_one_line(tiny, tmp_path, damage, message, capsys):
    folder = _damaged(tiny, tmp_path, damage)
    with pytest.raises(PackageError, match=message):
        load(folder)
    from gfnet.cli.eval import main

    assert main(["--package", folder, "--eval-mode", "1", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gfnet-eval: error: deployment package") and message in err[0]


def test_predict_checks_its_inputs(tiny):
    net, _, folder = tiny
    pkg = load(folder, threads=1)
    images = pixels(2, 4).numpy()
    with pytest.raises(ValueError, match="takes uint8 pixels"):
        pkg.predict(images.astype(np.float32), 0)
    with pytest.raises(ValueError, match=r"\[N, 3, 64, 64\]"):
        pkg.predict(images[:, :, :32], 0)
    with pytest.raises(ValueError, match="one threshold per step"):
        pkg.predict(images, [0.5, -1e8])
    with pytest.raises(ValueError, match="NaN"):
        pkg.predict(images, [float("nan"), 0.5, -1e8])
    with pytest.raises(ValueError, match="outside 0..38"):
        pkg.predict(images, 39)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        pkg.predict(images, 0, batch_size=0)
    with pytest.raises(ValueError, match="threads"):
        load(folder, threads=0)


def test_invalid_pixels_exit_at_once_as_in_the_engine(tiny, tiny_float):
    # the package was exported from the checkpoint: the engine runs the checkpoint's model at the package's S
    net = gfnet.load_checkpoint(tiny[1])
    size = read_manifest(tiny_float)["image_size"]
    x = torch.randn(3, 3, size, size)
    x[1, 0, 5, 5] = float("nan")
    thresholds = [2.0, 2.0, -1e8]  # nobody exits early but the invalid image
    with pytest.warns(RuntimeWarning, match="non-finite"):
        engine = gfnet.budgeted_predict(net, x, thresholds, batch_size=3)
    res = load(tiny_float).predict(x.numpy(), thresholds)
    assert res.invalid.tolist() == engine.invalid.tolist() == [False, True, False]
    assert res.preds[1] == -1 and res.exit_step.tolist() == engine.exit_step.tolist()


# ----------------------------------------------------------------------------- atomic export
_KILLED_EXPORT = """
import sys, time
import torch
import gfnet.deploy.exporter as exporter
sys.path.insert(0, {tests!r})
from test_deploy import tiny_net
real = exporter._write_onnx
def slow(exported, name, path):
    real(exported, name, path)
    print("wrote", name, flush=True)
    time.sleep(600)  # killed here: one graph written, the package incomplete
exporter._write_onnx = slow
exporter.export(tiny_net(steps=1), {out!r}, format="onnx", overwrite={overwrite})
"""


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_killed_export_leaves_no_half_package(tmp_path, overwrite):
    # T=1: the package is the glance graph alone (the cheapest to export); the child is killed after writing it,
    # before the manifest and the rename
    out = tmp_path / "pkg"
    if overwrite:  # an existing package stays whole until a new one is complete
        gfnet.export(tiny_net(steps=1, seed=1), str(out), format="onnx", verify=False)
        before = read_manifest(str(out))
    code = _KILLED_EXPORT.format(tests=os.path.join(ROOT, "tests"), out=str(out), overwrite=overwrite)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("wrote glance"), line + proc.stderr.read()[-2000:]
        temps = [name for name in os.listdir(tmp_path) if name.endswith(".gfnet-tmp")]
        assert len(temps) == 1 and os.listdir(tmp_path / temps[0]) == ["glance.onnx"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if overwrite:
        assert read_manifest(str(out)) == before
    else:
        assert not out.exists()
    assert [name for name in os.listdir(tmp_path) if name.endswith(".gfnet-tmp")]  # the killed export's folder
    gfnet.export(tiny_net(steps=1), str(out), format="onnx", verify=False, overwrite=overwrite)
    assert os.listdir(tmp_path) == ["pkg"]  # the next export removed the dead one's temporary folder
    after = read_manifest(str(out))
    if overwrite:  # replaced by the new package (other weights: other checksums)
        assert after["files"] != before["files"]


def test_export_refuses_graphs_that_compute_something_else(tmp_path, monkeypatch):
    # a translation error, injected: the graph traced and written is not the model's (weights off by 5%); the
    # verification runs the written graph in ONNX Runtime against the model and publishes nothing
    import copy

    import gfnet.deploy.exporter as exporter

    real = exporter._trace

    def wrong(module, args, max_batch):
        other = copy.deepcopy(module)
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(1.05)
        return real(other, args, max_batch)

    monkeypatch.setattr(exporter, "_trace", wrong)
    with pytest.raises(RuntimeError, match=r"the exported glance graph \(onnx\) differs from the PyTorch model"):
        gfnet.export(tiny_net(steps=1), str(tmp_path / "pkg"), format="onnx")
    assert os.listdir(tmp_path) == []


def test_export_refuses_an_existing_folder_and_bad_arguments(tmp_path):
    net = tiny_net()
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="exists; choose another folder or overwrite"):
        gfnet.export(net, str(tmp_path / "taken"))
    with pytest.raises(ValueError, match="format must be one of onnx, executorch"):
        gfnet.export(net, str(tmp_path / "x"), format="tflite")
    with pytest.raises(ValueError, match="input_dtype"):
        gfnet.export(net, str(tmp_path / "x"), input_dtype="float16")
    with pytest.raises(ValueError, match="max_batch"):
        gfnet.export(net, str(tmp_path / "x"), max_batch=1)
    assert sorted(os.listdir(tmp_path)) == ["taken"]


# ----------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def tiny_float(tiny, tmp_path_factory):
    """The tiny checkpoint exported by gfnet-export with float32 input (the CLI test checks what it wrote)."""
    from gfnet.cli.export import main

    _, checkpoint, _ = tiny
    out = tmp_path_factory.mktemp("deploy-cli") / "pkg"
    assert main(["--checkpoint", checkpoint, "--format", "onnx", "--out", str(out), "--input-dtype", "float32",
                 "--max-batch", "4"]) == 0
    return str(out)


def test_gfnet_export_writes_a_package_from_a_checkpoint(tiny, tiny_float, capsys):
    from gfnet.cli.export import main

    net, checkpoint, _ = tiny
    m = read_manifest(tiny_float)
    assert m["input"]["dtype"] == "float32" and m["input"]["normalised"] and m["max_batch"] is None
    assert m["source"]["sha256"] == __import__("hashlib").sha256(open(checkpoint, "rb").read()).hexdigest()
    assert np.allclose(m["dynamic_threshold"], net.meta.dynamic_threshold.double().numpy())
    assert m["verified"]["max_abs_difference"]["focus"] < 1e-4
    # again into the same folder: refused before any work, one line, exit 2
    capsys.readouterr()
    assert main(["--checkpoint", checkpoint, "--format", "onnx", "--out", tiny_float]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gfnet-export: error: --out {tiny_float} exists; choose another folder or pass --overwrite"]


def test_without_the_deploy_packages_the_commands_say_what_to_install(tiny, tmp_path):
    _, checkpoint, folder = tiny
    export = module_blocker("onnxscript") + (
        "from gfnet.cli.export import main\n"
        f"sys.exit(main(['--checkpoint', {checkpoint!r}, '--format', 'onnx', '--out', {str(tmp_path / 'p')!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", export], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "gfnet-export: error: --format onnx needs onnxscript: pip install 'gfnet[deploy]' (onnx, onnxruntime, "
        "onnxscript, executorch)"]
    run = module_blocker("onnxruntime") + (
        "from gfnet.deploy import load\n"
        "try:\n"
        f"    load({folder!r})\n"
        "except ImportError as e:\n"
        "    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == ("running an ONNX package needs onnxruntime: pip install onnxruntime "
                                   "(or pip install 'gfnet[deploy]')"), proc.stderr[-2000:]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from gfnet.data import make_sample_tree

    root = tmp_path_factory.mktemp("deploy-data") / "tree"
    make_sample_tree(root, num_classes=CLASSES, train_per_class=3, val_per_class=3, photo_size=(72, 64))
    return str(root)


def test_gfnet_eval_evaluates_a_package_as_its_checkpoint(tiny, tiny_float, tree, capsys):
    from gfnet.cli.eval import main

    net, checkpoint, _ = tiny
    common = ["--data", tree, "--backend", "torchvision", "--num-threads", "0", "--batch-size", "4"]

    def run(source, mode, *extra):
        assert main(source + ["--eval-mode", mode] + common + list(extra)) == 0
        return capsys.readouterr().out.splitlines()

    def table(lines):  # from the anytime accuracies to the end of the budget table
        start = next(i for i, line in enumerate(lines) if line.startswith("anytime_classification"))
        return [line for line in lines[start:] if not line.startswith(("real early exit", "  point"))]

    # mode 1: the stored thresholds (fitted on other images, so no validation image sits on one): equal tables
    from_checkpoint = run(["--checkpoint", checkpoint], "1")
    from_package = run(["--package", tiny_float, "--threads", "1"], "1", "--real-exit", "--real-exit-points", "5",
                       "35")
    assert table(from_package) == table(from_checkpoint)
    assert any("(onnx package, float32 input)" in line for line in from_package)
    exits = [line for line in from_package if line.startswith("  point")]
    assert len(exits) == 2 and not any("differs from the post-hoc simulation" in line for line in exits)
    # mode 2 fits thresholds on the training images (the sample tree's training and validation crops come from the
    # same few photos, so confidences can coincide with fitted thresholds: only the anytime line is compared)
    fitted = run(["--package", tiny_float], "2")
    assert any(line.startswith("fitting thresholds on") for line in fitted)
    assert fitted[fitted.index(next(line for line in fitted if line.startswith("anytime")))] == \
        next(line for line in from_checkpoint if line.startswith("anytime"))
    assert sum(1 for line in fitted if line.startswith("  ") and len(line.split()) == 3) == 39
    assert main(["--package", tiny_float, "--eval-mode", "0"]) == 0
    assert "runtime: onnx" in capsys.readouterr().out
    assert main(["--package", tiny_float, "--eval-mode", "1", "--data", tree, "--compile"]) == 2
    assert "--compile apply to checkpoints" in capsys.readouterr().err


# ----------------------------------------------------------------------------- latency and its figure
def test_accuracy_latency_points_and_the_figure(tiny, tmp_path):
    from gfnet.deploy.latency import accuracy_latency_points
    from gfnet.models.encoder import build_backbone
    from gfnet.viz import plot_accuracy_latency

    net, _, folder = tiny
    images = pixels(6, 11)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    rows = net.meta.dynamic_threshold[[4, 34]]
    backbone = build_backbone(net.config, CLASSES).eval()
    results = {}
    for runtime in ("eager", "onnx"):
        res = accuracy_latency_points(net, rows, images, labels, backbone=backbone, backbone_accuracy=40.0,
                                      runtime=runtime, threads=1, rounds=1, warmup=0, label="tiny")
        results[runtime] = res
        assert [p.budget for p in res.points] == [0, 1]
        for p, row in zip(res.points, rows):
            engine = gfnet.budgeted_predict(net, images, row, batch_size=6)
            assert p.accuracy == pytest.approx(float((engine.preds == labels).double().mean()) * 100)
            shares = torch.bincount(engine.exit_step, minlength=T).double() / 6
            assert p.exit_shares == pytest.approx(shares.tolist())
            assert p.macs == pytest.approx(engine.macs_per_image)
            assert 0 < p.p50_ms <= p.p99_ms and p.mean_ms > 0
        assert res.backbone["accuracy"] == 40.0 and res.backbone["mean_ms"] > 0
        assert res.all_steps["mean_ms"] > 0 and res.cpu
        assert res.summary().startswith(("at the backbone's accuracy", "GFNet does not reach"))
    path = tmp_path / "results.json"
    path.write_text(json.dumps([results["eager"].to_dict(), results["onnx"].to_dict()]))
    plotted = plot_accuracy_latency(str(path), tmp_path / "figure.png")
    assert [d["runtime"] for d in plotted] == ["eager", "onnx"]
    assert (tmp_path / "figure.png").stat().st_size > 1000
    from gfnet.cli.viz import main

    assert main(["latency", str(path), "--out", str(tmp_path / "cli.svg")]) == 0
    assert (tmp_path / "cli.svg").exists()


def test_latency_at_accuracy_interpolates_along_the_curve():
    from gfnet.deploy.latency import AccuracyLatency, LatencyPoint

    def point(acc, ms):
        return LatencyPoint(0, [], acc, 0.0, 0.0, [], ms, ms, ms)

    res = AccuracyLatency("onnx", 1, "a", 224, 96, 3, [1.0], 1, points=[point(70.0, 2.0), point(74.0, 4.0),
                                                                        point(75.0, 6.0)],
                          backbone={"accuracy": 72.0, "mean_ms": 5.0, "p50_ms": 5.0, "p99_ms": 5.0, "macs": 1.0})
    assert res.latency_at_accuracy(72.0) == pytest.approx(3.0)
    assert "40% lower" in res.summary()
    assert res.latency_at_accuracy(80.0) is None
    res.backbone["accuracy"] = 80.0
    assert res.summary().startswith("GFNet does not reach the backbone's accuracy (80.0%)")


def test_latency_suite_compares_outputs_before_timing(monkeypatch):
    from gfnet.bench import bench_latency
    from gfnet.bench.common import OutputMismatch
    from gfnet.deploy import latency

    kwargs = dict(device="cpu", quick=True, arch="resnet10t", patch_size=32, T=2, num_images=4, points=(35,),
                  throughput=False)
    real = latency._PackageRunner.predict_one

    def wrong(self, image, thresholds):  # a runtime that exits every image at the glance
        pred, _ = real(self, image, thresholds)
        return pred, 0

    monkeypatch.setattr(latency._PackageRunner, "predict_one", wrong)
    with pytest.raises(OutputMismatch, match="ONNX Runtime exits"):
        bench_latency.run(**kwargs)


@pytest.mark.parametrize("runtime", ["onnx", "executorch"])
def test_the_backbone_baseline_runs_in_each_runtime_at_a_batch_past_15(runtime, tmp_path):
    """The accuracy-against-latency figure's baseline (the backbone alone at full resolution) in a deployment
    runtime equals the eager backbone, at a batch of 16: ExecuTorch's plan used to stop at 15 images wherever
    a depthwise convolution sits."""
    if runtime == "executorch":
        pytest.importorskip("executorch", reason="the ExecuTorch tests need gfnet[deploy]")
    from gfnet.deploy.latency import backbone_runner

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.Conv2d(8, 8, 3, 1, 1, groups=8),
                                   torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   torch.nn.Linear(8, 5))
    images = pixels(16, 11, 24)
    eager = backbone_runner(backbone, "eager", 24, threads=1, workdir=str(tmp_path))
    runner = backbone_runner(backbone, runtime, 24, threads=1, workdir=str(tmp_path))
    expected = np.asarray(eager.fn(eager.as_input(images.numpy())))
    got = np.asarray(runner.fn(runner.as_input(images.numpy())))
    assert got.shape == (16, 5)
    assert np.abs(got - expected).max() <= 1e-5


def test_onnx_sessions_take_their_threads_and_do_not_spin(tiny):
    """A package's sessions take turns: each gets the threads asked for, and its pool threads sleep between runs
    instead of spinning on the cores the next session needs."""
    _, _, folder = tiny
    pkg = load(folder, threads=2)
    for session in pkg.graphs.sessions.values():
        options = session.get_session_options()
        assert options.intra_op_num_threads == 2
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_the_export_record_is_written_after_every_backbone(tmp_path, monkeypatch):
    """``python -m gfnet.bench.deploy_exports`` keeps what it measured: the record files hold every backbone done
    so far (a failure recorded, the run going on), written atomically after each one."""
    from gfnet.bench import deploy_exports

    seen = []

    def check(arch, fmt):
        path = tmp_path / "deploy_exports_cpu.json"
        seen.append(json.loads(path.read_text())["records"] if path.exists() else [])
        if arch == "bad":
            raise RuntimeError("lowering failed\nsecond line")
        return {"arch": arch, "format": fmt, "S": 224, "graphs": ["focus", "glance"], "export_wall_s": 1.0,
                "export_cpu_s": 1.0, "package_mb": 1.0, "verify_max_abs_difference": 1e-6, "images": 8,
                "ambiguous": 0, "exits_equal": True, "preds_equal": True, "probs_max_abs_difference": 1e-7,
                "ok": True}

    monkeypatch.setattr(deploy_exports, "check_backbone", check)
    assert deploy_exports.main(["--out-dir", str(tmp_path), "--formats", "onnx", "--archs", "a", "bad", "b"]) == 1
    assert [len(records) for records in seen] == [0, 1, 2]
    records = json.loads((tmp_path / "deploy_exports_cpu.json").read_text())["records"]
    assert [r["arch"] for r in records] == ["a", "bad", "b"]
    assert records[1]["error"] == "RuntimeError: lowering failed"
    md = (tmp_path / "deploy_exports_cpu.md").read_text()
    assert "| bad | onnx |" in md and "FAILED: RuntimeError: lowering failed" in md
