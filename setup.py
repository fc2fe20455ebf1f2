"""Build of torchlane's C++ core, python/torchlane/lib/libtorchlane.so, and of torchlane._C.

Two parts, built in this order (Note [One copy of the core]):
- libtorchlane.so: every csrc/**/*.cpp except the pybind11 bindings (csrc/bindings/*.cpp other
  than ops.cpp, which holds the op schemas), csrc/api/ included; the .cu files in CUDA builds.
  It knows no Python and is what C++ programs link (find_package(torchlane) with
  torchlane.cmake_prefix_path, docs/cpp_api.md).
- torchlane._C: the pybind11 bindings only, linked against libtorchlane.so (RUNPATH $ORIGIN/lib).
The build also puts the C++ API headers and the CMake package (share/cmake/torchlane) next to the
library: in python/torchlane/ for in-place builds, in the wheel otherwise.

The core is a CppExtension when torch has no CUDA; a CUDAExtension (adding csrc/**/*.cu) when
torch was built with CUDA and nvcc is found, or when TORCHLANE_FORCE_CUDA=1.
TORCHLANE_DEBUG=1 builds both parts with -O0 -g; TORCHLANE_SANITIZE=1 adds ASan/UBSan.

CPU code is compiled for this machine (-march=native: the AVX-512/AMX attention micro-kernels)
in local builds (`make build`, `pip install --no-build-isolation -e .`). A wheel (`pip wheel .`,
`python -m build`) is built portable for the x86-64 baseline, so it runs on any CPU the
installed torch runs on (the attention op then uses its BLAS tile kernels);
TORCHLANE_NO_NATIVE=1 forces a portable build, TORCHLANE_NATIVE=1 a native wheel.
"""

# Note [One copy of the core]: the reducer, the hooks and the op registrations
# (TORCH_LIBRARY(torchlane) in csrc/bindings/ops.cpp, TORCH_LIBRARY_IMPL next to each op) live in
# libtorchlane.so alone, so a process that imports torchlane and also links the C++ API loads them
# once (tests/test_cpp_api.py checks it). The library is compiled with default visibility (as
# CMakeLists.txt builds it): its classes and functions are what _C and C++ programs call. _C keeps
# -fvisibility=hidden for its own (pybind11) code. The library does not link libtorch_python.

import os
import re
import shutil
import sys
from glob import glob

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CORE = "torchlane.lib.libtorchlane"  # -> torchlane/lib/libtorchlane.so (get_ext_filename)


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


def _gloo_include_dir():
    """Note [Gloo headers] in CMakeLists.txt: Debian's libgloo-dev headers, when present."""
    dirs = [d for d in os.environ.get("CPATH", "").split(os.pathsep) if d]
    for d in dirs + ["/usr/local/include", "/usr/include"]:
        if os.path.exists(os.path.join(d, "gloo", "config.h")):
            return d
    return None


def _common_flags(cuda):
    # TORCHLANE_DEBUG_CHECKS turns on internal state assertions (Note [Reducer states]).
    opt = ["-O0", "-g", "-DTORCHLANE_DEBUG_CHECKS"] if _flag("TORCHLANE_DEBUG") else ["-O3"]
    # -fopenmp: at::parallel_for is a header template whose "#pragma omp parallel" is compiled into
    # the object that calls it; without the flag every parallel_for there runs on one thread.
    # libgomp.so.1 resolves to the copy torch has already loaded.
    cxx = opt + ["-std=c++20", "-Wall", "-Wno-unused-parameter", "-fopenmp"]
    link = ["-fopenmp"]
    if _flag("TORCHLANE_SANITIZE"):
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        cxx += san
        link += san
    if _native():
        cxx.append("-march=native" if not cuda else "-mavx2")
    return opt, cxx, link


def _core_extension():
    cuda = _want_cuda()
    opt, cxx, link = _common_flags(cuda)
    bindings = os.path.join("csrc", "bindings", "")
    ops = os.path.join("csrc", "bindings", "ops.cpp")
    sources = [s for s in _sources("csrc/**/*.cpp") if not s.startswith(bindings) or s == ops]
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "api", "include")]
    macros = []
    gloo = _gloo_include_dir()
    if gloo is not None:
        if gloo not in ("/usr/include", "/usr/local/include"):  # system dirs stay system dirs
            include_dirs.append(gloo)
        macros += [("USE_C10D_GLOO", "1"), ("TORCHLANE_WITH_GLOO", "1")]
    else:
        print(
            "torchlane: no gloo/ headers found (apt-get install libgloo-dev): "
            "init_process_group() will raise; pass a c10d::ProcessGroup instead",
            file=sys.stderr,
        )
    # The SONAME is what _C and C++ programs record (DT_NEEDED libtorchlane.so). The RUNPATH finds
    # torch's libraries when torchlane is installed next to torch (site-packages/torch/lib).
    link = link + ["-Wl,-soname,libtorchlane.so", "-Wl,-rpath,$ORIGIN/../../torch/lib"]
    if cuda:
        sources += _sources("csrc/**/*.cu")
        nvcc = opt + ["-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension(
            CORE,
            sources,
            include_dirs=include_dirs,
            define_macros=macros + [("TORCHLANE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    else:
        ext = CppExtension(
            CORE,
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    # No Python in the core: C++ programs load it without libpython.
    ext.libraries = [lib for lib in ext.libraries if lib != "torch_python"]
    ext.depends = _headers()
    return ext


def _bindings_extension():
    cuda = _want_cuda()
    _, cxx, link = _common_flags(cuda)
    ops = os.path.join("csrc", "bindings", "ops.cpp")
    sources = [s for s in _sources("csrc/bindings/*.cpp") if s != ops]
    macros = [("TORCHLANE_WITH_CUDA", "1")] if cuda else []
    # library_dirs is set in _BuildExtension.build_extension (where the core was just linked).
    ext = CppExtension(
        "torchlane._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        libraries=["torchlane"],
        extra_compile_args={"cxx": cxx + ["-fvisibility=hidden"]},
        extra_link_args=link + ["-Wl,-rpath,$ORIGIN/lib"],
    )
    ext.depends = _headers()
    return ext


def _headers():
    return [h for pattern in ("*.h", "*.hpp", "*.cuh") for h in _sources(f"csrc/**/{pattern}")]


def _version():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        return re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)


def _install_cmake_package(package_dir):
    """Headers and the CMake package next to lib/libtorchlane.so in `package_dir` (torchlane/):
    the same headers CMakeLists.txt installs, and share/cmake/torchlane/ (cmake/*.in)."""
    include = os.path.join(package_dir, "include")
    shutil.rmtree(include, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "csrc", "api", "include", "torchlane"), os.path.join(include, "torchlane"))
    for sub in ("api", "comm", "hooks", "reducer"):
        for header in _sources(f"csrc/{sub}/*.h") + _sources(f"csrc/{sub}/*.hpp"):
            dest = os.path.join(include, "torchlane", sub, os.path.basename(header))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(os.path.join(ROOT, header), dest)
    cmake_dir = os.path.join(package_dir, "share", "cmake", "torchlane")
    os.makedirs(cmake_dir, exist_ok=True)
    for name in ("torchlaneConfig.cmake", "torchlaneConfigVersion.cmake"):
        with open(os.path.join(ROOT, "cmake", "python", name + ".in")) as f:
            text = f.read().replace("@TORCHLANE_VERSION@", _version())
        with open(os.path.join(cmake_dir, name), "w") as f:
            f.write(text)


class _BuildExtension(BuildExtension):
    def get_ext_filename(self, ext_name):
        parts = ext_name.split(".")
        if parts[-1] == CORE.split(".")[-1]:  # a plain shared library, not a Python module
            return os.path.join(*parts[:-1], "libtorchlane.so")
        return super().get_ext_filename(ext_name)

    def get_export_symbols(self, ext):
        return ext.export_symbols if ext.name == CORE else super().get_export_symbols(ext)

    def build_extensions(self):
        # The core first: _C links it.
        self.extensions.sort(key=lambda ext: ext.name != CORE)
        super().build_extensions()

    def build_extension(self, ext):
        if ext.name != CORE:
            core_dir = os.path.dirname(self.get_ext_fullpath(CORE))
            ext.library_dirs = [d for d in ext.library_dirs if d != core_dir] + [core_dir]
        # One ninja build directory per part (each part writes its own build.ninja).
        build_temp = self.build_temp
        self.build_temp = os.path.join(build_temp, "core" if ext.name == CORE else "bindings")
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = build_temp

    def run(self):
        if self.inplace:  # setuptools copies lib/libtorchlane.so there after the build
            build_py = self.get_finalized_command("build_py")
            os.makedirs(build_py.get_package_dir("torchlane.lib"), exist_ok=True)
        super().run()
        # The CMake package next to the library: in the build tree (-> the wheel) and in place.
        # get_ext_fullpath() honours self.inplace here: the source tree for in-place builds.
        _install_cmake_package(os.path.dirname(os.path.dirname(self.get_ext_fullpath(CORE))))
        if self.inplace:
            self.inplace = 0
            _install_cmake_package(os.path.dirname(os.path.dirname(self.get_ext_fullpath(CORE))))
            self.inplace = 1


setup(
    ext_modules=[_core_extension(), _bindings_extension()],
    cmdclass={"build_ext": _BuildExtension.with_options(use_ninja=True)},
)
