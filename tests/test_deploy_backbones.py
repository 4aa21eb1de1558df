"""Deployment packages of the reference backbones: they export to ONNX, ResNet-50 (GRU classifier) and
MobileNet-V3 (cascade) to ExecuTorch too, and a package's early exit equals gfnet's engine image by image.

By default one backbone of each family exports to ONNX (resnet50, densenet121, regnety_600m,
mobilenetv3_large_100, efficientnet_b2: their larger siblings are the same operators in more blocks); all
eleven with ``GFNET_TEST_ALL_BACKBONES=1``. On the 2-core machine the eleven ONNX exports took 29 minutes of
a 43-minute run (other jobs sharing the cores), too much for every CI run. ExecuTorch's XNNPACK lowering takes
minutes per backbone; the other nine's record is ``python -m gfnet.bench.deploy_exports``.
Each package is exported once per test session (P=32, T=3, 10 classes, the backbone's own S) and shared.
"""
import os

import numpy as np
import pytest
import torch

import gfnet
from gfnet import budget
from gfnet.config import REFERENCE_ARCHS
from gfnet.deploy import DEFAULT_TOLERANCE, load, read_manifest

from helpers import TORCH_BLOCKER, randomise_batchnorm

pytest.importorskip("onnxruntime", reason="the deployment tests need gfnet[deploy]")
pytest.importorskip("onnxscript", reason="the deployment tests need gfnet[deploy]")

pytestmark = pytest.mark.usefixtures("native_cpu_convolutions")

P, T, CLASSES = 32, 3, 10
#: Input dtype per (backbone, format): both dtypes in both formats across the two equality backbones.
DTYPES = {("resnet50", "onnx"): "uint8", ("resnet50", "executorch"): "float32",
          ("mobilenetv3_large_100", "onnx"): "float32", ("mobilenetv3_large_100", "executorch"): "uint8"}
EQUALITY = [("resnet50", "onnx"), ("resnet50", "executorch"), ("mobilenetv3_large_100", "onnx"),
            ("mobilenetv3_large_100", "executorch")]


def _pixels(n, S, seed):
    return torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _as_input(net, pixels, dtype):
    if dtype == "uint8":
        return pixels
    mean = torch.tensor(net.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(net.config.std).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


class Packages:
    """Nets and their packages, made once per session."""

    def __init__(self, root):
        self.root, self.nets, self.folders = root, {}, {}

    def net(self, arch):
        if arch not in self.nets:
            torch.manual_seed(0)
            net = gfnet.build_model(arch, patch_size=P, T=T, num_classes=CLASSES).eval()
            randomise_batchnorm(net)
            with torch.no_grad():  # sharper outputs than at initialisation: thresholds split the images
                for module in (net.fc, net.model_prime.head):
                    for p in module.parameters():
                        p.mul_(8.0)
            # a budget table in the net's meta, as a checkpoint stores it: the package's manifest carries it
            train = net.anytime_predict(_pixels(16, net.image_size, 1)).probs
            net.meta.dynamic_threshold = torch.stack(
                [budget.find_thresholds(train, None, budget.exit_proportions(p / 20, T)) for p in range(1, 40)])
            self.nets[arch] = net
        return self.nets[arch]

    def get(self, arch, fmt):
        key = (arch, fmt)
        if key not in self.folders:
            folder = os.path.join(self.root, f"{arch}-{fmt}")
            gfnet.export(self.net(arch), folder, format=fmt, input_dtype=DTYPES.get(key, "uint8"), max_batch=16)
            self.folders[key] = folder
        return self.nets[arch], self.folders[key], DTYPES.get(key, "uint8")


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    return Packages(str(tmp_path_factory.mktemp("deploy-packages")))


def _compare_with_engine(net, pkg, dtype, n=4, seed=2):
    pixels = _pixels(n, net.image_size, seed)
    images = _as_input(net, pixels, dtype)
    probs = net.anytime_predict(images).probs
    conf = probs.max(-1).values
    thresholds = [float(conf[t].median()) for t in range(T - 1)] + [-1e8]
    engine = gfnet.budgeted_predict(net, images, thresholds, batch_size=2)
    res = pkg.predict(images.numpy(), thresholds, batch_size=2)
    clear = ~res.ambiguous
    assert np.array_equal(res.exit_step[clear], engine.exit_step.numpy()[clear])
    assert np.array_equal(res.preds[clear], engine.preds.numpy()[clear])
    return res


def _onnx_op_domains(folder, manifest):
    import onnx

    domains, ops = set(), set()
    for graph in manifest["graphs"].values():
        model = onnx.load(os.path.join(folder, graph["file"]))
        assert not model.functions, f"{graph['file']} keeps local functions"
        for node in model.graph.node:
            domains.add(node.domain)
            ops.add(node.op_type)
    return domains, ops


#: One backbone per family, exported on every run; the others with GFNET_TEST_ALL_BACKBONES=1.
FAMILIES = ("resnet50", "densenet121", "regnety_600m", "mobilenetv3_large_100", "efficientnet_b2")
ALL_BACKBONES = os.environ.get("GFNET_TEST_ALL_BACKBONES") == "1"


@pytest.mark.parametrize("arch", sorted(REFERENCE_ARCHS))
def test_every_reference_backbone_exports_to_onnx(arch, packages):
    if arch not in FAMILIES and not ALL_BACKBONES:
        pytest.skip(f"{arch}: its family's export runs on every run; all eleven with GFNET_TEST_ALL_BACKBONES=1")
    net, folder, dtype = packages.get(arch, "onnx")
    manifest = read_manifest(folder)
    cfg = REFERENCE_ARCHS[arch]
    assert (manifest["arch"], manifest["image_size"], manifest["patch_size"], manifest["T"]) == \
        (arch, cfg.image_size, P, T)
    assert manifest["glance_mode"] == cfg.prime_interpolation and manifest["mean"] == list(cfg.mean)
    assert manifest["classifier"] == ("gru" if cfg.fc_rnn else "cascade")
    expected_graphs = {"glance", "focus"} | ({"classify"} if cfg.fc_rnn else {f"classify_{t}" for t in range(1, T)})
    assert set(manifest["graphs"]) == expected_graphs
    assert manifest["flops"] == pytest.approx(gfnet.flops.compute_flops(net)["flops"])
    assert len(manifest["dynamic_threshold"]) == 39
    domains, ops = _onnx_op_domains(folder, manifest)
    assert domains <= {"", "ai.onnx"}, domains  # standard operators only: no gfnet (or any custom) domain
    assert not any("gfnet" in op.lower() for op in ops)
    _compare_with_engine(net, load(folder, threads=1), dtype)


@pytest.mark.parametrize("arch", ["resnet50", "mobilenetv3_large_100"])
def test_gru_and_cascade_backbones_export_to_executorch(arch, packages):
    pytest.importorskip("executorch", reason="the ExecuTorch tests need gfnet[deploy]")
    net, folder, dtype = packages.get(arch, "executorch")
    manifest = read_manifest(folder)
    assert manifest["runtime"] == "executorch" and manifest["max_batch"] == 16
    assert all(g["file"].endswith(".pte") for g in manifest["graphs"].values())
    _compare_with_engine(net, load(folder, threads=1), dtype)


@pytest.mark.parametrize("arch,fmt", EQUALITY)
def test_package_early_exit_equals_the_engine(arch, fmt, packages):
    if fmt == "executorch":
        pytest.importorskip("executorch", reason="the ExecuTorch tests need gfnet[deploy]")
    net, folder, dtype = packages.get(arch, fmt)
    pkg = load(folder, threads=1)
    n = 24
    pixels = _pixels(n, net.image_size, 3)
    images = _as_input(net, pixels, dtype)
    anytime = net.anytime_predict(images).probs  # [T, n, classes]
    fit = net.anytime_predict(_as_input(net, _pixels(n, net.image_size, 4), dtype)).probs
    thresholds = [float(v) for v in budget.find_thresholds(fit, None, budget.exit_proportions(1.0, T))]
    engine = gfnet.budgeted_predict(net, images, thresholds, batch_size=8)
    assert len(set(engine.exit_step.tolist())) >= 2, "the budget should split the images over the steps"

    res = pkg.predict(images.numpy(), thresholds, batch_size=8)
    clear = ~res.ambiguous
    assert clear.sum() >= n - 2, f"{int(res.ambiguous.sum())} ambiguous images of {n}"
    assert np.array_equal(res.exit_step[clear], engine.exit_step.numpy()[clear])
    assert np.array_equal(res.preds[clear], engine.preds.numpy()[clear])
    exit_probs = anytime[engine.exit_step, torch.arange(n)].numpy()
    assert np.abs(res.probs[clear] - exit_probs[clear]).max() <= DEFAULT_TOLERANCE
    assert res.macs_per_image == pytest.approx(float(np.asarray(pkg.flops)[res.exit_step].mean()))
    assert res.step_images.tolist() == [n] + [int((engine.exit_step >= t).sum()) for t in range(1, T)]

    # the latency path (one image per call) classifies every image as the batch path
    for i in range(n):
        one = pkg.predict(images[i:i + 1].numpy(), thresholds)
        if not (one.ambiguous[0] or res.ambiguous[i]):
            assert (one.exit_step[0], one.preds[0]) == (res.exit_step[i], res.preds[i])

    # an image whose confidence is (within rounding) the threshold is reported, not silently counted
    edge = list(thresholds)
    edge[0] = float(anytime[0, 0].max())
    assert pkg.predict(images[:1].numpy(), edge).ambiguous[0]

    # a budget index reads the manifest's stored thresholds (the checkpoint's dynamic_threshold)
    stored = net.meta.dynamic_threshold[19].tolist()
    by_index = pkg.predict(images.numpy(), 19, batch_size=8)
    by_value = pkg.predict(images.numpy(), stored, batch_size=8)
    assert np.array_equal(by_index.exit_step, by_value.exit_step) and by_index.thresholds == stored


def test_onnx_package_runs_without_torch(packages, tmp_path):
    import subprocess
    import sys

    net, folder, dtype = packages.get("mobilenetv3_large_100", "onnx")
    images = _as_input(net, _pixels(6, net.image_size, 5), dtype).numpy()
    np.save(tmp_path / "images.npy", images)
    thresholds = net.meta.dynamic_threshold[15].tolist()
    code = TORCH_BLOCKER + (
        "import json, numpy as np\n"
        "from gfnet.deploy import load\n"
        f"pkg = load({folder!r}, threads=1)\n"
        f"res = pkg.predict(np.load({str(tmp_path / 'images.npy')!r}), {thresholds!r}, batch_size=4)\n"
        "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('torch')]\n"
        "print(json.dumps({'preds': res.preds.tolist(), 'exit_step': res.exit_step.tolist(),\n"
        "                  'probs': res.probs.tolist()}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    res = load(folder, threads=1).predict(images, thresholds, batch_size=4)
    assert out["preds"] == res.preds.tolist() and out["exit_step"] == res.exit_step.tolist()
    assert np.array_equal(np.asarray(out["probs"], dtype=np.float32), res.probs)
