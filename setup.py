"""Build the nns_cuda._C extension.

* CPU-only machine (no usable CUDA, FORCE_CUDA unset): a ``CppExtension`` with the
  C++ kernels of ``csrc/cpu``.
* CUDA usable, or ``FORCE_CUDA=1`` (compile-only on a machine without a GPU, see
  DESIGN.md §5): a ``CUDAExtension`` that also compiles ``csrc/cuda/*.cu``.
  Without a GPU set ``TORCH_CUDA_ARCH_LIST`` (we default it to ``9.0``) and
  ``CUDA_HOME=/usr/local/cuda``.
"""
import glob
import os

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    if os.environ.get("NNS_NO_CUDA", "0") == "1":
        return False
    return torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


def _extensions():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include = [os.path.join(ROOT, "csrc", "include")]
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    macros = []
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        if cpp_extension.CUDA_HOME is None or not os.path.isdir(str(cpp_extension.CUDA_HOME)):
            os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
        cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        macros.append(("NNS_WITH_CUDA", None))
        return [
            cpp_extension.CUDAExtension(
                "nns_cuda._C",
                cpp + cu,
                include_dirs=include,
                define_macros=macros,
                extra_compile_args={
                    "cxx": cxx,
                    "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"],
                },
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        cpp_extension.CppExtension(
            "nns_cuda._C",
            cpp,
            include_dirs=include,
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
