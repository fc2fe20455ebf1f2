// Bindings of csrc/parallel/: the tensor-parallel region functions (Note [Tensor-parallel
// regions]) and the overlapped column-parallel linear (Note [Overlapped column backward]).
// A Python torch.distributed.ProcessGroup arrives as c10::intrusive_ptr<c10d::ProcessGroup>
// through torch's own pybind11 registration.
#include "bindings/bindings.h"
#include "parallel/parallel_linear.hpp"
#include "parallel/region_comm.hpp"

namespace torchlane::bindings {

void bind_parallel(py::module_& m, py::module_& testing) {
  namespace tp = torchlane::parallel;
  using Pg = tp::ProcessGroupPtr;
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("tp_copy_to_region", &tp::copy_to_region, py::arg("x"), py::arg("process_group"), no_gil);
  m.def("tp_reduce_from_region", &tp::reduce_from_region, py::arg("x"), py::arg("process_group"),
        no_gil);
  m.def("tp_scatter_to_region", &tp::scatter_to_region, py::arg("x"), py::arg("process_group"),
        py::arg("dim"), no_gil);
  m.def("tp_gather_from_region", &tp::gather_from_region, py::arg("x"), py::arg("process_group"),
        py::arg("dim"), no_gil);
  m.def("tp_gather_from_sequence_region", &tp::gather_from_sequence_region, py::arg("x"),
        py::arg("process_group"), py::arg("dim"), no_gil);
  m.def("tp_reduce_scatter_to_sequence_region", &tp::reduce_scatter_to_sequence_region,
        py::arg("x"), py::arg("process_group"), py::arg("dim"), no_gil);
  m.def(
      "tp_column_parallel_linear",
      [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
         const Pg& pg, bool sequence_parallel, int64_t seq_dim) {
        return tp::column_parallel_linear(x, weight, bias.value_or(at::Tensor()), pg,
                                          sequence_parallel, seq_dim);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("process_group"),
      py::arg("sequence_parallel") = false, py::arg("seq_dim") = 1, no_gil);
  // Plain collectives (no autograd), for the vocab-parallel cross-entropy's statistics.
  m.def(
      "tp_all_reduce",
      [](const at::Tensor& x, const Pg& pg, const std::string& op) {
        TORCH_CHECK_VALUE(op == "sum" || op == "max", "op must be 'sum' or 'max', got '", op, "'");
        return tp::all_reduce(x, pg, op == "max");
      },
      py::arg("x"), py::arg("process_group"), py::arg("op") = "sum", no_gil);
  m.def("tp_all_gather", &tp::all_gather, py::arg("x"), py::arg("process_group"), py::arg("dim"),
        no_gil);
  m.def("tp_reduce_scatter", &tp::reduce_scatter, py::arg("x"), py::arg("process_group"),
        py::arg("dim"), no_gil);
}

}  // namespace torchlane::bindings
