#include "attention/cpu_microkernel.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

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
#if TORCHLANE_HAVE_AVX512_BF16 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && \
    defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>
#define TORCHLANE_HAVE_AMX 1
#else
#define TORCHLANE_HAVE_AMX 0
#endif

namespace torchlane::attention::mk {
namespace {

std::atomic<bool> g_enabled{true};
std::atomic<bool> g_amx_enabled{true};

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
    case 5:
      micro<5, NV>(kw, a, lda, B, ldb, alpha, beta, C, ldc, mask);
      break;
    case 4:
      micro<4, NV>(kw, a, lda, B, ldb, alpha, beta, C, ldc, mask);
      break;
    case 3:
      micro<3, NV>(kw, a, lda, B, ldb, alpha, beta, C, ldc, mask);
      break;
    case 2:
      micro<2, NV>(kw, a, lda, B, ldb, alpha, beta, C, ldc, mask);
      break;
    case 1:
      micro<1, NV>(kw, a, lda, B, ldb, alpha, beta, C, ldc, mask);
      break;
    default:
      break;
  }
}

inline __mmask16 first_n(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                 : (n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1));
}

#endif  // TORCHLANE_HAVE_AVX512

#if TORCHLANE_HAVE_AMX
// Note [AMX tile GEMMs]
// On CPUs with AMX (Sapphire Rapids and later), gemm<uint32_t> runs on the tile unit: the "rows"
// layout is the A tile layout (16 rows of 16 words, lda apart) and the "pairs" layout the B tile
// layout (16 rows of 16 bf16 pairs, ldb apart), so the operands need no repacking. Blocks of up
// to 32 x 32 of C live in tiles 0-3 (tmm0 rows 0-15 / cols 0-15, tmm1 rows 0-15 / cols 16-31,
// tmm2 and tmm3 rows 16-31), A in tmm4/5, B in tmm6/7, all configured 16 rows x 64 bytes; K is
// taken 16 words (32 bf16) per tdpbf16ps. What the tiles do not cover (the last M % 16 rows,
// N % 16 columns, kw % 16 words) goes to the AVX512-BF16 micro-kernels. Linux hands out the tile
// state only on request (arch_prctl ARCH_REQ_XCOMP_PERM), asked once per process; without it the
// AVX-512 path is used. The tile configuration is checked (sttilecfg) at every call, since other
// code in the thread (oneDNN under torch) may have loaded its own, and released with
// release_tiles() at the end of a kernel's parallel region.

bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 0, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64);

void configure_tiles() {
  static const TileConfig want = [] {
    TileConfig c;
    c.palette = 1;
    for (int t = 0; t < 8; ++t) {
      c.colsb[t] = 64;
      c.rows[t] = 16;
    }
    return c;
  }();
  TileConfig now;
  _tile_storeconfig(&now);
  if (std::memcmp(&now, &want, sizeof(TileConfig)) != 0)
    _tile_loadconfig(&want);
}

// C (16 MT x 16 NT, ldc) = alpha * A B + beta * C over kw words (a multiple of 16).
template <int MT, int NT>
void amx_block(int64_t kw, const uint32_t* A, int64_t lda, const uint32_t* B, int64_t ldb,
               float alpha, float beta, float* C, int64_t ldc) {
  const bool direct = alpha == 1.0f && (beta == 0.0f || beta == 1.0f);  // no epilogue needed
  const int64_t sc = ldc * 4;
  if (direct && beta == 1.0f) {
    _tile_loadd(0, C, sc);
    if constexpr (NT > 1)
      _tile_loadd(1, C + 16, sc);
    if constexpr (MT > 1)
      _tile_loadd(2, C + 16 * ldc, sc);
    if constexpr (MT > 1 && NT > 1)
      _tile_loadd(3, C + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    if constexpr (NT > 1)
      _tile_zero(1);
    if constexpr (MT > 1)
      _tile_zero(2);
    if constexpr (MT > 1 && NT > 1)
      _tile_zero(3);
  }
  const int64_t sa = lda * 4, sb = ldb * 4;
  for (int64_t kk = 0; kk < kw; kk += 16) {
    _tile_loadd(4, A + kk, sa);
    _tile_loadd(6, B + kk * ldb, sb);
    if constexpr (NT > 1)
      _tile_loadd(7, B + kk * ldb + 16, sb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT > 1)
      _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT > 1) {
      _tile_loadd(5, A + 16 * lda + kk, sa);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NT > 1)
        _tile_dpbf16ps(3, 5, 7);
    }
  }
  if (direct) {
    _tile_stored(0, C, sc);
    if constexpr (NT > 1)
      _tile_stored(1, C + 16, sc);
    if constexpr (MT > 1)
      _tile_stored(2, C + 16 * ldc, sc);
    if constexpr (MT > 1 && NT > 1)
      _tile_stored(3, C + 16 * ldc + 16, sc);
    return;
  }
  alignas(64) float t[4][256];
  _tile_stored(0, t[0], 64);
  if constexpr (NT > 1)
    _tile_stored(1, t[1], 64);
  if constexpr (MT > 1)
    _tile_stored(2, t[2], 64);
  if constexpr (MT > 1 && NT > 1)
    _tile_stored(3, t[3], 64);
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int i = 0; i < MT; ++i) {
    for (int j = 0; j < NT; ++j) {
      for (int r = 0; r < 16; ++r) {
        float* c = C + (16 * i + r) * ldc + 16 * j;
        __m512 x = _mm512_mul_ps(_mm512_load_ps(&t[2 * i + j][16 * r]), va);
        if (beta != 0.0f)  // C is not read when beta == 0
          x = _mm512_fmadd_ps(_mm512_loadu_ps(c), vb, x);
        _mm512_storeu_ps(c, x);
      }
    }
  }
}

void amx_gemm(int64_t Ma, int64_t Na, int64_t Ka, float alpha, const uint32_t* A, int64_t lda,
              const uint32_t* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  configure_tiles();
  // Column blocks outer: one block's B tiles are reused across all of A, which (a query tile's
  // Q or P of up to ~32 KiB) then stays in L1.
  for (int64_t n = 0; n < Na; n += 32) {
    const bool two_n = Na - n >= 32;
    for (int64_t m = 0; m < Ma; m += 32) {
      const bool two_m = Ma - m >= 32;
      const uint32_t* a = A + m * lda;
      const uint32_t* b = B + n;
      float* c = C + m * ldc + n;
      if (two_m && two_n)
        amx_block<2, 2>(Ka, a, lda, b, ldb, alpha, beta, c, ldc);
      else if (two_m)
        amx_block<2, 1>(Ka, a, lda, b, ldb, alpha, beta, c, ldc);
      else if (two_n)
        amx_block<1, 2>(Ka, a, lda, b, ldb, alpha, beta, c, ldc);
      else
        amx_block<1, 1>(Ka, a, lda, b, ldb, alpha, beta, c, ldc);
    }
  }
}
#endif  // TORCHLANE_HAVE_AMX

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

bool amx_available() {
#if TORCHLANE_HAVE_AMX
  return g_amx_enabled && amx_permitted();
#else
  return false;
#endif
}

void set_amx_enabled(bool enabled) {
  g_amx_enabled = enabled;
}

void release_tiles() {
#if TORCHLANE_HAVE_AMX
  if (amx_available())
    _tile_release();
#endif
}

namespace {

#if TORCHLANE_HAVE_AVX512
// The AVX-512 micro-kernels over all of C (Note [Packed tile GEMMs]).
template <typename W>
void vector_gemm(int64_t M, int64_t N, int64_t kw, float alpha, const W* A, int64_t lda, const W* B,
                 int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += kNR) {
    const int64_t nv = std::min<int64_t>(kNR, N - n0 + 15) / 16;  // vectors in this block
    __mmask16 mask[4];
    for (int v = 0; v < 4; ++v)
      mask[v] = first_n(N - n0 - 16 * v);
    const W* b = B + n0;
    float* c = C + n0;
    switch (nv) {
      case 4:
        column_block<4>(M, kw, A, lda, b, ldb, alpha, beta, c, ldc, mask);
        break;
      case 3:
        column_block<3>(M, kw, A, lda, b, ldb, alpha, beta, c, ldc, mask);
        break;
      case 2:
        column_block<2>(M, kw, A, lda, b, ldb, alpha, beta, c, ldc, mask);
        break;
      default:
        column_block<1>(M, kw, A, lda, b, ldb, alpha, beta, c, ldc, mask);
        break;
    }
  }
}
#endif

}  // namespace

template <typename W>
void gemm(int64_t M, int64_t N, int64_t kw, float alpha, const W* A, int64_t lda, const W* B,
          int64_t ldb, float beta, float* C, int64_t ldc) {
  constexpr bool compiled =
      std::is_same_v<W, float> ? TORCHLANE_HAVE_AVX512 : TORCHLANE_HAVE_AVX512_BF16;
#if TORCHLANE_HAVE_AVX512
  if constexpr (compiled) {
    TORCH_INTERNAL_ASSERT(ldb % 16 == 0, "mk::gemm: ldb must be a multiple of 16");
#if TORCHLANE_HAVE_AMX
    if constexpr (std::is_same_v<W, uint32_t>) {
      // Whole 16 x 16 tiles of C over whole 16-word steps of K on AMX, the rest on AVX-512.
      const int64_t Ma = M / 16 * 16, Na = N / 16 * 16, Ka = kw / 16 * 16;
      if (Ma > 0 && Na > 0 && Ka > 0 && amx_available()) {
        amx_gemm(Ma, Na, Ka, alpha, A, lda, B, ldb, beta, C, ldc);
        if (Ka < kw)
          vector_gemm(Ma, Na, kw - Ka, alpha, A + Ka, lda, B + Ka * ldb, ldb, 1.0f, C, ldc);
        if (Na < N)
          vector_gemm(Ma, N - Na, kw, alpha, A, lda, B + Na, ldb, beta, C + Na, ldc);
        if (Ma < M)
          vector_gemm(M - Ma, N, kw, alpha, A + Ma * lda, lda, B, ldb, beta, C + Ma * ldc, ldc);
        return;
      }
    }
#endif
    vector_gemm(M, N, kw, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
#endif
  (void)compiled;
  TORCH_CHECK(false, "torchlane: this build has no AVX-512 attention micro-kernel for ",
              std::is_same_v<W, float> ? "fp32" : "bf16");
}

namespace {
#if TORCHLANE_HAVE_AVX512
// Transposes the 16 x 16 block of 32-bit words in r (row i in r[i]) in place: three rounds of
// shuffles, within 128-bit lanes (32- then 64-bit interleaves), then across them.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // t[i]: rows i & ~1 and i | 1 interleaved, elements 0,1 / 4,5 / ... (lo) or 2,3 / 6,7 (hi)
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4g + j]: column j (+ 4 lane) of rows 4g..4g+3, one 128-bit lane per group of 4 columns
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}
#endif
}  // namespace

void transpose_words(const uint32_t* src, int64_t lds, int64_t rows, int64_t cols, uint32_t* dst,
                     int64_t ldd) {
  int64_t r0 = 0;
#if TORCHLANE_HAVE_AVX512
  for (; r0 + 16 <= rows; r0 += 16) {
    int64_t c0 = 0;
    for (; c0 + 16 <= cols; c0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = _mm512_loadu_si512(src + (r0 + i) * lds + c0);
      transpose16(r);
      for (int i = 0; i < 16; ++i)
        _mm512_storeu_si512(dst + (c0 + i) * ldd + r0, r[i]);
    }
    for (int64_t c = c0; c < cols; ++c)
      for (int64_t r = r0; r < r0 + 16; ++r)
        dst[c * ldd + r] = src[r * lds + c];
  }
#endif
  for (int64_t r = r0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      dst[c * ldd + r] = src[r * lds + c];
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
  if constexpr (std::is_same_v<W, float> && std::is_same_v<T, float>) {
    transpose_words(reinterpret_cast<const uint32_t*>(src), ld, rows, cols,
                    reinterpret_cast<uint32_t*>(dst), lddw);
    return;
  }
  if constexpr (std::is_same_v<W, uint32_t> && std::is_same_v<T, c10::BFloat16>) {
    if (cols % 2 == 0 && ld % 2 == 0) {  // a transpose of 32-bit words (bf16 pairs)
      transpose_words(reinterpret_cast<const uint32_t*>(src), ld / 2, rows, cols / 2, dst, lddw);
      return;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * ld;
    for (int64_t c = 0; c < cols; c += P)
      dst[(c / P) * lddw + r] = word_at<W>(s + c, c + 1 < cols ? s + c + 1 : nullptr, 0);
  }
}

template <typename W, typename T>
void pack_rows_t(const T* src, int64_t ld, int64_t rows, int64_t cols, W* dst, int64_t lddw) {
  constexpr int64_t P = kPack<W>;
  if constexpr (std::is_same_v<W, float> && std::is_same_v<T, float>) {
    transpose_words(reinterpret_cast<const uint32_t*>(src), ld, rows, cols,
                    reinterpret_cast<uint32_t*>(dst), lddw);
    return;
  }
  // bf16: "pairs" of 32 source rows (16 words) at a time, transposed
  constexpr int64_t kRowsPerBlock = 16 * P;
  std::vector<W> pairs(16 * cols);
  for (int64_t r0 = 0; r0 < rows; r0 += kRowsPerBlock) {
    const int64_t n = std::min(kRowsPerBlock, rows - r0);
    pack_pairs(src + r0 * ld, ld, n, cols, pairs.data(), cols);
    transpose_words(reinterpret_cast<const uint32_t*>(pairs.data()), cols, words<W>(n), cols,
                    reinterpret_cast<uint32_t*>(dst + r0 / P), lddw);
  }
}

#define TORCHLANE_MK_PACKERS(W, T)                                                    \
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
