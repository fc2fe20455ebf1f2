// Bindings of csrc/attention/ beyond its ops (ops.cpp): the input checks and the CPU kernel's
// test switches.
#include "attention/attention.h"
#include "attention/cpu_microkernel.h"
#include "bindings/bindings.h"

namespace torchlane::bindings {

void bind_attention(py::module_& m, py::module_& testing) {
  // The one copy of the input rules, also called by the fake kernels
  // (python/torchlane/attention.py).
  m.def("_check_attention_inputs", &attention::check_attention_inputs, py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("scale"));
  // A private switch of the CPU attention kernel, for tests and benchmarks: name(enabled=None)
  // sets it when given and returns its state before the call.
  auto def_switch = [&testing](const char* name, bool (*get)(), void (*set)(bool)) {
    testing.def(
        name,
        [get, set](std::optional<bool> enabled) {
          const bool before = get();
          if (enabled.has_value())
            set(*enabled);
          return before;
        },
        py::arg("enabled") = py::none());
  };
  // Which tile GEMMs the CPU attention kernel uses (Note [Low precision on the CPU]): the packed
  // micro-kernels (True) or the BLAS ones.
  def_switch("attention_cpu_microkernels", &torchlane::attention::mk::enabled,
             &torchlane::attention::mk::set_enabled);
  // Whether the bf16 micro-kernel GEMMs run on AMX tiles (Note [AMX tile GEMMs]); the state read
  // back is False where the CPU, OS or build has no AMX.
  def_switch("attention_cpu_amx", &torchlane::attention::mk::amx_available,
             &torchlane::attention::mk::set_amx_enabled);
  testing.def("attention_cpu_microkernels_compiled", [] {
    namespace mk = torchlane::attention::mk;
    return py::make_tuple(mk::compiled<float>(), mk::compiled<uint32_t>());
  });
}

}  // namespace torchlane::bindings
