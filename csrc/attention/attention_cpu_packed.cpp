// CPU attention on the packed AVX-512 micro-kernels (Note [Packed tile GEMMs]): fp32 inputs with
// fp32 GEMMs, bf16 inputs with bf16 x bf16 -> fp32 GEMMs. See Note [Packed attention on the CPU].
#include "attention/cpu_vec.h"  // first: selects the vector ISA, see its Note

#include <memory>
#include <vector>

#include "attention/cpu_microkernel.h"
#include "attention/cpu_common.h"

// Note [Packed attention on the CPU]
// Same tiles, online softmax, masking and schedules as Note [CPU flash attention], with the GEMMs
// on the micro-kernels of Note [Packed tile GEMMs] instead of BLAS calls. The operands are packed
// into the micro-kernel's layouts: Q, K, V (and dO) once per call, O(S D) each, and the P / dS
// tiles as they are produced. dK and dV are accumulated transposed (dK^T += Q^T dS), so that the
// tile packed with the reduction over query rows is the B operand and the per-head Q^T / dO^T
// packs are the A operand. S, P, dP, dS and all accumulators are fp32. For bf16 inputs the GEMM
// operands are bf16, as in FlashAttention on GPUs: P is rounded to bf16 before P V (and
// dV += P^T dO), dS before dQ and dK.

namespace torchlane::attention::cpu {
namespace {

using mk::kNR;
using mk::round_up;

// Per-(batch, head) operands: packed copies, heads back to back, or (fp32 inputs already in the
// layout) the input itself, at its batch and head strides.
template <typename W>
struct Packed {
  std::unique_ptr<W[]> data;  // allocated uninitialised: see pack_heads
  int64_t per_head = 0, ld = 0;
  const W* input = nullptr;  // set when the input is used as is
  int64_t heads = 1, sb = 0, sh = 0;
  const W* head(int64_t bh) const {
    if (input != nullptr)
      return input + (bh / heads) * sb + (bh % heads) * sh;
    return data.get() + bh * per_head;
  }
};

enum class Pack { Rows, PairsT, Pairs, RowsT };

// Packs every (b, head) S x D matrix of t (heads = its second dimension) in the given layout:
//  Rows:   S rows of words(D)              (A operand, reduction over D)
//  PairsT: words(D) rows of round_up(S)    (B operand, reduction over D, columns = positions)
//  Pairs:  words(S) rows of round_up(D)    (B operand, reduction over positions, columns = D)
//  RowsT:  D rows of words(S)              (A operand, reduction over positions, rows = D)
template <typename W, typename T>
Packed<W> pack_heads(const Layout& t, int64_t B, int64_t heads, int64_t S, int64_t D, Pack how) {
  Packed<W> r;
  if constexpr (std::is_same_v<W, float> && std::is_same_v<T, float>) {
    // Row-major fp32 rows are the "rows" layout, and the "pairs" layout when the micro-kernel
    // may read whole 16-column vectors of every row (Note [Packed tile GEMMs]).
    if (how == Pack::Rows || (how == Pack::Pairs && D % 16 == 0 && t.ss % 16 == 0)) {
      r.input = static_cast<const float*>(t.base);
      r.ld = t.ss, r.heads = heads, r.sb = t.sb, r.sh = t.sh;
      return r;
    }
  }
  int64_t rows = 0, written = 0;  // rows of the pack, words written per row
  switch (how) {
    case Pack::Rows: rows = S, written = r.ld = mk::words<W>(D); break;
    case Pack::PairsT:
      rows = mk::words<W>(D), written = S, r.ld = mk::padded_ld(round_up(S, kNR));
      break;
    case Pack::Pairs: rows = mk::words<W>(S), written = D, r.ld = round_up(D, kNR); break;
    case Pack::RowsT: rows = D, written = mk::words<W>(S), r.ld = mk::padded_ld(written); break;
  }
  r.per_head = rows * r.ld;
  // Not zero-filled here: a serial fill of O(B H S D) fresh pages would take longer than the
  // packing itself. Each task writes its heads (first touch in parallel) and zeroes the words past
  // `written` in every row, which the micro-kernel may read as B columns past N.
  r.data.reset(new W[B * heads * r.per_head]);
  at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const T* src = row_ptr<T>(t, bh / heads, bh % heads, 0);
      W* dst = r.data.get() + bh * r.per_head;
      switch (how) {
        case Pack::Rows: mk::pack_rows(src, t.ss, S, D, dst, r.ld); break;
        case Pack::PairsT: mk::pack_pairs_t(src, t.ss, S, D, dst, r.ld); break;
        case Pack::Pairs: mk::pack_pairs(src, t.ss, S, D, dst, r.ld); break;
        case Pack::RowsT: mk::pack_rows_t(src, t.ss, S, D, dst, r.ld); break;
      }
      for (int64_t i = 0; i < rows; ++i)
        std::fill(dst + i * r.ld + written, dst + (i + 1) * r.ld, W(0));
    }
  });
  return r;
}

template <typename T>
void store_rows(const float* src, int64_t lds, T* dst, int64_t rows, int64_t D, const float* s) {
  for (int64_t r = 0; r < rows; ++r)
    store_row(src + r * lds, dst + r * D, D, s ? s[r] : 1.0f);
}

// dst (cols x D) = src^T, src D x cols with leading dimension lds.
template <typename T>
void store_transposed(const float* src, int64_t lds, T* dst, int64_t cols, int64_t D) {
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t d = 0; d < D; ++d)
      dst[c * D + d] = static_cast<T>(src[d * lds + c]);
}

// The micro-kernel word for inputs of type T: fp32 words, or bf16 pairs.
template <typename T>
using word_t = std::conditional_t<std::is_same_v<T, float>, float, uint32_t>;

template <typename T>
void fwd_impl(const Problem& p, const Layout& q, const Layout& k, const Layout& v, T* out,
              float* lse) {
  using W = word_t<T>;
  constexpr int64_t P = mk::kPack<W>;
  const int64_t BM = blocks().fwd_m, BN = round_up(blocks().fwd_n, kNR), lds = mk::padded_ld(BN);
  const int64_t D = p.D, dw = mk::words<W>(D), n_mtiles = (p.Sq + BM - 1) / BM;
  const auto kt = pack_heads<W, T>(k, p.B, p.Hkv, p.Sk, D, Pack::PairsT);
  const auto vn = pack_heads<W, T>(v, p.B, p.Hkv, p.Sk, D, Pack::Pairs);
  const float scale = static_cast<float>(p.scale);
  at::parallel_for(0, p.B * p.H * n_mtiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s_buf(BM * lds), o_acc(BM * D), m_run(BM), l_run(BM), inv_l(BM);
    // bf16 only: the Q tile and P packed as bf16 pairs (fp32 uses them as they are)
    std::vector<W> qa(P != 1 ? BM * dw : 0), pa(P != 1 ? BM * lds / P : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (p.H * n_mtiles), h = (t / n_mtiles) % p.H, mt = t % n_mtiles;
      const int64_t hk = h / p.group(), m0 = mt * BM, rows = std::min(BM, p.Sq - m0);
      const W* q_a = reinterpret_cast<const W*>(row_ptr<T>(q, b, h, m0));  // fp32: as is
      int64_t ldq = q.ss;
      if constexpr (P != 1) {
        mk::pack_rows(row_ptr<T>(q, b, h, m0), q.ss, rows, D, qa.data(), dw);
        q_a = qa.data();
        ldq = dw;
      }
      const W* kt_h = kt.head(b * p.Hkv + hk);
      const W* vn_h = vn.head(b * p.Hkv + hk);
      std::fill(o_acc.begin(), o_acc.begin() + rows * D, 0.0f);
      std::fill(m_run.begin(), m_run.end(), -std::numeric_limits<float>::infinity());
      std::fill(l_run.begin(), l_run.end(), 0.0f);
      const int64_t n_end = p.key_end(m0, rows);
      for (int64_t n0 = 0; n0 < n_end; n0 += BN) {
        const int64_t cols = std::min(BN, n_end - n0);
        float* S = s_buf.data();
        mk::gemm<W>(rows, cols, dw, scale, q_a, ldq, kt_h + n0, kt.ld, 0.0f, S, lds);
        online_softmax_tile(p, S, lds, m0, rows, n0, cols, m_run.data(), l_run.data(),
                            o_acc.data(), D);
        const W* pv_a = reinterpret_cast<const W*>(S);  // fp32: P is already in "rows" layout
        if constexpr (P != 1) {
          mk::pack_rows(S, lds, rows, cols, pa.data(), lds / P);
          pv_a = pa.data();
        }
        mk::gemm<W>(rows, D, mk::words<W>(cols), 1.0f, pv_a, lds / P, vn_h + (n0 / P) * vn.ld,
                    vn.ld, 1.0f, o_acc.data(), D);
      }
      float* lse_tile = lse + (b * p.H + h) * p.Sq + m0;
      for (int64_t r = 0; r < rows; ++r) {
        inv_l[r] = 1.0f / l_run[r];
        lse_tile[r] = m_run[r] + std::log(l_run[r]);
      }
      store_rows(o_acc.data(), D, out + ((b * p.H + h) * p.Sq + m0) * D, rows, D, inv_l.data());
    }
  });
}

template <typename W>
struct BwdPacks {
  Problem p;
  Packed<W> q_rows, do_rows, q_t, do_t;  // per query head
  Packed<W> k_pt, v_pt, k_pairs;         // per kv head
  const float *lse, *delta;
};

// Per-thread tiles: fp32 S/P and dP/dS, and (bf16 only: fp32 tiles are used as they are) their
// bf16 packs; all with leading dimension ld (words).
template <typename W>
struct BwdTiles {
  static constexpr bool kPacks = mk::kPack<W> != 1;
  int64_t ld;
  std::vector<float> P, dS;
  std::vector<W> p_pairs, ds_pairs, ds_rows;
  BwdTiles(int64_t BM, int64_t BN)
      : ld(mk::padded_ld(BN)), P(BM * ld), dS(BM * ld),
        p_pairs(kPacks ? mk::words<W>(BM) * ld : 0), ds_pairs(kPacks ? mk::words<W>(BM) * ld : 0),
        ds_rows(kPacks ? BM * ld / 2 : 0) {}
};

// One (query tile, key tile) pair of query head h: recomputes P and dS, then
//  dvT (D x cols, ld ldkv) += dO^T P,  dkT += scale Q^T dS   when dvT != nullptr,
//  dq (rows x D)            += scale dS K                     when dq != nullptr.
template <typename W>
void tile_pair(const BwdPacks<W>& a, BwdTiles<W>& w, int64_t b, int64_t h, int64_t hk,
               int64_t m0, int64_t rows, int64_t n0, int64_t cols, float* dvT, float* dkT,
               int64_t ldkv, float* dq) {
  constexpr int64_t P = mk::kPack<W>;
  const Problem& p = a.p;
  const int64_t D = p.D, dw = mk::words<W>(D), bh = b * p.H + h, bhk = b * p.Hkv + hk;
  const float scale = static_cast<float>(p.scale);
  const int64_t ld = w.ld;
  mk::gemm<W>(rows, cols, dw, scale, a.q_rows.head(bh) + m0 * a.q_rows.ld, a.q_rows.ld,
              a.k_pt.head(bhk) + n0, a.k_pt.ld, 0.0f, w.P.data(), ld);
  mk::gemm<W>(rows, cols, dw, 1.0f, a.do_rows.head(bh) + m0 * a.do_rows.ld, a.do_rows.ld,
              a.v_pt.head(bhk) + n0, a.v_pt.ld, 0.0f, w.dS.data(), ld);
  probs_and_dscores_rows(p, w.P.data(), w.dS.data(), ld, a.lse, a.delta, b, h, m0, rows, n0, cols);
  if (dvT != nullptr) {
    // fp32: the P and dS tiles already are "pairs" (row-major) B operands
    const W* p_b = reinterpret_cast<const W*>(w.P.data());
    const W* ds_b = reinterpret_cast<const W*>(w.dS.data());
    if constexpr (P != 1) {
      mk::pack_pairs(w.P.data(), ld, rows, cols, w.p_pairs.data(), ld);
      mk::pack_pairs(w.dS.data(), ld, rows, cols, w.ds_pairs.data(), ld);
      p_b = w.p_pairs.data();
      ds_b = w.ds_pairs.data();
    }
    const int64_t rw = mk::words<W>(rows);
    mk::gemm<W>(D, cols, rw, 1.0f, a.do_t.head(bh) + m0 / P, a.do_t.ld, p_b, ld, 1.0f, dvT, ldkv);
    mk::gemm<W>(D, cols, rw, scale, a.q_t.head(bh) + m0 / P, a.q_t.ld, ds_b, ld, 1.0f, dkT, ldkv);
  }
  if (dq != nullptr) {
    const W* ds_a = reinterpret_cast<const W*>(w.dS.data());
    if constexpr (P != 1) {
      mk::pack_rows(w.dS.data(), ld, rows, cols, w.ds_rows.data(), ld / P);
      ds_a = w.ds_rows.data();
    }
    mk::gemm<W>(rows, D, mk::words<W>(cols), scale, ds_a, ld / P,
                a.k_pairs.head(bhk) + (n0 / P) * a.k_pairs.ld, a.k_pairs.ld, 1.0f, dq, D);
  }
}

template <typename T>
void bwd_impl(const Problem& p, const Layout& q, const Layout& k, const Layout& v,
              const Layout& dout, const float* lse, const float* delta, T* dq, T* dk, T* dv) {
  using W = word_t<T>;
  // bf16: query tiles start at even rows, so that m0 / 2 addresses the Q^T / dO^T packs.
  const int64_t BM = round_up(blocks().bwd_m, mk::kPack<W>), BN = round_up(blocks().bwd_n, kNR);
  const int64_t D = p.D;
  const BwdPacks<W> a{p,
                      pack_heads<W, T>(q, p.B, p.H, p.Sq, D, Pack::Rows),
                      pack_heads<W, T>(dout, p.B, p.H, p.Sq, D, Pack::Rows),
                      pack_heads<W, T>(q, p.B, p.H, p.Sq, D, Pack::RowsT),
                      pack_heads<W, T>(dout, p.B, p.H, p.Sq, D, Pack::RowsT),
                      pack_heads<W, T>(k, p.B, p.Hkv, p.Sk, D, Pack::PairsT),
                      pack_heads<W, T>(v, p.B, p.Hkv, p.Sk, D, Pack::PairsT),
                      pack_heads<W, T>(k, p.B, p.Hkv, p.Sk, D, Pack::Pairs),
                      lse,
                      delta};
  if (p.B * p.Hkv >= 2 * at::get_num_threads()) {
    // By kv head (Note [CPU flash attention]): one task owns dK, dV of a kv head and dQ of its
    // query heads.
    at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
      BwdTiles<W> w(BM, BN);
      const int64_t ldkv = mk::padded_ld(p.Sk);
      std::vector<float> dq_acc(p.Sq * D), dkT(D * ldkv), dvT(D * ldkv);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / p.Hkv, hk = t % p.Hkv;
        std::fill(dkT.begin(), dkT.end(), 0.0f);
        std::fill(dvT.begin(), dvT.end(), 0.0f);
        for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
          std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
          for (int64_t n0 = 0; n0 < p.Sk; n0 += BN) {
            const int64_t cols = std::min(BN, p.Sk - n0);
            for (int64_t m0 = p.causal ? (n0 / BM) * BM : 0; m0 < p.Sq; m0 += BM) {
              tile_pair(a, w, b, h, hk, m0, std::min(BM, p.Sq - m0), n0, cols, dvT.data() + n0,
                        dkT.data() + n0, ldkv, dq_acc.data() + m0 * D);
            }
          }
          store_rows(dq_acc.data(), D, dq + (b * p.H + h) * p.Sq * D, p.Sq, D, nullptr);
        }
        store_transposed(dkT.data(), ldkv, dk + (b * p.Hkv + hk) * p.Sk * D, p.Sk, D);
        store_transposed(dvT.data(), ldkv, dv + (b * p.Hkv + hk) * p.Sk * D, p.Sk, D);
      }
    });
    return;
  }
  // By tile: a dK/dV pass over (batch, kv head, key tile), a dQ pass over (batch, head, query
  // tile).
  const int64_t n_ntiles = (p.Sk + BN - 1) / BN, n_mtiles = (p.Sq + BM - 1) / BM;
  at::parallel_for(0, p.B * p.Hkv * n_ntiles, 1, [&](int64_t begin, int64_t end) {
    BwdTiles<W> w(BM, BN);
    const int64_t ldkv = mk::padded_ld(BN);
    std::vector<float> dkT(D * ldkv), dvT(D * ldkv);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (p.Hkv * n_ntiles), hk = (t / n_ntiles) % p.Hkv;
      const int64_t n0 = (t % n_ntiles) * BN, cols = std::min(BN, p.Sk - n0);
      std::fill(dkT.begin(), dkT.end(), 0.0f);
      std::fill(dvT.begin(), dvT.end(), 0.0f);
      for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
        for (int64_t m0 = p.causal ? (n0 / BM) * BM : 0; m0 < p.Sq; m0 += BM) {
          tile_pair(a, w, b, h, hk, m0, std::min(BM, p.Sq - m0), n0, cols, dvT.data(),
                    dkT.data(), ldkv, nullptr);
        }
      }
      store_transposed(dkT.data(), ldkv, dk + ((b * p.Hkv + hk) * p.Sk + n0) * D, cols, D);
      store_transposed(dvT.data(), ldkv, dv + ((b * p.Hkv + hk) * p.Sk + n0) * D, cols, D);
    }
  });
  at::parallel_for(0, p.B * p.H * n_mtiles, 1, [&](int64_t begin, int64_t end) {
    BwdTiles<W> w(BM, BN);
    std::vector<float> dq_acc(BM * D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (p.H * n_mtiles), h = (t / n_mtiles) % p.H, hk = h / p.group();
      const int64_t m0 = (t % n_mtiles) * BM, rows = std::min(BM, p.Sq - m0);
      std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
      const int64_t n_end = p.key_end(m0, rows);
      for (int64_t n0 = 0; n0 < n_end; n0 += BN) {
        tile_pair(a, w, b, h, hk, m0, rows, n0, std::min(BN, p.Sk - n0), nullptr, nullptr, 0,
                  dq_acc.data());
      }
      store_rows(dq_acc.data(), D, dq + ((b * p.H + h) * p.Sq + m0) * D, rows, D, nullptr);
    }
  });
}

}  // namespace

void fwd_packed(const Problem& p, const Layout& q, const Layout& k, const Layout& v,
                const at::Tensor& out, float* lse) {
  if (out.scalar_type() == at::kBFloat16) {
    fwd_impl(p, q, k, v, out.data_ptr<c10::BFloat16>(), lse);
  } else {
    fwd_impl(p, q, k, v, out.data_ptr<float>(), lse);
  }
}

void bwd_packed(const Problem& p, const Layout& q, const Layout& k, const Layout& v,
                const Layout& dout, const float* lse, const float* delta, const at::Tensor& dq,
                const at::Tensor& dk, const at::Tensor& dv) {
  if (dq.scalar_type() == at::kBFloat16) {
    bwd_impl(p, q, k, v, dout, lse, delta, dq.data_ptr<c10::BFloat16>(),
             dk.data_ptr<c10::BFloat16>(), dv.data_ptr<c10::BFloat16>());
  } else {
    bwd_impl(p, q, k, v, dout, lse, delta, dq.data_ptr<float>(), dk.data_ptr<float>(),
             dv.data_ptr<float>());
  }
}

bool packed_kernels_available(at::ScalarType t) {
  if (t == at::kFloat)
    return mk::available<float>();
  if (t == at::kBFloat16)
    return mk::available<uint32_t>();
  return false;
}

}  // namespace torchlane::attention::cpu
