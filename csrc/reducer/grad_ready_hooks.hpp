#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>

namespace torchlane {

// Note [Gradient-ready hooks]
// A C++ post-hook on each parameter's AccumulateGrad node runs right after the gradient was
// accumulated into `.grad`, on the autograd thread, with no Python in between: the moment a
// reducer may copy the gradient into its bucket. The reducers (DDP's Reducer, ZeRO's
// ShardedReducer) own one GradReadyHooks each. It holds strong references to the AccumulateGrad
// nodes (autograd keeps them only weakly, and a node recreated later would not carry the hook)
// and removes its hooks again in remove() or its destructor; the owner calls remove() first in
// its own destructor, before the state the callback touches goes away.
class GradReadyHooks {
 public:
  GradReadyHooks() = default;
  GradReadyHooks(const GradReadyHooks&) = delete;
  GradReadyHooks& operator=(const GradReadyHooks&) = delete;
  ~GradReadyHooks() {
    remove();
  }

  // Calls on_ready(i) after params[i]'s gradient is accumulated.
  void install(const std::vector<at::Tensor>& params, std::function<void(int64_t)> on_ready) {
    for (size_t i = 0; i < params.size(); ++i) {
      auto accumulator = torch::autograd::impl::grad_accumulator(params[i]);
      TORCH_INTERNAL_ASSERT(accumulator, "no gradient accumulator for parameter ", i);
      keys_.push_back(
          accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
              [on_ready, i](const torch::autograd::variable_list& outputs,
                            const torch::autograd::variable_list& /*inputs*/) {
                on_ready(static_cast<int64_t>(i));
                return outputs;
              })));
      accumulators_.push_back(std::move(accumulator));
    }
  }

  void remove() {
    for (size_t i = 0; i < accumulators_.size(); ++i) {
      accumulators_[i]->del_post_hook(keys_[i]);
    }
    accumulators_.clear();
    keys_.clear();
  }

  // The AccumulateGrad node of each parameter, in parameter order.
  const std::vector<c10::intrusive_ptr<torch::autograd::Node>>& accumulators() const {
    return accumulators_;
  }

 private:
  std::vector<c10::intrusive_ptr<torch::autograd::Node>> accumulators_;
  std::vector<uintptr_t> keys_;
};

}  // namespace torchlane
