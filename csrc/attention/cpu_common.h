#pragma once
// Pieces shared by the CPU attention kernels: attention_cpu.cpp (BLAS tile GEMMs) and
// attention_cpu_packed.cpp (packed micro-kernels). Included after cpu_vec.h.
// gcc 12 reports the _mm512_undefined_* operands of ATen's vec_reduce_all as maybe-uninitialised.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "attention/cpu_config.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

namespace torchlane::attention {
namespace cpu {

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Strides of a (B, H, S, D) tensor with a unit-stride last dimension.
struct Layout {
  const void* base;
  int64_t sb, sh, ss;
};

inline Layout layout_of(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), std::max(t.stride(2), t.size(3))};
}

template <typename T>
const T* row_ptr(const Layout& l, int64_t b, int64_t h, int64_t s) {
  return static_cast<const T*>(l.base) + b * l.sb + h * l.sh + s * l.ss;
}

struct Problem {
  int64_t B, H, Hkv, Sq, Sk, D;
  bool causal;
  double scale;
  int64_t group() const {
    return H / Hkv;
  }
  // Number of keys query row i may see within [n0, n0 + n): top-left aligned causal mask.
  int64_t visible(int64_t i, int64_t n0, int64_t n) const {
    return causal ? std::clamp<int64_t>(i - n0 + 1, 0, n) : n;
  }
  // One past the last key any of the query rows [m0, m0 + m) may see.
  int64_t key_end(int64_t m0, int64_t m) const {
    return causal ? std::min(Sk, m0 + m) : Sk;
  }
};

// max_j x[j], -inf for n == 0. NaNs may be skipped: a NaN score still makes its exp, and with it
// the row's sum and output, NaN.
template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    // vmaxps alone (at::vec::maximum adds a NaN test per vector), four independent chains
    __m512 m0 = _mm512_set1_ps(m), m1 = m0, m2 = m0, m3 = m0;
    int64_t j = 0;
    for (; j + 64 <= n; j += 64) {
      m0 = _mm512_max_ps(_mm512_loadu_ps(x + j), m0);
      m1 = _mm512_max_ps(_mm512_loadu_ps(x + j + 16), m1);
      m2 = _mm512_max_ps(_mm512_loadu_ps(x + j + 32), m2);
      m3 = _mm512_max_ps(_mm512_loadu_ps(x + j + 48), m3);
    }
    for (; j + 16 <= n; j += 16)
      m0 = _mm512_max_ps(_mm512_loadu_ps(x + j), m0);
    if (j < n) {
      const __mmask16 tail = static_cast<__mmask16>((1u << (n - j)) - 1);
      m1 = _mm512_max_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(m), tail, x + j), m1);
    }
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
  }
#endif
  int64_t j = 0;
  if (n >= Vec::size()) {
    Vec vm(m);
    for (; j + Vec::size() <= n; j += Vec::size())
      vm = at::vec::maximum(vm, Vec::loadu(x + j));
    m = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; j < n; ++j)
    m = std::max(m, x[j]);
  return m;
}

// exp(x) for the softmax. fp32: ATen's exp_u20 (at most 20 ulp, the one torch's own CPU flash
// attention uses) instead of the 1-ulp Sleef exp; fp64 keeps the accurate one.
template <typename Vec>
inline Vec fast_exp(const Vec& x) {
  if constexpr (std::is_same_v<typename Vec::value_type, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// Stores the vector e at y, converted to y's type (bf16: rounded to nearest even).
template <typename acc_t, typename out_t>
inline void store_vec(const at::vec::Vectorized<acc_t>& e, out_t* y) {
  if constexpr (std::is_same_v<out_t, acc_t>) {
    e.store(y);
  } else {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
    if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<out_t, c10::BFloat16>) {
      // one instruction instead of ATen's portable rounding sequence
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), (__m256i)_mm512_cvtneps_pbh(e));
      return;
    }
#endif
    at::vec::convert_from_float<out_t>(e, e).store(y, at::vec::Vectorized<acc_t>::size());
  }
}

// The first n (< the vector size) lanes of e, stored as by store_vec.
template <typename acc_t, typename out_t>
inline void store_vec_n(const at::vec::Vectorized<acc_t>& e, out_t* y, int64_t n) {
  if constexpr (std::is_same_v<out_t, acc_t>) {
    e.store(y, static_cast<int>(n));
  } else {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
    if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<out_t, c10::BFloat16>) {
      _mm256_mask_storeu_epi16(y, static_cast<__mmask16>((1u << n) - 1),
                               (__m256i)_mm512_cvtneps_pbh(e));
      return;
    }
#endif
    at::vec::convert_from_float<out_t>(e, e).store(y, static_cast<int>(n));
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// Note [Softmax exp on AVX-512]
// exp(y) = 2^t with t = y log2(e), split as t = n + f, n = round(t), |f| <= 1/2: 2^f by a
// degree-5 polynomial (fitted on [-1/2, 1/2], relative error 3.5e-7) and vscalefps for the 2^n,
// 11 vector operations against ~19 for ATen's exp_u20. Measured against double exp: relative
// error at most 3.5e-7 (4 ulp) for y in [-1, 0], 5.9e-7 in [-10, 0], 3.9e-6 in [-87, 0] (the
// rounding of y log2(e) grows with |y|; those values are below 1e-4 of the row's largest).
// t is clamped below at -126, so the result is never a denormal: y = -inf and every y below
// -87.3 give 2^-126 (1.2e-38) instead of a smaller number or 0, which no softmax sum (>= 1, the
// row's maximum gives 1) can notice. NaN gives NaN (vmaxps returns its second operand when
// either is NaN), +inf gives +inf.
inline __m512 exp_avx512(__m512 y) {
  const __m512 shifter = _mm512_set1_ps(0x1.8p23f);  // adding it rounds |t| < 2^22 to an integer
  const __m512 log2e = _mm512_set1_ps(0x1.715476p0f);
  const __m512 t = _mm512_max_ps(_mm512_set1_ps(-126.0f), _mm512_mul_ps(y, log2e));
  const __m512 n = _mm512_sub_ps(_mm512_add_ps(t, shifter), shifter);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.291565131e-03f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.668535553e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.551688746e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402226478e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931464672e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

// Note [Softmax max subtraction]
// The softmax's logits are defined as the rounded products s = fl(scale * x) of the raw GEMM
// scores x, and the row maximum is m = fl(scale * max_j x[j]), which equals max_j fl(scale * x[j])
// (rounding is monotonic, scale > 0). So s - m <= 0 for every key and = 0 for the row's largest,
// and s - m is exact where it matters (Sterbenz: s and m within a factor 2). The earlier fused
// fma(x, scale, -m) skipped the product's rounding: at |logits| ~1e9 (fp32 ulp 64..256) the row's
// largest logit got an exponent of +-ulp(m)/2 instead of 0, i.e. exp(+-128): inf/inf = NaN, or,
// clamped at 0, every weight 2^-126 and a uniform average instead of the argmax (issue #16).
// The product must be rounded even where the compiler contracts a multiply and a subtract into
// an fma (GCC's default -ffp-contract=fast, nvcc's -fmad=true): rounded_product uses vmulps with
// an explicit rounding mode on AVX-512 (a builtin, never contracted) and an empty asm barrier on
// the product elsewhere; the CUDA source uses __fmul_rn (round_mul in kernels/tile_common.h).
// The backward recomputes P = exp(fl(scale * x) - lse) from the same GEMM scores (the packed
// kernels reproduce them bitwise), lse = fl(m + log l) with l >= 1, so its exponent is <= 0 up to
// the rounding of lse (< log l); it is clamped at 0 anyway, as a safety net for paths whose
// backward GEMM sums in another order. The forward needs no clamp (s - m <= 0 by construction).
// Rows whose visible logits are all -inf (SDPA: output 0; its backward: gradients 0) keep
// m = -inf and l = 0; online_softmax_tile writes P = 0 for them (never exp(-inf - -inf) = NaN),
// the output is stored as 0 (1/l is taken as 0 for l == 0 only) and lse = -inf makes the
// backward's P and dS 0. A +inf logit makes m = +inf and +inf - +inf = NaN: the row is NaN, as
// SDPA's. A NaN logit makes its exp, the sum l, the output and lse NaN; row_max skips NaN, so a
// tile whose visible logits are all NaN (or NaN and -inf) reads as m = -inf and is told apart
// from an all -inf row by a scan in that (rare) branch. No clamp may drop a NaN: vminps returns
// its second operand when either is NaN, the CUDA source uses y > 0 ? 0 : y (fminf drops NaN).
// docs/attention.md "Extreme values" states the rule as tested against SDPA's math backend.

// fl(x * s) for each lane, rounded to the vector's type and never fused into a following add or
// subtract; see Note [Softmax max subtraction].
template <typename Vec>
inline Vec rounded_product(const Vec& x, const Vec& s) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<typename Vec::value_type, float>)
    return _mm512_mul_round_ps(x, s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  else if constexpr (std::is_same_v<typename Vec::value_type, double>)
    return _mm512_mul_round_pd(x, s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  Vec p = x * s;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<typename Vec::value_type, float>) {
    __m256 r = p;
    asm("" : "+x"(r));  // the product is materialised: no fma can absorb it
    return Vec(r);
  } else if constexpr (std::is_same_v<typename Vec::value_type, double>) {
    __m256d r = p;
    asm("" : "+x"(r));
    return Vec(r);
  }
#endif
  asm("" : "+m"(p));
  return p;
}

// exp(fl(scale * x) - sub), vectorised, clamped at exp(0) = 1 when kClamp; see
// Note [Softmax exp on AVX-512] and Note [Softmax max subtraction].
template <bool kClamp, typename Vec>
inline Vec exp_scaled(const Vec& x, const Vec& scale, const Vec& sub) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<typename Vec::value_type, float>) {
    const __m512 y = _mm512_sub_ps(rounded_product(x, scale), sub);
    return exp_avx512(kClamp ? _mm512_min_ps(_mm512_setzero_ps(), y) : y);
  }
#endif
  const Vec y = rounded_product(x, scale) - sub;
  return fast_exp(kClamp ? at::vec::minimum(y, Vec(0)) : y);
}

// y[j] = exp(fl(scale * x[j]) - sub) for j < n (clamped at 1 when kClamp), returns the sum (of
// the values before y's rounding when y is bf16). y may be x.
template <bool kClamp, typename acc_t, typename out_t>
acc_t exp_sub_sum(const acc_t* x, int64_t n, acc_t sub, acc_t scale, out_t* y) {
  using Vec = at::vec::Vectorized<acc_t>;
  int64_t j = 0;
  const Vec vs(sub), vscale(scale);
  Vec acc(0), acc2(0);  // two vectors per step, two sums: the exps of a step overlap
  for (; j + 2 * Vec::size() <= n; j += 2 * Vec::size()) {
    const Vec e = exp_scaled<kClamp>(Vec::loadu(x + j), vscale, vs);
    const Vec e2 = exp_scaled<kClamp>(Vec::loadu(x + j + Vec::size()), vscale, vs);
    store_vec(e, y + j);
    store_vec(e2, y + j + Vec::size());
    acc = acc + e;
    acc2 = acc2 + e2;
  }
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec e = exp_scaled<kClamp>(Vec::loadu(x + j), vscale, vs);
    store_vec(e, y + j);
    acc = acc + e;
  }
  if (j < n) {  // the tail (causal diagonal tiles, short rows) as one partial vector, zero beyond
    const int64_t c = n - j;
    const Vec e = Vec::set(Vec(0), exp_scaled<kClamp>(Vec::loadu(x + j, c), vscale, vs), c);
    store_vec_n(e, y + j, c);
    acc = acc + e;
  }
  acc = acc + acc2;
  const acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, acc);
  return sum;
}

template <typename acc_t>
void scale_row(acc_t* x, int64_t n, acc_t s) {
  using Vec = at::vec::Vectorized<acc_t>;
  at::vec::map([s](Vec a) { return a * Vec(s); }, x, x, n);
}

template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, scalar_t* dst, int64_t n, acc_t s) {
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float> &&
                (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>)) {
    using Vec = at::vec::Vectorized<float>;
    const Vec vs(s);
    for (; j + Vec::size() <= n; j += Vec::size())
      store_vec(Vec::loadu(src + j) * vs, dst + j);
  }
  for (; j < n; ++j)
    dst[j] = static_cast<scalar_t>(src[j] * s);
}

// Online softmax over one S tile (rows x cols, leading dimension lds) of query rows m0.. against
// keys n0.., the scores being scale * S (scale > 0): updates the running max m_run and sum l_run,
// rescales the output accumulator rows (o_acc, rows x D, leading dimension ldo) when the max grows,
// and writes P = exp(scale * S - m) to P (leading dimension ldp; may be S, or a bf16 copy) with
// masked and fully masked entries zero (bf16: up to an even column count, the pairs' padding). See
// Note [CPU flash attention].
template <typename acc_t, typename out_t>
void online_softmax_tile(const Problem& p, const acc_t* S, int64_t lds, acc_t scale, int64_t m0,
                         int64_t rows, int64_t n0, int64_t cols, acc_t* m_run, acc_t* l_run,
                         acc_t* o_acc, int64_t D, int64_t ldo, out_t* P, int64_t ldp) {
  const int64_t fill_end = sizeof(out_t) == 2 ? (cols + 1) / 2 * 2 : cols;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* s_row = S + r * lds;
    out_t* p_row = P + r * ldp;
    const int64_t vis = p.visible(m0 + r, n0, cols);
    if (vis == 0) {  // only when causal: the whole row is masked in this tile
      std::fill(p_row, p_row + fill_end, out_t(0));
      continue;
    }
    const acc_t m_new = std::max(m_run[r], scale * row_max(s_row, vis));
    if (m_new == -std::numeric_limits<acc_t>::infinity()) {  // Note [Softmax max subtraction]
      // all -inf, or NaN (row_max skips NaN): a NaN makes the row's m, l and P NaN, as SDPA's
      const bool has_nan = std::any_of(s_row, s_row + vis, [](acc_t x) { return x != x; });
      std::fill(p_row, p_row + fill_end, out_t(0));
      if (has_nan) {
        std::fill(p_row, p_row + vis, out_t(std::numeric_limits<acc_t>::quiet_NaN()));
        m_run[r] = l_run[r] = std::numeric_limits<acc_t>::quiet_NaN();
      }
      continue;
    }
    // exp(-inf) = 0 on the first tile; no exp when the max stays (a -inf max: the sum is NaN)
    const acc_t alpha = m_new == m_run[r] ? acc_t(1) : std::exp(m_run[r] - m_new);
    const acc_t sum = exp_sub_sum<false>(s_row, vis, m_new, scale, p_row);
    std::fill(p_row + vis, p_row + fill_end, out_t(0));
    l_run[r] = l_run[r] * alpha + sum;
    m_run[r] = m_new;
    if (alpha != acc_t(1))
      scale_row(o_acc + r * ldo, D, alpha);
  }
}

// Turns the S tile into P = exp(scale * S - lse) (masked entries zero) and the dP tile into
// dS = P * (dP - delta), for query rows m0.. of (b, h) against keys n0.. (both tiles rows x cols,
// leading dimension ld; lse and delta are (B, H, Sq)).
template <typename acc_t>
void probs_and_dscores_rows(const Problem& p, acc_t* P, acc_t* dS, int64_t ld, acc_t scale,
                            const acc_t* lse, const acc_t* delta, int64_t b, int64_t h, int64_t m0,
                            int64_t rows, int64_t n0, int64_t cols) {
  using Vec = at::vec::Vectorized<acc_t>;
  lse += (b * p.H + h) * p.Sq + m0;
  delta += (b * p.H + h) * p.Sq + m0;
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* p_row = P + r * ld;
    acc_t* ds_row = dS + r * ld;
    const int64_t vis = p.visible(m0 + r, n0, cols);
    if (lse[r] == -std::numeric_limits<acc_t>::infinity()) {  // Note [Softmax max subtraction]
      std::fill(p_row, p_row + cols, acc_t(0));
      std::fill(ds_row, ds_row + cols, acc_t(0));
      continue;
    }
    const Vec d(delta[r]), vlse(lse[r]), vscale(scale);
    int64_t j = 0;
    for (; j + Vec::size() <= vis; j += Vec::size()) {  // one pass: P, then dS from it
      const Vec pv = exp_scaled<true>(Vec::loadu(p_row + j), vscale, vlse);
      pv.store(p_row + j);
      (pv * (Vec::loadu(ds_row + j) - d)).store(ds_row + j);
    }
    exp_sub_sum<true>(p_row + j, vis - j, lse[r], scale, p_row + j);  // the tail
    std::fill(p_row + vis, p_row + cols, acc_t(0));
    at::vec::map2([d](Vec pv, Vec dp) { return pv * (dp - d); }, ds_row + j, p_row + j, ds_row + j,
                  cols - j);
  }
}

// delta_i = rowsum(dO_i * O_i) - dlse_i, see Note [Attention op contract]: (B, H, Sq) of acc_t,
// one fused pass over the rows (dO * O as a tensor would be a full-size temporary: at B=4 H=8
// S=2048 D=128 fp32 that product and its sum took 12 ms of a ~700 ms backward on 2 cores).
template <typename acc_t>
at::Tensor compute_delta(const at::Tensor& dout_in, const at::Tensor& out_in,
                         const c10::optional<at::Tensor>& grad_lse) {
  const at::Tensor dout = dout_in.stride(-1) == 1 ? dout_in : dout_in.contiguous();
  at::Tensor out = out_in.to(dout.scalar_type());
  if (out.stride(-1) != 1)
    out = out.contiguous();
  const int64_t B = dout.size(0), H = dout.size(1), S = dout.size(2), D = dout.size(3);
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor d = at::empty({B, H, S}, dout.options().dtype(acc));
  acc_t* d_data = d.data_ptr<acc_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, dout.scalar_type(), "attention_delta", [&] {
        using Vec = at::vec::Vectorized<acc_t>;
        const auto* g = dout.const_data_ptr<scalar_t>();
        const auto* o = out.const_data_ptr<scalar_t>();
        at::parallel_for(0, B * H * S, 64, [&](int64_t begin, int64_t end) {
          std::vector<acc_t> ga, oa;  // rows converted to acc_t where the dtypes differ
          if constexpr (!std::is_same_v<scalar_t, acc_t>) {
            ga.resize(D);
            oa.resize(D);
          }
          for (int64_t i = begin; i < end; ++i) {
            const int64_t b = i / (H * S), h = (i / S) % H, s = i % S;
            const scalar_t* gr = g + b * dout.stride(0) + h * dout.stride(1) + s * dout.stride(2);
            const scalar_t* orow = o + b * out.stride(0) + h * out.stride(1) + s * out.stride(2);
            const acc_t *x, *y;
            if constexpr (std::is_same_v<scalar_t, acc_t>) {
              x = gr, y = orow;
            } else {
              for (int64_t j = 0; j < D; ++j) {
                ga[j] = static_cast<acc_t>(gr[j]);
                oa[j] = static_cast<acc_t>(orow[j]);
              }
              x = ga.data(), y = oa.data();
            }
            d_data[i] = at::vec::map2_reduce_all<acc_t>(
                [](Vec a, Vec c) { return a * c; }, [](Vec a, Vec c) { return a + c; }, x, y, D);
          }
        });
      });
  if (grad_lse.has_value() && grad_lse->defined())
    d.sub_(grad_lse->to(acc));
  return d;
}

inline Problem problem_of(const at::Tensor& q, const at::Tensor& k, bool causal, double scale) {
  return {q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), causal, scale};
}

// attention_cpu_packed.cpp, see Note [Packed attention on the CPU]: fp32 and bf16 inputs when
// packed_kernels_available(dtype). Layouts as layout_of(); out, dq (B, H, Sq, D), dk, dv
// (B, Hkv, Sk, D) contiguous tensors of the inputs' dtype; lse and delta (B, H, Sq) fp32.
bool packed_kernels_available(at::ScalarType t);
void fwd_packed(const Problem& p, const Layout& q, const Layout& k, const Layout& v,
                const at::Tensor& out, float* lse);
void bwd_packed(const Problem& p, const Layout& q, const Layout& k, const Layout& v,
                const Layout& dout, const float* lse, const float* delta, const at::Tensor& dq,
                const at::Tensor& dk, const at::Tensor& dv);

}  // namespace cpu
}  // namespace torchlane::attention
