// Bindings of csrc/reducer/: the pure bucket plan and the Reducer.
#include "reducer/reducer.hpp"
#include "bindings/bindings.h"
#include "comm/clock.hpp"
#include "reducer/bucket_plan.hpp"

#include <torch/csrc/distributed/c10d/python_comm_hook.h>

namespace torchlane::bindings {
namespace {

py::dict flight_record_to_dict(const Reducer& reducer) {
  const auto& f = *reducer.flight_record();
  py::dict d;
  d["iteration"] = f.iteration.load();
  d["iteration_first_seq"] = f.iteration_first_seq.load();
  d["launched_seq"] = f.launched_seq.load();
  d["launched_bucket"] = f.launched_bucket.load();
  d["launched_bytes"] = f.launched_bytes.load();
  d["launched_ns"] = f.launched_ns.load();
  d["completed_seq"] = f.completed_seq.load();
  d["completed_bucket"] = f.completed_bucket.load();
  d["completed_ns"] = f.completed_ns.load();
  // The same steady clock as the reducer's timestamps, so now_ns - launched_ns is an age.
  d["now_ns"] = comm::now_ns();
  return d;
}

py::dict stats_to_dict(const Reducer& reducer) {
  const auto stats = reducer.stats();
  auto ms = [&](int64_t t) {
    const int64_t t0 = stats.times.first_hook_ns;
    return t && t0 ? static_cast<double>(t - t0) / 1e6 : 0.0;
  };
  py::list events;
  for (size_t b = 0; b < stats.bucket_times.size(); ++b) {
    const auto& t = stats.bucket_times[b];
    py::dict e;
    e["index"] = b;
    e["ready_ms"] = ms(t.ready_ns);
    e["launch_ms"] = ms(t.launch_ns);
    e["return_ms"] = ms(t.return_ns);
    e["done_ms"] = ms(t.done_ns());
    events.append(e);
  }
  py::dict d;
  d["bytes_reduced"] = stats.bytes_reduced;
  d["bytes_sent"] = stats.bytes_sent;
  d["row_sparse_bytes_saved"] = stats.row_sparse_bytes_saved;
  d["backward_end_ms"] = ms(stats.times.backward_end_ns);
  d["comm_end_ms"] = ms(stats.times.comm_end_ns);
  d["first_hook_ns"] = stats.times.first_hook_ns;  // steady clock: Python's time.monotonic_ns()
  d["ready_order"] = stats.ready_order;
  d["bucket_events"] = events;
  py::list collectives;
  for (const auto& c : stats.collectives) {
    py::dict e;
    e["bucket"] = c.bucket;
    e["op"] = c.op;
    e["launch_ms"] = ms(c.launch_ns);
    collectives.append(e);
  }
  d["collectives"] = collectives;
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
    d["sparse"] = buckets[b].row_sparse ? py::object(py::str("row"))
                  : buckets[b].sparse   ? py::object(py::str("coo"))
                                        : py::object(py::none());
    out.append(d);
  }
  return out;
}

}  // namespace

void bind_reducer(py::module_& m, py::module_& testing) {
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

  // See Note [Destroying C++ objects that own a process group].
  py::class_<Reducer, NoGilPtr<Reducer>>(m, "Reducer")
      .def(py::init([](std::vector<at::Tensor> params, std::vector<std::string> names,
                       c10::intrusive_ptr<c10d::ProcessGroup> pg, int64_t bucket_cap_bytes,
                       int64_t first_bucket_cap_bytes, bool find_unused,
                       bool gradient_as_bucket_view, bool static_graph, bool check_finite,
                       bool verify_layout, std::vector<int64_t> sparse_params,
                       std::vector<int64_t> row_sparse_params) {
             torchlane::ReducerOptions options;
             options.bucket_cap_bytes = bucket_cap_bytes;
             options.first_bucket_cap_bytes = first_bucket_cap_bytes;
             options.find_unused_parameters = find_unused;
             options.gradient_as_bucket_view = gradient_as_bucket_view;
             options.static_graph = static_graph;
             options.check_finite = check_finite;
             options.verify_layout = verify_layout;
             options.sparse_params = std::move(sparse_params);
             options.row_sparse_params = std::move(row_sparse_params);
             return NoGilPtr<Reducer>(
                 new Reducer(std::move(params), std::move(names), std::move(pg), options));
           }),
           py::arg("params"), py::arg("param_names"), py::arg("process_group"),
           py::arg("bucket_cap_bytes"), py::arg("first_bucket_cap_bytes"),
           py::arg("find_unused_parameters"), py::arg("gradient_as_bucket_view"),
           py::arg("static_graph"), py::arg("check_finite") = false,
           py::arg("verify_layout") = false, py::arg("sparse_params") = std::vector<int64_t>{},
           py::arg("row_sparse_params") = std::vector<int64_t>{})
      // The GIL is released wherever the reducer's mutex is taken: a Python comm hook's callbacks
      // need the GIL while the autograd thread holds the mutex.
      .def("prepare_for_forward", &Reducer::prepare_for_forward,
           py::call_guard<py::gil_scoped_release>())
      .def("prepare_for_backward", &Reducer::prepare_for_backward, py::arg("outputs"),
           py::call_guard<py::gil_scoped_release>())
      .def("rebuild_buckets", &Reducer::rebuild_buckets, py::call_guard<py::gil_scoped_release>())
      .def("set_bucket_caps", &Reducer::set_bucket_caps, py::arg("cap_bytes"),
           py::arg("first_cap_bytes"), py::call_guard<py::gil_scoped_release>())
      .def("allow_local_backward", &Reducer::allow_local_backward,
           py::call_guard<py::gil_scoped_release>())
      .def(
          "register_cpp_comm_hook",
          [](Reducer& r, std::shared_ptr<torchlane::CommHook> hook) {
            r.register_comm_hook(std::move(hook));
          },
          py::call_guard<py::gil_scoped_release>())
      .def("register_python_comm_hook",
           [](Reducer& r, py::object state, py::object hook) {
             auto cpp_hook =
                 std::make_shared<c10d::PythonCommHook>(std::move(state), std::move(hook));
             py::gil_scoped_release release;
             r.register_comm_hook(std::move(cpp_hook));
           })
      .def_property_readonly("grads_finite",
                             [](const Reducer& r) {
                               py::gil_scoped_release release;
                               return r.grads_finite();
                             })
      .def("run_zero_allreduces", &Reducer::run_zero_allreduces,
           py::call_guard<py::gil_scoped_release>())
      .def("buckets", &buckets_to_list)
      .def("stats", &stats_to_dict)
      .def("flight_record", &flight_record_to_dict,
           "Last launched/completed bucket collective (Note [Flight record]); lock-free");
}

}  // namespace torchlane::bindings
