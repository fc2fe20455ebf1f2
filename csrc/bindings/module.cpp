// torchlane._C: the one Python module of the C++ core. Each subsystem binds itself (bindings.h).
#include "bindings/bindings.h"

PYBIND11_MODULE(_C, m) {
  namespace b = torchlane::bindings;
  m.doc() = "torchlane C++ core";
  auto testing = m.def_submodule("_testing", "test-only entry points (torchlane._testing)");
  b::bind_comm(m, testing);  // first: the CommHook base the hooks and the reducer use
  b::bind_hooks(m, testing);
  b::bind_reducer(m, testing);
  b::bind_attention(m, testing);
  b::bind_parallel(m, testing);
  b::bind_sharding(m, testing);
  b::bind_ps(m, testing);
}
