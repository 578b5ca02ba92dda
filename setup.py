"""Build the nns_cuda._C extension.

Sources, one op per file: ``csrc/*.cpp`` (the namespace, each op's schema and argument checks,
and the device-generic ATen ops), ``csrc/cpu/*.cpp`` (the CPU kernels), ``csrc/cuda/*.cu`` (the
CUDA kernels); headers in ``csrc/include/nns_cuda/``.

* No usable CUDA and ``FORCE_CUDA`` unset, or ``NNS_NO_CUDA=1`` (without ``FORCE_CUDA``): a
  ``CppExtension`` with ``csrc/*.cpp`` and ``csrc/cpu/*.cpp``.
* CUDA usable, or ``FORCE_CUDA=1``: a ``CUDAExtension`` that also compiles ``csrc/cuda/*.cu``
  and registers the device-generic ops for CUDA.

Compiling the CUDA sources without a GPU (it checks that they build; the CPU kernels are what
runs there) needs the CUDA build of torch and nvcc::

    FORCE_CUDA=1 CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=2 \
        python setup.py build_ext --inplace

``FORCE_CUDA=1`` because ``torch.cuda.is_available()`` is False there; ``TORCH_CUDA_ARCH_LIST``
defaults to ``9.0`` when unset (without a GPU ``torch.utils.cpp_extension`` has no architecture
to build for); set ``CUDA_HOME`` explicitly, since torch guesses the toolkit wrong when ``nvcc``
on ``PATH`` is a wrapper. More in the README, "Backends and building for CUDA".
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
