#pragma once

#include <vector>

#include <torch/csrc/distributed/c10d/comm.hpp>

namespace torchlane::comm {

// The c10d::GradBucket a comm hook receives (Note [Comm hook contract]) for `params` whose
// gradients lie back to back in the flat `buffer`, in order: bucket `index` of `count`; or, for a
// sparse COO `buffer`, the bucket of the one parameter whose sparse gradient it is. The one
// builder of buckets, for the reducer and for callers that run a hook without one.
c10d::GradBucket make_grad_bucket(size_t index, size_t count, const at::Tensor& buffer,
                                  const std::vector<at::Tensor>& params);

}  // namespace torchlane::comm
