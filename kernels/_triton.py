"""Triton for the kernel modules, or a stand-in where Triton is not installed (macOS, Windows, minimal CPU
installs), so that the plain-PyTorch references beside each kernel stay importable: with the stand-in,
defining a kernel works and launching one raises. gfnet.ops never picks the Triton backend without Triton
(``select_backend`` checks), so the error below is only reached by calling a launcher directly.
"""
try:
    import triton
    import triton.language as tl
except ImportError:
    class _Missing:
        """Absorbs the module-level uses (``tl.constexpr`` annotations, ``tl.float32`` in tables,
        ``@triton.jit``); any call that would run Triton raises."""

        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:  # @triton.jit on a kernel
                return self
            raise RuntimeError("Triton is not installed: `pip install triton` to run gfnet's Triton kernels")

        def __getitem__(self, grid):  # kernel[grid](...)
            return self

    triton = tl = _Missing()

__all__ = ["triton", "tl"]
