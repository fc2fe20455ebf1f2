// The one place that exposes torchlane's C++ core to Python.
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/python_comm_hook.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/extension.h>

#include "reducer/bucket_plan.hpp"
#include "reducer/comm_hook.hpp"
#include "reducer/reducer.hpp"

namespace py = pybind11;

namespace {

using torchlane::Reducer;

py::dict stats_to_dict(const Reducer& reducer) {
  const auto stats = reducer.stats();
  auto ms = [&](int64_t t) {
    return t && stats.first_hook_ns ? static_cast<double>(t - stats.first_hook_ns) / 1e6 : 0.0;
  };
  py::list events;
  for (size_t b = 0; b < stats.ready_ns.size(); ++b) {
    py::dict e;
    e["index"] = b;
    e["ready_ms"] = ms(stats.ready_ns[b]);
    e["launch_ms"] = ms(stats.launch_ns[b]);
    e["done_ms"] = ms(stats.done_ns[b]);
    events.append(e);
  }
  py::dict d;
  d["bytes_reduced"] = stats.bytes_reduced;
  d["bytes_sent"] = stats.bytes_sent;
  d["backward_end_ms"] = ms(stats.backward_end_ns);
  d["comm_end_ms"] = ms(stats.comm_end_ns);
  d["bucket_events"] = events;
  return d;
}

py::list buckets_to_list(const Reducer& reducer) {
  py::list out;
  const auto& buckets = reducer.buckets();
  for (size_t b = 0; b < buckets.size(); ++b) {
    py::dict d;
    d["index"] = b;
    d["numel"] = buckets[b].buffer.numel();
    d["bytes"] = buckets[b].buffer.nbytes();
    d["dtype"] = c10::toString(buckets[b].buffer.scalar_type());
    d["param_indices"] = buckets[b].params;
    out.append(d);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "torchlane C++ core";

  // ---- comm hooks (see Note [Comm hook contract]) ----
  py::class_<torchlane::CommHook, std::shared_ptr<torchlane::CommHook>>(m, "CommHook")
      .def_property_readonly("name", &torchlane::CommHook::name)
      .def("take_bytes_sent", &torchlane::CommHook::take_bytes_sent);

  // ---- reducer ----
  m.def(
      "compute_bucket_assignment",
      [](const std::vector<int64_t>& sizes_bytes, const std::vector<at::ScalarType>& dtypes,
         const std::vector<int64_t>& order, int64_t first_cap_bytes, int64_t cap_bytes) {
        TORCH_CHECK(sizes_bytes.size() == dtypes.size(), "sizes_bytes and dtypes differ in length");
        std::vector<torchlane::TensorMeta> metas;
        for (size_t i = 0; i < sizes_bytes.size(); ++i) {
          metas.push_back({sizes_bytes[i], dtypes[i], c10::Device(c10::kCPU)});
        }
        return torchlane::compute_bucket_assignment(metas, order, first_cap_bytes, cap_bytes);
      },
      py::arg("sizes_bytes"), py::arg("dtypes"), py::arg("order"), py::arg("first_cap_bytes"),
      py::arg("cap_bytes"), "Pure bucket assignment; see Note [Bucket assignment].");

  m.def(
      "broadcast_coalesced",
      [](const c10::intrusive_ptr<c10d::ProcessGroup>& pg, std::vector<at::Tensor> tensors,
         int64_t buffer_size, int64_t src) {
        py::gil_scoped_release release;
        c10d::broadcast_coalesced(pg, tensors, static_cast<size_t>(buffer_size),
                                  static_cast<int>(src));
      },
      py::arg("process_group"), py::arg("tensors"), py::arg("buffer_size"), py::arg("src") = 0);

  py::class_<Reducer>(m, "Reducer")
      .def(py::init([](std::vector<at::Tensor> params, std::vector<std::string> names,
                       c10::intrusive_ptr<c10d::ProcessGroup> pg, int64_t bucket_cap_bytes,
                       int64_t first_bucket_cap_bytes, bool find_unused,
                       bool gradient_as_bucket_view, bool static_graph, bool check_finite,
                       bool verify_layout) {
             torchlane::ReducerOptions options;
             options.bucket_cap_bytes = bucket_cap_bytes;
             options.first_bucket_cap_bytes = first_bucket_cap_bytes;
             options.find_unused_parameters = find_unused;
             options.gradient_as_bucket_view = gradient_as_bucket_view;
             options.static_graph = static_graph;
             options.check_finite = check_finite;
             options.verify_layout = verify_layout;
             return std::make_unique<Reducer>(std::move(params), std::move(names), std::move(pg),
                                              options);
           }),
           py::arg("params"), py::arg("param_names"), py::arg("process_group"),
           py::arg("bucket_cap_bytes"), py::arg("first_bucket_cap_bytes"),
           py::arg("find_unused_parameters"), py::arg("gradient_as_bucket_view"),
           py::arg("static_graph"), py::arg("check_finite") = false,
           py::arg("verify_layout") = false)
      .def("prepare_for_forward", &Reducer::prepare_for_forward)
      .def("prepare_for_backward", &Reducer::prepare_for_backward, py::arg("outputs"))
      .def("rebuild_buckets", &Reducer::rebuild_buckets,
           py::call_guard<py::gil_scoped_release>())
      .def("register_cpp_comm_hook",
           [](Reducer& r, std::shared_ptr<torchlane::CommHook> hook) {
             r.register_comm_hook(std::move(hook));
           })
      .def("register_python_comm_hook",
           [](Reducer& r, py::object state, py::object hook) {
             r.register_comm_hook(
                 std::make_shared<c10d::PythonCommHook>(std::move(state), std::move(hook)));
           })
      .def_property_readonly("grads_finite", &Reducer::grads_finite)
      .def("run_zero_allreduces", &Reducer::run_zero_allreduces,
           py::call_guard<py::gil_scoped_release>())
      .def("buckets", &buckets_to_list)
      .def("stats", &stats_to_dict)
      .def_property_readonly("world_size", &Reducer::world_size);
}
