"""Build of torchlane._C.

A CppExtension when torch has no CUDA; a CUDAExtension (adding csrc/**/*.cu) when torch
was built with CUDA and nvcc is found, or when TORCHLANE_FORCE_CUDA=1.
TORCHLANE_DEBUG=1 builds with -O0 -g; TORCHLANE_SANITIZE=1 adds ASan/UBSan.

CPU code is compiled for this machine (-march=native: the AVX-512/AMX attention micro-kernels)
in local builds (`make build`, `pip install --no-build-isolation -e .`). A wheel (`pip wheel .`,
`python -m build`) is built portable for the x86-64 baseline, so it runs on any CPU the
installed torch runs on (the attention op then uses its BLAS tile kernels);
TORCHLANE_NO_NATIVE=1 forces a portable build, TORCHLANE_NATIVE=1 a native wheel.
"""

import os
import sys
from glob import glob

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _want_cuda():
    if _flag("TORCHLANE_FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _native():
    if _flag("TORCHLANE_NO_NATIVE"):
        return False
    if _flag("TORCHLANE_NATIVE"):
        return True
    return "bdist_wheel" not in sys.argv  # a wheel may be installed on another CPU


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob(os.path.join(ROOT, pattern), recursive=True))


def _extension():
    cuda = _want_cuda()
    # TORCHLANE_DEBUG_CHECKS turns on internal state assertions (Note [Reducer states]).
    opt = ["-O0", "-g", "-DTORCHLANE_DEBUG_CHECKS"] if _flag("TORCHLANE_DEBUG") else ["-O3"]
    # -fopenmp: at::parallel_for is a header template whose "#pragma omp parallel" is compiled into
    # this extension; without the flag every parallel_for here runs on one thread. libgomp.so.1
    # resolves to the copy torch has already loaded.
    cxx = opt + ["-std=c++20", "-Wall", "-Wno-unused-parameter", "-fvisibility=hidden", "-fopenmp"]
    link = ["-fopenmp"]
    if _flag("TORCHLANE_SANITIZE"):
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        cxx += san
        link += san
    if _native():
        cxx.append("-march=native" if not cuda else "-mavx2")
    # csrc/api/ is the C++ API of libtorchlane (CMakeLists.txt), not part of the extension.
    api = os.path.join("csrc", "api", "")
    sources = [s for s in _sources("csrc/**/*.cpp") if not s.startswith(api)]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if cuda:
        sources += _sources("csrc/**/*.cu")
        nvcc = opt + ["-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            "torchlane._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("TORCHLANE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension(
        "torchlane._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
