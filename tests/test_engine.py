"""budgeted_predict (real early exit, continuous batching) against the post-hoc simulation:
anytime_predict + gfnet.budget.exit_steps, image by image."""
import pytest
import torch

import gfnet
from gfnet import budget
from gfnet.budget import separated_thresholds
from gfnet.engine import BudgetedPrediction, budgeted_predict, step_flops

pytestmark = pytest.mark.usefixtures("native_cpu_convolutions")


def make_net(arch, classifier=None, T=3, double=False, seed=0):
    torch.manual_seed(seed)
    net = gfnet.build_model(arch, patch_size=32, T=T, num_classes=10, classifier=classifier).eval()
    # sharper outputs than a fresh initialisation gives: max probabilities spread over (0, 1), so the
    # thresholds below cut the images into groups that exit at different steps
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features == 10:
                module.weight.mul_(25.0)
    return net.double() if double else net


def post_hoc(reference, thresholds):
    steps = budget.exit_steps(reference.probs, thresholds)
    preds = reference.preds.gather(0, steps.view(1, -1)).squeeze(0)
    return preds, steps


def top2_margin(probs):
    top = probs.topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


MODELS = [
    # (arch, classifier, double): float32 models rely on separated_thresholds and the top-2 margin check;
    # one float64 model removes rounding from the question altogether
    ("mobilenetv3_small_050", None, False),  # cascade classifier (fc_2, fc_3), glance from the backbone head
    ("resnet18", None, False),  # GRU classifier, glance from the GRU
    ("resnet10t", "gru", True),  # GRU classifier, float64
]
SHARES = [(0.3, 0.3), (0.75, 0.2)]
FLOPS = [1.0, 2.0, 3.0]  # stand-in costs where the test is not about them (counting them takes seconds)


@pytest.mark.parametrize("arch,classifier,double", MODELS)
def test_equals_post_hoc_simulation(arch, classifier, double):
    net = make_net(arch, classifier, double=double)
    dtype = torch.float64 if double else torch.float32
    images = torch.randn(18, 3, 48, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    reference = net.anytime_predict(images)
    assert top2_margin(reference.probs) > 1e-5  # arg-maxes are far from ties
    max_probs = budget.confidences(reference.probs)[0]
    for shares, batch_size in zip(SHARES, (6, 4)):
        thresholds, margin = separated_thresholds(max_probs, shares)
        assert margin > 1e-5
        want_preds, want_steps = post_hoc(reference, thresholds)
        for storage in ("references", "rows"):  # the CPU's default, and the device rows CUDA uses
            out = budgeted_predict(net, images, thresholds, batch_size=batch_size, flops=FLOPS,
                                       image_storage=storage)
            assert isinstance(out, BudgetedPrediction)
            assert torch.equal(out.exit_step, want_steps), (storage, shares, out.exit_step, want_steps)
            assert torch.equal(out.preds, want_preds), storage
        assert len(set(want_steps.tolist())) == net.T  # images exit at every step
        counts = torch.bincount(want_steps, minlength=net.T)
        assert out.step_images.tolist() == [int(counts[k:].sum()) for k in range(net.T)]


def test_batch_of_one():
    net = make_net("mobilenetv3_small_050", seed=2)
    images = torch.randn(6, 3, 48, 48, generator=torch.Generator().manual_seed(7))
    reference = net.anytime_predict(images)
    thresholds, margin = separated_thresholds(budget.confidences(reference.probs)[0], (0.3, 0.3))
    assert margin > 1e-5 and top2_margin(reference.probs) > 1e-5
    want_preds, want_steps = post_hoc(reference, thresholds)
    out = budgeted_predict(net, images, thresholds, batch_size=1, flops=FLOPS)
    assert torch.equal(out.exit_step, want_steps) and torch.equal(out.preds, want_preds)
    assert out.partial_batches == 0 and int(out.step_batches.sum()) == int(out.step_images.sum())


def test_fitted_thresholds_and_macs():
    net = make_net("resnet10t", "gru", T=4, double=True, seed=3)
    train = torch.randn(24, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    images = torch.randn(16, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    train_probs = net.anytime_predict(train).probs
    reference = net.anytime_predict(images)
    flops = step_flops(net)
    assert len(flops) == 4 and all(b > a for a, b in zip(flops, flops[1:]))
    targets = reference.preds[-1]  # any labels do for the expected cost
    for p in (4, 20, 36):
        thresholds = budget.find_thresholds(train_probs, None, budget.exit_proportions(p / 20.0, net.T))
        want_preds, want_steps = post_hoc(reference, thresholds)
        out = budgeted_predict(net, images, thresholds, batch_size=6)
        assert torch.equal(out.exit_step, want_steps) and torch.equal(out.preds, want_preds)
        _, expected = budget.evaluate(reference.probs, targets, flops, thresholds)
        assert out.macs_per_image == pytest.approx(expected, rel=1e-9)
        assert out.macs_spent == pytest.approx(sum(flops[k] for k in want_steps.tolist()), rel=1e-9)
        assert out.images_per_second > 0 and out.seconds > 0


def test_loader_stream_with_labels_and_uint8_images():
    net = make_net("resnet10t", "cascade", seed=4)
    g = torch.Generator().manual_seed(5)
    # uint8 NCHW views of NHWC memory, as gfnet.data's loaders give them (output="uint8")
    images = torch.randint(0, 256, (17, 3, 56, 56), dtype=torch.uint8, generator=g).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (17,), generator=g)
    reference = net.anytime_predict(images)
    thresholds, margin = separated_thresholds(budget.confidences(reference.probs)[0], (0.4, 0.3))
    assert margin > 1e-5 and top2_margin(reference.probs) > 1e-5
    sizes = [5, 1, 3, 0, 8]  # uneven loader batches, an empty one among them
    batches, start = [], 0
    for size in sizes:
        batches.append((images[start:start + size], labels[start:start + size]))
        start += size
    want_preds, want_steps = post_hoc(reference, thresholds)
    for storage in ("references", "rows"):
        out = budgeted_predict(net, iter(batches), thresholds, batch_size=4, flops=FLOPS, image_storage=storage)
        assert torch.equal(out.exit_step, want_steps) and torch.equal(out.preds, want_preds), storage
        assert torch.equal(out.targets, labels)
    # the same images as NHWC uint8 Tensor[N, S, S, 3] (DALI's own layout)
    nhwc = images.permute(0, 2, 3, 1).contiguous()
    out = budgeted_predict(net, nhwc, thresholds, batch_size=4, flops=FLOPS)
    assert torch.equal(out.exit_step, want_steps) and torch.equal(out.preds, want_preds)
    # a plain iterable of image tensors (no labels) works too
    out = budgeted_predict(net, [images[:10], images[10:]], thresholds, batch_size=16, flops=FLOPS)
    assert out.targets is None and torch.equal(out.exit_step, want_steps)


def test_single_step_model():
    net = make_net("resnet10t", "gru", T=1, double=True)
    images = torch.randn(7, 3, 48, 48, dtype=torch.float64)
    out = budgeted_predict(net, images, torch.tensor([0.5]), batch_size=3, flops=[1.0])
    assert out.exit_step.tolist() == [0] * 7
    assert torch.equal(out.preds, net.anytime_predict(images).preds[0])


def test_bad_arguments():
    net = make_net("resnet10t", "gru", T=3)
    images = torch.randn(4, 3, 48, 48)
    with pytest.raises(ValueError, match="one threshold per step"):
        budgeted_predict(net, images, torch.tensor([0.5, -1e8]))
    with pytest.raises(ValueError, match="batch_size"):
        budgeted_predict(net, images, torch.tensor([0.5, 0.5, -1e8]), batch_size=0)
    with pytest.raises(ValueError, match="Tensor"):
        budgeted_predict(net, images[0], torch.tensor([0.5, 0.5, -1e8]))
    with pytest.raises(ValueError, match="cuda_graphs"):
        budgeted_predict(net, images, torch.tensor([0.5, 0.5, -1e8]), cuda_graphs=True)
    with pytest.raises(ValueError, match="image_storage"):
        budgeted_predict(net, images, torch.tensor([0.5, 0.5, -1e8]), image_storage="disk")
    net.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        budgeted_predict(net, images, torch.tensor([0.5, 0.5, -1e8]))


@pytest.mark.cuda
@pytest.mark.parametrize("arch,classifier", [("mobilenetv3_small_050", None), ("resnet18", None)])
def test_cuda_graphs_equal_post_hoc(arch, classifier):
    net = make_net(arch, classifier).cuda()
    images = torch.randn(150, 3, 64, 64, generator=torch.Generator().manual_seed(6)).cuda()
    reference = net.anytime_predict(images, batch_size=16)
    thresholds, margin = separated_thresholds(budget.confidences(reference.probs)[0].cpu(), (0.3, 0.3))
    want_preds, want_steps = post_hoc(reference, thresholds.cuda())
    out = budgeted_predict(net, images, thresholds, batch_size=16, cuda_graphs=True, flops=FLOPS)
    assert bool(out.cuda_graphs[0]) and int(out.graph_batches.sum()) > 0
    assert torch.equal(out.exit_step, want_steps.cpu()) and torch.equal(out.preds, want_preds.cpu())
