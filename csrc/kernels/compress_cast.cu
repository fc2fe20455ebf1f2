// See Note [Cast compression rounding] in csrc/hooks/cast_hook.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/compress_cast.cuh"

namespace torchlane::kernels {
namespace {

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The wire value is rounded twice, exactly as `src.to(wire).div_(world_size)` rounds it.
template <typename Src, typename Wire>
__global__ void cast_compress_kernel(const Src* __restrict__ src, Wire* __restrict__ dst, int64_t n,
                                     float divisor) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float once = to_float(from_float<Wire>(static_cast<float>(src[i])));
    dst[i] = from_float<Wire>(once / divisor);
  }
}

template <typename Wire, typename Dst>
__global__ void cast_decompress_kernel(const Wire* __restrict__ src, Dst* __restrict__ dst,
                                       int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    dst[i] = static_cast<Dst>(to_float(src[i]));
  }
}

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);
}

template <typename Wire>
cudaError_t compress_to(const CastParams& p, cudaStream_t stream) {
  auto* dst = static_cast<Wire*>(p.dst);
  if (p.src_dtype == CastDtype::kFloat32) {
    cast_compress_kernel<<<blocks_for(p.numel), kThreads, 0, stream>>>(
        static_cast<const float*>(p.src), dst, p.numel, p.divisor);
  } else if (p.src_dtype == CastDtype::kFloat64) {
    cast_compress_kernel<<<blocks_for(p.numel), kThreads, 0, stream>>>(
        static_cast<const double*>(p.src), dst, p.numel, p.divisor);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename Wire>
cudaError_t decompress_from(const CastParams& p, cudaStream_t stream) {
  const auto* src = static_cast<const Wire*>(p.src);
  if (p.dst_dtype == CastDtype::kFloat32) {
    cast_decompress_kernel<<<blocks_for(p.numel), kThreads, 0, stream>>>(
        src, static_cast<float*>(p.dst), p.numel);
  } else if (p.dst_dtype == CastDtype::kFloat64) {
    cast_decompress_kernel<<<blocks_for(p.numel), kThreads, 0, stream>>>(
        src, static_cast<double*>(p.dst), p.numel);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_cast_compress(const CastParams& params, cudaStream_t stream) {
  if (params.numel == 0) {
    return cudaSuccess;
  }
  switch (params.dst_dtype) {
    case CastDtype::kFloat16:
      return compress_to<__half>(params, stream);
    case CastDtype::kBFloat16:
      return compress_to<__nv_bfloat16>(params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_cast_decompress(const CastParams& params, cudaStream_t stream) {
  if (params.numel == 0) {
    return cudaSuccess;
  }
  switch (params.src_dtype) {
    case CastDtype::kFloat16:
      return decompress_from<__half>(params, stream);
    case CastDtype::kBFloat16:
      return decompress_from<__nv_bfloat16>(params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace torchlane::kernels
