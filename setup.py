"""Build of the gfnet package and its C++ extension ``gfnet._C``.

The CPU sources in csrc/*.cpp are always compiled (with OpenMP); CUDA sources (csrc/*.cu) only
where a CUDA toolkit and a CUDA build of torch are both present, or GFNET_FORCE_CUDA=1.
The Triton kernels live in the top-level kernels/ folder and are installed as ``gfnet.kernels``
(a popular PyPI package already owns the import name ``kernels``); the benchmark suites of bench/
are installed as ``gfnet.bench`` so that the ``gfnet-bench`` command finds them.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("gfnet's build needs torch installed first: `pip install torch` then "
             "`pip install --no-build-isolation .`")

here = os.path.dirname(os.path.abspath(__file__))
cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))

with_cuda = bool(cu_sources) and (
    os.environ.get("GFNET_FORCE_CUDA") == "1"
    or (CUDA_HOME is not None and torch.version.cuda is not None and torch.cuda.is_available())
)
if os.environ.get("GFNET_NO_CUDA") == "1":
    with_cuda = False

cxx_flags = ["-O3"]  # torch picks the C++ standard it needs (C++20 for 2.14)
link_flags = []
if sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")

if with_cuda:
    ext = CUDAExtension(
        "gfnet._C", cpp_sources + cu_sources,
        define_macros=[("GFNET_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension("gfnet._C", cpp_sources, extra_compile_args=cxx_flags, extra_link_args=link_flags)

packages = find_packages(include=["gfnet", "gfnet.*"]) + ["gfnet.kernels", "gfnet.bench"]

setup(
    packages=packages,
    package_dir={"gfnet.kernels": "kernels", "gfnet.bench": "bench"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
