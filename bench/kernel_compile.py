"""Every Triton kernel variant compiled ahead of time for NVIDIA GPUs, down to a cubin, with the installed Triton,
and its PTX checked for IEEE division: run where no GPU is needed (the tests) and on a GPU machine with that
machine's own Triton (``gfnet-bench gpucheck``).

Triton's plain float32 ``/`` is ``div.full.f32`` (approximate) on NVIDIA GPUs; the kernels divide with
``div_rn`` (``div.rn.f32``), which keeps the focus crop bit-identical to torch's ``x / 255`` and
``(x - mean) / std``. The kernels must be decorated with TRITON_INTERPRET unset, so this runs as its own
process: ``python -m gfnet.bench.kernel_compile ARCH [ARCH ...]`` prints one JSON object,
{"<kernel variant> sm_<arch>": {"ok": bool, "ptx": str} or {"ok": false, "error": str}}.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

__all__ = ["compile_all", "check_division", "run_isolated"]

STRIDES = "H W sxn sxc sxh sxw son soc soh sow".split()
BWD_STRIDES = "H W sxn sxc sxh sxw sgn sgc sgh sgw gxn gxc gxh gxw".split()
DTYPE_PAIRS = (("*u8", "*bf16"), ("*u8", "*fp32"), ("*fp32", "*fp16"), ("*fp64", "*fp64"))
KERNELS_PER_PAIR = 5  # crop, glance bicubic and bilinear, bilinear crop forward and backward


def compile_all(archs) -> dict:
    """Compile every kernel variant for each compute capability in ``archs`` (e.g. 80, 90)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gfnet.kernels import focus_crop, focus_crop_bilinear, glance_resize

    results = {}
    out_types = {"*fp32": tl.float32, "*bf16": tl.bfloat16, "*fp16": tl.float16, "*fp64": tl.float64}

    def compile_one(name, fn, pointers, ints, consts, arch):
        sig = dict(pointers)
        sig.update({k: "i32" for k in ints})
        sig.update({k: "constexpr" for k in consts})
        try:
            kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                    target=GPUTarget("cuda", arch, 32))
            results[f"{name} sm_{arch}"] = {"ok": "cubin" in kernel.asm, "ptx": kernel.asm["ptx"]}
        except Exception as err:  # reported, not raised: every failure is listed at once
            results[f"{name} sm_{arch}"] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000]}

    for arch in archs:
        for x, out in DTYPE_PAIRS:
            compute = "*fp64" if x == "*fp64" else "*fp32"
            flags = {"IS_UINT8": x == "*u8", "NORMALISE": True, "OUT_DTYPE": out_types[out]}
            compile_one(f"focus_crop {x}->{out}", focus_crop._focus_crop_kernel,
                        {"x_ptr": x, "corner_ptr": "*i32", "out_ptr": out, "norm_ptr": compute}, STRIDES,
                        dict(flags, COMPUTE_F64=x == "*fp64", P=96, BLOCK=1024), arch)
            for bicubic in (True, False):
                compile_one(f"glance_resize bicubic={bicubic} {x}->{out}", glance_resize._glance_resize_kernel,
                            {"x_ptr": x, "out_ptr": out, "norm_ptr": compute}, STRIDES,
                            dict(flags, BICUBIC=bicubic, COMPUTE_F64=x == "*fp64", P=144, BLOCK=512), arch)
            compile_one(f"focus_crop_bilinear fwd {x}->{out}", focus_crop_bilinear._focus_crop_bilinear_fwd_kernel,
                        {"x_ptr": x, "centers_ptr": compute, "params_ptr": compute, "out_ptr": out}, STRIDES,
                        dict(flags, COMPUTE_F64=x == "*fp64", P=128, BLOCK=512), arch)
            compile_one(f"focus_crop_bilinear bwd {x} grad {out}",
                        focus_crop_bilinear._focus_crop_bilinear_bwd_kernel,
                        {"x_ptr": x, "centers_ptr": compute, "params_ptr": compute, "grad_out_ptr": out,
                         "grad_x_ptr": compute, "grad_c_ptr": compute}, BWD_STRIDES,
                        {"IS_UINT8": x == "*u8", "NORMALISE": True, "COMPUTE_F64": x == "*fp64",
                         "NEED_IMAGES": x != "*u8", "NEED_CENTERS": True, "P": 96, "BLOCK": 512}, arch)
    return results


def check_division(results: dict) -> list:
    """The variants that fail the division rule: no ``div.full.f32`` anywhere, ``div.rn.f32`` in every variant
    that computes in float32 (uint8 and float32 input); returns their names with the reason."""
    bad = []
    for name, result in results.items():
        ptx = result.get("ptx", "")
        if "div.full.f32" in ptx:
            bad.append(f"{name}: approximate division div.full.f32")
        elif ("*u8" in name or "*fp32" in name) and "div.rn.f32" not in ptx:
            bad.append(f"{name}: no div.rn.f32")
    return bad


def run_isolated(archs, timeout: float, preexec_fn=None) -> dict:
    """:func:`compile_all` in a process of its own with TRITON_INTERPRET unset (the interpreter replaces the
    kernels' decorators); raises RuntimeError with the process's error output if it fails. ``preexec_fn``: run in
    the child before it starts (gpucheck ties the child's life to its worker's)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "gfnet.bench.kernel_compile", *map(str, archs)],
                          capture_output=True, text=True, env=env, timeout=timeout, preexec_fn=preexec_fn)
    if proc.returncode != 0:
        raise RuntimeError(f"kernel compilation process failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(compile_all([int(a) for a in sys.argv[1:]] or [80, 90])))
