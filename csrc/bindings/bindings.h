// The Python bindings of torchlane._C, one file per subsystem. Each bind_* function adds its
// public classes and functions to the module and its test-only entry points to the `_testing`
// submodule (re-exported by torchlane._testing). Tensor-op schemas live in ops.cpp.
#pragma once

#include <torch/csrc/utils/pybind.h>

namespace torchlane::bindings {

namespace py = pybind11;

void bind_comm(py::module_& m, py::module_& testing);
void bind_reducer(py::module_& m, py::module_& testing);
void bind_hooks(py::module_& m, py::module_& testing);
void bind_attention(py::module_& m, py::module_& testing);
void bind_parallel(py::module_& m, py::module_& testing);
void bind_sharding(py::module_& m, py::module_& testing);
void bind_ps(py::module_& m, py::module_& testing);

}  // namespace torchlane::bindings
