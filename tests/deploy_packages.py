"""Deployment packages of the reference backbones, shared by the ONNX (test_deploy_backbones.py) and the
ExecuTorch (test_deploy_executorch.py) tests: nets with sharpened classifiers and a budget table, their
packages exported once per test module (P=32, T=3, 10 classes, the backbone's own S, max_batch 16), and the
comparison of a package's early exit with gfnet's engine."""
import os

import numpy as np
import pytest
import torch

import gfnet
from gfnet import budget
from gfnet.deploy import DEFAULT_TOLERANCE, load

from helpers import randomise_batchnorm

MAX_BATCH = 16
P, T, CLASSES = 32, 3, 10
#: Input dtype per (backbone, format): both dtypes in both formats across the two equality backbones.
DTYPES = {("resnet50", "onnx"): "uint8", ("resnet50", "executorch"): "float32",
          ("mobilenetv3_large_100", "onnx"): "float32", ("mobilenetv3_large_100", "executorch"): "uint8"}
#: The equality backbones: a GRU classifier and a cascade.
EQUALITY = [("resnet50", "onnx"), ("resnet50", "executorch"), ("mobilenetv3_large_100", "onnx"),
            ("mobilenetv3_large_100", "executorch")]


def random_pixels(n, S, seed):
    return torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def as_input(net, pixels, dtype):
    if dtype == "uint8":
        return pixels
    mean = torch.tensor(net.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(net.config.std).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


class Packages:
    """Nets and their packages, made once per test module (its ``packages`` fixture)."""

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
            train = net.anytime_predict(random_pixels(16, net.image_size, 1)).probs
            net.meta.dynamic_threshold = torch.stack(
                [budget.find_thresholds(train, None, budget.exit_proportions(p / 20, T)) for p in range(1, 40)])
            self.nets[arch] = net
        return self.nets[arch]

    def get(self, arch, fmt):
        key = (arch, fmt)
        if key not in self.folders:
            folder = os.path.join(self.root, f"{arch}-{fmt}")
            gfnet.export(self.net(arch), folder, format=fmt, input_dtype=DTYPES.get(key, "uint8"),
                         max_batch=MAX_BATCH)
            self.folders[key] = folder
        return self.nets[arch], self.folders[key], DTYPES.get(key, "uint8")


def compare_with_engine(net, pkg, dtype, n=4, seed=2):
    pixels = random_pixels(n, net.image_size, seed)
    images = as_input(net, pixels, dtype)
    probs = net.anytime_predict(images).probs
    conf = probs.max(-1).values
    thresholds = [float(conf[t].median()) for t in range(T - 1)] + [-1e8]
    engine = gfnet.budgeted_predict(net, images, thresholds, batch_size=2)
    res = pkg.predict(images.numpy(), thresholds, batch_size=2)
    clear = ~res.ambiguous
    assert np.array_equal(res.exit_step[clear], engine.exit_step.numpy()[clear])
    assert np.array_equal(res.preds[clear], engine.preds.numpy()[clear])
    return res




def check_early_exit_equals_the_engine(arch, fmt, packages):
    """A package's budgeted early exit (batches and one image at a time) equals gfnet.budgeted_predict image by
    image; ambiguous images are reported, budget indices read the manifest."""
    net, folder, dtype = packages.get(arch, fmt)
    pkg = load(folder, threads=1)
    n = 24
    pixels = random_pixels(n, net.image_size, 3)
    images = as_input(net, pixels, dtype)
    anytime = net.anytime_predict(images).probs  # [T, n, classes]
    fit = net.anytime_predict(as_input(net, random_pixels(n, net.image_size, 4), dtype)).probs
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
