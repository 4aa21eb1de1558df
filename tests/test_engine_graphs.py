"""The engine's CUDA-graph logic on a CPU (issue 20), through gfnet.bench.standins.EmulatedGraphs, which captures by
running, replays by running again, and refuses a capture for the reasons a real one fails (a convolution shape met
first inside it, a compilation inside it, forced failures): warm-up before every capture (loader streams too),
per-step reports and retries, one autocast state, models with graphs of their own, the plan's key and what a plan
keeps alive."""
import gc
import threading
import warnings
import weakref

import pytest
import torch

import gfnet
from gfnet import budget, engine
from gfnet.bench.standins import emulated_graphs
from gfnet.budget import separated_thresholds
from gfnet.engine import budgeted_predict, prepare_budgeted

pytestmark = pytest.mark.usefixtures("native_cpu_convolutions", "one_thread")
FLOPS = [1.0, 2.0, 3.0]


def make_net(T=3, seed=0, arch="resnet10t"):
    torch.manual_seed(seed)
    net = gfnet.build_model(arch, patch_size=32, T=T, num_classes=10, classifier="gru").eval()
    with torch.no_grad():  # sharp outputs: max probabilities spread over (0, 1)
        for module in net.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features == 10:
                module.weight.mul_(25.0)
    return net


def simulated(net, images, shares=(0.3, 0.3), dtype=None):
    reference = net.anytime_predict(images, dtype=dtype)
    thresholds, margin = separated_thresholds(budget.confidences(reference.probs)[0], shares)
    assert margin > 1e-5
    steps = budget.exit_steps(reference.probs, thresholds)
    return thresholds, reference.preds.gather(0, steps.view(1, -1)).squeeze(0), steps


def images_of(n, seed=1, size=40):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def full_batches(out, batch):
    """Full batches of each step, from the images run at each step (all batches full but the tail's)."""
    return out.step_images // batch


def test_graphs_replay_every_full_batch_and_equal_the_simulation():
    net, images = make_net(), images_of(20)
    thresholds, preds, steps = simulated(net, images)
    with emulated_graphs() as graphs, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no capture may fail
        out = budgeted_predict(net, images, thresholds, batch_size=4, flops=FLOPS)
    assert torch.equal(out.exit_step, steps) and torch.equal(out.preds, preds)
    assert graphs.failures == [] and graphs.captures == net.T
    assert out.graph_batches.tolist() == full_batches(out, 4).tolist() and bool(out.cuda_graphs.all())


def test_a_loader_stream_warms_every_step_before_capturing_it():
    """The first full batch of a step runs eagerly (cuDNN's benchmark mode times its convolutions then), the
    second is captured: a capture never meets a convolution shape first."""
    net, images = make_net(seed=3), images_of(32, seed=4)
    thresholds, preds, steps = simulated(net, images, shares=(0.25, 0.25))
    batches = [(images[i:i + 4], torch.arange(i, i + 4)) for i in range(0, 32, 4)]
    with emulated_graphs(first_sight=True) as graphs, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = budgeted_predict(net, iter(batches), thresholds, batch_size=4, flops=FLOPS)
    assert torch.equal(out.exit_step, steps) and torch.equal(out.preds, preds)
    assert graphs.failures == []
    full = full_batches(out, 4)
    assert bool((full >= 2).all())  # the stream is long enough for every step to replay
    assert out.graph_batches.tolist() == (full - 1).tolist()  # all but the warm-up batch replayed


def test_a_failed_capture_is_reported_per_step_and_tried_again_on_the_next_call():
    net, images = make_net(seed=5), images_of(20, seed=6)
    thresholds, preds, steps = simulated(net, images)
    # captures 0, 1, 2: prepare_budgeted's (step 1's fails); 3: step 1 again in the call (fails); 4: the next call
    with emulated_graphs(fail=lambda n: n in (1, 3)) as graphs:
        with pytest.warns(RuntimeWarning, match="capture of step 1 failed"):
            first = budgeted_predict(net, images, thresholds, batch_size=4, flops=FLOPS)
        assert first.cuda_graphs.tolist() == [True, False, True] and first.graph_batches[1] == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            second = budgeted_predict(net, images, thresholds, batch_size=4, flops=FLOPS)
    assert graphs.captures == 5
    assert bool(second.cuda_graphs.all()) and second.graph_batches.tolist() == full_batches(second, 4).tolist()
    for out in (first, second):
        assert torch.equal(out.exit_step, steps) and torch.equal(out.preds, preds)


def test_one_autocast_state_for_eager_runs_warm_up_and_capture():
    """A compiled model's guards see the autocast state: a different one in the capture recompiles inside it."""
    torch._dynamo.reset()
    net = make_net(seed=7).compile(backend="eager")  # compiled first by the engine's warm-up
    images = images_of(16, seed=8)
    reference = make_net(seed=7).anytime_predict(images, dtype="bf16", batch_size=4)  # its eager twin
    thresholds, _ = separated_thresholds(budget.confidences(reference.probs)[0], (0.3, 0.3))
    steps = budget.exit_steps(reference.probs, thresholds)
    preds = reference.preds.gather(0, steps.view(1, -1)).squeeze(0)
    with emulated_graphs(first_sight=False) as graphs:
        out = budgeted_predict(net, images, thresholds, batch_size=4, dtype="bf16", flops=FLOPS, pad_batches=True)
    assert graphs.failures == [] and bool(out.cuda_graphs.all())
    agree = (out.exit_step == steps) & (out.preds == preds)
    assert float(agree.double().mean()) > 0.9  # bf16: batch shapes round differently, near a threshold
    torch._dynamo.reset()


@pytest.mark.parametrize("mode, own", [("reduce-overhead", True), ("max-autotune", True), (None, False),
                                       ("max-autotune-no-cudagraphs", False)])
def test_models_with_cuda_graphs_of_their_own_keep_them(mode, own):
    net = make_net().compile(mode=mode)  # compiles lazily: nothing below runs it
    with emulated_graphs():  # where graphs are available
        setup = engine._setup(net, None, 4, None, None, None, None, None)
        assert setup[2] is (not own)  # the engine's graphs only where the model has none of its own
        if own:
            with pytest.raises(ValueError, match="capture CUDA graphs of their own"):
                budgeted_predict(net, images_of(4), [0.5, 0.5, -1e8], batch_size=4, cuda_graphs=True, flops=FLOPS)


def test_the_plan_key_sees_parameter_shapes_and_strides():
    net, images = make_net(), images_of(2)
    key = engine._plan_key(net, torch.device("cpu"), 4, 12, images, None, True, False)
    weight = net.fc.classifier.weight if hasattr(net.fc, "classifier") else next(
        p for p in net.parameters() if p.dim() == 2)
    with torch.no_grad():  # the same memory seen transposed: a graph would read it with the old strides
        weight.data = weight.data.as_strided(weight.shape[::-1], weight.stride()[::-1])
    assert weight.data_ptr() == weight.data_ptr()
    assert engine._plan_key(net, torch.device("cpu"), 4, 12, images, None, True, False) != key


def test_a_plan_survives_weights_loaded_in_place_and_reads_them():
    net, other, images = make_net(seed=9), make_net(seed=10), images_of(16, seed=11)
    thresholds, _, _ = simulated(net, images)
    with emulated_graphs() as graphs:
        budgeted_predict(net, images, thresholds, batch_size=4, flops=FLOPS)
        net.load_state_dict(other.state_dict())  # copies into the same tensors
        thresholds, preds, steps = simulated(net, images)
        out = budgeted_predict(net, images, thresholds, batch_size=4, flops=FLOPS)
    assert len(net.__dict__["_budgeted_plans"]) == 1 and graphs.captures == net.T  # reused, not captured anew
    assert torch.equal(out.exit_step, steps) and torch.equal(out.preds, preds)


def test_a_plan_keeps_the_kernel_parameters_its_graphs_read(monkeypatch):
    """The Triton kernels read mean/std from a cached device tensor by address; the cache may drop it (64
    entries), so the plan whose graphs captured that address must keep it."""
    from gfnet.ops import _checks, use_backend
    handed_out = []
    original = _checks._params

    def recording(*args):
        params = original(*args)
        handed_out.append(weakref.ref(params))
        return params
    monkeypatch.setattr(_checks, "_params", recording)
    net = make_net(T=2, seed=12)
    with emulated_graphs(), use_backend("triton"):  # Triton interpreted: the smallest run that captures
        prepare_budgeted(net, images_of(1, seed=13, size=32), batch_size=2)
    assert handed_out
    original.cache_clear()  # what 64 other (mean, std, dtype, device) entries would do
    gc.collect()
    assert all(ref() is not None for ref in handed_out)


def test_each_plan_captures_on_a_stream_of_its_own_device(monkeypatch):
    """torch's default capture stream is made once, on the device current at the first capture: each plan's
    machinery makes its own on its own device, warms there and captures there."""
    made, captured = [], []

    class FakeStream:
        def __init__(self, device=None):
            self.device = torch.device(device)
            made.append(self)

        def wait_stream(self, other):
            pass

    class FakeGraph:
        def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
            captured.append((stream, capture_error_mode))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(engine, "_CAPTURE_STREAMS", threading.local())  # the fakes never outlive the test
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "graph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: type("G", (), {"replay": lambda self: None})())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    for index in (1, 0):
        machinery = engine._CudaGraphs(torch.device("cuda", index))
        machinery.capture(lambda: torch.zeros(1))
    assert [s.device for s in made] == [torch.device("cuda", 1), torch.device("cuda", 0)]
    assert [c[0] for c in captured] == made and all(c[1] == "thread_local" for c in captured)


def test_plans_of_one_thread_share_its_capture_stream_per_device(monkeypatch):
    """Every stream that runs cuBLAS keeps a workspace (32 MiB on Hopper) for the life of the process: plans made
    by one thread for one device share one capture stream; another device or another thread gets its own."""
    made = []

    class FakeStream:
        def __init__(self, device=None):
            self.device = torch.device(device)
            made.append(self)

    monkeypatch.setattr(engine, "_CAPTURE_STREAMS", threading.local())
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    first, second, other = (engine._CudaGraphs(torch.device("cuda", i)) for i in (0, 0, 1))
    assert first.stream is second.stream and other.stream is not first.stream
    assert [s.device.index for s in made] == [0, 1]
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(engine._CudaGraphs(torch.device("cuda", 0)).stream))
    thread.start()
    thread.join()
    assert elsewhere[0] is not first.stream and elsewhere[0].device.index == 0
