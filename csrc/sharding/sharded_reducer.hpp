#pragma once
// The gradient half of ZeRO: C++ autograd hooks that reduce each flat bucket the moment its last
// gradient is ready (all-reduce for stage 1, reduce-scatter for stages 2 and 3) and leave the
// rank's shard of the averaged gradient on its master shard. See Note [Sharded gradient flow].
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "reducer/grad_ready_hooks.hpp"
#include "sharding/shard_layout.hpp"

namespace torchlane::sharding {

using ProcessGroupPtr = c10::intrusive_ptr<c10d::ProcessGroup>;

// Note [Sharded gradient flow]
// Buckets come from the reducer's plan (compute_bucket_assignment) and are laid out as in
// Note [Sharded flat bucket]. A post-hook on each parameter's AccumulateGrad node marks the
// parameter ready; buckets are launched strictly in plan order (bucket b only once 0..b-1 were
// launched), so every rank issues the same collectives in the same order even when gradients
// arrive in a different order or some parameters get none. Launching a bucket copies its
// parameters' gradients into a flat buffer (zeros for a parameter without a gradient), drops
// the parameters' own `.grad`, divides by the world size and launches
//   stage 1:    allreduce(flat)                          (the flat buffer is kept between steps)
//   stage 2, 3: reduce_scatter_single(shard_out, flat)   (flat and shard_out live one step)
// At the end of backward (an engine callback) the buckets no hook launched (parameters unused
// in this forward) are launched in order, every Work is waited on, and the rank's slice is
// added to (or becomes) the master shard's `.grad`. With sync off (no_sync) the hooks do
// nothing, so gradients accumulate locally in `.grad` and the next synced backward reduces the
// sum once. The flat buffer may be in a lower `reduce_dtype` (bf16 compression): gradients are
// cast into it and the reduced shard is cast back to the master shard's dtype.
class ShardedReducer {
 public:
  ShardedReducer(std::vector<at::Tensor> params, std::vector<std::vector<int64_t>> buckets,
                 std::vector<at::Tensor> master_shards, ProcessGroupPtr pg, int64_t stage,
                 std::optional<at::ScalarType> reduce_dtype);
  ~ShardedReducer();

  void set_sync(bool sync);
  bool sync() const;
  int64_t stage() const {
    return stage_;
  }
  const ShardLayout& layout(int64_t bucket) const {
    return layouts_.at(bucket);
  }
  int64_t num_buckets() const {
    return static_cast<int64_t>(layouts_.size());
  }
  // Bytes of gradient buffers held between steps (stage 1: the flat buckets; else 0).
  int64_t persistent_grad_bytes() const;
  // Collectives launched since construction.
  int64_t collectives_launched() const {
    return launched_count_;
  }

 private:
  struct Bucket {
    std::vector<int64_t> params;
    at::Tensor flat;       // padded_numel, reduce dtype
    at::Tensor shard_out;  // shard_numel, reduce dtype (stages 2, 3)
    c10::intrusive_ptr<c10d::Work> work;
    int64_t pending = 0;
  };

  void autograd_hook(int64_t index);
  void launch_locked(int64_t bucket);
  void release_finished_locked();
  // Note [Sharded gradient buffers]
  static constexpr int64_t kMaxReduceScattersInFlight = 2;
  void finalize_backward();
  void reset_locked();

  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> master_shards_;
  std::vector<ShardLayout> layouts_;
  std::vector<Bucket> buckets_;
  std::vector<std::pair<int64_t, int64_t>> location_;  // param -> (bucket, position)
  std::vector<char> ready_;
  GradReadyHooks grad_hooks_;  // Note [Gradient-ready hooks]
  ProcessGroupPtr pg_;
  int64_t stage_;
  int64_t rank_, world_;
  std::optional<at::ScalarType> reduce_dtype_;
  bool sync_ = true;
  bool in_backward_ = false;
  int64_t next_bucket_ = 0;
  int64_t launched_count_ = 0;
  mutable std::mutex mutex_;
  std::shared_ptr<std::atomic<bool>> alive_ = std::make_shared<std::atomic<bool>>(true);
};

// Note [Parameter all-gather]
// all_gather_single(flat, shard) (formerly _allgather_base) for each bucket, all launched before
// the first wait so that Gloo pipelines them; used after the optimizer step (stages 1, 2) and
// before forward (stage 3).
void all_gather_flat(const ProcessGroupPtr& pg, const std::vector<at::Tensor>& flats,
                     const std::vector<at::Tensor>& shards);

}  // namespace torchlane::sharding
