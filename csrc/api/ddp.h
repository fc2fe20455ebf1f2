#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "comm/comm_hook.hpp"
#include "hooks/powersgd_hook.hpp"
#include "hooks/topk_hook.hpp"

namespace torchlane {

class Reducer;

struct DDPOptions {
  double bucket_cap_mb = 25.0;
  bool find_unused_parameters = false;
  bool gradient_as_bucket_view = false;
  bool check_finite = false;  // then grads_finite() after each synchronised backward
  bool broadcast_buffers = true;
  bool verify_layout = false;  // Note [Layout verification] (a debugging mode)
};

struct BucketInfo {
  int64_t numel = 0;
  int64_t bytes = 0;
  std::string dtype;
  std::vector<std::string> params;
};

// The last synchronised backward's volume and timing (times from its first gradient hook).
struct CommStats {
  int64_t num_buckets = 0;
  int64_t bytes_reduced = 0;  // uncompressed bytes of all buckets
  int64_t bytes_sent = 0;     // what this rank handed to the process group (after compression)
  double backward_end_ms = 0;
  double comm_end_ms = 0;
  std::vector<BucketInfo> buckets;
};

// The C++ comm hooks (csrc/hooks/), for DistributedDataParallel::register_comm_hook.
std::shared_ptr<CommHook> bf16_compress_hook(c10::intrusive_ptr<c10d::ProcessGroup> pg);
std::shared_ptr<CommHook> fp16_compress_hook(c10::intrusive_ptr<c10d::ProcessGroup> pg);
std::shared_ptr<CommHook> powersgd_hook(c10::intrusive_ptr<c10d::ProcessGroup> pg,
                                        hooks::PowerSGDOptions options);
std::shared_ptr<CommHook> topk_hook(c10::intrusive_ptr<c10d::ProcessGroup> pg,
                                    hooks::TopKOptions options);

// Note [C++ DistributedDataParallel]
// The LibTorch counterpart of python/torchlane/ddp.py over the same C++ Reducer: construction
// checks that every rank holds the same parameters (names' order, shapes, dtypes; the same
// message as Python), broadcasts rank 0's parameters and buffers and builds the Reducer; forward
// runs the per-iteration protocol of Note [Reducer life cycle] (prepare_for_forward,
// rebuild_buckets, the buffer broadcast, then prepare_for_backward on the outputs). torch::nn
// modules have no virtual forward, so forward() goes through torch::nn::AnyModule (modules whose
// forward takes and returns tensors), and forward_with(fn) wraps any callable for the rest.
class DistributedDataParallel {
 public:
  template <typename M>
  DistributedDataParallel(std::shared_ptr<M> module, c10::intrusive_ptr<c10d::ProcessGroup> pg,
                          DDPOptions options = {})
      : DistributedDataParallel(std::static_pointer_cast<torch::nn::Module>(module), std::move(pg),
                                options, make_any(module)) {}
  ~DistributedDataParallel();
  DistributedDataParallel(const DistributedDataParallel&) = delete;
  DistributedDataParallel& operator=(const DistributedDataParallel&) = delete;

  // module->forward(args...) inside the DDP protocol; returns what the module returns.
  template <typename... Args>
  at::Tensor forward(Args&&... args) {
    TORCH_CHECK(!any_.is_empty(),
                "DistributedDataParallel::forward: the module has no forward(); "
                "use forward_with");
    return forward_with([&] { return any_.forward(std::forward<Args>(args)...); });
  }

  // Runs fn() (the model's forward, returning a tensor or a vector of tensors) inside the DDP
  // protocol; the tensors it returns are where backward's usage search starts.
  template <typename Fn>
  auto forward_with(Fn&& fn) {
    pre_forward();
    auto out = fn();
    return post_forward(std::move(out));
  }

  // RAII: gradients accumulate locally in .grad while a guard lives; the first synchronised
  // backward after it reduces them.
  class NoSyncGuard {
   public:
    explicit NoSyncGuard(DistributedDataParallel& ddp)
        : ddp_(&ddp), old_(ddp.require_backward_grad_sync_) {
      ddp.require_backward_grad_sync_ = false;
      ddp.allow_local_backward();  // Note [No silent gradient loss] in reducer/reducer.hpp
    }
    ~NoSyncGuard() {
      if (ddp_) {
        ddp_->require_backward_grad_sync_ = old_;
      }
    }
    NoSyncGuard(NoSyncGuard&& other) noexcept : ddp_(other.ddp_), old_(other.old_) {
      other.ddp_ = nullptr;
    }
    NoSyncGuard(const NoSyncGuard&) = delete;
    NoSyncGuard& operator=(const NoSyncGuard&) = delete;
    NoSyncGuard& operator=(NoSyncGuard&&) = delete;

   private:
    DistributedDataParallel* ddp_;
    bool old_;
  };
  [[nodiscard]] NoSyncGuard no_sync() {
    return NoSyncGuard(*this);
  }

  // One hook, before the first backward (csrc/hooks/ or any torchlane::CommHook).
  void register_comm_hook(std::shared_ptr<c10d::CommHookInterface> hook);
  // check_finite only: whether the last reduced gradients were all finite (same on every rank).
  bool grads_finite() const;
  CommStats comm_stats() const;

  const std::shared_ptr<torch::nn::Module>& module() const {
    return module_;
  }
  torch::nn::Module* operator->() const {
    return module_.get();
  }
  const c10::intrusive_ptr<c10d::ProcessGroup>& process_group() const {
    return pg_;
  }
  const std::vector<std::string>& parameter_names() const {
    return param_names_;
  }

 private:
  DistributedDataParallel(std::shared_ptr<torch::nn::Module> module,
                          c10::intrusive_ptr<c10d::ProcessGroup> pg, DDPOptions options,
                          torch::nn::AnyModule any);

  template <typename M>
  static torch::nn::AnyModule make_any(const std::shared_ptr<M>& module) {
    if constexpr (requires { &M::forward; }) {
      return torch::nn::AnyModule(module);
    } else {
      return torch::nn::AnyModule();
    }
  }

  void pre_forward();
  at::Tensor post_forward(at::Tensor out);
  std::vector<at::Tensor> post_forward(std::vector<at::Tensor> outs);
  std::vector<at::Tensor> finish_forward(std::vector<at::Tensor> outs);
  void verify_params_across_ranks();
  void broadcast(std::vector<at::Tensor> tensors);
  std::vector<at::Tensor> module_states() const;
  std::vector<at::Tensor> module_buffers() const;

  std::shared_ptr<torch::nn::Module> module_;
  torch::nn::AnyModule any_;
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  DDPOptions options_;
  std::vector<std::string> param_names_;
  std::vector<at::Tensor> params_;
  std::unique_ptr<Reducer> reducer_;
  bool require_backward_grad_sync_ = true;
  void allow_local_backward();
  bool require_forward_param_sync_ = true;
};

}  // namespace torchlane
