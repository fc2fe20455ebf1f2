#pragma once
// FlashAttention-2 backward for one thread block: kBlockN keys of one (batch, kv head); loops
// over the query heads of its group and their query tiles, accumulating dK and dV in registers
// (no atomics) and adding dQ into an fp32 buffer (atomics). Needs delta = rowsum(dO * O) - dlse
// precomputed. Written on the tile primitives of Note [Tile primitives].
#include "kernels/flash_params.h"
#include "kernels/tile_common.h"

namespace torchlane::kernels {

template <class Tile, class Kt>
TL_DEVICE void flash_bwd_block(const FlashBwdParams& p, int n_block, int bhk, char* smem) {
  using E = typename Kt::Element;
  constexpr int M = Kt::kBlockM, N = Kt::kBlockN, D = Kt::kHeadDim, LD = Kt::kLd;
  constexpr int LDS = Kt::kLdS;
  constexpr int kDqChunk = 16 * Kt::kNWarps;  // head-dim rows of dQ^T per pass
  static_assert(D % kDqChunk == 0, "head dim must be a multiple of the dQ chunk");
  using AccT = typename Tile::template Acc<N, M>;  // transposed scores: key rows, query columns
  using AccKV = typename Tile::template Acc<N, D>;
  using AccQt = typename Tile::template Acc<kDqChunk, M>;
  using NoScale = typename Tile::template RowVec<N>;

  const int b = bhk / p.h_kv, hk = bhk % p.h_kv, group = p.h / p.h_kv;
  const int n0 = n_block * N;
  if (n0 >= p.seqlen_k)
    return;
  const int n_valid = p.seqlen_k - n0 < N ? p.seqlen_k - n0 : N;
  E* sK = reinterpret_cast<E*>(smem);
  E* sV = sK + N * LD;
  E* sQ = sV + N * LD;
  E* sdO = sQ + M * LD;
  E* sdS = sdO + M * LD;  // dS^T: N x M
  float* s_lse = reinterpret_cast<float*>(sdS + N * LDS);
  float* s_delta = s_lse + M;

  const E* k = static_cast<const E*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
               n0 * p.k_row_stride;
  const E* v = static_cast<const E*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
               n0 * p.v_row_stride;
  Tile::template load_tile<E, N, D>(sK, LD, k, p.k_row_stride, n_valid);
  Tile::template load_tile<E, N, D>(sV, LD, v, p.v_row_stride, n_valid);
  AccKV dk, dv;
  Tile::zero(dk);
  Tile::zero(dv);

  // Query tiles whose rows all precede n0 see none of these keys (top-left causal).
  const int m_begin = p.causal ? (n0 / M) * M : 0;
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t row0 = (int64_t(b) * p.h + h) * p.seqlen_q;
    const E* q = static_cast<const E*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const E* dout = static_cast<const E*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride;
    for (int m0 = m_begin; m0 < p.seqlen_q; m0 += M) {
      const int m_valid = p.seqlen_q - m0 < M ? p.seqlen_q - m0 : M;
      Tile::barrier();  // every warp is done with the previous sQ, sdO, sdS
      Tile::template load_tile<E, M, D>(sQ, LD, q + m0 * p.q_row_stride, p.q_row_stride, m_valid);
      Tile::template load_tile<E, M, D>(sdO, LD, dout + m0 * p.do_row_stride, p.do_row_stride,
                                        m_valid);
      Tile::template load_rows<M>(s_lse, p.lse + row0 + m0, m_valid);
      Tile::template load_rows<M>(s_delta, p.delta + row0 + m0, m_valid);
      Tile::barrier();

      // P^T = exp(scale K Q^T - lse), zero where masked or past the end of either sequence.
      AccT pt;
      Tile::zero(pt);
      Tile::template gemm_nt<E, D>(pt, sK, LD, sQ, LD);
      Tile::for_each(pt, [&](float& x, int, int r, int c) {
        const int i = m0 + c, j = n0 + r;
        const bool keep = i < p.seqlen_q && j < p.seqlen_k && !(p.causal && j > i);
        // The logit is the forward's rounded product (round_mul: no fma, whose unrounded
        // product is off by up to 128 at |logits| ~1e9), so s - lse <= 0 up to lse's rounding;
        // the clamp (not fminf, which drops NaN) guards that, and an all -inf row (lse = -inf) gets
        // P = 0. See Note [Softmax max subtraction] in csrc/attention/cpu_common.h.
        const float y = round_mul(x, p.scale) - s_lse[c];
        x = keep && s_lse[c] != kNegInf ? Tile::exp(y > 0.f ? 0.f : y) : 0.f;  // NaN stays NaN
      });
      Tile::template gemm_pv<E, M>(dv, pt, sdO, LD);  // dV += P^T dO

      // dS^T = P^T * (V dO^T - delta)
      AccT dst;
      Tile::zero(dst);
      Tile::template gemm_nt<E, D>(dst, sV, LD, sdO, LD);
      Tile::for_each(dst, [&](float& x, int, int, int c) { x -= s_delta[c]; });
      Tile::mul(dst, pt);
      Tile::template gemm_pv<E, M>(dk, dst, sQ, LD);  // dK += dS^T Q (scaled at the end)

      // dQ += scale dS K, computed transposed (dQ^T = K^T dS^T) from dS^T in shared memory so
      // that warps own 16 head-dim rows each and kBlockM is free of the warp count.
      Tile::template store_acc_shared<E>(sdS, LDS, dst);
      Tile::barrier();
#pragma unroll 1
      for (int c0 = 0; c0 < D; c0 += kDqChunk) {
        AccQt dqt;
        Tile::zero(dqt);
        Tile::template gemm_tn<E, N>(dqt, sK + c0, LD, sdS, LDS);
        Tile::atomic_add_acc_transposed(p.dq_accum + (row0 + m0) * D + c0, D, m_valid, dqt,
                                        p.scale);
      }
    }
  }

  NoScale scale_k, one;
  Tile::fill(scale_k, p.scale);
  Tile::fill(one, 1.f);
  const int64_t kv_off = ((int64_t(b) * p.h_kv + hk) * p.seqlen_k + n0) * D;
  Tile::template store_acc<E>(static_cast<E*>(p.dk) + kv_off, D, n_valid, dk, scale_k);
  Tile::template store_acc<E>(static_cast<E*>(p.dv) + kv_off, D, n_valid, dv, one);
}

}  // namespace torchlane::kernels
