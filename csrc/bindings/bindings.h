// The Python bindings of torchlane._C, one file per subsystem. Each bind_* function adds its
// public classes and functions to the module and its test-only entry points to the `_testing`
// submodule (re-exported by torchlane._testing). Tensor-op schemas live in ops.cpp.
#pragma once

#include <torch/csrc/utils/pybind.h>

namespace torchlane::bindings {

namespace py = pybind11;

// Note [Destroying C++ objects that own a process group]
// An object that may hold the last reference to a c10d::ProcessGroup (the reducers) is deleted
// with the GIL released: ~ProcessGroupGloo joins Gloo's worker threads, and a worker may be
// destroying a finished Work whose tensors were created in Python, which takes the GIL. Deleted
// with the GIL held (at interpreter exit, or when a model is dropped after
// destroy_process_group), the two threads waited for each other forever.
template <typename T>
struct DeleteWithoutGil {
  void operator()(T* p) const {
    if (PyGILState_Check()) {
      py::gil_scoped_release no_gil;
      delete p;
    } else {
      delete p;
    }
  }
};
template <typename T>
using NoGilPtr = std::unique_ptr<T, DeleteWithoutGil<T>>;

void bind_comm(py::module_& m, py::module_& testing);
void bind_reducer(py::module_& m, py::module_& testing);
void bind_hooks(py::module_& m, py::module_& testing);
void bind_attention(py::module_& m, py::module_& testing);
void bind_parallel(py::module_& m, py::module_& testing);
void bind_sharding(py::module_& m, py::module_& testing);
void bind_ps(py::module_& m, py::module_& testing);

}  // namespace torchlane::bindings
