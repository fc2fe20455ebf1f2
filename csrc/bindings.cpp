// The one place that exposes torchlane's C++ core to Python.
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/utils/pybind.h>
#include <torch/extension.h>

#include "reducer/comm_hook.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "torchlane C++ core";

  // ---- comm hooks (see Note [Comm hook contract]) ----
  py::class_<torchlane::CommHook, std::shared_ptr<torchlane::CommHook>>(m, "CommHook")
      .def_property_readonly("name", &torchlane::CommHook::name)
      .def("take_bytes_sent", &torchlane::CommHook::take_bytes_sent);
}
