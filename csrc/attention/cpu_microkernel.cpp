#include "attention/cpu_microkernel.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>

#if defined(__AVX512F__) && defined(__AVX512BW__)
// gcc 12 reports the _mm512_undefined_* operands inside its own intrinsics as maybe-uninitialised.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define TORCHLANE_HAVE_AVX512 1
#else
#define TORCHLANE_HAVE_AVX512 0
#endif
#if TORCHLANE_HAVE_AVX512 && defined(__AVX512BF16__)
#define TORCHLANE_HAVE_AVX512_BF16 1
#else
#define TORCHLANE_HAVE_AVX512_BF16 0
#endif

namespace torchlane::attention::mk {
namespace {

std::atomic<bool> g_enabled{true};

inline uint16_t bits_of(float x) {
  return c10::BFloat16(x).x;  // round to nearest even
}
inline uint16_t bits_of(c10::BFloat16 x) {
  return x.x;
}
inline uint32_t word_of(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// Element i (and i + 1 when it exists, else zero) of a bf16 pair, or the fp32 element i.
template <typename W, typename T>
inline W word_at(const T* lo, const T* hi, int64_t i) {
  if constexpr (std::is_same_v<W, float>) {
    (void)hi;
    return static_cast<float>(lo[i]);
  } else {
    return word_of(bits_of(lo[i]), hi ? bits_of(hi[i]) : 0);
  }
}

#if TORCHLANE_HAVE_AVX512

inline __m512 broadcast(const float* a) {
  return _mm512_set1_ps(*a);
}
inline __m512 load_b(const float* b) {
  return _mm512_loadu_ps(b);
}
inline __m512 madd(__m512 acc, __m512 a, __m512 b) {
  return _mm512_fmadd_ps(a, b, acc);
}
#if TORCHLANE_HAVE_AVX512_BF16
inline __m512i broadcast(const uint32_t* a) {
  return _mm512_set1_epi32(static_cast<int>(*a));
}
inline __m512i load_b(const uint32_t* b) {
  return _mm512_loadu_si512(b);
}
inline __m512 madd(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}
#endif

// C[MR x 16 NV] block, see Note [Packed tile GEMMs]. mask[v]: the columns of C stored in vector v.
template <int MR, int NV, typename W>
inline void micro(int64_t kw, const W* A, int64_t lda, const W* B, int64_t ldb, float alpha,
                  float beta, float* C, int64_t ldc, const __mmask16* mask) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = _mm512_setzero_ps();
  if (beta != 0.0f) {  // C is read after the K loop: fetch it meanwhile (it may be far from L1)
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v)
        _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc + 16 * v), _MM_HINT_T0);
  }
  for (int64_t kk = 0; kk < kw; ++kk) {
    decltype(load_b(B)) b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      b[v] = load_b(B + kk * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const auto a = broadcast(A + r * lda + kk);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        acc[r][v] = madd(acc[r][v], a, b[v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      float* c = C + r * ldc + 16 * v;
      __m512 x = _mm512_mul_ps(acc[r][v], va);
      if (beta != 0.0f)  // C is not read when beta == 0 (it may be uninitialised)
        x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask[v], c), vb, x);
      _mm512_mask_storeu_ps(c, mask[v], x);
    }
  }
}

// Rows of one column block of NV vectors: kMR rows at a time, then the remainder.
template <int NV, typename W>
void column_block(int64_t M, int64_t kw, const W* A, int64_t lda, const W* B, int64_t ldb,
                  float alpha, float beta, float* C, int64_t ldc, const __mmask16* mask) {
  constexpr int kMR = 6;  // 6 x 4 accumulators + 4 B vectors + 1 broadcast of 32 zmm registers
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR)
    micro<kMR, NV>(kw, A + m * lda, lda, B, ldb, alpha, beta, C + m * ldc, ldc, mask);
  const W* a = A + m * lda;
  C += m * ldc;
  switch (M - m) {
    case 5: micro<5, NV>(kw, a, lda, B, ldb, alpha, beta, C, ldc, mask); break;
    case 4: micro<4, NV>(kw, a, lda, B, ldb, alpha, beta, C, ldc, mask); break;
    case 3: micro<3, NV>(kw, a, lda, B, ldb, alpha, beta, C, ldc, mask); break;
    case 2: micro<2, NV>(kw, a, lda, B, ldb, alpha, beta, C, ldc, mask); break;
    case 1: micro<1, NV>(kw, a, lda, B, ldb, alpha, beta, C, ldc, mask); break;
    default: break;
  }
}

inline __mmask16 first_n(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                 : (n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1));
}

#endif  // TORCHLANE_HAVE_AVX512

#if TORCHLANE_HAVE_AVX512_BF16
// 16 fp32 or bf16 values as 16 bf16 bit patterns, zero-extended to 32-bit lanes.
inline __m512i load16_bits(const float* p) {
  return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(p)));
}
inline __m512i load16_bits(const c10::BFloat16* p) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

}  // namespace

void set_enabled(bool enabled) {
  g_enabled = enabled;
}

bool enabled() {
  return g_enabled;
}

template <>
bool compiled<float>() {
  return TORCHLANE_HAVE_AVX512;
}

template <>
bool compiled<uint32_t>() {
  return TORCHLANE_HAVE_AVX512_BF16;
}

template <typename W>
void gemm(int64_t M, int64_t N, int64_t kw, float alpha, const W* A, int64_t lda, const W* B,
          int64_t ldb, float beta, float* C, int64_t ldc) {
  constexpr bool compiled =
      std::is_same_v<W, float> ? TORCHLANE_HAVE_AVX512 : TORCHLANE_HAVE_AVX512_BF16;
#if TORCHLANE_HAVE_AVX512
  if constexpr (compiled) {
    TORCH_INTERNAL_ASSERT(ldb % 16 == 0, "mk::gemm: ldb must be a multiple of 16");
    for (int64_t n0 = 0; n0 < N; n0 += kNR) {
      const int64_t nv = std::min<int64_t>(kNR, N - n0 + 15) / 16;  // vectors in this block
      __mmask16 mask[4];
      for (int v = 0; v < 4; ++v)
        mask[v] = first_n(N - n0 - 16 * v);
      const W* b = B + n0;
      float* c = C + n0;
      switch (nv) {
        case 4: column_block<4>(M, kw, A, lda, b, ldb, alpha, beta, c, ldc, mask); break;
        case 3: column_block<3>(M, kw, A, lda, b, ldb, alpha, beta, c, ldc, mask); break;
        case 2: column_block<2>(M, kw, A, lda, b, ldb, alpha, beta, c, ldc, mask); break;
        default: column_block<1>(M, kw, A, lda, b, ldb, alpha, beta, c, ldc, mask); break;
      }
    }
    return;
  }
#endif
  (void)compiled;
  TORCH_CHECK(false, "torchlane: this build has no AVX-512 attention micro-kernel for ",
              std::is_same_v<W, float> ? "fp32" : "bf16");
}

template <typename W, typename T>
void pack_rows(const T* src, int64_t ld, int64_t rows, int64_t cols, W* dst, int64_t lddw) {
  constexpr int64_t P = kPack<W>;
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * ld;
    W* d = dst + r * lddw;
    int64_t c = 0;
    if constexpr (std::is_same_v<W, float>) {
      std::copy(s, s + cols, d);
      continue;
    }
#if TORCHLANE_HAVE_AVX512_BF16
    for (; c + 32 <= cols; c += 32) {
      // 32 bf16 in 32-bit lanes -> packed pairs: packus interleaves per 128-bit lane (lo[4l..],
      // hi[4l..]); the 64-bit permutation restores the order lo[0..15], hi[0..15].
      const __m512i both = _mm512_packus_epi32(load16_bits(s + c), load16_bits(s + c + 16));
      const __m512i order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
      _mm512_storeu_si512(d + c / P, _mm512_permutexvar_epi64(order, both));
    }
#endif
    for (; c < cols; c += P)
      d[c / P] = word_at<W>(s + c, c + 1 < cols ? s + c + 1 : nullptr, 0);
  }
}

template <typename W, typename T>
void pack_pairs(const T* src, int64_t ld, int64_t rows, int64_t cols, W* dst, int64_t lddw) {
  constexpr int64_t P = kPack<W>;
  for (int64_t kk = 0; kk < words<W>(rows); ++kk) {
    const T* s0 = src + P * kk * ld;
    const T* s1 = (P == 2 && P * kk + 1 < rows) ? s0 + ld : nullptr;
    W* d = dst + kk * lddw;
    int64_t c = 0;
    if constexpr (std::is_same_v<W, float>) {
      std::copy(s0, s0 + cols, d);
      continue;
    }
#if TORCHLANE_HAVE_AVX512_BF16
    for (; c + 16 <= cols; c += 16) {
      const __m512i lo = load16_bits(s0 + c);
      const __m512i hi = s1 ? _mm512_slli_epi32(load16_bits(s1 + c), 16) : _mm512_setzero_si512();
      _mm512_storeu_si512(d + c, _mm512_or_si512(lo, hi));
    }
#endif
    for (; c < cols; ++c)
      d[c] = word_at<W>(s0, s1, c);
  }
}

template <typename W, typename T>
void pack_pairs_t(const T* src, int64_t ld, int64_t rows, int64_t cols, W* dst, int64_t lddw) {
  constexpr int64_t P = kPack<W>;
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * ld;
    for (int64_t c = 0; c < cols; c += P)
      dst[(c / P) * lddw + r] = word_at<W>(s + c, c + 1 < cols ? s + c + 1 : nullptr, 0);
  }
}

template <typename W, typename T>
void pack_rows_t(const T* src, int64_t ld, int64_t rows, int64_t cols, W* dst, int64_t lddw) {
  constexpr int64_t P = kPack<W>;
  for (int64_t kk = 0; kk < words<W>(rows); ++kk) {
    const T* s0 = src + P * kk * ld;
    const T* s1 = (P == 2 && P * kk + 1 < rows) ? s0 + ld : nullptr;
    for (int64_t c = 0; c < cols; ++c)
      dst[c * lddw + kk] = word_at<W>(s0, s1, c);
  }
}

#define TORCHLANE_MK_PACKERS(W, T)                                                         \
  template void pack_rows<W, T>(const T*, int64_t, int64_t, int64_t, W*, int64_t);    \
  template void pack_pairs<W, T>(const T*, int64_t, int64_t, int64_t, W*, int64_t);   \
  template void pack_pairs_t<W, T>(const T*, int64_t, int64_t, int64_t, W*, int64_t); \
  template void pack_rows_t<W, T>(const T*, int64_t, int64_t, int64_t, W*, int64_t);
TORCHLANE_MK_PACKERS(float, float)
TORCHLANE_MK_PACKERS(uint32_t, float)
TORCHLANE_MK_PACKERS(uint32_t, c10::BFloat16)
#undef TORCHLANE_MK_PACKERS
template void gemm<float>(int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                          int64_t, float, float*, int64_t);
template void gemm<uint32_t>(int64_t, int64_t, int64_t, float, const uint32_t*, int64_t,
                             const uint32_t*, int64_t, float, float*, int64_t);

}  // namespace torchlane::attention::mk
