// Bindings of csrc/hooks/: the C++ comm hooks and their pure plans.
#include <torch/csrc/distributed/c10d/comm.hpp>

#include "bindings/bindings.h"
#include "comm/comm_hook.hpp"
#include "comm/grad_bucket.hpp"
#include "hooks/cast_hook.hpp"
#include "hooks/powersgd_hook.hpp"
#include "hooks/topk_hook.hpp"

namespace torchlane::bindings {
namespace {

py::object tensor_or_none(const at::Tensor& t) {
  return t.defined() ? py::cast(t.clone()) : py::none();
}

// Runs `hook` on a bucket built from `buffer` (the parameters' gradients laid out back to back)
// and waits for its result: lets tests and Python-side callers use a C++ hook without a reducer.
at::Tensor run_comm_hook(const std::shared_ptr<torchlane::CommHook>& hook, at::Tensor buffer,
                         int64_t index, int64_t bucket_count, std::vector<at::Tensor> params) {
  TORCH_CHECK(hook, "_run_comm_hook: hook must not be None");
  TORCH_CHECK(buffer.is_sparse() || (buffer.dim() == 1 && buffer.is_contiguous()),
              "_run_comm_hook: buffer must be a contiguous 1-D tensor or a sparse gradient, got "
              "shape ",
              buffer.sizes());
  TORCH_CHECK(bucket_count >= 1 && index >= 0 && index < bucket_count,
              "_run_comm_hook: index must be in [0, bucket_count), got index ", index,
              " and bucket_count ", bucket_count);
  c10d::GradBucket bucket = comm::make_grad_bucket(
      static_cast<size_t>(index), static_cast<size_t>(bucket_count), buffer, params);
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
                    "CastCompressHook: wire_dtype must be 'float16' or 'bfloat16', got '", name,
                    "'");
  return at::kBFloat16;
}

hooks::PowerSGDOptions powersgd_options(int64_t rank, int64_t start_iter, double min_rate,
                                        bool use_error_feedback, bool warm_start, double epsilon,
                                        int64_t seed) {
  TORCH_CHECK_VALUE(seed >= 0, "powersgd: random_seed must be >= 0, got ", seed);
  hooks::PowerSGDOptions o;
  o.rank = rank;
  o.start_iter = start_iter;
  o.min_compression_rate = min_rate;
  o.use_error_feedback = use_error_feedback;
  o.warm_start = warm_start;
  o.epsilon = epsilon;
  o.seed = static_cast<uint64_t>(seed);
  hooks::check_options(o);
  return o;
}

hooks::TopKOptions topk_options(double ratio, int64_t start_iter, int64_t ratio_warmup_iters,
                                double min_rate, bool layerwise) {
  hooks::TopKOptions o;
  o.ratio = ratio;
  o.start_iter = start_iter;
  o.ratio_warmup_iters = ratio_warmup_iters;
  o.min_compression_rate = min_rate;
  o.layerwise = layerwise;
  hooks::check_options(o);
  return o;
}

}  // namespace

void bind_hooks(py::module_& m, py::module_& testing) {
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
                       int64_t random_seed) {
             return std::make_shared<h::PowerSGDHook>(
                 std::move(pg), powersgd_options(rank, start_powerSGD_iter, min_compression_rate,
                                                 use_error_feedback, warm_start,
                                                 orthogonalization_epsilon, random_seed));
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
      .def(py::init([](c10::intrusive_ptr<c10d::ProcessGroup> pg, double ratio, int64_t start_iter,
                       int64_t ratio_warmup_iters, double min_compression_rate, bool layerwise) {
             return std::make_shared<h::TopKHook>(
                 std::move(pg), topk_options(ratio, start_iter, ratio_warmup_iters,
                                             min_compression_rate, layerwise));
           }),
           py::arg("process_group"), py::arg("ratio"), py::arg("start_iter") = 0,
           py::arg("ratio_warmup_iters") = 0, py::arg("min_compression_rate") = 2.0,
           py::arg("layerwise") = false)
      .def_property_readonly("ratio", &h::TopKHook::ratio)
      .def_property_readonly("iter", &h::TopKHook::iter)
      .def("_residual", [](const h::TopKHook& hook, int64_t bucket_index) {
        return tensor_or_none(hook.residual(bucket_index));
      });

  // The option rules of torchlane.hooks.PowerSGDState / TopKState (one copy, in C++).
  m.def(
      "_check_powersgd_options",
      [](int64_t rank, int64_t start_iter, double min_rate, bool use_error_feedback,
         bool warm_start, double epsilon, int64_t seed) {
        powersgd_options(rank, start_iter, min_rate, use_error_feedback, warm_start, epsilon, seed);
      },
      py::arg("rank"), py::arg("start_powerSGD_iter"), py::arg("min_compression_rate"),
      py::arg("use_error_feedback"), py::arg("warm_start"), py::arg("orthogonalization_epsilon"),
      py::arg("random_seed"));
  m.def(
      "_check_topk_options",
      [](double ratio, int64_t start_iter, int64_t ratio_warmup_iters, double min_rate,
         bool layerwise) {
        topk_options(ratio, start_iter, ratio_warmup_iters, min_rate, layerwise);
      },
      py::arg("ratio"), py::arg("start_iter"), py::arg("ratio_warmup_iters"),
      py::arg("min_compression_rate"), py::arg("layerwise"));
  m.def("_run_comm_hook", &run_comm_hook, py::arg("hook"), py::arg("buffer"), py::arg("index"),
        py::arg("bucket_count"), py::arg("params"));
  testing.def("topk_count", &h::topk_count, py::arg("numel"), py::arg("ratio"));
  testing.def("topk_ratio_at", &h::topk_ratio_at, py::arg("ratio"), py::arg("warmup_iters"),
              py::arg("step"));
  testing.def(
      "topk_plan",
      [](const std::vector<std::vector<int64_t>>& shapes, double ratio, double min_rate,
         int64_t element_size) {
        const auto plan = h::topk_plan(shapes, ratio, min_rate, element_size);
        return py::make_tuple(plan.compressed, plan.compressed_offsets, plan.dense);
      },
      py::arg("shapes"), py::arg("ratio"), py::arg("min_compression_rate"),
      py::arg("element_size"));
  testing.def(
      "powersgd_seeds",
      [](uint64_t seed, int64_t count) {
        h::PowerSGDSeeds seeds(seed);
        std::vector<uint32_t> out;
        for (int64_t i = 0; i < count; ++i) {
          out.push_back(seeds.next());
        }
        return out;
      },
      py::arg("seed"), py::arg("count"));
  testing.def(
      "powersgd_plan",
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

}  // namespace torchlane::bindings
