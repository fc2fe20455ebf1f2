// Bindings of csrc/comm/: the comm-hook base class, coalesced broadcast, kept Works.
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>

#include "bindings/bindings.h"
#include "comm/comm_hook.hpp"
#include "comm/kept_works.hpp"

namespace torchlane::bindings {

void bind_comm(py::module_& m, py::module_& testing) {
  // See Note [Comm hook contract].
  py::class_<CommHook, std::shared_ptr<CommHook>>(m, "CommHook")
      .def_property_readonly("name", &CommHook::name)
      .def("take_bytes_sent", &CommHook::take_bytes_sent);

  m.def(
      "broadcast_coalesced",
      [](const c10::intrusive_ptr<c10d::ProcessGroup>& pg, std::vector<at::Tensor> tensors,
         int64_t buffer_size, int64_t src) {
        py::gil_scoped_release release;
        c10d::broadcast_coalesced(pg, tensors, static_cast<size_t>(buffer_size),
                                  static_cast<int>(src));
      },
      py::arg("process_group"), py::arg("tensors"), py::arg("buffer_size"), py::arg("src") = 0);

  // Note [Releasing collectives' Work objects]: called by an atexit hook (torchlane/__init__.py).
  // Waits with the GIL released, then drops the works with it held. Returns how many were still
  // referenced elsewhere when timeout_s ran out.
  m.def(
      "_release_kept_works",
      [](double timeout_s) {
        auto works = comm::take_kept_works();
        size_t shared = 0;
        {
          py::gil_scoped_release no_gil;
          shared = comm::wait_sole_owner(works, timeout_s);
        }
        works.clear();
        return shared;
      },
      py::arg("timeout_s"));
  testing.def("kept_work_stats", [] {
    const auto s = comm::kept_work_stats();
    return py::dict(py::arg("launched") = s.launched, py::arg("destroyed_here") = s.destroyed_here,
                    py::arg("kept") = s.kept);
  });
}

}  // namespace torchlane::bindings
