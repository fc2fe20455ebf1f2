// See Note [Top-k with error feedback] in csrc/hooks/topk_hook.cpp.
#include "kernels/compress_topk.cuh"

namespace torchlane::kernels {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);
}

template <typename T>
__global__ void gather_clear_kernel(T* __restrict__ residual, const int64_t* __restrict__ idx,
                                    T* __restrict__ values, int32_t* __restrict__ idx32,
                                    int64_t k) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < k;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx[j];
    values[j] = residual[i];
    residual[i] = T(0);
    idx32[j] = static_cast<int32_t>(i);
  }
}

// Several ranks may select the same position: atomics make the sum independent of the race.
template <typename T>
__global__ void scatter_add_kernel(T* __restrict__ out, const T* __restrict__ values,
                                   const int32_t* __restrict__ idx, int64_t count, T scale) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < count;
       j += int64_t(gridDim.x) * blockDim.x) {
    atomicAdd(out + idx[j], values[j] * scale);
  }
}

}  // namespace

cudaError_t launch_topk_gather_clear(const TopKGatherParams& p, cudaStream_t stream) {
  if (p.k == 0) {
    return cudaSuccess;
  }
  if (p.is_double) {
    gather_clear_kernel<<<blocks_for(p.k), kThreads, 0, stream>>>(
        static_cast<double*>(p.residual), p.indices, static_cast<double*>(p.values), p.indices32,
        p.k);
  } else {
    gather_clear_kernel<<<blocks_for(p.k), kThreads, 0, stream>>>(
        static_cast<float*>(p.residual), p.indices, static_cast<float*>(p.values), p.indices32,
        p.k);
  }
  return cudaGetLastError();
}

cudaError_t launch_topk_scatter_add(const TopKScatterParams& p, cudaStream_t stream) {
  if (p.count == 0) {
    return cudaSuccess;
  }
  if (p.is_double) {
    scatter_add_kernel<<<blocks_for(p.count), kThreads, 0, stream>>>(
        static_cast<double*>(p.out), static_cast<const double*>(p.values), p.indices, p.count,
        p.scale);
  } else {
    scatter_add_kernel<<<blocks_for(p.count), kThreads, 0, stream>>>(
        static_cast<float*>(p.out), static_cast<const float*>(p.values), p.indices, p.count,
        static_cast<float>(p.scale));
  }
  return cudaGetLastError();
}

}  // namespace torchlane::kernels
