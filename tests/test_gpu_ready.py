"""Issue 10's GPU readiness, as far as the CPU can show it: the device a process takes under torchrun, the
engine's caches, refusals and reports (the gpucheck command: tests/test_gpucheck.py)."""
import pytest
import torch

import gfnet
from gfnet import budget
from gfnet.engine import budgeted_predict, prepare_budgeted
from gfnet.train import distributed

pytestmark = pytest.mark.usefixtures("native_cpu_convolutions")


@pytest.mark.parametrize("visible, local_rank, expected", [(1, 3, 0), (4, 3, 3), (8, 0, 0)])
def test_local_rank_is_a_device_index_only_when_every_gpu_is_visible(monkeypatch, visible, local_rank, expected):
    # per-rank CUDA_VISIBLE_DEVICES (one GPU visible) makes LOCAL_RANK no device index
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert distributed.resolve_device(None, local_rank) == torch.device("cuda", expected)
    assert distributed.resolve_device("cuda", local_rank) == torch.device("cuda", expected)


def test_local_rank_past_the_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="LOCAL_RANK=3 but this process sees only 2 GPU"):
        distributed.resolve_device(None, 3)


def test_cuda_without_a_gpu_is_refused_with_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="use --device cpu"):
        distributed.resolve_device("cuda", 0)
    with pytest.raises(ValueError, match="unknown device"):
        gfnet.device.resolve_device("tpu:0")


def _net(T=3, seed=0):
    torch.manual_seed(seed)
    net = gfnet.build_model("resnet10t", patch_size=32, T=T, num_classes=10, classifier="gru").eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features == 10:
                module.weight.mul_(25.0)
    return net


def test_slot_buffers_are_kept_with_the_model_and_renewed_when_its_tensors_move():
    net = _net()
    images = torch.randint(0, 256, (20, 64, 64, 3), dtype=torch.uint8)
    thresholds = torch.tensor([0.9, 0.8, -1e8])
    prepare_budgeted(net, images[:1], batch_size=4, image_storage="rows")
    plans = net.__dict__["_budgeted_plans"]
    assert len(plans) == 1
    (plan,) = plans.values()
    assert plan.warm and plan.store.fc_hidden is not None
    first = budgeted_predict(net, images, thresholds, batch_size=4, image_storage="rows", flops=[1, 2, 3])
    assert list(plans.values()) == [plan]  # reused, nothing captured or allocated anew
    again = budgeted_predict(net, images, thresholds, batch_size=4, image_storage="rows", flops=[1, 2, 3])
    assert torch.equal(first.preds, again.preds) and torch.equal(first.exit_step, again.exit_step)
    net.double().float()  # new parameter tensors: the cached plan would read freed memory
    budgeted_predict(net, images, thresholds, batch_size=4, image_storage="rows", flops=[1, 2, 3])
    assert len(plans) == 2 and list(plans.values())[0] is plan


@pytest.mark.parametrize("storage", ["rows", "references"])
def test_non_finite_images_are_reported_not_classified(storage):
    net = _net()
    images = torch.rand(9, 3, 48, 48)
    images[4, 1, 10, 10] = float("nan")
    images[7, 0, 0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="2 image\\(s\\) gave non-finite logits"):
        out = budgeted_predict(net, images, torch.tensor([0.99, 0.99, -1e8]), batch_size=4, image_storage=storage,
                               flops=[1, 2, 3])
    assert out.invalid.tolist() == [i in (4, 7) for i in range(9)]
    assert out.preds[4] == -1 and out.preds[7] == -1 and out.exit_step[4] == 0
    assert bool((out.preds[~out.invalid] >= 0).all())


@pytest.mark.parametrize("call, error, message", [
    (lambda net, x: budgeted_predict(net, x, torch.tensor([float("nan"), 0.5, -1e8])), ValueError, "NaN"),
    (lambda net, x: budgeted_predict(net, torch.rand(4, 3, 48, 40), torch.tensor([0.5, 0.5, -1e8])), ValueError,
     "must be square"),
    (lambda net, x: budgeted_predict(net, [(x[:4], torch.arange(5))], torch.tensor([0.5, 0.5, -1e8])), ValueError,
     "4 images but 5 labels"),
    (lambda net, x: budgeted_predict(net, x, torch.tensor([0.5, 0.5, -1e8]), batch_size=0), ValueError,
     "batch_size"),
    (lambda net, x: budgeted_predict(net, x, torch.tensor([0.5, 0.5, -1e8]), dtype="int8"), ValueError, "dtype"),
    (lambda net, x: net.anytime_predict(torch.rand(2, 3, 48, 40)), ValueError, "must be square"),
    (lambda net, x: net.anytime_predict(x, steps=0), ValueError, "steps"),
    (lambda net, x: net.anytime_predict(x, batch_size=0), ValueError, "batch_size"),
    (lambda net, x: net.anytime_predict(x, dtype="fp8"), ValueError, "dtype"),
    (lambda net, x: net.anytime_predict(x.to(torch.int16)), TypeError, "uint8 or float"),
    (lambda net, x: net.anytime_predict(torch.rand(2, 3, 16, 16)), ValueError, "smaller than the patch size"),
])
def test_one_validation_for_every_entry_point(call, error, message):
    with pytest.raises(error, match=message):
        call(_net(), torch.rand(6, 3, 48, 48))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_images_are_converted_not_refused(dtype):
    net = _net()
    images = torch.rand(3, 3, 48, 48)
    want = net.anytime_predict(images).probs
    got = net.anytime_predict(images.to(dtype)).probs
    tol = {torch.float64: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=0)


def test_empty_batch_gives_empty_predictions():
    out = _net().anytime_predict(torch.rand(0, 3, 48, 48))
    assert out.probs.shape == (3, 0, 10) and out.actions.shape == (2, 0, 2)


def test_separated_thresholds_keep_their_margin():
    probs = torch.softmax(torch.randn(3, 50, 5, generator=torch.Generator().manual_seed(1)) * 3, -1)
    thresholds, margin = budget.separated_thresholds(budget.confidences(probs)[0], (0.3, 0.3))
    assert margin > 0 and thresholds[-1] == -1e8
    steps = budget.exit_steps(probs, thresholds)
    assert 0 < int((steps == 0).sum()) < 50


def test_gpu_defaults(monkeypatch):
    from gfnet.precision import default_amp
    from gfnet.train import Trainer, TrainOptions
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert default_amp("cuda:0") == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert default_amp("cuda:0") == "fp16"  # pre-Ampere cards: fp16 with a GradScaler
    trainer = Trainer(_net().train(), TrainOptions(stage=1, epochs=1))
    assert trainer.options.amp == "none" and trainer.amp_dtype is None  # auto on the CPU: fp32
