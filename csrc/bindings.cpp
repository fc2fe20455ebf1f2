// The one place that exposes torchlane's C++ core to Python.
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/utils/pybind.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "reducer/comm_hook.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "torchlane C++ core";

  // ---- comm hooks (see Note [Comm hook contract]) ----
  py::class_<torchlane::CommHook, std::shared_ptr<torchlane::CommHook>>(m, "CommHook")
      .def_property_readonly("name", &torchlane::CommHook::name)
      .def("take_bytes_sent", &torchlane::CommHook::take_bytes_sent);
}

// ---- torchlane ops (schemas only; each op's TORCH_LIBRARY_IMPL lives next to its kernels) ----
TORCH_LIBRARY(torchlane, m) {
  // attention: see Note [Attention op contract] in attention/attention.h
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, bool causal, float scale) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // The CUDA attention kernel's source run on the CPU; see Note [Tile primitives].
  m.def(
      "_attention_fwd_emulated(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> "
      "(Tensor, Tensor)");
  m.def(
      "_attention_bwd_emulated(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, bool causal, float scale) -> (Tensor, Tensor, Tensor)");
  // ---- end attention ----
}
