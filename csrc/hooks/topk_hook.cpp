#include "hooks/topk_hook.hpp"

#include <ATen/record_function.h>

#include "comm/kept_works.hpp"
#include "hooks/float_types.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <torch/library.h>

#ifdef TORCHLANE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/compress_topk.cuh"
#endif

namespace torchlane::hooks {

// Note [Top-k with error feedback]
// Each rank adds the bucket's gradient to its residual (the part of earlier gradients it has not
// sent yet), sends the k entries of largest magnitude of that sum as (value, int32 index) and keeps
// the rest as the new residual (Stich et al. 2018, "Sparsified SGD with memory"). Every rank then
// scatters all ranks' entries, each scaled by 1/world_size, into the zeroed result: the dense mean
// of the sparse updates. Positions chosen by several ranks add up; a rank's residual stays in
// units of its own gradient, so every element of every rank's gradient enters the mean exactly
// once, possibly late. With the training recipe of Deep Gradient Compression (Lin et al. 2018):
//  * Dense warm-up: before `start_iter` steps the whole bucket is plainly all-reduced (divided by
//    world size first), as PowerSGD's start_powerSGD_iter does; the step counter advances when
//    the last bucket of a step is seen. No residual exists yet.
//  * Ratio warm-up: the j-th compressed step sends the fraction ratio^((j + 1) / (W + 1)) for
//    j < W = ratio_warmup_iters, then `ratio`: DGC's exponentially decreasing density, per step.
//    While that fraction would cost at least the dense bytes ((value, index) pairs: above 1/2 for
//    float32), the bucket is all-reduced dense instead, which sends every entry for fewer bytes.
//  * What is compressed (topk_plan): tensors of >= 2 dimensions for which top-k saves bytes
//    (k (value + index) bytes * min_compression_rate < the tensor's bytes). 1-D tensors (biases,
//    norm weights: few bytes, and starved by a bucket-wide threshold) and tiny matrices are sent
//    dense, as DGC's code and PowerSGD do. The compressed tensors form the bucket's "compressed
//    space" (back to back, bucket order); the residual and the sent indices address it.
//  * Selection: one top-k over the compressed space (k = ceil(ratio * its numel)), or with
//    `layerwise` one per tensor (k_t = ceil(ratio * numel_t)), as DGC's code does.
// One rank's values, dense elements and indices travel packed in a single byte buffer, so a bucket
// costs one all-gather of k * (sizeof(value) + 4) + dense * sizeof(value) bytes per rank; every
// rank sums the gathered parts in rank order, so all ranks hold the same bits. The completion
// callback only computes and launches no collective, so every rank issues its collectives in the
// backward pass's order. The residual is reset when the bucket's layout changes (bucket rebuild).

namespace {

// A NaN ranks above every number (as in torch.topk), so it is sent and shows up in the result
// as it would after a plain all-reduce, instead of corrupting the selection.
template <typename T>
T magnitude_of(T v) {
  return std::isnan(v) ? std::numeric_limits<T>::infinity() : std::abs(v);
}

template <typename T>
void topk_compress_cpu(const T* grad, T* residual, int64_t n, int64_t k, int32_t* idx_out,
                       T* val_out) {
  std::vector<T> magnitude(n);
  for (int64_t i = 0; i < n; ++i) {
    residual[i] += grad[i];
    magnitude[i] = magnitude_of(residual[i]);
  }
  // Threshold = the k-th largest magnitude; take everything above it, then entries equal to it in
  // index order until k are taken, so the choice is deterministic and indices come out sorted.
  std::nth_element(magnitude.begin(), magnitude.begin() + (k - 1), magnitude.end(),
                   std::greater<T>());
  const T threshold = magnitude[k - 1];
  int64_t above = 0;
  for (int64_t i = 0; i < k; ++i) {
    above += magnitude[i] > threshold;
  }
  int64_t ties_left = k - above;
  int64_t taken = 0;
  for (int64_t i = 0; i < n && taken < k; ++i) {
    const T m = magnitude_of(residual[i]);
    const bool take = m > threshold || (m == threshold && ties_left > 0);
    if (take) {
      ties_left -= !(m > threshold);
      idx_out[taken] = static_cast<int32_t>(i);
      val_out[taken] = residual[i];
      residual[i] = T(0);
      ++taken;
    }
  }
  TORCH_INTERNAL_ASSERT(taken == k, "topk_compress selected ", taken, " entries, expected ", k);
}

template <typename T>
void topk_scatter_add_cpu(T* out, int64_t n, const T* values, const int32_t* idx, int64_t count,
                          T scale) {
  for (int64_t j = 0; j < count; ++j) {
    TORCH_CHECK(idx[j] >= 0 && idx[j] < n, "topk_scatter_add_: index ", idx[j],
                " out of range for a tensor of ", n, " elements");
    out[idx[j]] += values[j] * scale;
  }
}

void check_floating(const at::Tensor& t, const char* fn, const char* arg) {
  TORCH_CHECK(is_float_or_double(t), fn, ": ", arg, " must be float32 or float64, got ",
              t.scalar_type());
}

}  // namespace

int64_t topk_count(int64_t numel, double ratio) {
  TORCH_CHECK_VALUE(ratio > 0.0 && ratio <= 1.0, "topk: ratio must be in (0, 1], got ", ratio);
  const auto k = static_cast<int64_t>(std::ceil(ratio * static_cast<double>(numel)));
  return std::clamp<int64_t>(k, 1, std::max<int64_t>(numel, 1));
}

double topk_ratio_at(double ratio, int64_t warmup_iters, int64_t step) {
  TORCH_CHECK_VALUE(ratio > 0.0 && ratio <= 1.0, "topk: ratio must be in (0, 1], got ", ratio);
  TORCH_CHECK_VALUE(step >= 0 && warmup_iters >= 0, "topk: step and warmup_iters must be >= 0");
  if (step >= warmup_iters) {
    return ratio;
  }
  return std::pow(ratio, static_cast<double>(step + 1) / static_cast<double>(warmup_iters + 1));
}

TopKPlan topk_plan(const std::vector<std::vector<int64_t>>& shapes, double ratio,
                   double min_compression_rate, int64_t element_size) {
  TORCH_CHECK_VALUE(min_compression_rate >= 0, "topk: min_compression_rate must be >= 0, got ",
                    min_compression_rate);
  TORCH_CHECK_VALUE(element_size > 0, "topk: element_size must be > 0, got ", element_size);
  TopKPlan plan;
  for (size_t t = 0; t < shapes.size(); ++t) {
    int64_t numel = 1;
    for (auto s : shapes[t]) {
      numel *= s;
    }
    const double dense_bytes = static_cast<double>(numel * element_size);
    const double sent_bytes = static_cast<double>(topk_count(numel, ratio) * (element_size + 4));
    if (shapes[t].size() >= 2 && sent_bytes * min_compression_rate < dense_bytes) {
      plan.compressed.push_back(static_cast<int64_t>(t));
      plan.compressed_offsets.push_back(plan.compressed_numel);
      plan.compressed_numel += numel;
    } else {
      plan.dense.push_back(static_cast<int64_t>(t));
      plan.dense_numel += numel;
    }
  }
  return plan;
}

std::tuple<at::Tensor, at::Tensor> topk_compress_(at::Tensor& residual, const at::Tensor& grad,
                                                  int64_t k) {
  RECORD_FUNCTION("torchlane::topk_compress", std::vector<c10::IValue>({grad}));
  check_floating(residual, "topk_compress_", "residual");
  TORCH_CHECK(grad.scalar_type() == residual.scalar_type(), "topk_compress_: grad dtype ",
              grad.scalar_type(), " differs from residual dtype ", residual.scalar_type());
  TORCH_CHECK(grad.dim() == 1 && residual.dim() == 1 && grad.numel() == residual.numel(),
              "topk_compress_: grad and residual must be 1-D of the same length, got ",
              grad.sizes(), " and ", residual.sizes());
  TORCH_CHECK(residual.is_contiguous(), "topk_compress_: residual must be contiguous");
  TORCH_CHECK(grad.device() == residual.device(), "topk_compress_: grad is on ", grad.device(),
              " but residual is on ", residual.device());
  const int64_t n = residual.numel();
  TORCH_CHECK(n > 0, "topk_compress_: grad must not be empty");
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "topk_compress_: grad has ", n,
              " elements; int32 indices address at most 2^31 - 1");
  TORCH_CHECK(k >= 1 && k <= n, "topk_compress_: k must be in [1, ", n, "], got ", k);
  at::Tensor values = at::empty({k}, residual.options());
  at::Tensor indices = at::empty({k}, residual.options().dtype(at::kInt));
  const at::Tensor g = grad.contiguous();
  if (residual.is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES(residual.scalar_type(), "topk_compress_", [&] {
      topk_compress_cpu(g.const_data_ptr<scalar_t>(), residual.mutable_data_ptr<scalar_t>(), n, k,
                        indices.mutable_data_ptr<int32_t>(), values.mutable_data_ptr<scalar_t>());
    });
    return {values, indices};
  }
#ifdef TORCHLANE_WITH_CUDA
  TORCH_CHECK(residual.is_cuda(), "topk_compress_: unsupported device ", residual.device());
  const c10::cuda::CUDAGuard device_guard(residual.device());
  residual.add_(g);
  // Largest magnitudes via torch's topk; ties may resolve differently from the CPU path.
  at::Tensor picked = std::get<1>(at::topk(residual.abs(), k, 0, true, false));
  picked = std::get<0>(at::sort(picked));
  kernels::TopKGatherParams p{residual.mutable_data_ptr(),
                              picked.const_data_ptr<int64_t>(),
                              values.mutable_data_ptr(),
                              indices.mutable_data_ptr<int32_t>(),
                              k,
                              residual.scalar_type() == at::kDouble};
  const auto err = kernels::launch_topk_gather_clear(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "topk_compress_: CUDA launch failed: ", cudaGetErrorString(err));
  return {values, indices};
#else
  TORCH_CHECK(false, "topk_compress_: unsupported device ", residual.device());
  return {};  // unreachable; -O0 builds do not see that TORCH_CHECK(false) throws
#endif
}

void topk_scatter_add_(at::Tensor& out, const at::Tensor& values, const at::Tensor& indices,
                       double scale) {
  RECORD_FUNCTION("torchlane::topk_decompress", std::vector<c10::IValue>({out}));
  check_floating(out, "topk_scatter_add_", "out");
  TORCH_CHECK(values.scalar_type() == out.scalar_type(), "topk_scatter_add_: values dtype ",
              values.scalar_type(), " differs from out dtype ", out.scalar_type());
  TORCH_CHECK(indices.scalar_type() == at::kInt, "topk_scatter_add_: indices must be int32, got ",
              indices.scalar_type());
  TORCH_CHECK(values.numel() == indices.numel(), "topk_scatter_add_: ", values.numel(),
              " values but ", indices.numel(), " indices");
  TORCH_CHECK(out.is_contiguous(), "topk_scatter_add_: out must be contiguous");
  const at::Tensor v = values.contiguous();
  const at::Tensor i = indices.contiguous();
  if (out.is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "topk_scatter_add_", [&] {
      topk_scatter_add_cpu(out.mutable_data_ptr<scalar_t>(), out.numel(),
                           v.const_data_ptr<scalar_t>(), i.const_data_ptr<int32_t>(), v.numel(),
                           static_cast<scalar_t>(scale));
    });
    return;
  }
#ifdef TORCHLANE_WITH_CUDA
  TORCH_CHECK(out.is_cuda(), "topk_scatter_add_: unsupported device ", out.device());
  TORCH_CHECK(v.device() == out.device() && i.device() == out.device(),
              "topk_scatter_add_: values and indices must be on ", out.device());
  const c10::cuda::CUDAGuard device_guard(out.device());
  kernels::TopKScatterParams p{out.mutable_data_ptr(),
                               v.const_data_ptr(),
                               i.const_data_ptr<int32_t>(),
                               v.numel(),
                               scale,
                               out.scalar_type() == at::kDouble};
  const auto err = kernels::launch_topk_scatter_add(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess,
              "topk_scatter_add_: CUDA launch failed: ", cudaGetErrorString(err));
#else
  TORCH_CHECK(false, "topk_scatter_add_: unsupported device ", out.device());
#endif
}

void check_options(const TopKOptions& o) {
  TORCH_CHECK_VALUE(o.ratio > 0.0 && o.ratio <= 1.0, "topk: ratio must be a number in (0, 1], got ",
                    o.ratio);
  TORCH_CHECK_VALUE(o.start_iter >= 0, "topk: start_iter must be >= 0, got ", o.start_iter);
  TORCH_CHECK_VALUE(o.ratio_warmup_iters >= 0, "topk: ratio_warmup_iters must be >= 0, got ",
                    o.ratio_warmup_iters);
  TORCH_CHECK_VALUE(std::isfinite(o.min_compression_rate) && o.min_compression_rate >= 0,
                    "topk: min_compression_rate must be a finite number >= 0, got ",
                    o.min_compression_rate);
}

TopKHook::TopKHook(c10::intrusive_ptr<c10d::ProcessGroup> process_group, TopKOptions options)
    : CommHook(std::move(process_group)), options_(options) {
  TORCH_CHECK(process_group_, "TopKHook: process_group must not be None");
  check_options(options);
}

int64_t TopKHook::iter() const {
  std::lock_guard<std::mutex> guard(mutex_);
  return iter_;
}

at::Tensor TopKHook::residual(int64_t bucket_index) const {
  std::lock_guard<std::mutex> guard(mutex_);
  auto it = residuals_.find(bucket_index);
  return it == residuals_.end() ? at::Tensor() : it->second.residual;
}

void TopKHook::maybe_increase_iter(const c10d::GradBucket& bucket) {
  if (bucket.isLast()) {
    ++iter_;
  }
}

void TopKHook::save_for_rollback(const c10d::GradBucket& bucket) {
  if (!rollback_enabled_) {
    return;
  }
  if (!step_open_) {
    step_open_ = true;
    saved_iter_ = iter_;
    saved_residuals_.clear();
  }
  const auto index = static_cast<int64_t>(bucket.getIndex());
  if (saved_residuals_.count(index) == 0) {
    auto it = residuals_.find(index);
    BucketResidual saved;
    if (it != residuals_.end() && it->second.residual.defined()) {
      saved.shapes = it->second.shapes;
      saved.residual = it->second.residual.clone();
    }
    saved_residuals_.emplace(index, std::move(saved));
  }
}

void TopKHook::end_step(bool grads_finite) {
  std::lock_guard<std::mutex> guard(mutex_);
  if (!step_open_) {
    return;
  }
  if (!grads_finite) {  // Note [Rolling back a non-finite step]
    iter_ = saved_iter_;
    for (auto& [index, saved] : saved_residuals_) {
      if (saved.residual.defined()) {
        residuals_[index] = std::move(saved);
      } else {
        residuals_.erase(index);
      }
    }
  }
  step_open_ = false;
  saved_residuals_.clear();
}

at::Tensor TopKWire::values(const at::Tensor& packed, at::ScalarType dtype) const {
  return packed.narrow(0, 0, value_bytes()).view(dtype);
}
at::Tensor TopKWire::dense(const at::Tensor& packed, at::ScalarType dtype) const {
  return packed.narrow(0, value_bytes(), dense_bytes()).view(dtype);
}
at::Tensor TopKWire::indices(const at::Tensor& packed) const {
  return packed.narrow(0, index_offset(), 4 * k).view(at::kInt);
}

namespace {

// residual += compressed, then the top `entries` of the residual over the whole compressed space
// (or topk_count(n, ratio) per tensor when layerwise), as (values, int32 indices into the
// compressed space). Undefined tensors when nothing is compressed.
std::tuple<at::Tensor, at::Tensor> select_topk(const TopKPlan& plan,
                                               const std::vector<at::Tensor>& grads,
                                               const at::Tensor& compressed, at::Tensor& residual,
                                               bool layerwise, double ratio, int64_t entries) {
  if (plan.compressed_numel == 0) {
    return {};
  }
  if (!layerwise) {
    return topk_compress_(residual, compressed, entries);
  }
  std::vector<at::Tensor> vs, is;
  for (size_t c = 0; c < plan.compressed.size(); ++c) {
    const int64_t offset = plan.compressed_offsets[c];
    const int64_t n = grads[plan.compressed[c]].numel();
    at::Tensor part = residual.narrow(0, offset, n);
    auto [v, i] = topk_compress_(part, compressed.narrow(0, offset, n), topk_count(n, ratio));
    vs.push_back(v);
    is.push_back(i.add_(offset));
  }
  return {at::cat(vs), at::cat(is)};
}

// One rank's message: `values`, the plan's dense tensors and `indices`, laid out by `wire`.
at::Tensor topk_pack(const TopKWire& wire, const TopKPlan& plan,
                     const std::vector<at::Tensor>& grads, const at::Tensor& values,
                     const at::Tensor& indices, const at::Tensor& buffer) {
  const auto dtype = buffer.scalar_type();
  at::Tensor packed = at::empty({wire.total_bytes()}, buffer.options().dtype(at::kByte));
  if (wire.k > 0) {
    wire.values(packed, dtype).copy_(values);
    wire.indices(packed).copy_(indices);
  }
  if (wire.dense_numel > 0) {
    at::Tensor dense = wire.dense(packed, dtype);
    int64_t offset = 0;
    for (auto t : plan.dense) {
      const int64_t n = grads[t].numel();
      dense.narrow(0, offset, n).copy_(grads[t].reshape({-1}));
      offset += n;
    }
  }
  return packed;
}

// Every rank's message in, the mean gradient out: the sparse parts scatter-added into the
// compressed space (the buffer itself when nothing is dense), the dense parts averaged, and both
// written back into the bucket's gradients.
void topk_unpack_mean(const TopKWire& wire, const TopKPlan& plan,
                      const std::vector<at::Tensor>& from_ranks,
                      const std::vector<at::Tensor>& grads, const at::Tensor& buffer) {
  const auto dtype = buffer.scalar_type();
  const double scale = 1.0 / static_cast<double>(from_ranks.size());
  at::Tensor flat = buffer.view({-1});
  at::Tensor out = plan.dense.empty() ? flat : at::Tensor();
  if (plan.compressed_numel > 0) {
    if (!out.defined()) {
      out = at::empty({plan.compressed_numel}, flat.options());
    }
    out.zero_();
    for (const auto& packed : from_ranks) {
      topk_scatter_add_(out, wire.values(packed, dtype), wire.indices(packed), scale);
    }
  }
  if (plan.dense.empty()) {
    return;  // `out` was the buffer
  }
  at::Tensor dense_mean;
  for (const auto& packed : from_ranks) {
    at::Tensor part = wire.dense(packed, dtype);
    dense_mean = dense_mean.defined() ? dense_mean.add_(part, scale) : part.mul(scale);
  }
  for (size_t c = 0; c < plan.compressed.size(); ++c) {
    at::Tensor g = grads[plan.compressed[c]];
    g.copy_(out.narrow(0, plan.compressed_offsets[c], g.numel()).view_as(g));
  }
  int64_t offset = 0;
  for (auto t : plan.dense) {
    at::Tensor g = grads[t];
    g.copy_(dense_mean.narrow(0, offset, g.numel()).view_as(g));
    offset += g.numel();
  }
}

}  // namespace

at::Tensor TopKHook::residual_for_locked(int64_t bucket_index,
                                         const std::vector<std::vector<int64_t>>& shapes,
                                         int64_t numel, const at::Tensor& buffer) {
  BucketResidual& slot = residuals_[bucket_index];
  if (!slot.residual.defined() || slot.shapes != shapes ||
      slot.residual.device() != buffer.device() ||
      slot.residual.scalar_type() != buffer.scalar_type()) {
    slot.shapes = shapes;  // first compressed step, or the buckets were rebuilt
    slot.residual = at::zeros({numel}, buffer.options());
  }
  return slot.residual;
}

c10::intrusive_ptr<c10::ivalue::Future> TopKHook::runHook(c10d::GradBucket& bucket) {
  std::lock_guard<std::mutex> guard(mutex_);
  at::Tensor buffer = bucket.getBufferRef();
  if (buffer.is_sparse()) {  // Note [Sparse buckets in the C++ hooks]: no residual to save
    maybe_increase_iter(bucket);
    return allreduce_mean(buffer);
  }
  save_for_rollback(bucket);
  if (iter_ < options_.start_iter) {
    maybe_increase_iter(bucket);
    return allreduce_mean(buffer);
  }
  if (!is_float_or_double(buffer)) {
    TORCH_WARN_ONCE("torchlane topk hook: buckets of dtype ", buffer.scalar_type(),
                    " are all-reduced uncompressed; top-k compresses float32/float64 buckets");
    maybe_increase_iter(bucket);
    return allreduce_mean(buffer);
  }
  const double ratio =
      topk_ratio_at(options_.ratio, options_.ratio_warmup_iters, iter_ - options_.start_iter);
  maybe_increase_iter(bucket);

  const std::vector<at::Tensor> grads = bucket.getGradients();
  std::vector<std::vector<int64_t>> shapes;
  shapes.reserve(grads.size());
  for (const auto& g : grads) {
    shapes.emplace_back(g.sizes().vec());
  }
  const auto element_size = static_cast<int64_t>(buffer.element_size());
  const TopKPlan plan =
      topk_plan(shapes, options_.ratio, options_.min_compression_rate, element_size);
  const int64_t cn = plan.compressed_numel;
  at::Tensor residual;  // over the compressed space
  int64_t entries = 0;  // (value, index) pairs this step's top-k sends
  if (cn > 0) {
    residual = residual_for_locked(static_cast<int64_t>(bucket.getIndex()), shapes, cn, buffer);
    if (options_.layerwise) {
      for (auto t : plan.compressed) {
        entries += topk_count(grads[t].numel(), ratio);
      }
    } else {
      entries = topk_count(cn, ratio);
    }
  }
  if (cn > 0 && entries * (element_size + 4) >= cn * element_size) {
    // Early in the ratio warm-up, top-k would send more bytes than the tensors: send them dense,
    // residual included (the mean of sending every entry). The ratio only decreases, so this
    // happens before the first sparse step, while the residual is still zero.
    for (size_t c = 0; c < plan.compressed.size(); ++c) {
      at::Tensor g = grads[plan.compressed[c]];
      g.add_(residual.narrow(0, plan.compressed_offsets[c], g.numel()).view_as(g));
    }
    residual.zero_();
    return allreduce_mean(buffer);
  }

  // The compressed space: the buffer itself when every tensor is compressed.
  at::Tensor compressed;
  if (plan.dense.empty()) {
    compressed = buffer.view({-1});
  } else if (cn > 0) {
    std::vector<at::Tensor> parts;
    for (auto t : plan.compressed) {
      parts.push_back(grads[t].reshape({-1}));
    }
    compressed = at::cat(parts);
  }
  auto [values, indices] =
      select_topk(plan, grads, compressed, residual, options_.layerwise, ratio, entries);
  const TopKWire wire{values.defined() ? values.numel() : 0, plan.dense_numel, element_size};
  at::Tensor packed = topk_pack(wire, plan, grads, values, indices, buffer);

  std::vector<std::vector<at::Tensor>> gathered(1);
  for (int64_t r = 0; r < process_group_->getSize(); ++r) {
    gathered[0].push_back(at::empty_like(packed));
  }
  return launch_allgather(gathered, {packed})
      ->then(
          [buffer, grads, plan, gathered, wire](c10::ivalue::Future& done) {
            done.value();  // rethrows a communication error
            topk_unpack_mean(wire, plan, gathered[0], grads, buffer);
            return c10::IValue(buffer);
          },
          c10::TensorType::get());
}

// ---- ops: torchlane::topk_compress_ / torchlane::topk_scatter_add_ (schemas in bindings.cpp) ----

namespace {

std::tuple<at::Tensor, at::Tensor> topk_compress_op(at::Tensor& residual, const at::Tensor& grad,
                                                    int64_t k) {
  return topk_compress_(residual, grad, k);
}

void topk_scatter_add_op(at::Tensor& out, const at::Tensor& values, const at::Tensor& indices,
                         double scale) {
  topk_scatter_add_(out, values, indices, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlane, CPU, m) {
  m.impl("topk_compress_", &topk_compress_op);
  m.impl("topk_scatter_add_", &topk_scatter_add_op);
}

#ifdef TORCHLANE_WITH_CUDA
TORCH_LIBRARY_IMPL(torchlane, CUDA, m) {
  m.impl("topk_compress_", &topk_compress_op);
  m.impl("topk_scatter_add_", &topk_scatter_add_op);
}
#endif

}  // namespace torchlane::hooks
