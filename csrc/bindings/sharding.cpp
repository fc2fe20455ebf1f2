// Bindings of csrc/sharding/: the sharded flat-bucket layout, the ZeRO gradient reducer and the
// parameter all-gather (Notes [Sharded flat bucket], [Sharded gradient flow], [Parameter
// all-gather]).
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "bindings/bindings.h"
#include "sharding/shard_layout.hpp"
#include "sharding/sharded_reducer.hpp"

namespace torchlane::bindings {

void bind_sharding(py::module_& m, py::module_& testing) {
  namespace sh = torchlane::sharding;
  m.def(
      "shard_layout",
      [](const std::vector<int64_t>& numels, int64_t world_size) {
        const auto l = sh::shard_layout(numels, world_size);
        return py::make_tuple(l.offsets, l.numel, l.padded_numel, l.shard_numel);
      },
      py::arg("numels"), py::arg("world_size"),
      "(offsets, numel, padded_numel, shard_numel); see Note [Sharded flat bucket].");
  m.def("zero_all_gather_flat", &sh::all_gather_flat, py::arg("process_group"), py::arg("flats"),
        py::arg("shards"), py::call_guard<py::gil_scoped_release>());
  // See Note [Destroying C++ objects that own a process group].
  py::class_<sh::ShardedReducer, NoGilPtr<sh::ShardedReducer>>(m, "ShardedReducer")
      .def(py::init<std::vector<at::Tensor>, std::vector<std::vector<int64_t>>,
                    std::vector<at::Tensor>, sh::ProcessGroupPtr, int64_t,
                    std::optional<at::ScalarType>>(),
           py::arg("params"), py::arg("buckets"), py::arg("master_shards"),
           py::arg("process_group"), py::arg("stage"), py::arg("reduce_dtype") = py::none())
      .def("set_sync", &sh::ShardedReducer::set_sync, py::arg("sync"))
      .def_property_readonly("sync", &sh::ShardedReducer::sync)
      .def_property_readonly("stage", &sh::ShardedReducer::stage)
      .def_property_readonly("num_buckets", &sh::ShardedReducer::num_buckets)
      .def("persistent_grad_bytes", &sh::ShardedReducer::persistent_grad_bytes)
      .def("collectives_launched", &sh::ShardedReducer::collectives_launched);
  (void)testing;
}

}  // namespace torchlane::bindings
