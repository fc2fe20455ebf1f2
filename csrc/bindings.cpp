// The one place that exposes torchlane's C++ core to Python.
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/python_comm_hook.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "attention/cpu_microkernel.h"
#include "reducer/bucket_plan.hpp"
#include "reducer/comm_hook.hpp"
#include "reducer/kept_works.hpp"
#include "reducer/reducer.hpp"
// ---- gradient compression hooks (issue 4) ----
#include "reducer/hooks/cast_hook.hpp"
#include "reducer/hooks/powersgd_hook.hpp"
#include "reducer/hooks/topk_hook.hpp"
// ---- end gradient compression hooks ----

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
    e["return_ms"] = ms(stats.return_ns[b]);
    e["done_ms"] = ms(stats.done_ns[b]);
    events.append(e);
  }
  py::dict d;
  d["bytes_reduced"] = stats.bytes_reduced;
  d["bytes_sent"] = stats.bytes_sent;
  d["backward_end_ms"] = ms(stats.backward_end_ns);
  d["comm_end_ms"] = ms(stats.comm_end_ns);
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
    out.append(d);
  }
  return out;
}

}  // namespace

// ---- gradient compression hooks (issue 4) ----
namespace {

py::object tensor_or_none(const at::Tensor& t) {
  return t.defined() ? py::cast(t.clone()) : py::none();
}

// Runs `hook` on a bucket built from `buffer` (the parameters' gradients laid out back to back)
// and waits for its result: lets tests and Python-side callers use a C++ hook without a reducer.
at::Tensor run_comm_hook(const std::shared_ptr<torchlane::CommHook>& hook, at::Tensor buffer,
                         int64_t index, int64_t bucket_count, std::vector<at::Tensor> params) {
  TORCH_CHECK(hook, "_run_comm_hook: hook must not be None");
  TORCH_CHECK(buffer.dim() == 1 && buffer.is_contiguous(),
              "_run_comm_hook: buffer must be a contiguous 1-D tensor, got shape ", buffer.sizes());
  TORCH_CHECK(bucket_count >= 1 && index >= 0 && index < bucket_count,
              "_run_comm_hook: index must be in [0, bucket_count), got index ", index,
              " and bucket_count ", bucket_count);
  std::vector<size_t> offsets, lengths;
  std::vector<c10::IntArrayRef> sizes;
  size_t offset = 0;
  for (const auto& p : params) {
    offsets.push_back(offset);
    lengths.push_back(p.numel());
    sizes.push_back(p.sizes());
    offset += p.numel();
  }
  TORCH_CHECK(static_cast<int64_t>(offset) == buffer.numel(), "_run_comm_hook: params hold ",
              offset, " elements but buffer has ", buffer.numel());
  c10d::GradBucket bucket(index, bucket_count, buffer, offsets, lengths, sizes, params,
                          std::nullopt);
  c10::intrusive_ptr<c10::ivalue::Future> fut;
  {
    py::gil_scoped_release no_gil;
    fut = hook->runHook(bucket);
    hook->flush();  // this caller waits bucket by bucket (Note [Comm hook contract])
    fut->wait();
  }
  at::Tensor result = hook->parseHookResult(fut->value());
  TORCH_CHECK(result.numel() == buffer.numel(), "comm hook ", hook->name(), " returned ",
              result.numel(), " elements for a bucket of ", buffer.numel());
  return result;
}

at::ScalarType wire_dtype_from_name(const std::string& name) {
  if (name == "float16" || name == "fp16") {
    return at::kHalf;
  }
  TORCH_CHECK_VALUE(name == "bfloat16" || name == "bf16",
              "CastCompressHook: wire_dtype must be 'float16' or 'bfloat16', got '", name, "'");
  return at::kBFloat16;
}

void bind_compression_hooks(py::module_& m) {
  using torchlane::CommHook;
  namespace h = torchlane::hooks;
  py::class_<h::CastCompressHook, CommHook, std::shared_ptr<h::CastCompressHook>>(
      m, "CastCompressHook")
      .def(py::init([](c10::intrusive_ptr<c10d::ProcessGroup> pg, const std::string& wire) {
             return std::make_shared<h::CastCompressHook>(std::move(pg),
                                                          wire_dtype_from_name(wire));
           }),
           py::arg("process_group"), py::arg("wire_dtype"));

  py::class_<h::PowerSGDHook, CommHook, std::shared_ptr<h::PowerSGDHook>>(m, "PowerSGDHook")
      .def(py::init([](c10::intrusive_ptr<c10d::ProcessGroup> pg, int64_t rank,
                       int64_t start_powerSGD_iter, double min_compression_rate,
                       bool use_error_feedback, bool warm_start, double orthogonalization_epsilon,
                       uint64_t random_seed) {
             h::PowerSGDOptions o;
             o.rank = rank;
             o.start_iter = start_powerSGD_iter;
             o.min_compression_rate = min_compression_rate;
             o.use_error_feedback = use_error_feedback;
             o.warm_start = warm_start;
             o.epsilon = orthogonalization_epsilon;
             o.seed = random_seed;
             return std::make_shared<h::PowerSGDHook>(std::move(pg), o);
           }),
           py::arg("process_group"), py::arg("rank"), py::arg("start_powerSGD_iter"),
           py::arg("min_compression_rate"), py::arg("use_error_feedback"), py::arg("warm_start"),
           py::arg("orthogonalization_epsilon"), py::arg("random_seed"))
      .def_property_readonly("iter", &h::PowerSGDHook::iter)
      .def("compression_stats", &h::PowerSGDHook::compression_stats)
      .def("_memory", [](const h::PowerSGDHook& hook, int64_t bucket_index) {
        auto [p, q, e] = hook.memory(bucket_index);
        return py::make_tuple(tensor_or_none(p), tensor_or_none(q), tensor_or_none(e));
      });

  py::class_<h::TopKHook, CommHook, std::shared_ptr<h::TopKHook>>(m, "TopKHook")
      .def(py::init([](c10::intrusive_ptr<c10d::ProcessGroup> pg, double ratio,
                       int64_t start_iter, int64_t ratio_warmup_iters,
                       double min_compression_rate, bool layerwise) {
             h::TopKOptions o;
             o.ratio = ratio;
             o.start_iter = start_iter;
             o.ratio_warmup_iters = ratio_warmup_iters;
             o.min_compression_rate = min_compression_rate;
             o.layerwise = layerwise;
             return std::make_shared<h::TopKHook>(std::move(pg), o);
           }),
           py::arg("process_group"), py::arg("ratio"), py::arg("start_iter") = 0,
           py::arg("ratio_warmup_iters") = 0, py::arg("min_compression_rate") = 2.0,
           py::arg("layerwise") = false)
      .def_property_readonly("ratio", &h::TopKHook::ratio)
      .def_property_readonly("iter", &h::TopKHook::iter)
      .def("_residual", [](const h::TopKHook& hook, int64_t bucket_index) {
        return tensor_or_none(hook.residual(bucket_index));
      });

  m.def("_run_comm_hook", &run_comm_hook, py::arg("hook"), py::arg("buffer"), py::arg("index"),
        py::arg("bucket_count"), py::arg("params"));
  m.def("_topk_count", &h::topk_count, py::arg("numel"), py::arg("ratio"));
  m.def("_topk_ratio_at", &h::topk_ratio_at, py::arg("ratio"), py::arg("warmup_iters"),
        py::arg("step"));
  m.def(
      "_topk_plan",
      [](const std::vector<std::vector<int64_t>>& shapes, double ratio, double min_rate,
         int64_t element_size) {
        const auto plan = h::topk_plan(shapes, ratio, min_rate, element_size);
        return py::make_tuple(plan.compressed, plan.compressed_offsets, plan.dense);
      },
      py::arg("shapes"), py::arg("ratio"), py::arg("min_compression_rate"),
      py::arg("element_size"));
  m.def(
      "_powersgd_seeds",
      [](uint64_t seed, int64_t count) {
        h::PowerSGDSeeds seeds(seed);
        std::vector<uint32_t> out;
        for (int64_t i = 0; i < count; ++i) {
          out.push_back(seeds.next());
        }
        return out;
      },
      py::arg("seed"), py::arg("count"));
  m.def(
      "_powersgd_plan",
      [](const std::vector<std::vector<int64_t>>& shapes, int64_t rank, double min_rate) {
        const auto plan = h::powersgd_plan(shapes, rank, min_rate);
        py::list compressed;
        for (const auto& c : plan.compressed) {
          compressed.append(
              py::make_tuple(c.tensor, c.rows, c.cols, c.rank, c.p_offset, c.q_offset));
        }
        return py::make_tuple(compressed, plan.uncompressed);
      },
      py::arg("shapes"), py::arg("rank"), py::arg("min_compression_rate"));
}

}  // namespace

// Compression ops; implementations next to each hook (TORCH_LIBRARY_IMPL per dispatch key).
TORCH_LIBRARY_FRAGMENT(torchlane, m) {
  m.def("cast_compress(Tensor src, ScalarType wire_dtype, int world_size) -> Tensor");
  m.def("cast_decompress(Tensor wire, ScalarType dtype) -> Tensor");
  m.def("topk_compress_(Tensor(a!) residual, Tensor grad, int k) -> (Tensor, Tensor)");
  m.def("topk_scatter_add_(Tensor(a!) out, Tensor values, Tensor indices, float scale) -> ()");
  m.def("orthogonalize_(Tensor(a!) matrix, float epsilon) -> ()");
}
// ---- end gradient compression hooks ----

PYBIND11_MODULE(_C, m) {
  m.doc() = "torchlane C++ core";

  // ---- comm hooks (see Note [Comm hook contract]) ----
  py::class_<torchlane::CommHook, std::shared_ptr<torchlane::CommHook>>(m, "CommHook")
      .def_property_readonly("name", &torchlane::CommHook::name)
      .def("take_bytes_sent", &torchlane::CommHook::take_bytes_sent);

  bind_compression_hooks(m);  // gradient compression hooks (issue 4)

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
      // The GIL is released wherever the reducer's mutex is taken: a Python comm hook's callbacks
      // need the GIL while the autograd thread holds the mutex.
      .def("prepare_for_forward", &Reducer::prepare_for_forward,
           py::call_guard<py::gil_scoped_release>())
      .def("prepare_for_backward", &Reducer::prepare_for_backward, py::arg("outputs"),
           py::call_guard<py::gil_scoped_release>())
      .def("rebuild_buckets", &Reducer::rebuild_buckets,
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
      .def("stats", &stats_to_dict);

  // Note [Releasing collectives' Work objects]: called by an atexit hook (torchlane/__init__.py).
  // Waits with the GIL released, then drops the works with it held. Returns how many were still
  // referenced elsewhere when timeout_s ran out.
  m.def(
      "_release_kept_works",
      [](double timeout_s) {
        auto works = torchlane::comm::take_kept_works();
        size_t shared = 0;
        {
          py::gil_scoped_release no_gil;
          shared = torchlane::comm::wait_sole_owner(works, timeout_s);
        }
        works.clear();
        return shared;
      },
      py::arg("timeout_s"));
  m.def("_kept_work_stats", [] {
    const auto s = torchlane::comm::kept_work_stats();
    return py::dict(py::arg("launched") = s.launched, py::arg("destroyed_here") = s.destroyed_here,
                    py::arg("kept") = s.kept);
  });

  // A private switch of the CPU attention kernel, for tests and benchmarks: name(enabled=None)
  // sets it when given and returns its state before the call.
  auto def_switch = [&m](const char* name, bool (*get)(), void (*set)(bool)) {
    m.def(
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
  def_switch("_attention_cpu_microkernels", &torchlane::attention::mk::enabled,
             &torchlane::attention::mk::set_enabled);
  // Whether the bf16 micro-kernel GEMMs run on AMX tiles (Note [AMX tile GEMMs]); the state read
  // back is False where the CPU, OS or build has no AMX.
  def_switch("_attention_cpu_amx", &torchlane::attention::mk::amx_available,
             &torchlane::attention::mk::set_amx_enabled);
  m.def("_attention_cpu_microkernels_compiled", [] {
    namespace mk = torchlane::attention::mk;
    return py::make_tuple(mk::compiled<float>(), mk::compiled<uint32_t>());
  });
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
