#pragma once

#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "comm/comm_hook.hpp"

namespace torchlane::hooks {

struct TopKOptions {
  double ratio = 0.01;             // fraction of the compressed elements sent per step
  int64_t start_iter = 0;          // dense (all-reduced) steps before compression starts
  int64_t ratio_warmup_iters = 0;  // steps over which the sent fraction decays from ~1 to ratio
  double min_compression_rate = 2.0;
  bool layerwise = false;  // top-k per tensor instead of over the bucket's compressed tensors
};

// The one copy of the option rules (ValueError naming the argument); the hook and
// torchlane.hooks.TopKState both call it.
void check_options(const TopKOptions& options);

// ---- pure math, testable alone (see Note [Top-k with error feedback]) ----

// Number of entries sent out of `numel`: ceil(ratio * numel), at least 1.
int64_t topk_count(int64_t numel, double ratio);

// The fraction sent at the `step`-th compressed step (0 = the first step after start_iter):
// ratio^((step + 1) / (warmup_iters + 1)) during the warm-up, then ratio (Lin et al. 2018).
double topk_ratio_at(double ratio, int64_t warmup_iters, int64_t step);

// Which of a bucket's tensors top-k compresses: those with >= 2 dimensions whose
// topk_count(numel, ratio) (value, int32 index) pairs, times min_compression_rate, take fewer
// bytes than the tensor itself. The others (biases, norm weights, tiny matrices) are reduced
// dense. Compressed tensors are laid out back to back, in bucket order, in the "compressed
// space" that the residual and the sent indices address.
struct TopKPlan {
  std::vector<int64_t> compressed;          // tensor indices, bucket order
  std::vector<int64_t> compressed_offsets;  // offset of each in the compressed space
  std::vector<int64_t> dense;               // tensor indices, bucket order
  int64_t compressed_numel = 0, dense_numel = 0;
};
TopKPlan topk_plan(const std::vector<std::vector<int64_t>>& shapes, double ratio,
                   double min_compression_rate, int64_t element_size);

// What one rank sends per compressed bucket, as bytes: k values | the dense tensors' elements |
// k int32 indices into the compressed space (in this order, so that every part starts aligned to
// its element size). Every rank's message has the same layout, so one all-gather carries them.
struct TopKWire {
  int64_t k = 0, dense_numel = 0, element_size = 0;
  int64_t value_bytes() const {
    return k * element_size;
  }
  int64_t dense_bytes() const {
    return dense_numel * element_size;
  }
  int64_t index_offset() const {
    return value_bytes() + dense_bytes();
  }
  int64_t total_bytes() const {
    return index_offset() + 4 * k;
  }
  // Views of a packed message (uint8) as its three parts.
  at::Tensor values(const at::Tensor& packed, at::ScalarType dtype) const;
  at::Tensor dense(const at::Tensor& packed, at::ScalarType dtype) const;
  at::Tensor indices(const at::Tensor& packed) const;
};

// Compression math of the top-k hook (bound as ops torchlane::topk_compress_ and
// torchlane::topk_scatter_add_).
//
// residual += grad; then the k entries of largest |residual| are returned as (values, int32
// indices in ascending order) and zeroed in `residual`, which is left holding the error to feed
// back next step. Ties in magnitude are broken towards the lower index (CPU).
std::tuple<at::Tensor, at::Tensor> topk_compress_(at::Tensor& residual, const at::Tensor& grad,
                                                  int64_t k);
// out[indices[j]] += scale * values[j] for every j (indices may repeat across ranks).
void topk_scatter_add_(at::Tensor& out, const at::Tensor& values, const at::Tensor& indices,
                       double scale);

// Top-k sparsification with error feedback, dense warm-up and ratio warm-up; 1-D and small
// tensors reduced dense. See Note [Top-k with error feedback].
class TopKHook : public CommHook {
 public:
  TopKHook(c10::intrusive_ptr<c10d::ProcessGroup> process_group, TopKOptions options);

  void end_step(bool grads_finite) override;
  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override;
  std::string name() const override {
    return "topk";
  }

  const TopKOptions& options() const {
    return options_;
  }
  double ratio() const {
    return options_.ratio;
  }
  int64_t iter() const;
  // The error-feedback residual of a bucket over its compressed space (undefined before its
  // first compressed step); for tests.
  at::Tensor residual(int64_t bucket_index) const;

 private:
  struct BucketResidual {
    std::vector<std::vector<int64_t>> shapes;  // the bucket layout the residual belongs to
    at::Tensor residual;
  };

  void maybe_increase_iter(const c10d::GradBucket& bucket);
  // The bucket's error-feedback residual over `numel` compressed elements; zeros when the bucket
  // layout, device or dtype changed since it was made.
  at::Tensor residual_for_locked(int64_t bucket_index,
                                 const std::vector<std::vector<int64_t>>& shapes, int64_t numel,
                                 const at::Tensor& buffer);

  TopKOptions options_;
  mutable std::mutex mutex_;
  int64_t iter_ = 0;
  std::unordered_map<int64_t, BucketResidual> residuals_;
  // Note [Rolling back a non-finite step]: iter_ at the step's first bucket and a copy of each
  // residual (undefined: it did not exist) before the step changed it.
  bool step_open_ = false;
  int64_t saved_iter_ = 0;
  std::unordered_map<int64_t, BucketResidual> saved_residuals_;
  void save_for_rollback(const c10d::GradBucket& bucket);
};

}  // namespace torchlane::hooks
