#pragma once

#include "comm/comm_hook.hpp"
#include "comm/kept_works.hpp"

namespace torchlane::hooks {

// The uncompressed path shared by the hooks (PowerSGD's warm-up steps, buckets of a dtype a hook
// does not compress): divide by world size first, as torch's allreduce_hook does, then sum.
// Returns a future holding `buffer`.
inline c10::intrusive_ptr<c10::ivalue::Future> allreduce_mean(
    const c10::intrusive_ptr<c10d::ProcessGroup>& process_group, at::Tensor buffer) {
  buffer.div_(process_group->getSize());
  std::vector<at::Tensor> tensors{buffer};
  return comm::launched(process_group->allreduce(tensors))
      ->then(
          [buffer](c10::ivalue::Future& done) {
            done.value();  // rethrows a communication error
            return c10::IValue(buffer);
          },
          c10::TensorType::get());
}

inline bool is_float_or_double(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

}  // namespace torchlane::hooks
