"""The demo: GFNet on cluttered handwritten digits, trained through its three stages on the CPU in minutes.

The task (:func:`make_cluttered_digits`) is built from scikit-learn's 8x8 handwritten digits (1797 real
digits that ship inside the package: no download). Each digit is enlarged to ``digit_size`` pixels and
put at a random place on a larger dark canvas, among fragments (random quarters of other digits). The
glance sees the whole canvas shrunk to P x P, where the digit is a few pixels wide and hard to tell from
the fragments; a full-resolution P x P patch on the digit shows it whole. So accuracy should climb from
the glance to the focus steps, and a learned policy should beat random patch positions.

:func:`run_demo` builds the task, trains a small timm backbone through stages 1-3 with
:class:`gfnet.train.Trainer`, evaluates anytime accuracy with the learned policy and with random patch
positions, fits budgeted-classification thresholds (:mod:`gfnet.budget`) and writes the folder that
``gfnet-viz report`` reads, with the file names :mod:`gfnet.viz.report` defines: the checkpoint
(``checkpoint.pth.tar``, reference format, evaluation fields filled), ``results.json``, the images to draw
(``samples.pt``), and the report's pictures (``patches.png``, ``budget_curve.png``, drawn by
:func:`gfnet.viz.render_report` itself); plus ``demo.log`` and each stage's checkpoints and ``train.log``
under ``stage1/``, ``stage2/``, ``stage3/``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import gfnet
from gfnet import budget
from gfnet.precision import AMP_MODES, amp_dtype, autocast
from gfnet.train import TensorLoader, Trainer, TrainOptions
from gfnet.viz.report import CHECKPOINT_FILE, LATENCY_FILE, RESULTS_FILE, SAMPLES_FILE, render_report

__all__ = ["DemoConfig", "QUICK", "DEMO_AMP", "ClutteredDigitsLoader", "make_cluttered_digits",
           "digit_patch_actions", "pretrain_encoders", "anytime_accuracy", "test_canvases",
           "checkpoint_anytime_accuracy", "write_canvas_tree", "train_full_resolution_backbone",
           "recalibrate_batch_norm", "method_claims", "DEMO_LATENCY", "measure_latency", "run_demo"]

log = logging.getLogger("gfnet.demo")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes, model and schedule of the demo (defaults: a few minutes on 2 CPU cores).

    canvas: S, the image side; digit_size: side of an enlarged digit; fragments: distractors per
    image; noise: amplitude (0-255) of the uniform noise every canvas pixel starts from (see
    :func:`make_cluttered_digits`); patch_size: P; T: steps; arch: the timm backbone;
    train_images / test_images: canvases; pretrain_epochs / pretrain_lr: the encoders' initialisation
    (:func:`pretrain_encoders`, Adam); epochs1/2/3: epochs of each stage; batch_size: stages 1 and 3 and
    pre-training; policy_batch_size: stage 2's (PPO makes one update per batch: smaller batches, more
    updates for the same images); lr: backbone learning rate of stage 1 (the classifier uses the
    reference's 0.1); policy_lr: stage 2's Adam (the reference's 3e-4 is made for 15 ImageNet epochs of
    5000 updates; this short schedule takes about a thousand); lr3: stage 3's backbone and classifier
    rate (a light touch: 1437 training digits overfit quickly); baseline_epochs / baseline_lr: epochs
    and Adam learning rate of the full-resolution backbone the demo trains for comparison
    (:func:`train_full_resolution_backbone`; 0 epochs skips it; as many epochs as GFNet's local encoder
    sees, pre-training included, less one); latency_images / latency_budgets: held-out canvases classified one
    at a time, and budgets of the curve, for the accuracy-against-latency figure (:func:`measure_latency`);
    min_gain: points by which step T must beat the glance and the
    learned policy must beat random patches for the demo to count the method as shown; channels_last: the
    encoders' memory format (contiguous by default; channels-last convolutions round differently, a check of
    the demo's robustness); seed.
    """

    canvas: int = 128
    digit_size: int = 16
    fragments: int = 4
    noise: float = 48.0
    patch_size: int = 40
    T: int = 3
    arch: str = "test_resnet"
    train_images: int = 4000
    test_images: int = 1000
    pretrain_epochs: int = 2
    pretrain_lr: float = 3e-3
    epochs1: int = 2
    epochs2: int = 8
    epochs3: int = 1
    batch_size: int = 64
    policy_batch_size: int = 32
    lr: float = 0.01
    policy_lr: float = 1e-3
    lr3: float = 1e-3
    baseline_epochs: int = 4
    baseline_lr: float = 1e-3
    latency_images: int = 200
    latency_budgets: int = 6
    min_gain: float = 10.0
    channels_last: bool = False
    seed: int = 0


#: The demo's precisions (``gfnet-demo --amp``): "none" (fp32, the published numbers) or "bf16" (bf16
#: autocast for training and evaluation alike; the weights and optimiser state stay fp32).
DEMO_AMP = tuple(m for m in AMP_MODES if m in ("none", "bf16"))  # the CPU's precisions (fp16 is a GPU's)


#: The ``--quick`` configuration: the same pipeline at a toy size (tests; well under a minute).
QUICK = DemoConfig(canvas=64, digit_size=12, fragments=2, patch_size=24, T=3, train_images=128,
                   test_images=64, pretrain_epochs=1, epochs1=1, epochs2=1, epochs3=1, batch_size=32,
                   policy_batch_size=32, baseline_epochs=1, latency_images=16, latency_budgets=3)


def _digits(split: str, seed: int):
    """Real digits of one split: (Tensor[M, 1, 8, 8] float in [0, 1], Tensor[M] int64). A fixed 80/20
    split of scikit-learn's 1797 digits, so that test canvases show digits never seen in training."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    labels = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    cut = int(0.8 * len(labels))
    idx = order[:cut] if split == "train" else order[cut:]
    return images[idx], labels[idx]


def make_cluttered_digits(n: int, split: str = "train", canvas: int = 128, digit_size: int = 16,
                          fragments: int = 4, seed: int = 0, noise: float = 0.0):
    """``n`` cluttered-digit images from scikit-learn's digits.

    Each image: a ``canvas`` x ``canvas`` background of uniform noise in [0, ``noise``] (of 255), one digit
    enlarged (bilinear) to ``digit_size`` pixels at a uniformly random position, plus ``fragments``
    distractors, each a random (digit_size/2)-pixel quarter of another digit at a random position; pixels
    combine by maximum.

    Why noise: on a black background most P x P patches are constant, and batch norm's statistics over
    batches of mostly constant patches swing from batch to batch (their variance comes from the few
    patches that show ink); the running statistics that evaluation uses then disagree with the batch
    statistics the network trained with. Measured with the demo's stage 1 (seed 0, AVX2 CPU): random-patch
    accuracy after steps 1-3 was 52.3% -> 35.5% -> 21.8% in eval mode but 52.3% -> 52.6% -> 53.2% with
    the local encoder's batch statistics; with noise 48 the two agree and focus steps stop hurting.
    Photographs, the method's real input, have texture everywhere.

    Returns:
        images Tensor[n, 3, canvas, canvas] uint8 (grey, the channels equal: an expanded view of one
        channel, 3x less memory), labels Tensor[n] int64 (the digit), boxes Tensor[n, 2] int64 (the
        digit's top-left row and column).
    """
    if digit_size > canvas:
        raise ValueError(f"digit_size {digit_size} must fit the canvas {canvas}")
    g = torch.Generator().manual_seed(seed * 7 + (0 if split == "train" else 1))
    src, src_labels = _digits(split, seed)
    big = F.interpolate(src, size=(digit_size, digit_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    pick = torch.randint(len(src_labels), (n,), generator=g)
    out = torch.zeros(n, canvas, canvas)
    if noise > 0:
        out.uniform_(0.0, noise / 255.0, generator=g)
    span = canvas - digit_size + 1
    boxes = torch.randint(span, (n, 2), generator=g)
    half = digit_size // 2
    for _ in range(fragments):
        other = torch.randint(len(src_labels), (n,), generator=g)
        quarter = torch.randint(2, (n, 2), generator=g) * half
        pos = torch.randint(canvas - half + 1, (n, 2), generator=g)
        for i in range(n):
            r, c = quarter[i].tolist()
            piece = big[other[i], 0, r:r + half, c:c + half]
            pr, pc = pos[i].tolist()
            region = out[i, pr:pr + half, pc:pc + half]
            torch.maximum(region, piece, out=region)
    for i in range(n):
        r, c = boxes[i].tolist()
        region = out[i, r:r + digit_size, c:c + digit_size]
        torch.maximum(region, big[pick[i], 0], out=region)
    images = out.mul_(255).round_().to(torch.uint8).unsqueeze(1).expand(n, 3, canvas, canvas)
    return images, src_labels[pick], boxes


class ClutteredDigitsLoader:
    """Training batches of cluttered digits, with fresh canvases every epoch (new positions and clutter
    around the same training digits: the encoders see more variety than a fixed set of canvases).

    Args:
        n: canvases per epoch; config: the task's sizes; batch_size; seed.
        epoch_offset: added to the epoch number when drawing canvases (each stage gets its own).
    Interface of :class:`gfnet.train.TensorLoader` (``len``, ``set_epoch``); :meth:`canvases` gives an
    epoch's (images, labels, boxes).
    """

    def __init__(self, n: int, config: DemoConfig, batch_size: int, seed: int = 0, epoch_offset: int = 0):
        self.n, self.config, self.batch_size, self.seed = n, config, batch_size, seed
        self.epoch, self.epoch_offset = 0, epoch_offset
        self._cache = None

    def canvases(self, epoch: int):
        key = epoch + self.epoch_offset
        if self._cache is None or self._cache[0] != key:
            c = self.config
            self._cache = (key, make_cluttered_digits(self.n, "train", c.canvas, c.digit_size, c.fragments,
                                                      seed=self.seed * 10007 + key, noise=c.noise))
        return self._cache[1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self):
        images, labels, _ = self.canvases(self.epoch)
        loader = TensorLoader(images, labels, self.batch_size, train=True, seed=self.seed)
        loader.set_epoch(self.epoch + self.epoch_offset)
        return iter(loader)


def digit_patch_actions(boxes: torch.Tensor, canvas: int, digit_size: int, patch_size: int,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Actions Tensor[N, 2] in [0, 1] whose P x P patch contains the whole digit at a random offset
    (the patch's top-left corner floor(a * (S - P)) lands in [box + digit - P, box], clamped)."""
    slack = max(patch_size - digit_size, 0)
    off = torch.randint(0, slack + 1, boxes.shape, generator=generator)
    corner = (boxes - off).clamp(0, canvas - patch_size)
    return ((corner.float() + 0.5) / max(canvas - patch_size, 1)).clamp(0, 1)


def pretrain_encoders(net, loader: ClutteredDigitsLoader, epochs: int = 2, lr: float = 3e-3, seed: int = 0,
                      amp: Optional[str] = None) -> dict:
    """The demo's stand-in for the ImageNet initialisation the reference starts stage 1 from.

    Trains each encoder with its own head as a plain digit classifier (Adam): the global encoder on
    glances (whole canvases shrunk to P x P), the local encoder on P x P patches that contain the
    digit. Uses the digit boxes, which GFNet itself never sees. ``amp``: None/"none" (fp32) or "bf16"
    (the forward passes under bf16 autocast). Returns the last epoch's training accuracy (%) of each encoder.
    """
    g = torch.Generator().manual_seed(seed)
    P, batch_size, digit_size = net.patch_size, loader.batch_size, loader.config.digit_size
    params = list(net.model_prime.parameters()) + list(net.model.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    net.model_prime.train()
    net.model.train()
    acc = {}
    for epoch in range(epochs):
        images, labels, boxes = loader.canvases(epoch)
        canvas = images.shape[-1]
        order = torch.randperm(len(labels), generator=g)
        hits = {"global": 0, "local": 0}
        for start in range(0, len(order) - batch_size + 1, batch_size):
            b = order[start:start + batch_size]
            x, y = images[b], labels[b]
            actions = digit_patch_actions(boxes[b], canvas, digit_size, P, g)
            loss = 0.0
            with autocast(x.device, amp):
                for name, encoder, inp in (("global", net.model_prime, net.glance_input(x, "bicubic")),
                                           ("local", net.model, net.focus_input(x, actions))):
                    logits = encoder.head(encoder(inp)[0])
                    loss = loss + F.cross_entropy(logits, y)  # autocast computes it in float32
                    hits[name] += int((logits.argmax(1) == y).sum())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seen = len(order) // batch_size * batch_size
        acc = {k: 100.0 * v / seen for k, v in hits.items()}
        log.info("pre-training epoch %d/%d: train accuracy global %.1f%%, local %.1f%%", epoch + 1, epochs,
                 acc["global"], acc["local"])
    return acc


@torch.no_grad()
def anytime_accuracy(net, images: torch.Tensor, labels: torch.Tensor, policy: str = "learned",
                     batch_size: int = 256, seed: int = 0, glance_mode: Optional[str] = None,
                     amp: Optional[str] = None):
    """Top-1 accuracy (%) after each step with the ``learned`` policy (mean actions) or ``random``
    patch positions (uniform, seeded), plus the softmax outputs Tensor[T, N, classes] float32 and the
    actions Tensor[T-1, N, 2] float32. ``net`` must be in eval mode. ``amp``: None/"none" (fp32) or
    "bf16" (every step under bf16 autocast; the softmax in float32)."""
    g = torch.Generator().manual_seed(seed)
    probs, actions = [], []
    for start in range(0, len(labels), batch_size):
        x = images[start:start + batch_size]
        with autocast(x.device, amp):
            out = net.step(0, x, glance_mode=glance_mode)
            p, a = [F.softmax(out.logits.float(), 1)], []
            for t in range(1, net.T):
                act = torch.rand(x.shape[0], 2, generator=g) if policy == "random" else None
                out = net.step(t, x, out.state, actions=act)
                p.append(F.softmax(out.logits.float(), 1))
                a.append(out.actions.float())
        probs.append(torch.stack(p))
        actions.append(torch.stack(a))
    probs, actions = torch.cat(probs, 1), torch.cat(actions, 1)
    acc = (probs.argmax(-1) == labels).float().mean(1).mul(100).tolist()
    return acc, probs, actions


def _write_json(path: str, obj: dict) -> None:
    # Atomic: a reader (gfnet-viz report) never sees half a file; never over a pipe or a device file.
    from gfnet.atomic import atomic_write

    atomic_write(path, lambda f: json.dump(obj, f, indent=1), text=True)


#: Test canvases saved for the report's patch picture.
REPORT_IMAGES = 8


def test_canvases(config: DemoConfig):
    """The demo's held-out canvases (images uint8 Tensor[N, 3, S, S], labels, boxes), rebuilt from ``config``'s
    seed and sizes: the same every time."""
    c = config
    return make_cluttered_digits(c.test_images, "test", c.canvas, c.digit_size, c.fragments, c.seed, noise=c.noise)


#: The manifest that marks a folder written by :func:`write_canvas_tree` (an earlier tree may be replaced).
CANVAS_TREE_MANIFEST = ".gfnet-demo-canvases.json"


def write_canvas_tree(root: str, config: DemoConfig = DemoConfig(), train_images: int = 2000) -> dict:
    """Write the demo's canvases as an image tree that ``gfnet-eval --data ROOT`` reads: ``ROOT/val/<digit>/``
    holds the demo's held-out canvases (:func:`test_canvases`, the ones its accuracies are measured on) and
    ``ROOT/train/<digit>/`` ``train_images`` training canvases (those the demo fits its thresholds on), as
    lossless greyscale PNGs of S x S pixels, so that a loader reads back exactly the demo's pixels. Class folders
    are ``0`` .. ``9``: their sorted order is the digit, the demo's label.

    ``root`` must be new, empty or an earlier canvas tree (replaced). Returns {"train": n, "val": n}.
    """
    import shutil

    from PIL import Image

    c = config
    if os.path.isdir(root) and os.listdir(root):
        if not os.path.isfile(os.path.join(root, CANVAS_TREE_MANIFEST)):
            raise FileExistsError(f"{root} is not empty and holds no earlier canvas tree ({CANVAS_TREE_MANIFEST}): "
                                  "choose a new folder (class folders written beside other files would change "
                                  "the labels)")
        for split in ("train", "val"):
            shutil.rmtree(os.path.join(root, split), ignore_errors=True)
    loader = ClutteredDigitsLoader(c.train_images, c, c.batch_size, seed=c.seed, epoch_offset=4000)
    train_x, train_y, _ = loader.canvases(0)  # the canvases the demo fits its thresholds on
    val_x, val_y, _ = test_canvases(c)
    counts = {}
    for split, images, labels in (("train", train_x[:train_images], train_y[:train_images]), ("val", val_x, val_y)):
        for d in range(10):
            os.makedirs(os.path.join(root, split, str(d)), exist_ok=True)
        for i in range(len(labels)):
            Image.fromarray(images[i, 0].numpy(), mode="L").save(
                os.path.join(root, split, str(int(labels[i])), f"{split}_{i:05d}.png"))
        counts[split] = len(labels)
    with open(os.path.join(root, CANVAS_TREE_MANIFEST), "w") as f:
        json.dump({"config": asdict(c), "counts": counts}, f, indent=1)
    return counts


def checkpoint_anytime_accuracy(path: str, config: DemoConfig = DemoConfig(), amp: Optional[str] = None) -> list:
    """Anytime accuracy (%, one per step) of a demo checkpoint on the demo's held-out canvases (rebuilt
    from ``config``'s seed and sizes) with the learned policy, under ``amp`` (None/"none" fp32, or "bf16"):
    how a network trained in one precision classifies when evaluated in another."""
    net = gfnet.load_checkpoint(path).eval()
    test_x, test_y, _ = test_canvases(config)
    return anytime_accuracy(net, test_x, test_y, "learned", amp=amp)[0]


def train_full_resolution_backbone(config: DemoConfig, loader: ClutteredDigitsLoader, test_x: torch.Tensor,
                                   test_y: torch.Tensor, amp: Optional[str] = None):
    """The comparison GFNet is measured against: the same backbone (``config.arch``) classifying whole
    S x S canvases at full resolution, trained from scratch with Adam (``config.baseline_lr``) for
    ``config.baseline_epochs`` epochs of the training canvases that ``loader`` draws.

    Its batch-norm statistics are then recomputed over 16 training batches at the final weights (as pycls's
    "precise BN" does): the running averages lag behind weights that move fast, and measured here, one
    setting (Adam 3e-3, 4 epochs) trained to 96% yet classified held-out canvases at chance with them.

    Returns (model in eval mode, test accuracy %, Multiply-Adds of one image).
    """
    import timm

    from gfnet.flops import count_macs

    c = config
    g = torch.Generator().manual_seed(c.seed + 17)
    with torch.random.fork_rng(devices=[]):  # its initialisation depends on the seed alone
        torch.manual_seed(c.seed + 17)
        model = timm.create_model(c.arch, pretrained=False, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=c.baseline_lr)
    mean = torch.tensor(gfnet.get_config(c.arch).mean).view(1, 3, 1, 1)
    std = torch.tensor(gfnet.get_config(c.arch).std).view(1, 3, 1, 1)

    def normalize_images(x, mean, std):  # uint8 canvases -> the backbone's normalised float input
        return (x.float() / 255.0 - mean) / std

    for epoch in range(c.baseline_epochs):
        model.train()
        images, labels, _ = loader.canvases(epoch)
        order = torch.randperm(len(labels), generator=g)
        hits = seen = 0
        for start in range(0, len(order) - c.batch_size + 1, c.batch_size):
            b = order[start:start + c.batch_size]
            x = normalize_images(images[b], mean, std)
            with autocast(x.device, amp):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hits += int((logits.argmax(1) == labels[b]).sum())
            seen += len(b)
        log.info("full-resolution %s, epoch %d/%d: train accuracy %.1f%%", c.arch, epoch + 1, c.baseline_epochs,
                 100.0 * hits / max(seen, 1))
    recalibrate_batch_norm(model, (normalize_images(images[order[i:i + c.batch_size]], mean, std)
                                   for i in range(0, min(len(order), 16 * c.batch_size), c.batch_size)))
    model.eval()
    hits = 0
    with torch.no_grad():
        for start in range(0, len(test_y), 256):
            x = normalize_images(test_x[start:start + 256], mean, std)
            with autocast(x.device, amp):
                hits += int((model(x).argmax(1) == test_y[start:start + 256]).sum())
    macs = count_macs(model, torch.zeros(1, 3, c.canvas, c.canvas))
    return model, 100.0 * hits / len(test_y), macs


@torch.no_grad()
def recalibrate_batch_norm(model: torch.nn.Module, batches) -> None:
    """Replace every batch-norm layer's running mean and variance by their average over ``batches`` (inputs
    for ``model``), computed at the current weights in training mode; the weights do not change."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    try:
        for x in batches:
            model(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum


#: What the demo's accuracy-against-latency figure measures (``gfnet-demo --latency``): "auto" (eager PyTorch, and
#: ONNX Runtime where gfnet[deploy] is installed), "eager" (eager PyTorch only), "none" (no latency measured).
DEMO_LATENCY = ("auto", "eager", "none")


def measure_latency(net, thresholds, test_x: torch.Tensor, test_y: torch.Tensor, backbone: torch.nn.Module,
                    config: DemoConfig, out_dir: str, runtimes: str = "auto") -> dict:
    """Accuracy against batch-1 latency (1 thread, the paper's phone setting) of the trained GFNet at
    ``config.latency_budgets`` budgets of its curve (rows of ``thresholds``, spread from the cheapest to the
    dearest) and of the full-resolution ``backbone``, on the first ``config.latency_images`` held-out canvases,
    in eager PyTorch and, with ``runtimes="auto"`` where gfnet[deploy] is installed, in ONNX Runtime (the
    package exported into a temporary folder). Each image's whole classification is timed once (after a warm-up
    on 8 images); accuracies are of the runtime's own predictions on those canvases (the backbone's too, so
    every point of the figure counts the same images).

    Writes ``out_dir/latency.json`` (one :class:`gfnet.deploy.latency.AccuracyLatency` dict per runtime, what
    ``gfnet-viz latency`` and the report draw). Returns a summary for results.json: the runtimes measured, the
    paper's sentence in the fastest of them (lowest all-steps latency), and ``skipped`` (why ONNX Runtime was
    not measured and what to install), or ``{"skipped": ...}`` alone for ``runtimes="none"``.
    """
    from gfnet.deploy.exporter import INSTALL_HINT, missing_dependencies
    from gfnet.deploy.latency import accuracy_latency_points

    if runtimes not in DEMO_LATENCY:
        raise ValueError(f"runtimes must be one of {DEMO_LATENCY}; got {runtimes!r}")
    if runtimes == "none":
        return {"skipped": "not measured (--latency none)"}
    t0 = time.perf_counter()
    c = config
    n = max(1, min(int(c.latency_images), len(test_y)))
    x, y = test_x[:n], test_y[:n]
    mean = torch.tensor(net.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(net.config.std).view(1, 3, 1, 1)
    backbone = backbone.eval()
    with torch.no_grad():
        base_acc = 100.0 * float((backbone((x.float() / 255.0 - mean) / std).argmax(1) == y).double().mean())
    table = torch.as_tensor(thresholds).detach().cpu().double()
    budgets = sorted({int(round(float(v))) for v in torch.linspace(0, len(table) - 1, max(1, c.latency_budgets))})
    names, skipped = ["eager"], None
    if runtimes == "auto":
        missing = missing_dependencies("onnx")
        if missing:
            skipped = (f"ONNX Runtime latency skipped: it needs {', '.join(missing)} ({INSTALL_HINT}); the figure "
                       "shows eager PyTorch only")
            log.warning("%s", skipped)
        else:
            names.append("onnx")
    measured = []
    for runtime in names:
        res = accuracy_latency_points(net, table, x, y, backbone=backbone, backbone_accuracy=base_acc,
                                      runtime=runtime, threads=1, rounds=1, warmup=1, warmup_images=8,
                                      budgets=budgets, label=f"GFNet demo ({net.arch}, T={net.T})")
        log.info("latency, %s, batch 1, 1 thread: all %d steps %.2f ms, full-resolution %s %.2f ms; %s", runtime,
                 net.T, res.all_steps["mean_ms"], net.arch, res.backbone["mean_ms"], res.summary())
        measured.append(res)
    _write_json(os.path.join(out_dir, LATENCY_FILE), [r.to_dict() for r in measured])
    fastest = min(measured, key=lambda r: r.all_steps["mean_ms"])
    return {"file": LATENCY_FILE, "images": n, "threads": 1, "budgets": budgets, "cpu": fastest.cpu,
            "runtimes": {r.runtime: {"all_steps_mean_ms": r.all_steps["mean_ms"],
                                     "backbone_mean_ms": r.backbone["mean_ms"],
                                     "points": [[p.mean_ms, p.accuracy] for p in r.points]} for r in measured},
            "backbone_accuracy_on_these_images": base_acc, "fastest_runtime": fastest.runtime,
            "sentence": fastest.summary(), "skipped": skipped, "seconds": time.perf_counter() - t0}


def method_claims(learned: list, random: list, min_gain: float) -> dict:
    """The demo's two claims, from anytime accuracies (%) with the learned policy and with random patch
    positions: accuracy after T steps beats the glance, and the learned policy beats random patches at
    step T, each by at least ``min_gain`` points. ``verdict`` is "shown" when both hold, else "not shown"."""
    glance, last, last_random = learned[0], learned[-1], random[-1]
    gain, policy_gain = last - glance, last - last_random
    claims = {
        "accuracy_after_T_steps_vs_glance": f"{last:.1f}% vs {glance:.1f}% ({gain:+.1f} points)",
        "learned_policy_vs_random_patches_at_T": f"{last:.1f}% vs {last_random:.1f}% ({policy_gain:+.1f} points)",
        "T_steps_gain_points": gain,
        "policy_gain_points": policy_gain,
        "min_gain_points": float(min_gain),
        "T_steps_beat_glance": bool(gain >= min_gain),
        "learned_policy_beats_random": bool(policy_gain >= min_gain),
    }
    claims["verdict"] = "shown" if claims["T_steps_beat_glance"] and claims["learned_policy_beats_random"] \
        else "not shown"
    return claims


def run_demo(out_dir: str, config: DemoConfig = DemoConfig(), progress: bool = True,
             threads: Optional[int] = None, amp: str = "none", latency: str = "auto") -> dict:
    """Build the task, train stages 1-3, evaluate, write the report folder; returns the results dict.

    The results state (``claims``) whether accuracy after T steps beats the glance and the learned
    policy beats random patch positions, by how much, on held-out digits.

    ``amp``: "none" (fp32: the published numbers) or "bf16": encoder pre-training, the three stages
    (:class:`TrainOptions` ``amp``) and every evaluation run under bf16 autocast; results.json records it
    as ``precision``. ``latency``: which runtimes :func:`measure_latency` times (:data:`DEMO_LATENCY`).

    ``demo.log`` receives the gfnet.demo and gfnet.train records that the application's logging
    configuration lets through (``gfnet-demo`` lets INFO through; a library never sets logger levels).
    """
    os.makedirs(out_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(out_dir, "demo.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    loggers = [logging.getLogger("gfnet.demo"), logging.getLogger("gfnet.train")]
    for lg in loggers:
        lg.addHandler(handler)
    if amp not in DEMO_AMP:
        raise ValueError(f"amp must be one of {DEMO_AMP}; got {amp!r}")
    prev_threads = torch.get_num_threads()
    try:
        return _run_demo(out_dir, config, progress, threads, amp, latency)
    finally:
        torch.set_num_threads(prev_threads)
        for lg in loggers:
            lg.removeHandler(handler)
        handler.close()


def _run_demo(out_dir: str, config: DemoConfig, progress: bool, threads: Optional[int], amp: str,
              latency: str = "auto") -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()
    if threads:
        torch.set_num_threads(threads)
    c = config
    torch.manual_seed(c.seed)
    log.info("task: %d training canvases per epoch (fresh clutter each epoch) and %d held-out canvases of %dx%d px, "
             "one %d px digit among %d fragments on noise up to %g/255; %s GFNet P=%d, T=%d; batch %d (stage 2: "
             "%d); seed %d; %s", c.train_images, c.test_images, c.canvas, c.canvas, c.digit_size, c.fragments,
             c.noise, c.arch, c.patch_size, c.T, c.batch_size, c.policy_batch_size, c.seed,
             "fp32" if amp_dtype(amp) is None else "bf16 autocast")
    test_x, test_y, _ = test_canvases(c)
    net = gfnet.build_model(c.arch, patch_size=c.patch_size, T=c.T, num_classes=10)
    # the canvases are the images: S = canvas, no resize, no crop (the trainer logs and records this geometry)
    net.config = net.config.replace(image_size=c.canvas, crop_pct=1.0)
    net.meta.classes = [str(d) for d in range(10)]  # the class folders of `gfnet-data demo-canvases`
    if c.channels_last:
        net.to_channels_last()
    t_pre = time.perf_counter()
    train_loader = ClutteredDigitsLoader(c.train_images, c, c.batch_size, seed=c.seed, epoch_offset=1000)
    pre_acc = pretrain_encoders(net, train_loader, c.pretrain_epochs, c.pretrain_lr, c.seed, amp) \
        if c.pretrain_epochs > 0 else {}
    log.info("encoder pre-training: %.0f s", time.perf_counter() - t_pre)
    eval_loader = TensorLoader(test_x, test_y, 256, train=False)
    histories = {}
    common = dict(progress=progress, seed=c.seed, train_global=True, dsn_ratio=1.0, log_every=5, amp=amp,
                  channels_last=c.channels_last, transforms="backbone")
    policy_loader = ClutteredDigitsLoader(c.train_images, c, c.policy_batch_size, seed=c.seed)
    # stage 2 starts PPO from a fresh policy, as the reference's train.py (and gfnet-train) do
    for stage, epochs, loader, extra in (
            (1, c.epochs1, train_loader, dict(backbone_lr=c.lr, batch_size=c.batch_size)),
            (2, c.epochs2, policy_loader, dict(policy_lr=c.policy_lr, batch_size=c.policy_batch_size)),
            (3, c.epochs3, train_loader, dict(backbone_lr=c.lr3, fc_lr=c.lr3, batch_size=c.batch_size))):
        t_stage = time.perf_counter()
        loader.epoch_offset = 1000 * (stage + 1)
        trainer = Trainer(net, TrainOptions(stage=stage, epochs=epochs, **common, **extra),
                          out_dir=os.path.join(out_dir, f"stage{stage}"), save_best=False,
                          overwrite=True)  # the demo rewrites its own stage folders
        histories[stage] = trainer.fit(loader, eval_loader)
        log.info("stage %d: %.0f s, %s", stage, time.perf_counter() - t_stage, histories[stage][-1])
    net.eval()
    learned, test_probs, _ = anytime_accuracy(net, test_x, test_y, "learned", amp=amp)
    rand_acc, _, _ = anytime_accuracy(net, test_x, test_y, "random", seed=c.seed + 1, amp=amp)
    # Thresholds are fitted on training canvases (the reference fits them on training images).
    fit_x, fit_y, _ = train_loader.canvases(0)
    fit_x, fit_y = fit_x[:2000], fit_y[:2000]
    _, train_probs, _ = anytime_accuracy(net, fit_x, fit_y, "learned", amp=amp)
    thresholds, budget_acc, budget_flops = budget.budget_curve(train_probs, fit_y, test_probs, test_y,
                                                               net.meta.flops)
    net.meta.anytime_classification, net.meta.dynamic_threshold = learned, thresholds
    net.meta.budgeted_batch_classification = [budget_flops, budget_acc]
    ckpt = os.path.join(out_dir, CHECKPOINT_FILE)
    gfnet.save_checkpoint(net, ckpt)
    torch.save({"images": test_x[:REPORT_IMAGES].contiguous(), "labels": test_y[:REPORT_IMAGES],
                "class_names": [str(d) for d in range(10)]}, os.path.join(out_dir, SAMPLES_FILE))
    baseline = None
    if c.baseline_epochs > 0:
        t_base = time.perf_counter()
        baseline_loader = ClutteredDigitsLoader(c.train_images, c, c.batch_size, seed=c.seed, epoch_offset=5000)
        base_model, base_acc, base_macs = train_full_resolution_backbone(c, baseline_loader, test_x, test_y, amp)
        baseline = {"macs": base_macs, "acc": base_acc, "epochs": c.baseline_epochs,
                    "what": f"{c.arch} alone on the whole {c.canvas}x{c.canvas} canvas"}
        log.info("full-resolution %s: %.1f%% held-out accuracy, %.1f MMACs per image (GFNet all steps: %.1f), "
                 "%.0f s", c.arch, base_acc, base_macs / 1e6, net.meta.flops[-1] / 1e6,
                 time.perf_counter() - t_base)
    latency_summary = measure_latency(net, thresholds, test_x, test_y, base_model, c, out_dir, latency) \
        if baseline is not None else {"skipped": "no full-resolution backbone trained (baseline_epochs=0)"}
    claims = method_claims(learned, rand_acc, c.min_gain)
    results = {
        "label": f"GFNet demo ({net.arch}, T={net.T})",
        "verdict": claims["verdict"],
        "task": {**asdict(c), "train_digits": "80% of sklearn digits", "test_digits": "the other 20%"},
        # fp32, or bf16 autocast for training and evaluation (weights and optimiser state in fp32)
        "precision": "fp32" if amp_dtype(amp) is None else "bf16 autocast",
        "anytime_accuracy_learned_policy": learned,
        "anytime_accuracy_random_patches": rand_acc,
        "glance_accuracy": learned[0],
        "claims": claims,
        # the fields of a reference checkpoint, under its names, so that `gfnet-viz budget results.json` and the
        # report read this file as they read a checkpoint
        "anytime_classification": learned,
        "budgeted_batch_classification": [budget_flops, budget_acc],
        "flops": net.meta.flops,
        "baseline": baseline,
        "latency": latency_summary,
        "pretraining_train_accuracy": pre_acc,
        "history": {f"stage{k}": v for k, v in histories.items()},
        "checkpoint": ckpt,
    }
    results_path = os.path.join(out_dir, RESULTS_FILE)
    _write_json(results_path, results)  # the report reads its label
    report = render_report(out_dir)
    results["figures"] = [report["patches"], report["budget_curve"]] + \
        ([report["accuracy_latency"]] if report.get("accuracy_latency") else [])
    results["seconds"] = time.perf_counter() - t0
    # CPU seconds of all this process's threads: on a shared machine, wall time alone says little.
    results["cpu_seconds"] = time.process_time() - cpu0
    results["threads"] = torch.get_num_threads()
    results["load_average_1min_end"] = os.getloadavg()[0]
    _write_json(results_path, results)
    if claims["verdict"] != "shown":
        log.warning("the method was NOT shown by this run: %s; %s (each must gain >= %g points)",
                    claims["accuracy_after_T_steps_vs_glance"], claims["learned_policy_vs_random_patches_at_T"],
                    c.min_gain)
    return results
