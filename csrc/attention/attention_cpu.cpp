// CPU implementation of torchlane::attention_fwd / attention_bwd. See Note [CPU flash attention].
#include "attention/cpu_vec.h"  // first: selects the vector ISA, see its Note

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "attention/attention.h"
#include "attention/cpu_common.h"
#include "attention/cpu_gemm.h"

// Note [CPU flash attention]
// Forward: one task per (batch, query head, query tile of kBlockM rows), run by at::parallel_for.
// A task walks the key/value tiles of kBlockN rows that its queries may see (with causal masking
// the tiles wholly above the diagonal are never visited), computes S = scale * Q K^T for the
// tile with one GEMM, keeps a running row max m and row sum l (online softmax), rescales its fp32
// output accumulator when m grows and adds P V with a second GEMM. Only a kBlockM x kBlockN tile
// of S exists at a time.
//
// Backward recomputes P = exp(S - lse) tile by tile from the saved logsumexp, with
// delta_i = rowsum(dO_i * O_i) (minus the lse gradient, see Note [Attention op contract]):
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ += scale dS K,  dK += scale dS^T Q.
// It is deterministic (a fixed summation order, no atomics) and has these schedules:
//  - by kv head: one task per (batch, kv head) owns dK, dV of that head and dQ of its query heads.
//    Five GEMMs per tile pair; used when there are enough (batch, kv head) pairs for all threads.
//  - by query head (packed kernels only, attention_cpu_packed.cpp): one task per (batch, query
//    head) owns its dQ and partial sums of dK, dV, added up per group afterwards; five GEMMs per
//    tile pair, for GQA / MQA with fewer kv heads than threads.
//  - by tile: a dK/dV pass with one task per (batch, kv head, key tile) and a dQ pass with one
//    task per (batch, query head, query tile). S and dP are computed in both passes (seven GEMMs
//    per tile pair instead of five) but the work splits over as many tasks as there are tiles,
//    so a single long sequence still uses every core.

// Note [Low precision on the CPU]
// Where the packed micro-kernels exist (attention_cpu_packed.cpp, Note [Packed attention on the
// CPU]) fp32 runs on their fp32 GEMMs and bf16 on their bf16 x bf16 -> fp32 GEMMs (vdpbf16ps).
// Other low-precision inputs (fp16; bf16 without AVX512-BF16) are converted to fp32 once (O(S D)
// memory, negligible next to the O(S^2 D) work), computed in fp32 and rounded back at the end.
// This file's BLAS tile kernels run fp64, and everything when the micro-kernels are not built
// (no AVX-512) or mk::set_enabled(false): MKL's bf16 GEMM (cblas_gemm_bf16bf16f32) was many times
// slower than sgemm on the AMD EPYC development machine, hence fp32 there too.

namespace torchlane::attention {
namespace {

using namespace cpu;

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
void fwd_kernel(const Problem& p, const Layout& q, const Layout& k, const Layout& v, scalar_t* out,
                acc_type<scalar_t>* lse) {
  using acc_t = acc_type<scalar_t>;
  const int64_t BM = blocks().fwd_m, BN = blocks().fwd_n;
  const int64_t D = p.D, n_mtiles = (p.Sq + BM - 1) / BM;
  const acc_t scale = static_cast<acc_t>(p.scale);
  at::parallel_for(0, p.B * p.H * n_mtiles, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas single_threaded_blas;
    std::vector<acc_t> s_buf(BM * BN), o_acc(BM * D), m_run(BM), l_run(BM);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (p.H * n_mtiles), h = (t / n_mtiles) % p.H, mt = t % n_mtiles;
      const int64_t hk = h / p.group(), m0 = mt * BM, rows = std::min(BM, p.Sq - m0);
      const scalar_t* q_tile = row_ptr<scalar_t>(q, b, h, m0);
      std::fill(o_acc.begin(), o_acc.begin() + rows * D, acc_t(0));
      std::fill(m_run.begin(), m_run.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(l_run.begin(), l_run.end(), acc_t(0));
      const int64_t n_end = p.key_end(m0, rows);
      for (int64_t n0 = 0; n0 < n_end; n0 += BN) {
        const int64_t cols = std::min(BN, n_end - n0);
        acc_t* S = s_buf.data();
        tile_gemm(false, true, rows, cols, D, scale, q_tile, q.ss, row_ptr<scalar_t>(k, b, hk, n0),
                  k.ss, acc_t(0), S, BN);
        online_softmax_tile(p, S, BN, acc_t(1), m0, rows, n0, cols, m_run.data(), l_run.data(),
                            o_acc.data(), D, D, S, BN);
        tile_gemm(false, false, rows, D, cols, acc_t(1), S, BN, row_ptr<scalar_t>(v, b, hk, n0),
                  v.ss, acc_t(1), o_acc.data(), D);
      }
      scalar_t* out_tile = out + ((b * p.H + h) * p.Sq + m0) * D;
      acc_t* lse_tile = lse + (b * p.H + h) * p.Sq + m0;
      for (int64_t r = 0; r < rows; ++r) {
        // l = 0: a row whose logits are all -inf, see Note [Softmax max subtraction]
        store_row(o_acc.data() + r * D, out_tile + r * D, D,
                  l_run[r] == acc_t(0) ? acc_t(0) : acc_t(1) / l_run[r]);  // NaN stays NaN
        lse_tile[r] = m_run[r] + std::log(l_run[r]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
struct BwdArgs {
  using acc_t = acc_type<scalar_t>;
  Problem p;
  Layout q, k, v, dout;
  const acc_t* lse;    // (B, H, Sq)
  const acc_t* delta;  // (B, H, Sq)
};

// Per-thread tiles for one (query tile, key tile) pair.
template <typename scalar_t>
struct BwdScratch {
  using acc_t = acc_type<scalar_t>;
  std::vector<acc_t> P, dS;
  BwdScratch()
      : P(blocks().blas_bwd_m * blocks().blas_bwd_n),
        dS(blocks().blas_bwd_m * blocks().blas_bwd_n) {}
};

// Recomputes P and dS for query rows [m0, m0 + rows) of head h against keys [n0, n0 + cols) of
// kv head hk (tiles with leading dimension blocks().blas_bwd_n).
template <typename scalar_t>
std::pair<const scalar_t*, const scalar_t*> probs_and_dscores(const BwdArgs<scalar_t>& a,
                                                              BwdScratch<scalar_t>& w, int64_t b,
                                                              int64_t h, int64_t hk, int64_t m0,
                                                              int64_t rows, int64_t n0,
                                                              int64_t cols) {
  using acc_t = acc_type<scalar_t>;
  const int64_t BN = blocks().blas_bwd_n;
  const Problem& p = a.p;
  tile_gemm(false, true, rows, cols, p.D, static_cast<acc_t>(p.scale),
            row_ptr<scalar_t>(a.q, b, h, m0), a.q.ss, row_ptr<scalar_t>(a.k, b, hk, n0), a.k.ss,
            acc_t(0), w.P.data(), BN);
  tile_gemm(false, true, rows, cols, p.D, acc_t(1), row_ptr<scalar_t>(a.dout, b, h, m0), a.dout.ss,
            row_ptr<scalar_t>(a.v, b, hk, n0), a.v.ss, acc_t(0), w.dS.data(), BN);
  probs_and_dscores_rows(p, w.P.data(), w.dS.data(), BN, acc_t(1), a.lse, a.delta, b, h, m0, rows,
                         n0, cols);
  return {w.P.data(), w.dS.data()};
}

template <typename scalar_t>
void store_tile(const acc_type<scalar_t>* src, scalar_t* dst, int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r)
    store_row(src + r * D, dst + r * D, D, acc_type<scalar_t>(1));
}

// Schedule "by kv head" of Note [CPU flash attention].
template <typename scalar_t>
void bwd_by_kv_head(const BwdArgs<scalar_t>& a, scalar_t* dq, scalar_t* dk, scalar_t* dv) {
  using acc_t = acc_type<scalar_t>;
  const int64_t BM = blocks().blas_bwd_m, BN = blocks().blas_bwd_n;
  const Problem& p = a.p;
  const int64_t D = p.D;
  const acc_t scale = static_cast<acc_t>(p.scale);
  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas single_threaded_blas;
    BwdScratch<scalar_t> w;
    std::vector<acc_t> dq_acc(p.Sq * D), dk_acc(p.Sk * D), dv_acc(p.Sk * D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / p.Hkv, hk = t % p.Hkv;
      std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
      std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
      for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
        std::fill(dq_acc.begin(), dq_acc.end(), acc_t(0));
        for (int64_t n0 = 0; n0 < p.Sk; n0 += BN) {
          const int64_t cols = std::min(BN, p.Sk - n0);
          const int64_t m_begin = p.causal ? (n0 / BM) * BM : 0;  // earlier rows see no key here
          for (int64_t m0 = m_begin; m0 < p.Sq; m0 += BM) {
            const int64_t rows = std::min(BM, p.Sq - m0);
            auto [P, dS] = probs_and_dscores(a, w, b, h, hk, m0, rows, n0, cols);
            const scalar_t* q_tile = row_ptr<scalar_t>(a.q, b, h, m0);
            tile_gemm(true, false, cols, D, rows, acc_t(1), P, BN,
                      row_ptr<scalar_t>(a.dout, b, h, m0), a.dout.ss, acc_t(1),
                      dv_acc.data() + n0 * D, D);
            tile_gemm(false, false, rows, D, cols, scale, dS, BN, row_ptr<scalar_t>(a.k, b, hk, n0),
                      a.k.ss, acc_t(1), dq_acc.data() + m0 * D, D);
            tile_gemm(true, false, cols, D, rows, scale, dS, BN, q_tile, a.q.ss, acc_t(1),
                      dk_acc.data() + n0 * D, D);
          }
        }
        store_tile<scalar_t>(dq_acc.data(), dq + (b * p.H + h) * p.Sq * D, p.Sq, D);
      }
      store_tile<scalar_t>(dk_acc.data(), dk + (b * p.Hkv + hk) * p.Sk * D, p.Sk, D);
      store_tile<scalar_t>(dv_acc.data(), dv + (b * p.Hkv + hk) * p.Sk * D, p.Sk, D);
    }
  });
}

// Schedule "by tile" of Note [CPU flash attention].
template <typename scalar_t>
void bwd_by_tile(const BwdArgs<scalar_t>& a, scalar_t* dq, scalar_t* dk, scalar_t* dv) {
  using acc_t = acc_type<scalar_t>;
  const int64_t BM = blocks().blas_bwd_m, BN = blocks().blas_bwd_n;
  const Problem& p = a.p;
  const int64_t D = p.D, n_ntiles = (p.Sk + BN - 1) / BN, n_mtiles = (p.Sq + BM - 1) / BM;
  const acc_t scale = static_cast<acc_t>(p.scale);
  // dK, dV: one task per (batch, kv head, key tile).
  at::parallel_for(0, p.B * p.Hkv * n_ntiles, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas single_threaded_blas;
    BwdScratch<scalar_t> w;
    std::vector<acc_t> dk_acc(BN * D), dv_acc(BN * D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (p.Hkv * n_ntiles), hk = (t / n_ntiles) % p.Hkv;
      const int64_t n0 = (t % n_ntiles) * BN, cols = std::min(BN, p.Sk - n0);
      std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
      std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
      for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
        for (int64_t m0 = p.causal ? (n0 / BM) * BM : 0; m0 < p.Sq; m0 += BM) {
          const int64_t rows = std::min(BM, p.Sq - m0);
          auto [P, dS] = probs_and_dscores(a, w, b, h, hk, m0, rows, n0, cols);
          tile_gemm(true, false, cols, D, rows, acc_t(1), P, BN,
                    row_ptr<scalar_t>(a.dout, b, h, m0), a.dout.ss, acc_t(1), dv_acc.data(), D);
          tile_gemm(true, false, cols, D, rows, scale, dS, BN, row_ptr<scalar_t>(a.q, b, h, m0),
                    a.q.ss, acc_t(1), dk_acc.data(), D);
        }
      }
      store_tile<scalar_t>(dk_acc.data(), dk + ((b * p.Hkv + hk) * p.Sk + n0) * D, cols, D);
      store_tile<scalar_t>(dv_acc.data(), dv + ((b * p.Hkv + hk) * p.Sk + n0) * D, cols, D);
    }
  });
  // dQ: one task per (batch, query head, query tile).
  at::parallel_for(0, p.B * p.H * n_mtiles, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas single_threaded_blas;
    BwdScratch<scalar_t> w;
    std::vector<acc_t> dq_acc(BM * D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (p.H * n_mtiles), h = (t / n_mtiles) % p.H, hk = h / p.group();
      const int64_t m0 = (t % n_mtiles) * BM, rows = std::min(BM, p.Sq - m0);
      std::fill(dq_acc.begin(), dq_acc.end(), acc_t(0));
      const int64_t n_end = p.key_end(m0, rows);
      for (int64_t n0 = 0; n0 < n_end; n0 += BN) {
        const int64_t cols = std::min(BN, p.Sk - n0);
        auto [P, dS] = probs_and_dscores(a, w, b, h, hk, m0, rows, n0, cols);
        (void)P;
        tile_gemm(false, false, rows, D, cols, scale, dS, BN, row_ptr<scalar_t>(a.k, b, hk, n0),
                  a.k.ss, acc_t(1), dq_acc.data(), D);
      }
      store_tile<scalar_t>(dq_acc.data(), dq + ((b * p.H + h) * p.Sq + m0) * D, rows, D);
    }
  });
}

}  // namespace

// Low-precision inputs run the fp32 kernel on fp32 copies; see Note [Low precision on the CPU].
// The dtype the kernels compute in: the packed micro-kernels take fp32 and bf16 inputs as they are;
// otherwise low-precision inputs are computed in fp32 (Note [Low precision on the CPU]), on the
// packed fp32 kernels where those exist.
at::ScalarType compute_type(at::ScalarType t) {
  if (packed_kernels_available(t))
    return t;
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

at::ScalarType lse_type(at::ScalarType compute) {
  return compute == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, bool causal,
                                                     double scale) {
  check_attention_inputs(q_in, k_in, v_in, scale);
  const auto ct = compute_type(q_in.scalar_type());
  const at::Tensor q = rows_unit_stride(q_in.to(ct)), k = rows_unit_stride(k_in.to(ct)),
                   v = rows_unit_stride(v_in.to(ct));
  const Problem p = problem_of(q, k, causal, scale);
  at::Tensor out = at::empty({p.B, p.H, p.Sq, p.D}, q.options());
  at::Tensor lse = at::empty({p.B, p.H, p.Sq}, q.options().dtype(lse_type(ct)));
  if (packed_kernels_available(ct)) {
    fwd_packed(p, layout_of(q), layout_of(k), layout_of(v), out, lse.data_ptr<float>());
  } else {
    AT_DISPATCH_FLOATING_TYPES(ct, "attention_fwd_cpu", [&] {
      fwd_kernel<scalar_t>(p, layout_of(q), layout_of(k), layout_of(v), out.data_ptr<scalar_t>(),
                           lse.data_ptr<scalar_t>());
    });
  }
  return {out.to(q_in.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse_in,
    bool causal, double scale) {
  check_attention_backward_inputs(grad_out, grad_lse, q_in, k_in, v_in, out, lse_in, scale);
  const auto ct = compute_type(q_in.scalar_type());
  const at::Tensor q = rows_unit_stride(q_in.to(ct)), k = rows_unit_stride(k_in.to(ct)),
                   v = rows_unit_stride(v_in.to(ct)), dout = rows_unit_stride(grad_out.to(ct));
  const at::Tensor lse = lse_in.contiguous();
  const Problem p = problem_of(q, k, causal, scale);
  at::Tensor dq = at::empty({p.B, p.H, p.Sq, p.D}, q.options());
  at::Tensor dk = at::empty({p.B, p.Hkv, p.Sk, p.D}, q.options());
  at::Tensor dv = at::empty({p.B, p.Hkv, p.Sk, p.D}, q.options());
  if (packed_kernels_available(ct)) {
    const at::Tensor delta = compute_delta<float>(dout, out, grad_lse);
    bwd_packed(p, layout_of(q), layout_of(k), layout_of(v), layout_of(dout), lse.data_ptr<float>(),
               delta.data_ptr<float>(), dq, dk, dv);
  } else {
    AT_DISPATCH_FLOATING_TYPES(ct, "attention_bwd_cpu", [&] {
      const at::Tensor delta = compute_delta<scalar_t>(dout, out, grad_lse);
      const BwdArgs<scalar_t> a{p,
                                layout_of(q),
                                layout_of(k),
                                layout_of(v),
                                layout_of(dout),
                                lse.data_ptr<scalar_t>(),
                                delta.data_ptr<scalar_t>()};
      auto* dq_p = dq.data_ptr<scalar_t>();
      auto* dk_p = dk.data_ptr<scalar_t>();
      auto* dv_p = dv.data_ptr<scalar_t>();
      if (p.B * p.Hkv >= 2 * at::get_num_threads()) {
        bwd_by_kv_head(a, dq_p, dk_p, dv_p);
      } else {
        bwd_by_tile(a, dq_p, dk_p, dv_p);
      }
    });
  }
  const auto t = q_in.scalar_type();
  return {dq.to(t), dk.to(t), dv.to(t)};
}

TORCH_LIBRARY_IMPL(torchlane, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace torchlane::attention
