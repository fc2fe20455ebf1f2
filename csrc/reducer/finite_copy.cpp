#include "reducer/finite_copy.hpp"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace torchlane {

namespace {

// x - x is 0 for finite x and NaN for +-inf and NaN, so `!(x - x == 0)` flags non-finite values
// without a branch the vectoriser has to keep.
template <typename T>
bool copy_contiguous(T* dst, const T* src, int64_t n) {
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    bool local_bad = false;
    for (int64_t i = begin; i < end; ++i) {
      const T v = src[i];
      dst[i] = v;
      const float f = static_cast<float>(v);
      local_bad |= !(f - f == 0.0f);
    }
    if (local_bad) {
      bad.store(true, std::memory_order_relaxed);
    }
  });
  return !bad.load();
}

}  // namespace

bool all_finite(const at::Tensor& t) {
  return at::isfinite(t).all().item<bool>();
}

bool copy_and_check_finite(at::Tensor& dst, const at::Tensor& src) {
  const bool fast = dst.device().is_cpu() && src.device().is_cpu() && dst.is_contiguous() &&
                    src.is_contiguous() && dst.scalar_type() == src.scalar_type() &&
                    dst.numel() == src.numel();
  if (fast) {
    switch (src.scalar_type()) {
      case at::kFloat:
        return copy_contiguous(dst.data_ptr<float>(), src.data_ptr<float>(), src.numel());
      case at::kDouble:
        return copy_contiguous(dst.data_ptr<double>(), src.data_ptr<double>(), src.numel());
      case at::kBFloat16:
        return copy_contiguous(dst.data_ptr<at::BFloat16>(), src.data_ptr<at::BFloat16>(),
                               src.numel());
      case at::kHalf:
        return copy_contiguous(dst.data_ptr<at::Half>(), src.data_ptr<at::Half>(), src.numel());
      default:
        break;
    }
  }
  dst.copy_(src);
  return all_finite(src);
}

}  // namespace torchlane
