#include "reducer/hooks/topk_hook.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
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
// the rest as the new residual (Stich et al. 2018, "Sparsified SGD with memory"). Values and
// indices of one rank travel packed in a single byte buffer, so a bucket costs one all-gather of
// k * (sizeof(value) + 4) bytes per rank. Every rank then scatters all ranks' entries, each scaled
// by 1/world_size, into the zeroed bucket buffer: the dense mean of the sparse updates. Positions
// chosen by several ranks add up. The completion callback only computes and launches no
// collective, so every rank issues its collectives in the backward pass's order.

namespace {

template <typename T>
void topk_compress_cpu(const T* grad, T* residual, int64_t n, int64_t k, int32_t* idx_out,
                       T* val_out) {
  std::vector<T> magnitude(n);
  for (int64_t i = 0; i < n; ++i) {
    residual[i] += grad[i];
    magnitude[i] = std::abs(residual[i]);
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
    const T m = std::abs(residual[i]);
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
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, fn, ": ", arg,
              " must be float32 or float64, got ", t.scalar_type());
}

}  // namespace

int64_t topk_count(int64_t numel, double ratio) {
  TORCH_CHECK_VALUE(ratio > 0.0 && ratio <= 1.0, "topk: ratio must be in (0, 1], got ", ratio);
  const auto k = static_cast<int64_t>(std::ceil(ratio * static_cast<double>(numel)));
  return std::clamp<int64_t>(k, 1, std::max<int64_t>(numel, 1));
}

std::tuple<at::Tensor, at::Tensor> topk_compress_(at::Tensor& residual, const at::Tensor& grad,
                                                  int64_t k) {
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
  kernels::TopKGatherParams p{residual.mutable_data_ptr(),    picked.const_data_ptr<int64_t>(),
                              values.mutable_data_ptr(),      indices.mutable_data_ptr<int32_t>(),
                              k, residual.scalar_type() == at::kDouble};
  const auto err = kernels::launch_topk_gather_clear(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "topk_compress_: CUDA launch failed: ", cudaGetErrorString(err));
  return {values, indices};
#else
  TORCH_CHECK(false, "topk_compress_: unsupported device ", residual.device());
#endif
}

void topk_scatter_add_(at::Tensor& out, const at::Tensor& values, const at::Tensor& indices,
                       double scale) {
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
  kernels::TopKScatterParams p{out.mutable_data_ptr(), v.const_data_ptr(),
                               i.const_data_ptr<int32_t>(), v.numel(), scale,
                               out.scalar_type() == at::kDouble};
  const auto err = kernels::launch_topk_scatter_add(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "topk_scatter_add_: CUDA launch failed: ",
              cudaGetErrorString(err));
#else
  TORCH_CHECK(false, "topk_scatter_add_: unsupported device ", out.device());
#endif
}

TopKHook::TopKHook(c10::intrusive_ptr<c10d::ProcessGroup> process_group, double ratio)
    : CommHook(std::move(process_group)), ratio_(ratio) {
  TORCH_CHECK(process_group_, "TopKHook: process_group must not be None");
  TORCH_CHECK_VALUE(ratio > 0.0 && ratio <= 1.0, "TopKHook: ratio must be in (0, 1], got ", ratio);
}

at::Tensor TopKHook::residual(int64_t bucket_index) const {
  std::lock_guard<std::mutex> guard(mutex_);
  auto it = residuals_.find(bucket_index);
  return it == residuals_.end() ? at::Tensor() : it->second;
}

c10::intrusive_ptr<c10::ivalue::Future> TopKHook::runHook(c10d::GradBucket& bucket) {
  at::Tensor buffer = bucket.getBufferRef();
  check_floating(buffer, "topk hook", "the bucket buffer");
  const auto index = static_cast<int64_t>(bucket.getIndex());
  const int64_t n = buffer.numel();
  const int64_t k = topk_count(n, ratio_);
  at::Tensor residual;
  {
    std::lock_guard<std::mutex> guard(mutex_);
    auto& slot = residuals_[index];
    if (!slot.defined() || slot.numel() != n || slot.device() != buffer.device() ||
        slot.scalar_type() != buffer.scalar_type()) {
      slot = at::zeros({n}, buffer.options());  // first step, or the buckets were rebuilt
    }
    residual = slot;
  }
  auto [values, indices] = topk_compress_(residual, buffer.view({-1}), k);

  const int64_t value_bytes = k * static_cast<int64_t>(values.element_size());
  at::Tensor packed = at::empty({value_bytes + 4 * k}, buffer.options().dtype(at::kByte));
  packed.narrow(0, 0, value_bytes).view(buffer.scalar_type()).copy_(values);
  packed.narrow(0, value_bytes, 4 * k).view(at::kInt).copy_(indices);
  count_bytes_sent(packed.numel());

  const int64_t world = process_group_->getSize();
  std::vector<std::vector<at::Tensor>> gathered(1);
  for (int64_t r = 0; r < world; ++r) {
    gathered[0].push_back(at::empty_like(packed));
  }
  std::vector<at::Tensor> inputs{packed};
  auto fut = process_group_->allgather(gathered, inputs)->getFuture();
  const auto dtype = buffer.scalar_type();
  return fut->then(
      [buffer, gathered, value_bytes, k, dtype, world](c10::ivalue::Future& done) {
        done.value();  // rethrows a communication error
        at::Tensor flat = buffer.view({-1});
        flat.zero_();
        for (const auto& from_rank : gathered[0]) {
          topk_scatter_add_(flat, from_rank.narrow(0, 0, value_bytes).view(dtype),
                            from_rank.narrow(0, value_bytes, 4 * k).view(at::kInt),
                            1.0 / static_cast<double>(world));
        }
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
