#include "hooks/cast_hook.hpp"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#ifdef TORCHLANE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/compress_cast.cuh"
#endif

#include "comm/kept_works.hpp"
#include "hooks/float_types.hpp"

namespace torchlane::hooks {

// Note [Cast compression rounding]
// torch's fp16_compress_hook computes `buffer.to(fp16).div_(world_size)`: the gradient is rounded
// to the wire dtype, divided in float and rounded again. We do the same two roundings in one pass
// over the buffer (no intermediate tensor), so the bytes on the wire are bit-identical to torch's
// hook and the all-reduced result is too. Dividing *before* the all-reduce (not after) keeps the
// fp16 sum of world_size gradients from overflowing. Decompression widens the reduced wire tensor
// back into the bucket buffer, which is then the hook's result.

namespace {

constexpr int64_t kGrain = 1 << 15;

template <typename Src, typename Wire>
void cast_compress_cpu(const Src* src, Wire* dst, int64_t n, float divisor) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float once = static_cast<float>(static_cast<Wire>(static_cast<float>(src[i])));
      dst[i] = static_cast<Wire>(once / divisor);
    }
  });
}

template <typename Wire, typename Dst>
void cast_decompress_cpu(const Wire* src, Dst* dst, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      dst[i] = static_cast<Dst>(static_cast<float>(src[i]));
    }
  });
}

bool is_narrow(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

#ifdef TORCHLANE_WITH_CUDA
kernels::CastDtype cast_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kernels::CastDtype::kFloat32;
    case at::kDouble:
      return kernels::CastDtype::kFloat64;
    case at::kHalf:
      return kernels::CastDtype::kFloat16;
    default:
      return kernels::CastDtype::kBFloat16;
  }
}
#endif

}  // namespace

at::Tensor cast_compress(const at::Tensor& src, at::ScalarType wire_dtype, int64_t world_size) {
  RECORD_FUNCTION("torchlane::cast_compress", std::vector<c10::IValue>({src}));
  TORCH_CHECK_VALUE(is_narrow(wire_dtype), "cast_compress: wire_dtype must be torch.float16 or ",
                    "torch.bfloat16, got ", wire_dtype);
  TORCH_CHECK_VALUE(world_size >= 1, "cast_compress: world_size must be >= 1, got ", world_size);
  const at::Tensor in = src.contiguous();
  if (!is_float_or_double(in.scalar_type())) {
    // Rare (a half-precision model): the generic path rounds the same way.
    return in.to(wire_dtype).div_(world_size);
  }
  at::Tensor out = at::empty(in.sizes(), in.options().dtype(wire_dtype));
  const auto divisor = static_cast<float>(world_size);
  if (in.is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "cast_compress", [&] {
      if (wire_dtype == at::kHalf) {
        cast_compress_cpu(in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<c10::Half>(),
                          in.numel(), divisor);
      } else {
        cast_compress_cpu(in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<c10::BFloat16>(),
                          in.numel(), divisor);
      }
    });
    return out;
  }
#ifdef TORCHLANE_WITH_CUDA
  if (in.is_cuda()) {
    const c10::cuda::CUDAGuard device_guard(in.device());
    kernels::CastParams p{in.const_data_ptr(),          out.mutable_data_ptr(), in.numel(),
                          cast_dtype(in.scalar_type()), cast_dtype(wire_dtype), divisor};
    const auto err = kernels::launch_cast_compress(p, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "cast_compress: CUDA launch failed: ", cudaGetErrorString(err));
    return out;
  }
#endif
  return in.to(wire_dtype).div_(world_size);
}

void cast_decompress_into(const at::Tensor& wire, at::Tensor& dst) {
  RECORD_FUNCTION("torchlane::cast_decompress", std::vector<c10::IValue>({wire}));
  TORCH_CHECK(wire.numel() == dst.numel(), "cast_decompress: wire has ", wire.numel(),
              " elements but the destination has ", dst.numel());
  if (!(is_narrow(wire.scalar_type()) && is_float_or_double(dst.scalar_type()) &&
        dst.is_contiguous() && wire.device() == dst.device())) {
    dst.copy_(wire.view(dst.sizes()));
    return;
  }
  const at::Tensor in = wire.contiguous();
  if (in.is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "cast_decompress", [&] {
      if (in.scalar_type() == at::kHalf) {
        cast_decompress_cpu(in.const_data_ptr<c10::Half>(), dst.mutable_data_ptr<scalar_t>(),
                            in.numel());
      } else {
        cast_decompress_cpu(in.const_data_ptr<c10::BFloat16>(), dst.mutable_data_ptr<scalar_t>(),
                            in.numel());
      }
    });
    return;
  }
#ifdef TORCHLANE_WITH_CUDA
  if (in.is_cuda()) {
    const c10::cuda::CUDAGuard device_guard(in.device());
    kernels::CastParams p{in.const_data_ptr(),          dst.mutable_data_ptr(),        in.numel(),
                          cast_dtype(in.scalar_type()), cast_dtype(dst.scalar_type()), 1.0f};
    const auto err = kernels::launch_cast_decompress(p, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess,
                "cast_decompress: CUDA launch failed: ", cudaGetErrorString(err));
    return;
  }
#endif
  dst.copy_(in.view(dst.sizes()));
}

CastCompressHook::CastCompressHook(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                                   at::ScalarType wire_dtype)
    : CommHook(std::move(process_group)), wire_dtype_(wire_dtype) {
  TORCH_CHECK(process_group_, "CastCompressHook: process_group must not be None");
  TORCH_CHECK_VALUE(is_narrow(wire_dtype),
                    "CastCompressHook: wire dtype must be float16 or bfloat16, ", "got ",
                    wire_dtype);
}

std::string CastCompressHook::name() const {
  return wire_dtype_ == at::kHalf ? "fp16_compress" : "bf16_compress";
}

c10::intrusive_ptr<c10::ivalue::Future> CastCompressHook::runHook(c10d::GradBucket& bucket) {
  at::Tensor buffer = bucket.getBufferRef();
  if (buffer.is_sparse()) {  // Note [Sparse buckets in the C++ hooks]
    return allreduce_mean(buffer);
  }
  auto fut = launch_allreduce({cast_compress(buffer, wire_dtype_, process_group_->getSize())});
  // The callback only computes: it launches no collective, so every rank issues the
  // collectives of all buckets in the same order (the backward pass's).
  return fut->then(
      [buffer](c10::ivalue::Future& done) {
        at::Tensor out = buffer;
        cast_decompress_into(done.value().toTensorVector().at(0), out);
        return c10::IValue(out);
      },
      c10::TensorType::get());
}

// ---- ops: torchlane::cast_compress / torchlane::cast_decompress (schemas in bindings.cpp) ----

namespace {

at::Tensor cast_compress_op(const at::Tensor& src, at::ScalarType wire_dtype, int64_t world_size) {
  return cast_compress(src, wire_dtype, world_size);
}

at::Tensor cast_decompress_op(const at::Tensor& wire, at::ScalarType dtype) {
  TORCH_CHECK(is_float_or_double(dtype),
              "cast_decompress: dtype must be torch.float32 or torch.float64, ", "got ", dtype);
  at::Tensor out = at::empty(wire.sizes(), wire.options().dtype(dtype));
  cast_decompress_into(wire, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlane, CPU, m) {
  m.impl("cast_compress", &cast_compress_op);
  m.impl("cast_decompress", &cast_decompress_op);
}

#ifdef TORCHLANE_WITH_CUDA
TORCH_LIBRARY_IMPL(torchlane, CUDA, m) {
  m.impl("cast_compress", &cast_compress_op);
  m.impl("cast_decompress", &cast_decompress_op);
}
#endif

}  // namespace torchlane::hooks
