#pragma once
// __global__ wrappers around the block-level kernels and their launchers (grid, dynamic shared
// memory). Included only by the per-instantiation .cu files.
#include <cuda_runtime.h>

#include "kernels/flash_api.h"
#include "kernels/flash_bwd_block.h"
#include "kernels/flash_fwd_block.h"
#include "kernels/tile_cuda.cuh"

namespace torchlane::kernels {

// Largest dynamic shared memory per block on sm_80 (sm_90 allows 227 KiB).
constexpr int kMaxSmemBytesSm80 = 163 * 1024;

template <class Kt>
__global__ void __launch_bounds__(Kt::kNThreads) flash_fwd_kernel(const FlashFwdParams p) {
  extern __shared__ __align__(16) char smem[];
  flash_fwd_block<CudaTile<Kt::kNWarps>, Kt>(p, blockIdx.x, blockIdx.y, smem);
}

template <class Kt>
__global__ void __launch_bounds__(Kt::kNThreads) flash_bwd_kernel(const FlashBwdParams p) {
  extern __shared__ __align__(16) char smem[];
  flash_bwd_block<CudaTile<Kt::kNWarps>, Kt>(p, blockIdx.x, blockIdx.y, smem);
}

template <class Kt>
cudaError_t launch_flash_fwd(const FlashFwdParams& p, cudaStream_t stream) {
  constexpr int smem = Kt::kFwdSmemBytes;
  static_assert(smem <= kMaxSmemBytesSm80, "forward tiles exceed sm_80 shared memory");
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(flash_fwd_kernel<Kt>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  const dim3 grid((p.seqlen_q + Kt::kBlockM - 1) / Kt::kBlockM, p.b * p.h);
  flash_fwd_kernel<Kt><<<grid, Kt::kNThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <class Kt>
cudaError_t launch_flash_bwd(const FlashBwdParams& p, cudaStream_t stream) {
  constexpr int smem = Kt::kBwdSmemBytes;
  static_assert(smem <= kMaxSmemBytesSm80, "backward tiles exceed sm_80 shared memory");
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(flash_bwd_kernel<Kt>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  const dim3 grid((p.seqlen_k + Kt::kBlockN - 1) / Kt::kBlockN, p.b * p.h_kv);
  flash_bwd_kernel<Kt><<<grid, Kt::kNThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace torchlane::kernels

// One explicit instantiation per .cu file, see DESIGN.md "Compile-time variants, one per file".
#define TORCHLANE_FLASH_FWD_INSTANTIATION(Element, kHeadDim)                                   \
  namespace torchlane::kernels {                                                             \
  template <>                                                                                \
  cudaError_t run_flash_fwd<Element, kHeadDim>(const FlashFwdParams& p, cudaStream_t stream) { \
    return launch_flash_fwd<FwdTraits<kHeadDim, Element>>(p, stream);                        \
  }                                                                                          \
  }

#define TORCHLANE_FLASH_BWD_INSTANTIATION(Element, kHeadDim)                                   \
  namespace torchlane::kernels {                                                             \
  template <>                                                                                \
  cudaError_t run_flash_bwd<Element, kHeadDim>(const FlashBwdParams& p, cudaStream_t stream) { \
    return launch_flash_bwd<BwdTraits<kHeadDim, Element>>(p, stream);                        \
  }                                                                                          \
  }
