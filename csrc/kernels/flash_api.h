#pragma once
// Entry points of the CUDA flash attention kernels, one explicit instantiation per .cu file
// (flash_{fwd,bwd}_hdim{64,128}_{fp16,bf16}.cu). No torch headers.
#include <cuda_runtime.h>

#include "kernels/flash_params.h"

namespace torchlane::kernels {

// Element: __half or __nv_bfloat16. Launch on `stream`; return the launch status.
template <typename Element, int kHeadDim>
cudaError_t run_flash_fwd(const FlashFwdParams& params, cudaStream_t stream);

// dq_accum must be zeroed and delta filled by the caller; see flash_bwd_block.h.
template <typename Element, int kHeadDim>
cudaError_t run_flash_bwd(const FlashBwdParams& params, cudaStream_t stream);

}  // namespace torchlane::kernels
