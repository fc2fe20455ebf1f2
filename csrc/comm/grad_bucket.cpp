#include "comm/grad_bucket.hpp"

namespace torchlane::comm {

c10d::GradBucket make_grad_bucket(size_t index, size_t count, const at::Tensor& buffer,
                                  const std::vector<at::Tensor>& params) {
  if (buffer.is_sparse()) {
    // A sparse-gradient bucket (Note [Sparse gradients], reducer.cpp) as torch's reducer builds
    // it: one parameter, the sparse gradient as buffer(), no offsets, lengths or per-parameter
    // views (getGradients() is empty).
    TORCH_CHECK(params.size() == 1 && params[0].sizes() == buffer.sizes(),
                "comm hook bucket: a sparse buffer needs exactly one parameter of its size, got ",
                params.size(), " parameters for a buffer of size ", buffer.sizes());
    return c10d::GradBucket(index, count, buffer, {}, {}, {}, params, std::nullopt);
  }
  std::vector<size_t> offsets, lengths;
  std::vector<c10::IntArrayRef> sizes;
  size_t offset = 0;
  for (const auto& p : params) {
    offsets.push_back(offset);
    lengths.push_back(static_cast<size_t>(p.numel()));
    sizes.push_back(p.sizes());
    offset += static_cast<size_t>(p.numel());
  }
  TORCH_CHECK(static_cast<int64_t>(offset) == buffer.numel(), "comm hook bucket: params hold ",
              offset, " elements but buffer has ", buffer.numel());
  return c10d::GradBucket(index, count, buffer, std::move(offsets), std::move(lengths),
                          std::move(sizes), params, std::nullopt);
}

}  // namespace torchlane::comm
