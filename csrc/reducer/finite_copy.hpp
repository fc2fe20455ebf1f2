#pragma once

#include <ATen/ATen.h>

namespace torchlane {

// Copies `src` into `dst` (same shape) and reports whether every value copied is finite, in one
// pass over the data for contiguous CPU float tensors (the reducer's write-back of the reduced
// gradients, so the check costs no extra pass; see Note [Finite check]). Other tensors fall back
// to copy_ plus a separate isfinite reduction.
bool copy_and_check_finite(at::Tensor& dst, const at::Tensor& src);

// Whether every value of `t` is finite.
bool all_finite(const at::Tensor& t);

}  // namespace torchlane
