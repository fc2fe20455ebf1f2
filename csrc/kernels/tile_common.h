#pragma once
// Shared pieces of the tile-primitive layer. See Note [Tile primitives].
//
// Note [Tile primitives]
// The flash attention kernels (flash_fwd_block.h, flash_bwd_block.h) are written once, at the
// level of a thread block, against a small set of block-collective tile primitives:
//   load_tile     copy a (rows x COLS) tile from global to shared memory, zero-filling rows past
//                 the end of the sequence;
//   Acc<M, N>     an fp32 accumulator tile of M x N held in registers, M = 16 x (warps): warp w
//                 owns rows 16w..16w+15;  RowVec<M>: one fp32 value per row of such a tile;
//   gemm_nt       acc += A B^T with A (M x K) and B (N x K) in shared memory (Q K^T);
//   gemm_pv       acc += P B with P an accumulator tile rounded to the element type and B (K x N)
//                 in shared memory (P V, and dV += P^T dO, dK += dS^T Q in the backward);
//   gemm_tn       acc += A^T B with A (K x M) and B (K x N) in shared memory (dQ += dS K);
//   for_each      visit every element of a tile with its (row, column) inside the tile;
//   for_each_row, row_max, row_sum, scale_rows, mul   per-row bookkeeping of the online softmax
//                 and elementwise products of tiles with the same shape;
//   store_acc, store_acc_shared, atomic_add_acc_transposed, store_rows   write results back;
//   barrier       __syncthreads().
// Each primitive has two backends with identical semantics:
//   CudaTile (tile_cuda.cuh): tensor-core mma.sync.m16n8k16 with the fp32 accumulators spread
//     over the lanes of each warp in the mma layout, warp shuffles for row reductions;
//   HostTile (tile_host.h): plain C++ loops over the whole tile, one block at a time.
// So the same kernel source is compiled by nvcc for the GPU and by g++ for the CPU, where the
// tests run it block by block on small shapes (torch.ops.torchlane._attention_*_emulated). The
// host backend checks the algorithm (tiling, masking, online softmax, recomputation, the
// accumulation and rounding points); the CUDA backend's fragment layouts are only compiled.
#include <cstdint>

#if defined(__CUDACC__)
#define TL_DEVICE __device__ __forceinline__
#else
#define TL_DEVICE inline
#endif

namespace torchlane::kernels {

// Compile-time shape of one kernel instantiation.
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, typename Element_>
struct FlashTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  // Shared-memory rows are padded by 8 elements (16 bytes): rows stay 16-byte aligned and
  // consecutive rows start in different banks.
  static constexpr int kPad = 8;
  static constexpr int kLd = kHeadDim + kPad;
  static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of 16");
  static_assert(kBlockM % 16 == 0 && kBlockN % 16 == 0, "tiles are made of 16 x 16 mma tiles");
  // Forward: Q tile + K tile + V tile.
  static constexpr int kFwdSmemBytes = (kBlockM + 2 * kBlockN) * kLd * int(sizeof(Element));
  // Backward: K, V (kBlockN rows), Q, dO (kBlockM rows), dS^T (kBlockN x kBlockM), lse, delta.
  static constexpr int kLdS = kBlockM + kPad;
  static constexpr int kBwdSmemBytes = (2 * kBlockN + 2 * kBlockM) * kLd * int(sizeof(Element)) +
                                       kBlockN * kLdS * int(sizeof(Element)) +
                                       2 * kBlockM * int(sizeof(float));
};

// Forward: a 16-row slab per warp over Q, kBlockN keys per step.
template <int kHeadDim, typename Element>
using FwdTraits = FlashTraits<kHeadDim, 64, 64, 4, Element>;
// Backward: warps own 16 key rows each (kBlockN = 64); the dK and dV accumulators take 2 x D/2
// registers per thread, so head dim 128 uses 32-row query tiles to stay within 255 registers
// without spills (tools/cuda_check.py checks this).
template <int kHeadDim, typename Element>
using BwdTraits = FlashTraits<kHeadDim, (kHeadDim > 64 ? 32 : 64), 64, 4, Element>;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -__builtin_huge_valf();

// a * b rounded to fp32, never contracted into an fma with a following add or subtract (nvcc's
// -fmad=true, GCC's -ffp-contract=fast would): the softmax needs fl(scale * x) - m <= 0 exactly.
// See Note [Softmax max subtraction] in csrc/attention/cpu_common.h.
TL_DEVICE float round_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  float r = a * b;
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+x"(r));
#else
  asm("" : "+m"(r));
#endif
  return r;
#endif
}

}  // namespace torchlane::kernels
