#pragma once

#include <string>

#include "comm/comm_hook.hpp"

namespace torchlane::hooks {

// Compression math of the bf16/fp16 hooks, usable on their own (and bound as the
// torchlane::cast_compress / torchlane::cast_decompress ops).
//
// cast_compress returns `src` cast to `wire_dtype` and divided by `world_size`, in one pass.
// See Note [Cast compression rounding].
at::Tensor cast_compress(const at::Tensor& src, at::ScalarType wire_dtype, int64_t world_size);
// Copies the reduced wire tensor back into `dst` (the bucket buffer), widening it.
void cast_decompress_into(const at::Tensor& wire, at::Tensor& dst);

// fp16 / bf16 compression: each rank sends numel * 2 bytes instead of numel * 4 (float32).
class CastCompressHook : public CommHook {
 public:
  CastCompressHook(c10::intrusive_ptr<c10d::ProcessGroup> process_group, at::ScalarType wire_dtype);

  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override;
  std::string name() const override;

  at::ScalarType wire_dtype() const {
    return wire_dtype_;
  }

 private:
  at::ScalarType wire_dtype_;
};

}  // namespace torchlane::hooks
