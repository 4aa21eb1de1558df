"""net.compile(): the encoders compiled with torch.compile agree with eager to float rounding in anytime and
budgeted inference and in training, and the varying batches of budgeted inference recompile a bounded number of
times (issue 14). On the CPU with inductor: tens of seconds of compilation, shared through a module fixture."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

import gfnet
from gfnet import budget
from gfnet.engine import budgeted_predict


def _net(seed=0):
    torch.manual_seed(seed)
    net = gfnet.build_model("resnet10t", patch_size=32, T=3, num_classes=10, classifier="gru").eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features == 10:
                module.weight.mul_(25.0)
    return net


@pytest.fixture(scope="module")
def nets():
    torch._dynamo.reset()
    eager = _net()
    compiled = copy.deepcopy(eager).compile()
    return eager, compiled


def test_compiled_anytime_equals_eager(nets):
    eager, compiled = nets
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    want = eager.anytime_predict(images)
    got = compiled.anytime_predict(images)
    assert compiled.compiled["backend"] == "inductor"
    torch.testing.assert_close(got.probs, want.probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.actions, want.actions, atol=1e-5, rtol=1e-4)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints unchanged


def test_compiled_budgeted_equals_eager(nets):
    eager, compiled = nets
    images = torch.rand(37, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    reference = eager.anytime_predict(images)
    thresholds, margin = budget.separated_thresholds(budget.confidences(reference.probs)[0], (0.3, 0.3))
    want = budgeted_predict(eager, images, thresholds, batch_size=8, flops=[1, 2, 3])
    got = budgeted_predict(compiled, images, thresholds, batch_size=8, flops=[1, 2, 3])
    assert got.partial_batches > 0
    assert torch.equal(got.exit_step, want.exit_step) and torch.equal(got.preds, want.preds)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_inference_recompiles_a_bounded_number_of_times():
    """The default (dynamic=None): a stream's partial batches recompile each encoder once with a dynamic batch
    dimension, and another stream of other sizes compiles nothing new. Dynamo's "eager" backend: the graphs
    without code generation."""
    torch._dynamo.reset()
    net = _net(seed=3).compile(backend="eager")
    images = torch.rand(37, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    thresholds = torch.tensor([0.2, 0.5, 1.0])
    before = _graphs()
    gfnet.engine.step_flops(net)  # counted eagerly: compiles nothing
    assert _graphs() == before
    first = budgeted_predict(net, images, thresholds, batch_size=8)
    assert first.partial_batches > 0
    compiled = _graphs()
    assert compiled - before <= 4  # per encoder (they share their code): the full batch, then dynamic
    budgeted_predict(net, images[:29], thresholds, batch_size=8)
    net.anytime_predict(images[:13], batch_size=8)
    assert _graphs() == compiled


def test_padded_batches_keep_one_static_shape():
    """pad_batches=True: partial batches run at the full batch shape, so that even a model compiled with static
    shapes (dynamic=False) compiles once per encoder; without padding every new size compiles again."""
    torch._dynamo.reset()
    net = _net(seed=3).compile(backend="eager", dynamic=False)
    images = torch.rand(37, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    thresholds = torch.tensor([0.2, 0.5, 1.0])
    before = _graphs()
    first = budgeted_predict(net, images, thresholds, batch_size=8, pad_batches=True)
    assert first.partial_batches > 0
    compiled_once = _graphs()
    assert compiled_once - before <= 2  # one graph per encoder at most (they share their code)
    budgeted_predict(net, images[:29], thresholds, batch_size=8, pad_batches=True)
    got = net.anytime_predict(images, batch_size=8, pad_batches=True)
    assert _graphs() == compiled_once
    want = net.anytime_predict(images, batch_size=8)  # a chunk of 5: a new shape
    assert _graphs() > compiled_once
    torch.testing.assert_close(got.probs, want.probs, atol=1e-6, rtol=1e-5)
    assert got.probs.shape == (3, 37, 10) and got.actions.shape == (2, 37, 2)
    unpadded = budgeted_predict(net, images, thresholds, batch_size=8)
    assert torch.equal(unpadded.preds, first.preds) and torch.equal(unpadded.exit_step, first.exit_step)


def test_compiled_training_step_equals_eager():
    from gfnet.train import Trainer, TrainOptions
    torch._dynamo.reset()
    images = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    labels = torch.tensor([1, 2, 3, 4])
    results = []
    for use_compile in (False, True):
        net = _net(seed=5).train()
        if use_compile:  # aot_eager: the traced forward and backward graphs, without inductor's code generation
            net.compile(backend="aot_eager")
        trainer = Trainer(net, TrainOptions(stage=1, epochs=1, amp="none", compile=use_compile, seed=3))
        torch.manual_seed(7)
        loss = float(trainer.train_step(images, labels)["loss"])
        results.append((loss, {k: v.clone() for k, v in net.state_dict().items()}))
    (loss_e, state_e), (loss_c, state_c) = results
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    for key in state_e:
        torch.testing.assert_close(state_c[key], state_e[key], atol=1e-5, rtol=1e-4, msg=key)
