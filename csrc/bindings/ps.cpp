// Bindings of csrc/ps/: the parameter server's shard state (torchlane.ps drives the messages).
#include "bindings/bindings.h"
#include "ps/shard_server.hpp"

namespace torchlane::bindings {

void bind_ps(py::module_& m, py::module_& /*testing*/) {
  namespace ps = torchlane::ps;
  py::class_<ps::ShardServer>(m, "ShardServer")
      .def(py::init([](at::Tensor shard, double lr, double momentum, bool nesterov,
                       std::optional<int64_t> max_staleness, std::vector<int64_t> workers) {
             return ps::ShardServer(std::move(shard), ps::OuterOptions{lr, momentum, nesterov},
                                    max_staleness, std::move(workers));
           }),
           py::arg("shard"), py::arg("outer_lr"), py::arg("outer_momentum"), py::arg("nesterov"),
           py::arg("max_staleness"), py::arg("workers"))
      .def("may_pull", &ps::ShardServer::may_pull, py::arg("worker"))
      .def("record_pull", &ps::ShardServer::record_pull, py::arg("worker"))
      .def("apply", &ps::ShardServer::apply, py::arg("worker"), py::arg("update"),
           py::call_guard<py::gil_scoped_release>())
      .def("remove", &ps::ShardServer::remove, py::arg("worker"), py::arg("left"))
      .def("rejoin", &ps::ShardServer::rejoin, py::arg("worker"))
      .def("state",
           [](const ps::ShardServer& s) {
             auto st = s.state();
             py::object momentum = py::none();
             if (st.momentum_buffer.defined()) {
               momentum = py::cast(st.momentum_buffer);
             }
             return py::dict(py::arg("shard") = st.shard, py::arg("momentum_buffer") = momentum,
                             py::arg("version") = st.version, py::arg("workers") = st.workers,
                             py::arg("log") = st.log);
           })
      .def(
          "restore",
          [](ps::ShardServer& s, at::Tensor shard, std::optional<at::Tensor> momentum_buffer,
             int64_t version, at::Tensor workers, at::Tensor log) {
            s.restore(ps::ShardServer::State{std::move(shard),
                                             momentum_buffer.value_or(at::Tensor()), version,
                                             std::move(workers), std::move(log)});
          },
          py::arg("shard"), py::arg("momentum_buffer"), py::arg("version"), py::arg("workers"),
          py::arg("log"))
      .def_property_readonly("shard", &ps::ShardServer::shard)
      .def_property_readonly("version", &ps::ShardServer::version)
      .def_property_readonly("live_workers", &ps::ShardServer::live_workers)
      .def_property_readonly("dead_workers", &ps::ShardServer::dead_workers)
      .def("log", [](const ps::ShardServer& s) {
        py::list out;
        for (const auto& r : s.log()) {
          out.append(py::dict(py::arg("worker") = r.worker, py::arg("round") = r.round,
                              py::arg("staleness") = r.staleness,
                              py::arg("base_version") = r.base_version,
                              py::arg("version") = r.version));
        }
        return out;
      });
}

}  // namespace torchlane::bindings
