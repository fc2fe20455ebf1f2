# torchlane: the two user commands are `make demo` and `make test`.
# Each one installs what it needs on a fresh machine that has only Python.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
NPROC ?= 2
TORCH_VERSION := 2.13.0
export MAX_JOBS ?= 2
# The targets use the in-place build of this checkout (python/torchlane/_C*.so), no install step.
export PYTHONPATH := $(CURDIR)/python$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: help deps build demo test test-extras test-torch-suite bench sanitize cuda-check format lint clean

help:
	@echo "make demo   - build and train a small GPT on 2 CPU ranks with torchlane DDP"
	@echo "make test   - build and run the test suite"
	@echo "make bench  - run the benchmarks (writes benchmarks/results/)"

# torch is installed pinned: an unpinned `pip install torch` pulls a multi-GB CUDA build.
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	@$(PYTHON) -c "import ninja, numpy, setuptools, wheel" 2>/dev/null || $(PIP) install ninja numpy "setuptools>=64" wheel

build: deps
	$(PYTHON) setup.py -q build_ext --inplace
	$(PYTHON) -c "import torchlane; print('torchlane', torchlane.__version__, 'built in', torchlane.__file__)"

demo: build
	@$(PYTHON) -c "import tqdm" 2>/dev/null || $(PIP) install -q tqdm
	$(PYTHON) -m torch.distributed.run --standalone --nproc-per-node $(NPROC) examples/train_gpt.py

# test-cpp-deps first: the C++ API tests (tests/test_cpp_api.py) need cmake, and the library
# needs Debian's Gloo headers when it is built (Note [Gloo headers]).
test: test-cpp-deps build
	@$(PYTHON) -c "import pytest, hypothesis" 2>/dev/null || $(PIP) install -q "pytest>=8" "hypothesis>=6"
	$(PYTHON) -m pytest -q tests

# The integration tests with test-only extras (HF accelerate, Lightning); `make test` skips them
# when the package is missing. torch is pinned in the same install so pip cannot replace it.
test-extras: build
	@$(PYTHON) -c "import pytest, hypothesis" 2>/dev/null || $(PIP) install -q "pytest>=8" "hypothesis>=6"
	@$(PYTHON) -c "import accelerate" 2>/dev/null || $(PIP) install -q accelerate "torch==$(TORCH_VERSION)"
	@$(PYTHON) -c "import lightning" 2>/dev/null || $(PIP) install -q "lightning==2.6.*" "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pytest -q tests/test_dropin.py -k accelerate
	$(PYTHON) -m pytest -q tests/test_lightning.py

# torch's own CPU/Gloo DDP tests (distributed_test.py from the installed wheel) with torchlane
# swapped in: the fixed list that passes (tools/torch_ddp_suite.py PASSING, docs/ddp.md), or
# SUITE_K=pattern for any selection (unittest -k). Not in `make test` (minutes); in .ci/run.
SUITE_K ?=
test-torch-suite: build
	@$(PYTHON) -c "import expecttest" 2>/dev/null || $(PIP) install -q expecttest
	$(PYTHON) tools/torch_ddp_suite.py $(if $(SUITE_K),-k $(SUITE_K))

bench: build
	@$(PYTHON) -c "import matplotlib" 2>/dev/null || $(PIP) install -q matplotlib
	$(PYTHON) benchmarks/run_all.py

# Compile every CUDA kernel instantiation with nvcc alone (no torch), sm_80 and sm_90,
# warnings as errors, and check ptxas for spills and shared-memory use.
cuda-check:
	$(PYTHON) tools/cuda_check.py

# ASan + UBSan build of _C, then the C++-heavy tests against it (SANITIZE_TESTS: pytest
# arguments for a subset; default: every C++-heavy test file, see tools/run_sanitized.sh).
SANITIZE_TESTS ?=
sanitize: deps
	@$(PYTHON) -c "import pytest, hypothesis" 2>/dev/null || $(PIP) install -q "pytest>=8" "hypothesis>=6"
	TORCHLANE_SANITIZE=1 TORCHLANE_DEBUG=1 $(PYTHON) setup.py -q build_ext --inplace --build-temp build/sanitize
	tools/run_sanitized.sh $(SANITIZE_TESTS)

format:
	clang-format -i $(CPP_SOURCES)
	$(PYTHON) -m ruff check --fix python tests benchmarks examples tools

CPP_SOURCES = $$(find csrc examples tests -name '*.cpp' -o -name '*.hpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

# ruff (pyproject.toml) and clang-format (.clang-format); `make format` fixes what both report.
lint:
	@$(PYTHON) -m ruff --version >/dev/null 2>&1 || $(PIP) install -q ruff
	$(PYTHON) -m ruff check python tests benchmarks examples tools
	clang-format --dry-run --Werror $(CPP_SOURCES)

clean:
	rm -rf build python/torchlane/_C*.so python/torchlane/lib python/torchlane/include python/torchlane/share

# ---- C++ API (docs/cpp_api.md) ----
# `make build` makes python/torchlane/lib/libtorchlane.so (the core torchlane._C links) and ships
# the CMake package next to it (torchlane.cmake_prefix_path): C++ programs find_package(torchlane)
# there and link that same library. cmake, ccache and the Gloo headers (Note [Gloo headers]) come
# from apt. cpp-lib is the standalone CMake build of the library (CMakeLists.txt), for installing
# it without the Python package.
CPP_PREFIX := $(CURDIR)/build/cpp-install
TORCH_CMAKE = $(shell $(PYTHON) -c "import torch; print(torch.utils.cmake_prefix_path)")
# In the recipe's shell (which sees the exported PYTHONPATH; $(shell) does not), after `build`.
TORCHLANE_CMAKE = $$($(PYTHON) -c "import torchlane; print(torchlane.cmake_prefix_path)")
.PHONY: cpp-deps test-cpp-deps cpp-lib cpp-demo cpp-test
cpp-deps:
	@command -v cmake >/dev/null && test -f /usr/include/gloo/config.h || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake libgloo-dev)

# For `make test`: cpp-deps where apt can run (root), otherwise the C++ API tests skip, saying why.
test-cpp-deps:
	@command -v cmake >/dev/null && test -f /usr/include/gloo/config.h || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && $(MAKE) --no-print-directory cpp-deps; } || \
		echo "make test: cmake or libgloo-dev is missing and apt-get cannot install them here: the C++ API tests will skip"

cpp-lib: deps cpp-deps
	cmake -S . -B build/cpp -DTORCHLANE_BUILD_TESTS=OFF -DCMAKE_PREFIX_PATH="$(TORCH_CMAKE)" \
		$$(command -v ccache >/dev/null && echo -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
	cmake --build build/cpp -j $(MAX_JOBS)
	cmake --install build/cpp --prefix $(CPP_PREFIX)

# The example is its own CMake project: it finds the Python package's CMake package like a user's
# would (the Gloo headers are needed when the library is built, hence cpp-deps before build).
cpp-demo: cpp-deps build
	cmake -S examples/cpp -B build/cpp-demo -DCMAKE_PREFIX_PATH="$(TORCH_CMAKE);$(TORCHLANE_CMAKE)" \
		-Dtorchlane_DIR="$(TORCHLANE_CMAKE)/torchlane"
	cmake --build build/cpp-demo -j $(MAX_JOBS)
	$(PYTHON) -m torch.distributed.run --standalone --nproc-per-node $(NPROC) --no-python \
		./build/cpp-demo/train_mlp

cpp-test: cpp-deps build
	@$(PYTHON) -c "import pytest, hypothesis" 2>/dev/null || $(PIP) install -q "pytest>=8" "hypothesis>=6"
	$(PYTHON) -m pytest -q tests/test_cpp_api.py
