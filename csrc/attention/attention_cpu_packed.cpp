// CPU attention on the packed AVX-512 micro-kernels (Note [Packed tile GEMMs]): fp32 inputs with
// fp32 GEMMs, bf16 inputs with bf16 x bf16 -> fp32 GEMMs. See Note [Packed attention on the CPU].
#include "attention/cpu_vec.h"  // first: selects the vector ISA, see its Note

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "attention/cpu_common.h"
#include "attention/cpu_microkernel.h"
#include "attention/cpu_workspace.h"

// Note [Packed attention on the CPU]
// Same tiles, online softmax, masking and schedules as Note [CPU flash attention], with the GEMMs
// on the micro-kernels of Note [Packed tile GEMMs] instead of BLAS calls. The operands are packed
// into the micro-kernel's layouts, O(S D) each, and the P / dS tiles as they are produced; fp32
// inputs already in a layout are used as they are. The forward and the by-head backward schedules
// pack one kv head / query head at a time into per-thread workspaces (Note [Per-thread buffers]),
// the backward walking the keys in chunks (see bwd_by_head); the by-tile backward packs K^T, V^T,
// K, Q^T, dO^T for the whole tensors once per call. dK and dV are accumulated transposed
// (dK^T += Q^T dS), so that the tile packed with the reduction over query rows is the B operand
// and the per-head Q^T / dO^T packs are the A operand. Leading dimensions are padded
// (mk::padded_ld) so that the rows of a tile do not compete for the same L1 sets; K^T, V^T, Q^T,
// dO^T and the dK^T / dV^T accumulators are kept in blocks of a tile (Note [Blocked packs]). The
// GEMMs producing S leave it unscaled when the scale is positive: the softmax applies it in its
// exp, and (bf16) writes P straight into its bf16 pack.
// S, P, dP, dS and all accumulators are fp32. For bf16 inputs the GEMM operands are bf16, as in
// FlashAttention on GPUs: P is rounded to bf16 before P V (and dV += P^T dO), dS before dQ and dK.

namespace torchlane::attention::cpu {
namespace {

using mk::kNR;
using mk::round_up;

// Per-(batch, head) operands: packed copies, heads back to back, or (fp32 inputs already in the
// layout) the input itself, at its batch and head strides.
template <typename W>
struct Packed {
  AlignedArray<W> data;  // allocated uninitialised: see pack_heads
  int64_t per_head = 0, ld = 0;
  const W* input = nullptr;  // set when the input is used as is
  int64_t heads = 1, sb = 0, sh = 0;
  const W* head(int64_t bh) const {
    if (input != nullptr)
      return input + (bh / heads) * sb + (bh % heads) * sh;
    return data.data() + bh * per_head;
  }
};

enum class Pack { Rows, PairsT, Pairs, RowsT };

// Words of one packed S x D matrix (S positions of a head, D features) in each layout:
//  Rows:   S rows of words(D)                 (A operand, reduction over D)
//  PairsT: words(D) rows of ~round_up(S)      (B operand, reduction over D, columns = positions)
//  Pairs:  words(S) rows of round_up(D)       (B operand, reduction over positions, columns = D)
//  RowsT:  D rows of ~words(S)                (A operand, reduction over positions, rows = D)
// `written` words of every row hold data; the rest of the row (up to ld) is zeroed.
struct PackShape {
  int64_t rows, written, ld;
};

template <typename W>
PackShape pack_shape(Pack how, int64_t S, int64_t D) {
  switch (how) {
    case Pack::Rows:
      return {S, mk::words<W>(D), mk::words<W>(D)};
    case Pack::PairsT:
      return {mk::words<W>(D), S, mk::padded_ld(round_up(S, kNR))};
    case Pack::Pairs:
      return {mk::words<W>(S), D, mk::padded_ld(round_up(D, kNR))};
    case Pack::RowsT:
      return {D, mk::words<W>(S), mk::padded_ld(mk::words<W>(S))};
  }
  return {0, 0, 0};
}

// True when the row-major fp32 input (row stride ss) already is the layout: the "rows" layout,
// and the "pairs" layout when the micro-kernel may read whole 16-column vectors of every row
// (Note [Packed tile GEMMs]).
template <typename W, typename T>
bool usable_as_is(Pack how, int64_t D, int64_t ss) {
  if constexpr (std::is_same_v<W, float> && std::is_same_v<T, float>)
    return how == Pack::Rows || (how == Pack::Pairs && D % 16 == 0 && ss % 16 == 0);
  return false;
}

// Packs the S x D matrix src (row stride ld_src) into dst with the given shape (sh.ld apart).
template <typename W, typename T>
void pack_matrix(const T* src, int64_t ld_src, int64_t S, int64_t D, Pack how, const PackShape& sh,
                 W* dst) {
  switch (how) {
    case Pack::Rows:
      mk::pack_rows(src, ld_src, S, D, dst, sh.ld);
      break;
    case Pack::PairsT:
      mk::pack_pairs_t(src, ld_src, S, D, dst, sh.ld);
      break;
    case Pack::Pairs:
      mk::pack_pairs(src, ld_src, S, D, dst, sh.ld);
      break;
    case Pack::RowsT:
      mk::pack_rows_t(src, ld_src, S, D, dst, sh.ld);
      break;
  }
  for (int64_t i = 0; i < sh.rows; ++i)
    std::fill(dst + i * sh.ld + sh.written, dst + (i + 1) * sh.ld, W(0));
}

// A packed matrix or tile: word (row, col) at ptr[row * ld + col].
template <typename W>
struct View {
  const W* ptr;
  int64_t ld;
};

// Words pack_or_view needs for the S x D matrix (row stride ld_src) in layout `how`.
template <typename W, typename T>
int64_t pack_words(Pack how, int64_t S, int64_t D, int64_t ld_src) {
  if (usable_as_is<W, T>(how, D, ld_src))
    return 0;
  const PackShape sh = pack_shape<W>(how, S, D);
  return sh.rows * sh.ld;
}

// The S x D matrix src in layout `how`: src itself where usable as is, else packed into dst
// (pack_words words).
template <typename W, typename T>
View<W> pack_or_view(const T* src, int64_t ld_src, int64_t S, int64_t D, Pack how, W* dst) {
  if (usable_as_is<W, T>(how, D, ld_src))
    return {reinterpret_cast<const W*>(src), ld_src};
  const PackShape sh = pack_shape<W>(how, S, D);
  pack_matrix(src, ld_src, S, D, how, sh, dst);
  return {dst, sh.ld};
}

// Releases, at the end of a task, the AMX tiles its bf16 GEMMs may have configured (Note [AMX
// tile GEMMs]).
template <typename W>
struct ReleaseTiles {
  ~ReleaseTiles() {
    if constexpr (!std::is_same_v<W, float>)
      mk::release_tiles();
  }
};

// Note [Blocked packs]
// One head's S x D matrix packed in blocks of BS positions (keys or queries), each block in
// layout `how` on its own (S = BS), block_words() apart: K^T / V^T ("pairs" of the transpose,
// reduction over D) in blocks of the key tile, Q^T / dO^T ("rows" of the transpose, reduction
// over query rows) in blocks of the query tile. A GEMM then reads a tile's rows ~BS words apart
// instead of ~S. With rows S apart (8 KiB at S = 2048) every row of a tile is on its own 4 KiB
// page: the hardware prefetchers do not follow such strides (the L2 streamer stays within a
// page), and each micro-kernel step waited on L2. Measured on the 2-core Xeon, the backward's
// GEMM sequence for one head (S = 2048, D = 128, fp32, a harness around mk::gemm): S and dP
// GEMMs 121-128 -> 141-150 GFLOP/s with blocked K^T / V^T, the dK^T / dV^T GEMMs 120 -> 140-154
// with blocked Q^T / dO^T and the dK^T / dV^T accumulators also kept in blocks of the key tile
// (D rows of ~BN words each, see bwd_by_head); for AMX tile loads (bf16) the same spread cost a
// third of the forward's GEMM time (Note [Per-thread buffers]).
template <typename W>
struct Blocked {
  Pack how;
  int64_t S, D, BS;
  PackShape block_shape() const {
    return pack_shape<W>(how, BS, D);
  }
  int64_t block_words() const {
    return block_shape().rows * block_shape().ld;
  }
  int64_t words() const {
    return (S + BS - 1) / BS * block_words();
  }
  // Packs src (row stride ss) into dst (words() words); the view's ptr is block 0.
  template <typename T>
  View<W> pack(const T* src, int64_t ss, W* dst) const {
    const PackShape full = block_shape();
    for (int64_t j = 0; j * BS < S; ++j) {
      const int64_t n = std::min(BS, S - j * BS);
      PackShape block = pack_shape<W>(how, n, D);
      block.ld = full.ld;
      pack_matrix(src + j * BS * ss, ss, n, D, how, block, dst + j * block_words());
    }
    return {dst, full.ld};
  }
  // The block holding position i (a multiple of BS) of the packed view v.
  const W* block(const View<W>& v, int64_t i) const {
    return v.ptr + (i / BS) * block_words();
  }
};

// Packs every (b, head) S x D matrix of t (heads = its second dimension) as `shape` (Note
// [Blocked packs]; one block of S positions for an unblocked layout).
template <typename W, typename T>
Packed<W> pack_heads(const Layout& t, int64_t B, int64_t heads, const Blocked<W>& shape) {
  Packed<W> r;
  if (shape.BS >= shape.S && usable_as_is<W, T>(shape.how, shape.D, t.ss)) {
    r.input = static_cast<const W*>(t.base);
    r.ld = t.ss, r.heads = heads, r.sb = t.sb, r.sh = t.sh;
    return r;
  }
  r.ld = shape.block_shape().ld;
  r.per_head = shape.words();
  // Not zero-filled here: a serial fill of O(B H S D) fresh pages would take longer than the
  // packing itself; every task writes (first touches) its heads, row tails included.
  r.data = AlignedArray<W>(B * heads * r.per_head, Huge::kYes);
  at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh)
      shape.pack(row_ptr<T>(t, bh / heads, bh % heads, 0), t.ss, r.data.data() + bh * r.per_head);
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
  const auto* s = reinterpret_cast<const uint32_t*>(src);
  if constexpr (std::is_same_v<T, float>) {
    mk::transpose_words(s, lds, D, cols, reinterpret_cast<uint32_t*>(dst), D);
  } else {  // 16 columns at a time through an fp32 block
    float block[16 * 256];
    const int64_t d_step = 256;
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t nc = std::min<int64_t>(16, cols - c0);
      for (int64_t d0 = 0; d0 < D; d0 += d_step) {
        const int64_t nd = std::min(d_step, D - d0);
        mk::transpose_words(s + d0 * lds + c0, lds, nd, nc, reinterpret_cast<uint32_t*>(block),
                            d_step);
        for (int64_t c = 0; c < nc; ++c)
          store_row(block + c * d_step, dst + (c0 + c) * D + d0, nd, 1.0f);
      }
    }
  }
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
  const int64_t ldo = mk::padded_ld(D);  // o_acc
  // The softmax applies a positive scale to the raw scores (the GEMM's tiles need no epilogue);
  // a negative one goes into the GEMM, since the row max of scale * S is no longer scale * max.
  const float scale = static_cast<float>(p.scale);
  const float s_alpha = scale > 0.0f ? 1.0f : scale, s_scale = scale > 0.0f ? scale : 1.0f;
  at::parallel_for(0, p.B * p.H * n_mtiles, 1, [&](int64_t begin, int64_t end) {
    ReleaseTiles<W> release_tiles;
    // o_acc, S, m_run, l_run, inv_l; bf16 only: the Q tile and P packed as bf16 pairs (fp32
    // uses them as they are); K^T and V of one (batch, kv head)
    const Blocked<W> kt_shape{Pack::PairsT, p.Sk, D, BN};
    Workspace ws;
    const int64_t o_off = ws.reserve<float>(BM * ldo), s_off = ws.reserve<float>(BM * lds);
    const int64_t m_off = ws.reserve<float>(BM), l_off = ws.reserve<float>(BM);
    const int64_t i_off = ws.reserve<float>(BM);
    const int64_t qa_off = ws.reserve<W>(P != 1 ? BM * dw : 0);
    const int64_t pa_off = ws.reserve<W>(P != 1 ? BM * lds / P : 0);
    const int64_t kt_off = ws.reserve<W>(kt_shape.words());
    const int64_t vn_off = ws.reserve<W>(pack_words<W, T>(Pack::Pairs, p.Sk, D, v.ss));
    ws.allocate();
    float* o_acc = ws.at<float>(o_off);
    float* s_buf = ws.at<float>(s_off);
    float* m_run = ws.at<float>(m_off);
    float* l_run = ws.at<float>(l_off);
    float* inv_l = ws.at<float>(i_off);
    W* qa = ws.at<W>(qa_off);
    W* pa = ws.at<W>(pa_off);
    // K^T and V are packed when a task of another (batch, kv head) comes up: a thread's tasks are
    // a contiguous range, so each is packed about once per thread.
    int64_t packed = -1;
    View<W> kt{nullptr, 0}, vn{nullptr, 0};
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (p.H * n_mtiles), h = (t / n_mtiles) % p.H, mt = t % n_mtiles;
      const int64_t hk = h / p.group(), m0 = mt * BM, rows = std::min(BM, p.Sq - m0);
      if (b * p.Hkv + hk != packed) {
        packed = b * p.Hkv + hk;
        kt = kt_shape.pack(row_ptr<T>(k, b, hk, 0), k.ss, ws.at<W>(kt_off));
        vn = pack_or_view(row_ptr<T>(v, b, hk, 0), v.ss, p.Sk, D, Pack::Pairs, ws.at<W>(vn_off));
      }
      const W* q_a = reinterpret_cast<const W*>(row_ptr<T>(q, b, h, m0));  // fp32: as is
      int64_t ldq = q.ss;
      if constexpr (P != 1) {
        mk::pack_rows(row_ptr<T>(q, b, h, m0), q.ss, rows, D, qa, dw);
        q_a = qa;
        ldq = dw;
      }
      const W* vn_h = vn.ptr;
      std::fill(o_acc, o_acc + rows * ldo, 0.0f);
      std::fill(m_run, m_run + BM, -std::numeric_limits<float>::infinity());
      std::fill(l_run, l_run + BM, 0.0f);
      const int64_t n_end = p.key_end(m0, rows);
      for (int64_t n0 = 0; n0 < n_end; n0 += BN) {
        const int64_t cols = std::min(BN, n_end - n0);
        float* S = s_buf;
        mk::gemm<W>(rows, cols, dw, s_alpha, q_a, ldq, kt_shape.block(kt, n0), kt.ld, 0.0f, S, lds);
        // P in place of S (fp32, already in "rows" layout), or straight into its bf16 pack
        const W* pv_a = reinterpret_cast<const W*>(S);
        if constexpr (P != 1) {
          auto* pb = reinterpret_cast<c10::BFloat16*>(pa);
          online_softmax_tile(p, S, lds, s_scale, m0, rows, n0, cols, m_run, l_run, o_acc, D, ldo,
                              pb, lds);
          pv_a = pa;
        } else {
          online_softmax_tile(p, S, lds, s_scale, m0, rows, n0, cols, m_run, l_run, o_acc, D, ldo,
                              S, lds);
        }
        mk::gemm<W>(rows, D, mk::words<W>(cols), 1.0f, pv_a, lds / P, vn_h + (n0 / P) * vn.ld,
                    vn.ld, 1.0f, o_acc, ldo);
      }
      float* lse_tile = lse + (b * p.H + h) * p.Sq + m0;
      for (int64_t r = 0; r < rows; ++r) {
        inv_l[r] = l_run[r] == 0.0f ? 0.0f : 1.0f / l_run[r];  // Note [Softmax max subtraction]
        lse_tile[r] = m_run[r] + std::log(l_run[r]);
      }
      store_rows(o_acc, ldo, out + ((b * p.H + h) * p.Sq + m0) * D, rows, D, inv_l);
    }
  });
}

// Per-thread tiles: fp32 S/P and dP/dS, and (bf16 only: fp32 tiles are used as they are) their
// bf16 packs; all with leading dimension ld (words).
template <typename W>
struct BwdTiles {
  static constexpr bool kPacks = mk::kPack<W> != 1;
  int64_t ld;
  AlignedArray<float> P, dS;
  AlignedArray<W> p_pairs, ds_pairs, ds_rows;
  BwdTiles(int64_t BM, int64_t BN)
      : ld(mk::padded_ld(BN)),
        P(BM * ld, Huge::kNo),
        dS(BM * ld, Huge::kNo),
        p_pairs(kPacks ? mk::words<W>(BM) * ld : 0, Huge::kNo),
        ds_pairs(kPacks ? mk::words<W>(BM) * ld : 0, Huge::kNo),
        ds_rows(kPacks ? BM * ld / 2 : 0, Huge::kNo) {}
};

// The GEMM operands of one (query tile m0, key tile n0) pair, each at the tile's first word:
template <typename W>
struct PairOperands {
  View<W> q, dout;    // Q, dO rows m0..: "rows" layout, reduction over D
  View<W> qT, doutT;  // Q^T, dO^T of the query tile: "rows" layout, reduction over query rows
  View<W> kT, vT;     // K^T, V^T at key column n0: "pairs" layout, reduction over D
  View<W> k;          // K at key n0: "pairs" layout, reduction over keys (dQ only)
};

// One (query tile, key tile) pair of query head h: recomputes P and dS, then
//  dvT (D x cols, ld ldkv) += dO^T P,  dkT += scale Q^T dS   when dvT != nullptr,
//  dq (rows x D)            += scale dS K                     when dq != nullptr.
template <typename W>
void tile_pair(const Problem& p, const float* lse, const float* delta, BwdTiles<W>& w,
               const PairOperands<W>& o, int64_t b, int64_t h, int64_t m0, int64_t rows, int64_t n0,
               int64_t cols, float* dvT, float* dkT, int64_t ldkv, float* dq) {
  constexpr int64_t P = mk::kPack<W>;
  const int64_t D = p.D, dw = mk::words<W>(D), ld = w.ld;
  const float scale = static_cast<float>(p.scale);
  mk::gemm<W>(rows, cols, dw, 1.0f, o.q.ptr, o.q.ld, o.kT.ptr, o.kT.ld, 0.0f, w.P.data(), ld);
  mk::gemm<W>(rows, cols, dw, 1.0f, o.dout.ptr, o.dout.ld, o.vT.ptr, o.vT.ld, 0.0f, w.dS.data(),
              ld);
  probs_and_dscores_rows(p, w.P.data(), w.dS.data(), ld, scale, lse, delta, b, h, m0, rows, n0,
                         cols);
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
    mk::gemm<W>(D, cols, rw, 1.0f, o.doutT.ptr, o.doutT.ld, p_b, ld, 1.0f, dvT, ldkv);
    mk::gemm<W>(D, cols, rw, scale, o.qT.ptr, o.qT.ld, ds_b, ld, 1.0f, dkT, ldkv);
  }
  if (dq != nullptr) {
    const W* ds_a = reinterpret_cast<const W*>(w.dS.data());
    if constexpr (P != 1) {
      mk::pack_rows(w.dS.data(), ld, rows, cols, w.ds_rows.data(), ld / P);
      ds_a = w.ds_rows.data();
    }
    mk::gemm<W>(rows, D, mk::words<W>(cols), scale, ds_a, ld / P, o.k.ptr, o.k.ld, 1.0f, dq, D);
  }
}

// acc[i] += part[i], i < n.
inline void add_into(float* acc, const float* part, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    acc[i] += part[i];
}

// Note [Backward summation order]
// All three backward schedules (Note [CPU flash attention]; bwd_impl picks one) add the same
// numbers in the same order, so their results are bitwise identical:
//  - dQ of a query tile: over key tiles in increasing order;
//  - dK, dV of a kv head: each query head's contribution (over query tiles in increasing order)
//    as a partial sum from zero, then the partial sums over the group's query heads in
//    increasing order (for MHA the one partial sum is the result).

// By head: with per_q_head false, one task per (batch, kv head) owns dK, dV of that kv head and
// dQ of its query heads; with per_q_head true (GQA / MQA with fewer kv heads than threads), one
// task per (batch, query head) owns its dQ and its partial sums of dK, dV, reduced over each
// group afterwards. Nothing is packed for the whole tensors: a task packs the kv head's K^T, V^T
// (and K) and the query head's Q^T, dO^T (and bf16 Q, dO) into its thread's workspace (Note
// [Per-thread buffers]). Keys are taken in chunks of KC (a multiple of BN): all query tiles meet
// one chunk before the next, so the chunk's dK^T / dV^T accumulators and K^T / V^T tiles stay in
// cache.
template <typename T>
void bwd_by_head(const Problem& p, const Layout& q, const Layout& k, const Layout& v,
                 const Layout& dout, const float* lse, const float* delta, T* dq, T* dk, T* dv,
                 int64_t BM, int64_t BN, int64_t kc_floats, bool per_q_head) {
  using W = word_t<T>;
  const int64_t D = p.D, G = p.group();
  const int64_t KC = std::max<int64_t>(BN, kc_floats / D / BN * BN);
  // dK^T and dV^T of a head in blocks of BN keys (Note [Blocked packs]): block j, D rows of ldb
  // floats, holds keys j * BN..; acc_n floats for each of dK^T, dV^T
  const int64_t n_ntiles = (p.Sk + BN - 1) / BN, ldb = mk::padded_ld(BN);
  const int64_t blk_n = D * ldb, acc_n = n_ntiles * blk_n;
  const Blocked<W> t_shape{Pack::PairsT, p.Sk, D, BN};  // K^T, V^T
  const Blocked<W> qt_shape{Pack::RowsT, p.Sq, D, BM};  // Q^T, dO^T
  // per_q_head: dK^T, dV^T partial sums of every (batch, query head), 2 * acc_n floats each
  AlignedArray<float> partials(per_q_head ? p.B * p.H * 2 * acc_n : 0, Huge::kYes);
  at::parallel_for(0, per_q_head ? p.B * p.H : p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    ReleaseTiles<W> release_tiles;
    BwdTiles<W> w(BM, BN);
    Workspace ws;
    const int64_t kt_off = ws.reserve<W>(t_shape.words());
    const int64_t vt_off = ws.reserve<W>(t_shape.words());
    const int64_t kp_off = ws.reserve<W>(pack_words<W, T>(Pack::Pairs, p.Sk, D, k.ss));
    const int64_t q_off = ws.reserve<W>(pack_words<W, T>(Pack::Rows, p.Sq, D, q.ss));
    const int64_t do_off = ws.reserve<W>(pack_words<W, T>(Pack::Rows, p.Sq, D, dout.ss));
    const int64_t qt_off = ws.reserve<W>(qt_shape.words());
    const int64_t dot_off = ws.reserve<W>(qt_shape.words());
    // fp32: dQ accumulates in the output itself
    constexpr bool kDqInPlace = std::is_same_v<T, float>;
    const int64_t dq_off = ws.reserve<float>(kDqInPlace ? 0 : p.Sq * D);
    // by kv head: dK^T, dV^T of the kv head, and (GQA) one query head's partial sums of them
    const int64_t acc_off = ws.reserve<float>(per_q_head ? 0 : (G > 1 ? 4 : 2) * acc_n);
    ws.allocate();
    float* dq_acc = ws.at<float>(dq_off);
    int64_t packed = -1;
    View<W> kt{nullptr, 0}, vt{nullptr, 0}, kp{nullptr, 0};
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = per_q_head ? t / p.H : t / p.Hkv;
      const int64_t hk = per_q_head ? (t % p.H) / G : t % p.Hkv;
      const int64_t h_begin = per_q_head ? t % p.H : hk * G;
      const int64_t h_end = per_q_head ? h_begin + 1 : h_begin + G;
      float* dkT = per_q_head ? partials.data() + t * 2 * acc_n : ws.at<float>(acc_off);
      float* dvT = dkT + acc_n;
      if (b * p.Hkv + hk != packed) {  // a thread's tasks are a contiguous range
        packed = b * p.Hkv + hk;
        kt = t_shape.pack(row_ptr<T>(k, b, hk, 0), k.ss, ws.at<W>(kt_off));
        vt = t_shape.pack(row_ptr<T>(v, b, hk, 0), v.ss, ws.at<W>(vt_off));
        kp = pack_or_view(row_ptr<T>(k, b, hk, 0), k.ss, p.Sk, D, Pack::Pairs, ws.at<W>(kp_off));
      }
      for (int64_t h = h_begin; h < h_end; ++h) {
        // the first query head adds into the result, the others into partial sums added to it
        float* pk = h == h_begin ? dkT : dkT + 2 * acc_n;
        float* pv = pk + acc_n;
        std::fill(pk, pk + 2 * acc_n, 0.0f);
        const T* q_src = row_ptr<T>(q, b, h, 0);
        const T* do_src = row_ptr<T>(dout, b, h, 0);
        const View<W> qr = pack_or_view(q_src, q.ss, p.Sq, D, Pack::Rows, ws.at<W>(q_off));
        const View<W> dor = pack_or_view(do_src, dout.ss, p.Sq, D, Pack::Rows, ws.at<W>(do_off));
        const View<W> qt = qt_shape.pack(q_src, q.ss, ws.at<W>(qt_off));
        const View<W> dot = qt_shape.pack(do_src, dout.ss, ws.at<W>(dot_off));
        T* dq_h = dq + (b * p.H + h) * p.Sq * D;
        float* dq_sum = kDqInPlace ? reinterpret_cast<float*>(dq_h) : dq_acc;
        std::fill(dq_sum, dq_sum + p.Sq * D, 0.0f);
        for (int64_t kc0 = 0; kc0 < p.Sk; kc0 += KC) {
          for (int64_t m0 = 0; m0 < p.Sq; m0 += BM) {
            const int64_t rows = std::min(BM, p.Sq - m0);
            const int64_t n_end = std::min(kc0 + KC, p.key_end(m0, rows));
            PairOperands<W> o;
            o.q = {qr.ptr + m0 * qr.ld, qr.ld};
            o.dout = {dor.ptr + m0 * dor.ld, dor.ld};
            o.qT = {qt_shape.block(qt, m0), qt.ld};
            o.doutT = {qt_shape.block(dot, m0), dot.ld};
            for (int64_t n0 = kc0; n0 < n_end; n0 += BN) {
              o.kT = {t_shape.block(kt, n0), kt.ld};
              o.vT = {t_shape.block(vt, n0), vt.ld};
              o.k = {kp.ptr + (n0 / mk::kPack<W>)*kp.ld, kp.ld};
              const int64_t blk = (n0 / BN) * blk_n;
              tile_pair(p, lse, delta, w, o, b, h, m0, rows, n0, std::min(BN, p.Sk - n0), pv + blk,
                        pk + blk, ldb, dq_sum + m0 * D);
            }
          }
        }
        if (pk != dkT)
          add_into(dkT, pk, 2 * acc_n);  // dK^T and dV^T are adjacent
        if constexpr (!kDqInPlace)
          store_rows(dq_acc, D, dq_h, p.Sq, D, nullptr);
      }
      if (!per_q_head) {
        for (int64_t j = 0; j < n_ntiles; ++j) {
          const int64_t n0 = j * BN, cols = std::min(BN, p.Sk - n0);
          store_transposed(dkT + j * blk_n, ldb, dk + ((b * p.Hkv + hk) * p.Sk + n0) * D, cols, D);
          store_transposed(dvT + j * blk_n, ldb, dv + ((b * p.Hkv + hk) * p.Sk + n0) * D, cols, D);
        }
      }
    }
  });
  if (!per_q_head)
    return;
  // Each group's partial sums, in query head order, into its first one, then stored: tasks of
  // (batch, kv head, key tile).
  at::parallel_for(0, p.B * p.Hkv * n_ntiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bhk = t / n_ntiles, j = t % n_ntiles;
      const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv;
      const int64_t n0 = j * BN, cols = std::min(BN, p.Sk - n0);
      float* first = partials.data() + (b * p.H + hk * G) * 2 * acc_n + j * blk_n;
      for (int64_t g = 1; g < G; ++g) {
        const float* part = first + g * 2 * acc_n;
        add_into(first, part, blk_n);                  // dK^T
        add_into(first + acc_n, part + acc_n, blk_n);  // dV^T
      }
      store_transposed(first, ldb, dk + (bhk * p.Sk + n0) * D, cols, D);
      store_transposed(first + acc_n, ldb, dv + (bhk * p.Sk + n0) * D, cols, D);
    }
  });
}

// By tile, for few (batch, kv head) pairs: a dK/dV pass over (batch, kv head, key tile), a dQ
// pass over (batch, head, query tile), on operands packed once for the whole tensors.
template <typename T>
void bwd_by_tile(const Problem& p, const Layout& q, const Layout& k, const Layout& v,
                 const Layout& dout, const float* lse, const float* delta, T* dq, T* dk, T* dv,
                 int64_t BM, int64_t BN) {
  using W = word_t<T>;
  constexpr int64_t P = mk::kPack<W>;
  const int64_t D = p.D;
  const Blocked<W> q_shape{Pack::Rows, p.Sq, D, p.Sq}, kp_shape{Pack::Pairs, p.Sk, D, p.Sk};
  // Q^T, dO^T in blocks of the query tile, K^T, V^T of the key tile (Note [Blocked packs])
  const Blocked<W> t_shape{Pack::PairsT, p.Sk, D, BN}, qt_shape{Pack::RowsT, p.Sq, D, BM};
  const auto q_rows = pack_heads<W, T>(q, p.B, p.H, q_shape);
  const auto do_rows = pack_heads<W, T>(dout, p.B, p.H, q_shape);
  const auto q_t = pack_heads<W, T>(q, p.B, p.H, qt_shape);
  const auto do_t = pack_heads<W, T>(dout, p.B, p.H, qt_shape);
  const auto k_pt = pack_heads<W, T>(k, p.B, p.Hkv, t_shape);
  const auto v_pt = pack_heads<W, T>(v, p.B, p.Hkv, t_shape);
  const auto k_pairs = pack_heads<W, T>(k, p.B, p.Hkv, kp_shape);
  auto operands = [&](int64_t bh, int64_t bhk, int64_t m0, int64_t n0) {
    PairOperands<W> o;
    o.q = {q_rows.head(bh) + m0 * q_rows.ld, q_rows.ld};
    o.dout = {do_rows.head(bh) + m0 * do_rows.ld, do_rows.ld};
    o.qT = {qt_shape.block({q_t.head(bh), q_t.ld}, m0), q_t.ld};
    o.doutT = {qt_shape.block({do_t.head(bh), do_t.ld}, m0), do_t.ld};
    o.kT = {t_shape.block({k_pt.head(bhk), k_pt.ld}, n0), k_pt.ld};
    o.vT = {t_shape.block({v_pt.head(bhk), v_pt.ld}, n0), v_pt.ld};
    o.k = {k_pairs.head(bhk) + (n0 / P) * k_pairs.ld, k_pairs.ld};
    return o;
  };
  const int64_t n_ntiles = (p.Sk + BN - 1) / BN, n_mtiles = (p.Sq + BM - 1) / BM;
  at::parallel_for(0, p.B * p.Hkv * n_ntiles, 1, [&](int64_t begin, int64_t end) {
    ReleaseTiles<W> release_tiles;
    BwdTiles<W> w(BM, BN);
    const int64_t ldkv = mk::padded_ld(BN), acc_n = D * ldkv;
    // dK^T, dV^T of the key tile, then (GQA) one query head's partial sums of them (Note
    // [Backward summation order])
    AlignedArray<float> acc((p.group() > 1 ? 4 : 2) * acc_n, Huge::kNo);
    float *dkT = acc.data(), *dvT = dkT + acc_n;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (p.Hkv * n_ntiles), hk = (t / n_ntiles) % p.Hkv;
      const int64_t n0 = (t % n_ntiles) * BN, cols = std::min(BN, p.Sk - n0);
      const int64_t h_begin = hk * p.group(), h_end = h_begin + p.group();
      for (int64_t h = h_begin; h < h_end; ++h) {
        float* pk = h == h_begin ? dkT : dkT + 2 * acc_n;
        std::fill(pk, pk + 2 * acc_n, 0.0f);
        for (int64_t m0 = p.causal ? (n0 / BM) * BM : 0; m0 < p.Sq; m0 += BM) {
          tile_pair(p, lse, delta, w, operands(b * p.H + h, b * p.Hkv + hk, m0, n0), b, h, m0,
                    std::min(BM, p.Sq - m0), n0, cols, pk + acc_n, pk, ldkv, nullptr);
        }
        if (pk != dkT)
          add_into(dkT, pk, 2 * acc_n);
      }
      store_transposed(dkT, ldkv, dk + ((b * p.Hkv + hk) * p.Sk + n0) * D, cols, D);
      store_transposed(dvT, ldkv, dv + ((b * p.Hkv + hk) * p.Sk + n0) * D, cols, D);
    }
  });
  at::parallel_for(0, p.B * p.H * n_mtiles, 1, [&](int64_t begin, int64_t end) {
    ReleaseTiles<W> release_tiles;
    BwdTiles<W> w(BM, BN);
    AlignedArray<float> dq_acc(BM * D, Huge::kNo);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (p.H * n_mtiles), h = (t / n_mtiles) % p.H, hk = h / p.group();
      const int64_t m0 = (t % n_mtiles) * BM, rows = std::min(BM, p.Sq - m0);
      std::fill(dq_acc.data(), dq_acc.data() + BM * D, 0.0f);
      const int64_t n_end = p.key_end(m0, rows);
      for (int64_t n0 = 0; n0 < n_end; n0 += BN) {
        tile_pair(p, lse, delta, w, operands(b * p.H + h, b * p.Hkv + hk, m0, n0), b, h, m0, rows,
                  n0, std::min(BN, p.Sk - n0), nullptr, nullptr, 0, dq_acc.data());
      }
      store_rows(dq_acc.data(), D, dq + ((b * p.H + h) * p.Sq + m0) * D, rows, D, nullptr);
    }
  });
}

// The by-kv-head schedule when there are enough (batch, kv head) tasks for all threads; else by
// query head when there are enough (batch, query head) tasks and their dK / dV partial sums take
// at most kMaxPartialBytes; else by tile (or the one forced, Note [CPU attention tuning knobs]).
BwdSchedule backward_schedule(const Problem& p) {
  if (const auto forced = forced_backward_schedule())
    return *forced;
  constexpr int64_t kMaxPartialBytes = int64_t(256) << 20;
  const int64_t threads = at::get_num_threads();
  if (p.B * p.Hkv >= 2 * threads)
    return BwdSchedule::KvHead;
  const int64_t partial_bytes = p.B * p.H * 2 * p.D * mk::padded_ld(p.Sk) * 4;
  if (p.B * p.H >= 2 * threads && partial_bytes <= kMaxPartialBytes)
    return BwdSchedule::QHead;
  return BwdSchedule::Tile;
}

template <typename T>
void bwd_impl(const Problem& p, const Layout& q, const Layout& k, const Layout& v,
              const Layout& dout, const float* lse, const float* delta, T* dq, T* dk, T* dv) {
  const Blocks& b = blocks();
  const bool small = std::is_same_v<T, float> && p.causal;  // see Blocks
  // bf16: query tiles start at even rows (whole words of the Q^T / dO^T packs).
  const int64_t BM = round_up(small ? b.bwd_causal_fp32_m : b.bwd_m, mk::kPack<word_t<T>>);
  const int64_t BN = round_up(small ? b.bwd_causal_fp32_n : b.bwd_n, kNR);
  const int64_t kc = small ? b.bwd_causal_fp32_kc_floats : b.bwd_kc_floats;
  switch (backward_schedule(p)) {
    case BwdSchedule::KvHead:
      bwd_by_head(p, q, k, v, dout, lse, delta, dq, dk, dv, BM, BN, kc, false);
      break;
    case BwdSchedule::QHead:
      bwd_by_head(p, q, k, v, dout, lse, delta, dq, dk, dv, BM, BN, kc, true);
      break;
    case BwdSchedule::Tile:
      bwd_by_tile(p, q, k, v, dout, lse, delta, dq, dk, dv, BM, BN);
      break;
  }
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
