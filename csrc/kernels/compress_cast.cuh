#pragma once
// CUDA kernels of the bf16/fp16 compression hooks. Pure: raw pointers, no torch headers.
#include <cstdint>

#include <cuda_runtime_api.h>

namespace torchlane::kernels {

enum class CastDtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct CastParams {
  const void* src;
  void* dst;
  int64_t numel;
  CastDtype src_dtype;
  CastDtype dst_dtype;
  // Compress: dst = round_dst(round_wire(src) / divisor). Decompress: divisor = 1.
  float divisor;
};

// Returns cudaSuccess or the launch error. Launches on `stream`.
cudaError_t launch_cast_compress(const CastParams& params, cudaStream_t stream);
cudaError_t launch_cast_decompress(const CastParams& params, cudaStream_t stream);

}  // namespace torchlane::kernels
