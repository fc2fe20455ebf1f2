#pragma once
// FlashAttention-2 forward for one thread block: kBlockM query rows of one (batch, head) against
// all the key tiles they may see. Written on the tile primitives of Note [Tile primitives]; Tile
// is CudaTile (GPU) or HostTile (CPU emulation), Kt a FlashTraits.
#include "kernels/flash_params.h"
#include "kernels/tile_common.h"

namespace torchlane::kernels {

template <class Tile, class Kt>
TL_DEVICE void flash_fwd_block(const FlashFwdParams& p, int m_block, int bh, char* smem) {
  using E = typename Kt::Element;
  constexpr int M = Kt::kBlockM, N = Kt::kBlockN, D = Kt::kHeadDim, LD = Kt::kLd;
  using AccS = typename Tile::template Acc<M, N>;
  using AccO = typename Tile::template Acc<M, D>;
  using Rows = typename Tile::template RowVec<M>;

  const int b = bh / p.h, h = bh % p.h, hk = h / (p.h / p.h_kv);
  const int m0 = m_block * M;
  if (m0 >= p.seqlen_q)
    return;
  const int m_valid = p.seqlen_q - m0 < M ? p.seqlen_q - m0 : M;
  const E* q =
      static_cast<const E*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + m0 * p.q_row_stride;
  const E* k = static_cast<const E*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const E* v = static_cast<const E*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  E* sQ = reinterpret_cast<E*>(smem);
  E* sK = sQ + M * LD;
  E* sV = sK + N * LD;

  Tile::template load_tile<E, M, D>(sQ, LD, q, p.q_row_stride, m_valid);
  AccO o;
  Tile::zero(o);
  Rows m_run, l_run;
  Tile::fill(m_run, kNegInf);
  Tile::fill(l_run, 0.f);

  // Top-left causal: the block's last query row m0 + m_valid - 1 sees keys < m0 + m_valid.
  const int n_end = p.causal && m0 + m_valid < p.seqlen_k ? m0 + m_valid : p.seqlen_k;
  for (int n0 = 0; n0 < n_end; n0 += N) {
    const int n_valid = p.seqlen_k - n0 < N ? p.seqlen_k - n0 : N;
    Tile::barrier();  // every warp is done reading the previous sK, sV
    Tile::template load_tile<E, N, D>(sK, LD, k + n0 * p.k_row_stride, p.k_row_stride, n_valid);
    Tile::template load_tile<E, N, D>(sV, LD, v + n0 * p.v_row_stride, p.v_row_stride, n_valid);
    Tile::barrier();

    AccS s;
    Tile::zero(s);
    Tile::template gemm_nt<E, D>(s, sQ, LD, sK, LD);
    Tile::for_each(s, [&](float& x, int, int r, int c) {
      const int i = m0 + r, j = n0 + c;
      x = (j >= p.seqlen_k || (p.causal && j > i)) ? kNegInf : round_mul(x, p.scale);
    });
    // Online softmax. Every row sees key 0 in the first tile, so m_run is finite from then on
    // (unless its logits are -inf) and a row that is fully masked in a later tile gets
    // p = exp(-inf) = 0 and alpha = 1.
    Rows tile_max, alpha, tile_sum;
    Tile::row_max(s, tile_max);
    Tile::template for_each_row<M>([&](int sl, int) {
      const float m_new = m_run[sl] > tile_max[sl] ? m_run[sl] : tile_max[sl];
      alpha[sl] = m_run[sl] == kNegInf ? 0.f : Tile::exp(m_run[sl] - m_new);
      m_run[sl] = m_new;
    });
    // x - m <= 0 since m is the max of the same rounded products (no clamp: fminf would turn
    // the NaN of +inf - +inf into 0). A row whose logits so far are all -inf keeps m = -inf,
    // l = 0 and gets p = 0 (not exp(-inf - -inf) = NaN); its output is 0 and its lse -inf, as
    // SDPA's; a NaN logit (which row_max skips) stays NaN in p, l and the output. See
    // Note [Softmax max subtraction] in csrc/attention/cpu_common.h.
    Tile::for_each(s, [&](float& x, int sl, int, int) {
      x = m_run[sl] == kNegInf ? (x != x ? x : 0.f) : Tile::exp(x - m_run[sl]);
    });
    Tile::row_sum(s, tile_sum);
    Tile::template for_each_row<M>(
        [&](int sl, int) { l_run[sl] = l_run[sl] * alpha[sl] + tile_sum[sl]; });
    Tile::scale_rows(o, alpha);
    Tile::template gemm_pv<E, N>(o, s, sV, LD);
  }

  Rows inv_l, lse;
  Tile::template for_each_row<M>([&](int sl, int) {
    inv_l[sl] = l_run[sl] == 0.f ? 0.f : 1.f / l_run[sl];  // a NaN sum keeps NaN
    lse[sl] = m_run[sl] + Tile::log(l_run[sl]);
  });
  E* o_ptr =
      static_cast<E*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride + m0 * p.o_row_stride;
  Tile::template store_acc<E>(o_ptr, p.o_row_stride, m_valid, o, inv_l);
  Tile::store_rows(p.lse + (int64_t(b) * p.h + h) * p.seqlen_q + m0, m_valid, lse);
}

}  // namespace torchlane::kernels
