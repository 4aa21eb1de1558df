"""Which kernel runs an op: the one place that decides, and explains in words a user can act on when it
refuses.

Each op of gfnet.ops has one schema (``gfnet::<name>``) registered with torch.library and one kernel per
device registered through the dispatcher: the C++ kernel of gfnet._C for CPU tensors, the Triton launcher for
CUDA tensors (run under a device guard, so that tensors on ``cuda:1`` launch on ``cuda:1``), and the
plain-PyTorch reference for any other device. The backend is not part of the schema: tests and benchmarks
override it per thread with :func:`use_backend` (or the ops' ``backend=`` argument, which does the same),
for instance to run the Triton kernels on CPU tensors under TRITON_INTERPRET=1 or the references anywhere.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
import warnings
from typing import Optional

import torch

from gfnet._extension import ExtensionMissing, extension
from gfnet.device import device_guard

__all__ = ["BACKENDS", "select_backend", "use_backend", "current_backend", "triton_kernels", "cpu_kernels"]

BACKENDS = ("triton", "cpp", "torch")

# Why a path cannot run, in one table: (backend, situation) -> message.
REFUSALS = {
    ("triton", "not installed"): "backend='triton' needs the triton package: `pip install triton`",
    ("triton", "device"): ("Triton needs a CUDA tensor; got {device} (set TRITON_INTERPRET=1 before triton is "
                           "imported to run it in the interpreter, or use backend='cpp' or 'torch')"),
    ("cpp", "device"): ("gfnet._C has CPU kernels only; got a {device} tensor (use backend='triton' or 'torch', "
                        "or backend=None to choose)"),
    ("cpp", "missing"): ("backend='cpp' needs gfnet._C: {error}; or use backend='torch'"),
    ("triton", "fallback"): ("Triton is not installed, so gfnet's glance/focus ops run the slower PyTorch "
                             "reference on CUDA; `pip install triton` for the fused kernels"),
}

_state = threading.local()
_probed: dict = {}
_warned: set = set()


def _triton_installed() -> bool:
    if "triton" not in _probed:
        _probed["triton"] = importlib.util.find_spec("triton") is not None
    return _probed["triton"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def current_backend() -> Optional[str]:
    """The backend forced for this thread by :func:`use_backend`, or None (the device decides)."""
    return getattr(_state, "backend", None)


@contextlib.contextmanager
def use_backend(backend: Optional[str]):
    """Force the kernels of every gfnet op called in this thread to ``backend`` ("triton", "cpp", "torch";
    None: the device decides). For tests and benchmarks; models never need it."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
    previous = current_backend()
    _state.backend = backend
    try:
        yield
    finally:
        _state.backend = previous


def select_backend(images: torch.Tensor, backend: Optional[str] = None) -> str:
    """The kernel that runs an op on ``images``: "triton", "cpp" or "torch".

    backend=None (and no :func:`use_backend` override) chooses by device: Triton for CUDA tensors (the
    reference, with a warning once, where Triton is not installed), gfnet._C for CPU tensors, the reference
    elsewhere. A forced backend that cannot run raises RuntimeError saying why and what to do instead.
    """
    backend = backend if backend is not None else current_backend()
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
    device = images.device.type
    if backend is None:
        if device == "cuda":
            if _triton_installed():
                return "triton"
            if "triton" not in _warned:
                _warned.add("triton")
                warnings.warn(REFUSALS["triton", "fallback"], RuntimeWarning, stacklevel=3)
            return "torch"
        if device == "cpu":
            extension()  # a missing extension is an actionable error, never a silent slowdown
            return "cpp"
        return "torch"
    if backend == "triton":
        if not _triton_installed():
            raise RuntimeError(REFUSALS["triton", "not installed"])
        if device == "cuda" or (device == "cpu" and _interpreting()):
            return "triton"
        raise RuntimeError(REFUSALS["triton", "device"].format(device=device))
    if backend == "cpp":
        if device != "cpu":
            raise RuntimeError(REFUSALS["cpp", "device"].format(device=device))
        try:
            extension()
        except ExtensionMissing as err:
            raise RuntimeError(REFUSALS["cpp", "missing"].format(error=err)) from None
        return "cpp"
    return "torch"


def alert_not_deterministic(caller: str) -> None:
    """What PyTorch's own nondeterministic kernels do: raise under ``torch.use_deterministic_algorithms(True)``,
    warn with ``warn_only=True``, nothing otherwise."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (f"{caller} does not have a deterministic implementation, but you set "
               "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this operation, "
               "or you can use the 'warn_only=True' option, if that's acceptable for your application.")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(message)


def register_kernels(op, run, images_arg: int = 0) -> None:
    """Register ``run(backend, *op_args)`` as the op's kernel for CPU and for CUDA tensors (``args[images_arg]``
    is the images): on the CPU the chosen kernel runs as it is, on CUDA under a guard for the images' device,
    so that Triton launches (on the current device) go to the GPU that holds the tensors."""
    @op.register_kernel("cpu")
    def _cpu(*args):
        return run(select_backend(args[images_arg]), *args)

    @op.register_kernel("cuda")
    def _cuda(*args):
        with device_guard(args[images_arg]):
            return run(select_backend(args[images_arg]), *args)


def triton_kernels(name: str):
    """The kernel module ``gfnet.kernels.<name>`` (imported lazily: importing Triton takes seconds)."""
    return importlib.import_module(f"gfnet.kernels.{name}")


def cpu_kernels():
    """gfnet._C, whose functions are the ops' CPU kernels."""
    return extension("focus_crop", "glance_resize", "focus_crop_bilinear", "focus_crop_bilinear_backward")
