#pragma once

#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "reducer/comm_hook.hpp"

namespace torchlane::hooks {

// Number of entries a bucket of `numel` elements sends: ceil(ratio * numel), at least 1.
int64_t topk_count(int64_t numel, double ratio);

// Compression math of the top-k hook (bound as ops torchlane::topk_compress_ and
// torchlane::topk_scatter_add_). See Note [Top-k with error feedback].
//
// residual += grad; then the k entries of largest |residual| are returned as (values, int32
// indices in ascending order) and zeroed in `residual`, which is left holding the error to feed
// back next step. Ties in magnitude are broken towards the lower index (CPU).
std::tuple<at::Tensor, at::Tensor> topk_compress_(at::Tensor& residual, const at::Tensor& grad,
                                                  int64_t k);
// out[indices[j]] += scale * values[j] for every j (indices may repeat across ranks).
void topk_scatter_add_(at::Tensor& out, const at::Tensor& values, const at::Tensor& indices,
                       double scale);

// Top-k sparsification with error feedback: each rank sends k values and k int32 indices
// (k = ceil(ratio * numel)); every rank gathers all of them and applies their dense mean.
class TopKHook : public CommHook {
 public:
  TopKHook(c10::intrusive_ptr<c10d::ProcessGroup> process_group, double ratio);

  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override;
  std::string name() const override {
    return "topk";
  }

  double ratio() const {
    return ratio_;
  }
  // The error-feedback residual of a bucket (undefined before its first step); for tests.
  at::Tensor residual(int64_t bucket_index) const;

 private:
  double ratio_;
  mutable std::mutex mutex_;
  std::unordered_map<int64_t, at::Tensor> residuals_;
};

}  // namespace torchlane::hooks
