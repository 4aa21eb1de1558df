"""gfnet.ops: every backend against the plain-PyTorch definitions, on small awkward inputs (CPU only; the
Triton kernels run under TRITON_INTERPRET=1, set by conftest.py).

Tolerances, per op and compute dtype, with the reason beside each:
- focus_crop: exact everywhere. A crop is a copy followed by the reference's own operations in the same
  order (x / 255, then (x - mean) / std, each correctly rounded), and every output conversion rounds to
  nearest even, so even normalised, bf16 and fp16 outputs are bit-identical.
- glance_resize, float32: atol 2e-5, rtol 1e-5. The kernels sum the 16 (or 4) taps in another order than
  ATen and normalise after interpolating instead of before; both are a few float32 ulps of values <= ~3.
- glance_resize / focus_crop_bilinear, float64: atol 1e-12 (the same differences at float64 precision).
- focus_crop_bilinear, float32: atol 2e-5, rtol 1e-5 (grid_sample computes the source position from the
  normalised grid, (g + 1) / 2 * (S - 1), which rounds differently from our pixel-space position).
- bf16 / fp16 outputs of the interpolating ops: one unit in the last place of the output dtype (rtol 2^-7,
  2^-10), since float32 values a few ulps apart can round to neighbouring bf16/fp16 values.
- Gradients (float64): gradcheck's defaults; the kernels' gradients against autograd through grid_sample at
  atol 1e-10.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from gfnet import ops
from gfnet.config import IMAGENET_MEAN, IMAGENET_STD
from gfnet.kernels.reference import focus_crop_bilinear_ref, focus_crop_ref, glance_resize_ref

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest.py where no GPU is present
FAST = ("cpp", "triton")  # "triton" cases run interpreted on CPU tensors (skipped where a GPU is present)
MEAN, STD = IMAGENET_MEAN, IMAGENET_STD

INTERP_TOL = {  # (atol, rtol) by output dtype, for the interpolating ops
    torch.float32: (2e-5, 1e-5),
    torch.float64: (1e-12, 1e-12),
    torch.bfloat16: (2 ** -7, 2 ** -7),
    torch.float16: (2 ** -10, 2 ** -10),
}


def make_images(n, h, w, dtype, layout, seed=0):
    """Tensor[N, 3, H, W] (or [N, H, W, 3] for "hwc") in the asked memory layout, values of a real image's
    range: uint8 in [0, 255], float in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    else:
        x = torch.rand((n, 3, h, w), generator=g, dtype=torch.float64).to(dtype)
    if layout == "nchw":
        return x
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "hwc":
        return x.permute(0, 2, 3, 1).contiguous()
    if layout == "strided":  # every other row and column of a bigger buffer, channels reversed
        big = torch.zeros((n, 3, 2 * h, 2 * w + 1), dtype=dtype)
        big[:, :, ::2, 1::2] = x.flip(1)
        return big[:, :, ::2, 1::2].flip(1)
    raise AssertionError(layout)


def nchw(images):
    return images.permute(0, 3, 1, 2) if images.shape[1] != 3 else images


def reference_loop_crop(images, actions, patch_size):
    """The GFNet reference's get_patch: a Python loop with two host reads per sample."""
    size = images.size(3)
    corners = torch.floor(actions * (size - patch_size)).int()
    patches = []
    for i in range(images.size(0)):
        y, x = corners[i, 0].item(), corners[i, 1].item()
        patches.append(images[i:i + 1, :, y:y + patch_size, x:x + patch_size])
    return torch.cat(patches, 0)


def assert_interp_close(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    atol, rtol = INTERP_TOL[actual.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------- focus_crop

@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "hwc", "strided"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64, torch.bfloat16])
def test_focus_crop_matches_reference(backend, layout, dtype):
    images = make_images(3, 17, 17, dtype, layout)
    actions = torch.tensor([[0.0, 1.0], [0.37, 0.91], [1.0, 0.0]])
    for mean, std in ((None, None), (MEAN, STD)):
        out = ops.focus_crop(images, actions, 6, mean=mean, std=std, backend=backend)
        ref = focus_crop_ref(nchw(images), actions, 6, mean=mean, std=std)
        assert out.dtype == (torch.float32 if dtype == torch.uint8 else dtype)
        torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ("cpp", "triton", "torch"))
def test_focus_crop_bit_identical_to_reference_loop(backend):
    images = make_images(5, 23, 23, torch.float32, "nchw", seed=1)
    actions = torch.rand(5, 2, generator=torch.Generator().manual_seed(2))
    actions[0] = torch.tensor([0.0, 1.0])  # both extreme corners
    out = ops.focus_crop(images, actions, 9, backend=backend)
    assert torch.equal(out, reference_loop_crop(images, actions, 9))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_focus_crop_out_dtype_and_format(backend, out_dtype, channels_last):
    images = make_images(1, 11, 11, torch.uint8, "hwc")  # batch 1, odd size, DALI's layout
    actions = torch.tensor([[0.5, 0.25]])
    out = ops.focus_crop(images, actions, 5, mean=MEAN, std=STD, out_dtype=out_dtype,
                         channels_last=channels_last, backend=backend)
    ref = focus_crop_ref(nchw(images), actions, 5, mean=MEAN, std=STD, out_dtype=out_dtype)
    assert out.dtype == out_dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_focus_crop_float64_actions_use_their_own_rounding():
    # The corner is computed in the actions' dtype, as the reference does: 0.5 * 7 = 3.5 -> 3 either way, but
    # a float64 action just below a float32 boundary must not be rounded up first.
    images = make_images(1, 10, 10, torch.float32, "nchw")
    a64 = torch.tensor([[3 / 7 - 1e-12, 0.0]], dtype=torch.float64)  # * 7 = 2.999999999993 -> 2
    out = ops.focus_crop(images, a64, 3, backend="cpp")
    assert torch.equal(out, images[:, :, 2:5, 0:3])


# --------------------------------------------------------------------------------------------- glance_resize

@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "hwc", "strided"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_glance_resize_matches_reference(backend, mode, layout, dtype):
    images = make_images(2, 19, 13, dtype, layout)  # not square: each axis has its own scale
    for size, mean, std in ((7, None, None), (8, MEAN, STD), (25, MEAN, STD)):  # down, down, up
        out = ops.glance_resize(images, size, mode=mode, mean=mean, std=std, backend=backend)
        ref = glance_resize_ref(nchw(images), size, mode=mode, mean=mean, std=std)
        assert_interp_close(out, ref)


@pytest.mark.parametrize("backend", FAST + ("torch",))
def test_glance_resize_equals_interpolate_then_normalise(backend):
    # The model's own formulation: normalise the float image, then F.interpolate(align_corners=True).
    images = make_images(1, 21, 21, torch.float32, "nchw")
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    expected = F.interpolate((images - m) / s, size=(9, 9), mode="bicubic", align_corners=True)
    out = ops.glance_resize(images, 9, mean=MEAN, std=STD, backend=backend)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_glance_resize_out_dtype_channels_last(backend, out_dtype):
    images = make_images(1, 15, 15, torch.uint8, "hwc")
    out = ops.glance_resize(images, 6, mean=MEAN, std=STD, out_dtype=out_dtype, channels_last=True,
                            backend=backend)
    ref = glance_resize_ref(nchw(images), 6, mean=MEAN, std=STD, out_dtype=out_dtype)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_interp_close(out, ref)


@pytest.mark.parametrize("backend", FAST)
def test_glance_resize_same_size_is_identity(backend):
    images = make_images(2, 9, 9, torch.float32, "nchw")
    for mode in ("bicubic", "bilinear"):
        assert torch.equal(ops.glance_resize(images, 9, mode=mode, backend=backend), images)


@pytest.mark.parametrize("backend", FAST)
def test_degenerate_sizes(backend):
    images = make_images(2, 9, 9, torch.float32, "nchw")
    actions = torch.tensor([[0.3, 0.6], [1.0, 0.0]])
    assert torch.equal(ops.focus_crop(images, actions, 9, backend=backend), images)  # P == S: corner 0
    for mode in ("bicubic", "bilinear"):  # one output pixel: scale 0, the first input pixel
        expected = F.interpolate(images, size=(1, 1), mode=mode, align_corners=True)
        torch.testing.assert_close(ops.glance_resize(images, 1, mode=mode, backend=backend), expected)
    empty = make_images(0, 9, 9, torch.uint8, "hwc")
    assert ops.focus_crop(empty, torch.zeros(0, 2), 4, backend=backend).shape == (0, 3, 4, 4)
    assert ops.glance_resize(empty, 4, backend=backend).shape == (0, 3, 4, 4)
    assert ops.focus_crop_bilinear(empty, torch.zeros(0, 2), 4, backend=backend).shape == (0, 3, 4, 4)


# --------------------------------------------------------------------------------------------- focus_crop_bilinear

@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "hwc", "strided"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_focus_crop_bilinear_matches_reference(backend, layout, dtype):
    images = make_images(3, 14, 11, dtype, layout)
    centers = torch.tensor([[0.0, 1.0], [0.41, 0.63], [0.97, 0.05]])  # the first and last reach past the border
    for scale, mean, std in ((1.0, None, None), (0.7, MEAN, STD), (1.6, MEAN, STD)):
        out = ops.focus_crop_bilinear(images, centers, 7, scale=scale, mean=mean, std=std, backend=backend)
        ref = focus_crop_bilinear_ref(nchw(images), centers, 7, scale=scale, mean=mean, std=std)
        assert_interp_close(out, ref)


@pytest.mark.parametrize("backend", FAST + ("torch",))
def test_focus_crop_bilinear_at_integer_corner_is_the_crop(backend):
    images = make_images(2, 13, 13, torch.float32, "nchw")
    p, corner = 5, torch.tensor([[3, 6], [0, 8]])
    centers = (corner + (p - 1) / 2) / 12  # the convention: pixel centers at cy * (H - 1)
    out = ops.focus_crop_bilinear(images, centers, p, backend=backend)
    expected = torch.stack([images[i, :, y:y + p, x:x + p] for i, (y, x) in enumerate(corner.tolist())])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", FAST + ("torch",))
def test_focus_crop_bilinear_gradcheck(backend):
    # fast_mode checks random projections of the Jacobian: the slow mode's one call per input element is
    # minutes under the Triton interpreter.
    images = make_images(2, 9, 8, torch.float64, "nchw").requires_grad_()
    # No sample on an integer pixel position, where bilinear interpolation has a kink.
    centers = torch.tensor([[0.31, 0.55], [0.81, 0.14]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, c: ops.focus_crop_bilinear(x, c, 5, scale=1.3, mean=MEAN, std=STD, backend=backend),
        (images, centers), fast_mode=True)


@pytest.mark.parametrize("backend", FAST)
def test_focus_crop_bilinear_gradients_match_grid_sample(backend):
    images = make_images(2, 10, 12, torch.float64, "hwc").requires_grad_()
    centers = torch.tensor([[0.2, 0.9], [0.66, 0.33]], dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = {}
    for be in (backend, "torch"):
        out = ops.focus_crop_bilinear(images, centers, 6, scale=0.9, mean=MEAN, std=STD, backend=be)
        grads[be] = torch.autograd.grad((out * weights).sum(), (images, centers))
    for ours, ref in zip(grads[backend], grads["torch"]):
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", FAST)
def test_focus_crop_bilinear_uint8_gradient_reaches_centers_only(backend):
    images = make_images(1, 9, 9, torch.uint8, "nchw")
    centers = torch.tensor([[0.42, 0.58]], requires_grad=True)
    out = ops.focus_crop_bilinear(images, centers, 4, mean=MEAN, std=STD, backend=backend)
    (g,) = torch.autograd.grad(out.sum(), centers)
    ref = focus_crop_bilinear_ref(images, centers, 4, mean=MEAN, std=STD)
    (g_ref,) = torch.autograd.grad(ref.sum(), centers)
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)  # float32 sums of ~100 terms


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("layout", ["nchw", "hwc"])
def test_crop_and_glance_gradcheck(backend, layout):
    images = make_images(2, 7, 7, torch.float64, layout).requires_grad_()
    actions = torch.tensor([[0.2, 0.9], [0.7, 0.4]], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: ops.focus_crop(x, actions, 4, mean=MEAN, std=STD, backend=backend), (images,), fast_mode=True)
    for mode in ("bicubic", "bilinear"):
        assert torch.autograd.gradcheck(
            lambda x: ops.glance_resize(x, 5, mode=mode, mean=MEAN, std=STD, backend=backend), (images,),
            fast_mode=True)


# --------------------------------------------------------------------------------------------- torch.library

@pytest.mark.parametrize("backend", ("cpp", "torch"))
def test_opcheck(backend):
    # One schema per op, the backend outside it: the same op checked with each kernel forced.
    images = make_images(2, 9, 9, torch.uint8, "hwc")
    imagesf = make_images(2, 9, 9, torch.float64, "channels_last").requires_grad_()
    actions = torch.tensor([[0.1, 0.9], [0.5, 0.5]])
    centers = torch.tensor([[0.3, 0.7], [0.5, 0.45]], dtype=torch.float64, requires_grad=True)
    m, s = list(MEAN), list(STD)
    with ops.use_backend(backend):
        torch.library.opcheck(torch.ops.gfnet.focus_crop, (images, actions, 4, m, s, torch.bfloat16, True))
        torch.library.opcheck(torch.ops.gfnet.focus_crop, (imagesf, actions, 4, m, s, torch.float64, False))
        torch.library.opcheck(torch.ops.gfnet.glance_resize, (images, 5, "bicubic", m, s, torch.float32, False))
        torch.library.opcheck(torch.ops.gfnet.glance_resize, (imagesf, 5, "bilinear", m, s, torch.float64, True))
        torch.library.opcheck(torch.ops.gfnet.focus_crop_bilinear,
                              (imagesf, centers, 4, 0.8, m, s, torch.float64, False))
    if backend == "cpp":
        grad = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        torch.library.opcheck(torch.ops.gfnet.focus_crop_bilinear_backward,
                              (grad, imagesf.detach(), centers.detach(), 4, 0.8, m, s, True, True))


def test_opcheck_triton_interpreted():
    images = make_images(1, 7, 7, torch.float32, "nchw").requires_grad_()
    centers = torch.tensor([[0.4, 0.6]], requires_grad=True)
    with ops.use_backend("triton"):
        torch.library.opcheck(torch.ops.gfnet.focus_crop_bilinear,
                              (images, centers, 3, 1.0, None, None, torch.float32, False),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def step(images, actions, centers):
        glance = ops.glance_resize(images, 6, mean=MEAN, std=STD)
        patch = ops.focus_crop(images, actions, 5, mean=MEAN, std=STD)
        soft = ops.focus_crop_bilinear(images.float() / 255, centers, 5)
        return glance.sum() + patch.sum() + soft.sum()

    images = make_images(2, 11, 11, torch.uint8, "hwc")
    actions = torch.tensor([[0.2, 0.8], [0.6, 0.1]])
    centers = torch.tensor([[0.4, 0.5], [0.6, 0.3]], requires_grad=True)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(images, actions, centers)
    loss.backward()
    g_compiled = centers.grad.clone()
    centers.grad = None
    expected = step(images, actions, centers)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(g_compiled, centers.grad)


# --------------------------------------------------------------------------------------------- dispatch and errors

def test_default_backend_on_cpu_is_cpp():
    assert ops.select_backend(torch.zeros(1, 3, 4, 4)) == "cpp"
    assert ops.select_backend(torch.zeros(1, 3, 4, 4), "torch") == "torch"


def test_triton_on_cpu_refused_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton needs a CUDA tensor; got cpu .*TRITON_INTERPRET=1"):
        ops.focus_crop(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2), 4, backend="triton")


def test_unknown_backend_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.glance_resize(torch.zeros(1, 3, 8, 8), 4, backend="cuda")


def test_missing_extension_is_an_actionable_error(monkeypatch):
    # STYLE: a missing extension is an actionable error, never a silent slowdown; the reference stays reachable.
    from gfnet import _extension
    monkeypatch.setitem(_extension._cache, "module", _extension.ExtensionMissing(
        "gfnet's C++ extension gfnet._C failed to import (no module named gfnet._C); build it with "
        "`pip install --no-build-isolation -e .`"))
    images, actions = make_images(1, 8, 8, torch.uint8, "nchw"), torch.tensor([[0.5, 0.5]])
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        ops.focus_crop(images, actions, 3)
    with pytest.raises(RuntimeError, match="backend='cpp' needs gfnet._C"):
        ops.focus_crop(images, actions, 3, backend="cpp")
    assert torch.equal(ops.focus_crop(images, actions, 3, backend="torch"), focus_crop_ref(images, actions, 3))


def test_use_backend_is_per_thread_and_restored():
    import threading
    seen = {}
    with ops.use_backend("torch"):
        assert ops.select_backend(torch.zeros(1, 3, 4, 4)) == "torch"
        worker = threading.Thread(target=lambda: seen.update(b=ops.select_backend(torch.zeros(1, 3, 4, 4))))
        worker.start()
        worker.join()
    assert seen["b"] == "cpp" and ops.select_backend(torch.zeros(1, 3, 4, 4)) == "cpp"


def test_device_guard_targets_the_tensors_device():
    # Triton launches on the current CUDA device: the kernels run under a guard for the inputs' device, so
    # that tensors on cuda:1 never launch on cuda:0 (an illegal memory access). (The guard's effect needs two
    # GPUs; test_cuda_second_device checks it there.)
    from gfnet.device import device_guard
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(device_guard(torch.zeros(1)), torch.cuda.device)


def _nan_images(dtype, layout):
    images = make_images(2, 12, 12, torch.float32, "nchw")
    bits = images.view(torch.int32)
    bits[0, 1, 3, 4] = 0x7FFFFFFF  # the GPU's canonical NaN
    bits[1, 2, 6, 7] = -1  # 0xFFFFFFFF
    bits[1, 0, 0, 0] = 0x7F800001  # a signalling NaN whose payload lies below the bf16 bits
    images = images.to(dtype)
    return images.permute(0, 2, 3, 1).contiguous() if layout == "hwc" else images


@pytest.mark.parametrize("backend", ("cpp", "triton", "torch"))
@pytest.mark.parametrize("out_dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_nan_pixels_stay_nan(backend, out_dtype):
    # A NaN pixel must stay NaN in every backend and output dtype (the bf16 rounding once turned 0x7FFFFFFF
    # into -0.0). Where the reference's output is NaN, so must ours be, and nowhere else.
    images = _nan_images(torch.float32, "hwc")
    actions = torch.tensor([[0.0, 0.3], [0.7, 0.9]])
    centers = torch.tensor([[0.3, 0.4], [0.55, 0.6]])
    calls = {
        "focus_crop": lambda b: ops.focus_crop(images, actions, 8, mean=MEAN, std=STD, out_dtype=out_dtype, backend=b),
        "glance_resize": lambda b: ops.glance_resize(images, 7, mean=MEAN, std=STD, out_dtype=out_dtype, backend=b),
        "focus_crop_bilinear": lambda b: ops.focus_crop_bilinear(images, centers, 6, mean=MEAN, std=STD,
                                                                 out_dtype=out_dtype, backend=b),
    }
    for name, call in calls.items():
        out, ref = call(backend), call("torch")
        assert ref.isnan().any(), name
        assert torch.equal(out.isnan(), ref.isnan()), name
        assert torch.equal(out.nan_to_num(0.0), ref.nan_to_num(0.0)) or name != "focus_crop", name


@pytest.mark.parametrize("backend", ("cpp", "triton"))
def test_bilinear_backward_tells_the_determinism_flag(backend):
    images = make_images(1, 9, 9, torch.float32, "nchw").requires_grad_()
    centers = torch.tensor([[0.4, 0.6]], requires_grad=True)
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        out = ops.focus_crop_bilinear(images, centers, 4, backend=backend)
        if backend == "triton":  # atomic adds: PyTorch's rule for nondeterministic kernels
            with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
                out.sum().backward()
            torch.use_deterministic_algorithms(True, warn_only=True)
            out = ops.focus_crop_bilinear(images, centers, 4, backend=backend)
            with pytest.warns(UserWarning, match="deterministic"):
                out.sum().backward()
        else:
            out.sum().backward()  # the C++ backward is deterministic
        assert centers.grad is not None
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.mark.parametrize("call, message", [
    (lambda: ops.focus_crop(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2), 9), "larger than the 8x8 image"),
    (lambda: ops.focus_crop(torch.zeros(3, 8, 8), torch.zeros(1, 2), 4), "got rank 3"),
    (lambda: ops.focus_crop(torch.zeros(1, 4, 8, 8), torch.zeros(1, 2), 4), "must have 3 channels"),
    (lambda: ops.focus_crop(torch.zeros(1, 3, 8, 8), torch.tensor([[0.5, 1.5]]), 4), "in \\[0, 1\\]"),
    (lambda: ops.focus_crop(torch.zeros(1, 3, 8, 8), torch.tensor([[float("nan"), 0.5]]), 4), "no NaN"),
    (lambda: ops.focus_crop(torch.zeros(2, 3, 8, 8), torch.zeros(3, 2), 4), "batch mismatch"),
    (lambda: ops.focus_crop(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3), 4), "Tensor\\[N, 2\\]"),
    (lambda: ops.focus_crop(torch.zeros(1, 3, 8, 10), torch.zeros(1, 2), 4), "square images"),
    (lambda: ops.focus_crop(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, dtype=torch.long), 4), "float tensor"),
    (lambda: ops.focus_crop(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2), 4, mean=MEAN), "both mean and std"),
    (lambda: ops.focus_crop(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2), 4, mean=(0, 0), std=(1, 1)), "3 values"),
    (lambda: ops.focus_crop(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2), 4, out_dtype=torch.int32), "out_dtype"),
    (lambda: ops.focus_crop(torch.zeros(1, 3, 8, 8, dtype=torch.int32), torch.zeros(1, 2), 4), "uint8 or float"),
    (lambda: ops.glance_resize(torch.zeros(1, 3, 8, 8), 0), "size must be positive"),
    (lambda: ops.glance_resize(torch.zeros(1, 3, 8, 8), 4, mode="nearest"), "'bicubic' or 'bilinear'"),
    (lambda: ops.focus_crop_bilinear(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2), 4, scale=0), "scale"),
    (lambda: ops.focus_crop_bilinear(torch.zeros(1, 3, 1, 8), torch.zeros(1, 2), 1), "at least 2x2"),
    (lambda: ops.focus_crop_bilinear(torch.zeros(2, 3, 8, 8), torch.zeros(1, 2), 4), "batch mismatch"),
])
def test_bad_input_refused(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_unvalidated_actions_stay_inside_the_image():
    # validate=False skips the host read; the kernels clamp the corner instead of reading out of bounds.
    images = make_images(1, 8, 8, torch.float32, "nchw")
    for backend in FAST if INTERPRETING else ("cpp",):
        out = ops.focus_crop(images, torch.tensor([[2.0, -1.0]]), 4, backend=backend, validate=False)
        assert torch.equal(out, images[:, :, 4:8, 0:4])


# --------------------------------------------------------------------------------------------- GPU

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_cuda_triton_matches_reference(dtype):
    images = make_images(4, 40, 40, dtype, "hwc").cuda()
    actions = torch.rand(4, 2, device="cuda")
    out = ops.focus_crop(images, actions, 16, mean=MEAN, std=STD, out_dtype=torch.bfloat16)
    ref = ops.focus_crop(images, actions, 16, mean=MEAN, std=STD, out_dtype=torch.bfloat16, backend="torch")
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    for mode in ("bicubic", "bilinear"):
        assert_interp_close(ops.glance_resize(images, 17, mode=mode, mean=MEAN, std=STD),
                            ops.glance_resize(images, 17, mode=mode, mean=MEAN, std=STD, backend="torch"))
    centers = torch.rand(4, 2, device="cuda", requires_grad=True)
    out = ops.focus_crop_bilinear(images, centers, 16, scale=0.8, mean=MEAN, std=STD)
    ref = ops.focus_crop_bilinear(images, centers, 16, scale=0.8, mean=MEAN, std=STD, backend="torch")
    assert_interp_close(out, ref)
    (g,) = torch.autograd.grad(out.sum(), centers)
    (g_ref,) = torch.autograd.grad(ref.sum(), centers)
    torch.testing.assert_close(g, g_ref, atol=1e-3, rtol=1e-3)
