"""Build of the gfnet package and its C++ extension ``gfnet._C``.

gfnet._C holds the CPU kernels of the glance/focus ops (csrc/<op>.cpp, one file per op) and the early-exit
scheduler (csrc/scheduler.cpp). There are no CUDA sources: on CUDA the ops run Triton kernels (kernels/),
compiled at first use, so the build needs no CUDA toolkit. at::parallel_for's OpenMP backend is header-inlined,
hence -fopenmp.
The Triton kernels live in the top-level kernels/ folder and are installed as ``gfnet.kernels``
(a popular PyPI package already owns the import name ``kernels``); the benchmark suites of bench/
are installed as ``gfnet.bench`` so that the ``gfnet-bench`` command finds them.
"""
import glob
import sys

from setuptools import find_packages, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("gfnet's build needs torch installed first: `pip install torch` then "
             "`pip install --no-build-isolation .`")

cxx_flags = ["-O3"]  # torch picks the C++ standard it needs (C++20 for 2.14)
link_flags = []
if sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")

ext = CppExtension("gfnet._C", sorted(glob.glob("csrc/*.cpp")), extra_compile_args=cxx_flags,
                   extra_link_args=link_flags, depends=sorted(glob.glob("csrc/*.h")))

packages = find_packages(include=["gfnet", "gfnet.*"]) + ["gfnet.kernels", "gfnet.bench"]

setup(
    packages=packages,
    package_dir={"gfnet.kernels": "kernels", "gfnet.bench": "bench"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
