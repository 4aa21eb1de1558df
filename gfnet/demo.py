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
from gfnet.precision import amp_dtype, autocast
from gfnet.train import TensorLoader, Trainer, TrainOptions
from gfnet.viz.report import CHECKPOINT_FILE, RESULTS_FILE, SAMPLES_FILE, render_report

__all__ = ["DemoConfig", "QUICK", "DEMO_AMP", "ClutteredDigitsLoader", "make_cluttered_digits",
           "digit_patch_actions", "pretrain_encoders", "anytime_accuracy", "checkpoint_anytime_accuracy", "run_demo"]

log = logging.getLogger("gfnet.demo")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes, model and schedule of the demo (defaults: about 5 minutes on 2 CPU cores).

    canvas: S, the image side; digit_size: side of an enlarged digit; fragments: distractors per
    image; patch_size: P; T: steps; arch: the timm backbone; train_images / test_images: canvases;
    pretrain_epochs / pretrain_lr: the encoders' initialisation (:func:`pretrain_encoders`, Adam);
    epochs1/2/3: epochs of each stage; batch_size; lr: backbone learning rate of stages 1 and 3 (the
    classifier uses the reference's 0.1); policy_lr: stage 2's Adam (10x the reference's 3e-4: a few
    hundred updates instead of 15 ImageNet epochs); lr3: stage 3's backbone and classifier rate (a
    light touch: 1437 training digits overfit quickly); seed.
    """

    canvas: int = 128
    digit_size: int = 16
    fragments: int = 4
    patch_size: int = 40
    T: int = 3
    arch: str = "test_resnet"
    train_images: int = 4000
    test_images: int = 1000
    pretrain_epochs: int = 2
    pretrain_lr: float = 3e-3
    epochs1: int = 2
    epochs2: int = 6
    epochs3: int = 1
    batch_size: int = 64
    lr: float = 0.01
    policy_lr: float = 3e-3
    lr3: float = 1e-3
    seed: int = 0


#: The demo's precisions (``gfnet-demo --amp``): "none" (fp32, the published numbers) or "bf16" (bf16
#: autocast for training and evaluation alike; the weights and optimiser state stay fp32).
DEMO_AMP = ("none", "bf16")


#: The ``--quick`` configuration: the same pipeline at a toy size (tests; well under a minute).
QUICK = DemoConfig(canvas=64, digit_size=12, fragments=2, patch_size=24, T=3, train_images=128,
                   test_images=64, pretrain_epochs=1, epochs1=1, epochs2=1, epochs3=1, batch_size=32)


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
                          fragments: int = 4, seed: int = 0):
    """``n`` cluttered-digit images from scikit-learn's digits.

    Each image: one digit enlarged (bilinear) to ``digit_size`` pixels at a uniformly random position
    on a ``canvas`` x ``canvas`` black canvas, plus ``fragments`` distractors, each a random
    (digit_size/2)-pixel quarter of another digit at a random position; pixels combine by maximum.

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
                                                      seed=self.seed * 10007 + key))
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
    from gfnet.checkpoint import replaceable_target

    replaceable_target(path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


#: Test canvases saved for the report's patch picture.
REPORT_IMAGES = 8


def checkpoint_anytime_accuracy(path: str, config: DemoConfig = DemoConfig(), amp: Optional[str] = None) -> list:
    """Anytime accuracy (%, one per step) of a demo checkpoint on the demo's held-out canvases (rebuilt
    from ``config``'s seed and sizes) with the learned policy, under ``amp`` (None/"none" fp32, or "bf16"):
    how a network trained in one precision classifies when evaluated in another."""
    c = config
    net = gfnet.load_checkpoint(path).eval()
    test_x, test_y, _ = make_cluttered_digits(c.test_images, "test", c.canvas, c.digit_size, c.fragments, c.seed)
    return anytime_accuracy(net, test_x, test_y, "learned", amp=amp)[0]


def run_demo(out_dir: str, config: DemoConfig = DemoConfig(), progress: bool = True,
             threads: Optional[int] = None, amp: str = "none") -> dict:
    """Build the task, train stages 1-3, evaluate, write the report folder; returns the results dict.

    The results state (``claims``) whether accuracy after T steps beats the glance and the learned
    policy beats random patch positions, by how much, on held-out digits.

    ``amp``: "none" (fp32: the published numbers) or "bf16": encoder pre-training, the three stages
    (:class:`TrainOptions` ``amp``) and every evaluation run under bf16 autocast; results.json records it
    as ``precision``.

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
        return _run_demo(out_dir, config, progress, threads, amp)
    finally:
        torch.set_num_threads(prev_threads)
        for lg in loggers:
            lg.removeHandler(handler)
        handler.close()


def _run_demo(out_dir: str, config: DemoConfig, progress: bool, threads: Optional[int], amp: str) -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()
    if threads:
        torch.set_num_threads(threads)
    c = config
    torch.manual_seed(c.seed)
    test_x, test_y, test_boxes = make_cluttered_digits(c.test_images, "test", c.canvas, c.digit_size,
                                                      c.fragments, c.seed)
    net = gfnet.build_model(c.arch, patch_size=c.patch_size, T=c.T, num_classes=10)
    net.config = net.config.replace(image_size=c.canvas)
    t_pre = time.perf_counter()
    train_loader = ClutteredDigitsLoader(c.train_images, c, c.batch_size, seed=c.seed, epoch_offset=1000)
    pre_acc = pretrain_encoders(net, train_loader, c.pretrain_epochs, c.pretrain_lr, c.seed, amp) \
        if c.pretrain_epochs > 0 else {}
    log.info("encoder pre-training: %.0f s", time.perf_counter() - t_pre)
    eval_loader = TensorLoader(test_x, test_y, 256, train=False)
    histories = {}
    # contiguous encoders (the trainer's default is channels-last): the published numbers were made so, and
    # channels-last convolutions round differently, so they would not reproduce them bit for bit
    common = dict(progress=progress, seed=c.seed, train_global=True, dsn_ratio=1.0, log_every=5, amp=amp,
                  channels_last=False)
    for stage, epochs, extra in ((1, c.epochs1, dict(backbone_lr=c.lr)),
                                 # continue_policy: PPO starts from the policy the network was built with
                                 # (untrained either way: stage 1 uses random patches). The reference's
                                 # re-initialisation draws another start, on which this short schedule
                                 # (6 epochs) learns much less: 66.9% -> 65.0% instead of 72.5% -> 77.7%.
                                 (2, c.epochs2, dict(policy_lr=c.policy_lr, continue_policy=True)),
                                 (3, c.epochs3, dict(backbone_lr=c.lr3, fc_lr=c.lr3))):
        t_stage = time.perf_counter()
        train_loader.epoch_offset = 1000 * (stage + 1)
        trainer = Trainer(net, TrainOptions(stage=stage, epochs=epochs, **common, **extra),
                          out_dir=os.path.join(out_dir, f"stage{stage}"), save_best=False,
                          overwrite=True)  # the demo rewrites its own stage folders
        histories[stage] = trainer.fit(train_loader, eval_loader)
        log.info("stage %d: %.0f s, %s", stage, time.perf_counter() - t_stage, histories[stage][-1])
    net.eval()
    learned, test_probs, _ = anytime_accuracy(net, test_x, test_y, "learned", amp=amp)
    rand_acc, _, _ = anytime_accuracy(net, test_x, test_y, "random", seed=c.seed + 1, amp=amp)
    # Thresholds are fitted on training canvases (the reference fits them on training images).
    fit_x, fit_y, _ = train_loader.canvases(0)
    fit_x, fit_y = fit_x[:2000], fit_y[:2000]
    _, train_probs, _ = anytime_accuracy(net, fit_x, fit_y, "learned", amp=amp)
    thresholds, budget_acc, budget_flops = budget.budget_curve(train_probs, fit_y, test_probs, test_y,
                                                               net.meta["flops"])
    net.meta.update({"anytime_classification": learned, "dynamic_threshold": thresholds,
                     "budgeted_batch_classification": [budget_flops, budget_acc]})
    ckpt = os.path.join(out_dir, CHECKPOINT_FILE)
    gfnet.save_checkpoint(net, ckpt)
    torch.save({"images": test_x[:REPORT_IMAGES].contiguous(), "labels": test_y[:REPORT_IMAGES],
                "class_names": [str(d) for d in range(10)]}, os.path.join(out_dir, SAMPLES_FILE))
    glance, last, last_random = learned[0], learned[-1], rand_acc[-1]
    results = {
        "label": f"GFNet demo ({net.arch}, T={net.T})",
        "task": {**asdict(c), "train_digits": "80% of sklearn digits", "test_digits": "the other 20%"},
        # fp32, or bf16 autocast for training and evaluation (weights and optimiser state in fp32)
        "precision": "fp32" if amp_dtype(amp) is None else "bf16 autocast",
        "anytime_accuracy_learned_policy": learned,
        "anytime_accuracy_random_patches": rand_acc,
        "glance_accuracy": glance,
        "flops_per_step_cumulative": net.meta["flops"],
        "claims": {
            "accuracy_after_T_steps_vs_glance": f"{last:.1f}% vs {glance:.1f}% (+{last - glance:.1f} points)",
            "learned_policy_vs_random_patches_at_T": f"{last:.1f}% vs {last_random:.1f}% "
                                                     f"(+{last - last_random:.1f} points)",
            "T_steps_beat_glance": bool(last > glance + 10.0),
            "learned_policy_beats_random": bool(last > last_random + 5.0),
        },
        "pretraining_train_accuracy": pre_acc,
        "history": {f"stage{k}": v for k, v in histories.items()},
        "checkpoint": ckpt,
        "budgeted_classification": {"flops": budget_flops, "acc": budget_acc},
    }
    results_path = os.path.join(out_dir, RESULTS_FILE)
    _write_json(results_path, results)  # the report reads its label
    report = render_report(out_dir)
    results["figures"] = [report["patches"], report["budget_curve"]]
    results["seconds"] = time.perf_counter() - t0
    # CPU seconds of all this process's threads: on a shared machine, wall time alone says little.
    results["cpu_seconds"] = time.process_time() - cpu0
    results["threads"] = torch.get_num_threads()
    results["load_average_1min_end"] = os.getloadavg()[0]
    _write_json(results_path, results)
    return results
