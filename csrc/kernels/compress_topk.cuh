#pragma once
// CUDA kernels of the top-k hook. Pure: raw pointers, no torch headers.
#include <cstdint>

#include <cuda_runtime_api.h>

namespace torchlane::kernels {

struct TopKGatherParams {
  void* residual;          // [n], the values at `indices` are moved out of it
  const int64_t* indices;  // [k], selected positions
  void* values;            // [k], output
  int32_t* indices32;      // [k], output: the indices narrowed to int32 for the wire
  int64_t k;
  bool is_double;
};

struct TopKScatterParams {
  void* out;               // [n]
  const void* values;      // [count]
  const int32_t* indices;  // [count]
  int64_t count;
  double scale;
  bool is_double;
};

cudaError_t launch_topk_gather_clear(const TopKGatherParams& params, cudaStream_t stream);
cudaError_t launch_topk_scatter_add(const TopKScatterParams& params, cudaStream_t stream);

}  // namespace torchlane::kernels
