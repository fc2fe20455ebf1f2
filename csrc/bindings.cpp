// The one place that exposes torchlane's C++ core to Python.
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/utils/pybind.h>
#include <torch/extension.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "torchlane C++ core";
  m.def("_pg_size", [](const c10::intrusive_ptr<c10d::ProcessGroup>& pg) { return pg->getSize(); });
}
