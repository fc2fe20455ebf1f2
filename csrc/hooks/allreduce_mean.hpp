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

// Bytes a tensor puts on the wire: a sparse COO tensor sends its indices and values (Gloo's sparse
// all-reduce all-gathers both), a dense one its elements.
inline int64_t wire_bytes(const at::Tensor& t) {
  if (t.is_sparse()) {
    return static_cast<int64_t>(t._indices().nbytes() + t._values().nbytes());
  }
  return t.numel() * static_cast<int64_t>(t.element_size());
}

// Note [Sparse buckets in the C++ hooks]
// A sparse-gradient bucket (Note [Sparse gradients], reducer.cpp) reaches a hook as a sparse COO
// buffer. All of torchlane's C++ hooks pass it through uncompressed: divided by world size and
// reduced by the process group's sparse all-reduce (allreduce_mean above, the path torch's
// allreduce_hook takes). Compressing it would not be sound or not pay: top-k and PowerSGD keep
// error-feedback state shaped like a dense bucket and a sparse gradient already sends only the
// rows it touches; a bf16/fp16 cast of the values would halve them, but Gloo's sparse reduction
// then sums in the narrow dtype (dense casts accumulate the same way, but torch DDP has no such
// path for sparse buckets to compare with), so it is left out rather than shipped untested.
inline bool is_float_or_double(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

}  // namespace torchlane::hooks
