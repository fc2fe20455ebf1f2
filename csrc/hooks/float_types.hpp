#pragma once

#include <ATen/core/Tensor.h>

namespace torchlane::hooks {

// The dtypes the compressing hooks compress; other buckets take the uncompressed path.

inline bool is_float_or_double(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble;
}
inline bool is_float_or_double(const at::Tensor& t) {
  return is_float_or_double(t.scalar_type());
}

}  // namespace torchlane::hooks
