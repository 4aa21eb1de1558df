"""One step of each mode of a small GFNet (MobileNet-V3-Large, P = 96, T = 3, S = 224), timed.

Inference: the glance step and a focus step (``GFNet.step``, no gradient), and budgeted inference of a
batch (``gfnet.budgeted_predict``: the engine's exits, compaction and scheduling). Training: one
optimisation step of stages 1, 2 (PPO) and 3 (``Trainer.train_step``, fp32). The inference benchmarks
first check their result against a second path (the steps against ``anytime_predict``, the budgeted exits
against the anytime probabilities); the training steps check that the step changed what it trains."""
import pytest
import torch
from conftest import SCALE, run_synced

import gfnet
from gfnet.train import Trainer, TrainOptions

ARCH, P, T, S, CLASSES = "mobilenetv3_large_100", 96, 3, 224, 10
BATCH = 8 * SCALE


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 3, S, S, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def _net(device, seed=0):
    torch.manual_seed(seed)
    return gfnet.build_model(ARCH, patch_size=P, T=T, num_classes=CLASSES).to(device).eval()


@pytest.mark.parametrize("t", [0, 1], ids=["glance", "focus"])
def test_inference_step(benchmark, device, batch, t):
    net = _net(device)
    images = batch[0].to(device)
    with torch.no_grad():
        glance = net.step(0, images)
        anytime = net.anytime_predict(images)
        torch.testing.assert_close(glance.logits.softmax(-1), anytime.probs[0], rtol=1e-4, atol=1e-5)

        def run():
            return net.step(0, images) if t == 0 else net.step(1, images, glance.state)
        benchmark(run_synced(device)(run))


def test_budgeted_inference(benchmark, device, batch):
    net = _net(device)
    images = batch[0].to(device)
    with torch.no_grad():
        probs = net.anytime_predict(images).probs  # [T, N, classes]
    conf = probs.max(-1).values
    # thresholds between the images' confidences, so that images exit at every step
    thresholds = torch.stack([conf[0].median(), conf[1].median(), torch.tensor(-1.0, device=device)])
    run = run_synced(device)(lambda: gfnet.budgeted_predict(net, images, thresholds, batch_size=BATCH))
    res = run()
    rows = torch.arange(BATCH, device=device)
    torch.testing.assert_close(res.preds, probs[res.exit_step, rows].argmax(-1))
    benchmark(run)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_train_step(benchmark, device, batch, stage):
    net = _net(device)
    options = TrainOptions(stage=stage, batch_size=BATCH, amp="none", channels_last=False, progress=False,
                           policy_lr=1e-3)
    trainer = Trainer(net, options)
    net.train()
    images, labels = batch
    trained = net.policy if stage == 2 else net.fc
    before = [p.detach().clone() for p in trained.parameters()]
    run = run_synced(device)(lambda: trainer.train_step(images, labels))
    out = run()
    assert torch.isfinite(out["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trained.parameters())), "the step trained nothing"
    benchmark(run)
