#pragma once
// AVX-512 tile GEMMs (fp32, and bf16 x bf16 -> fp32 on AVX512-BF16) for the CPU attention
// kernel. See Note [Packed tile GEMMs].
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

namespace torchlane::attention::mk {

// Note [Packed tile GEMMs]
// C[M x N] (+)= A[M x K] B[K x N] with fp32 C, computed by a micro-kernel that keeps a 6 x 64
// block of C in 24 zmm accumulators and streams K: per step 4 loads of B and 6 broadcasts of A
// feed 24 multiply-adds (fewer vectors for the last columns of C). The operands are "words" W:
//  - W = float: fp32 operands, one element per word, vfmadd231ps.
//  - W = uint32_t: bf16 operands, two consecutive elements of the reduction (k) dimension per
//    word, vdpbf16ps (both products added to the fp32 lane: twice the multiply-adds of an fp32
//    FMA per instruction).
// A is in "rows" layout: M rows of words(K) words, lda apart; one word per row is broadcast per
// step. A row-major matrix (bf16: with an even row length) already is in this layout.
// B is in "pairs" layout: words(K) rows of ldb words (ldb a multiple of 16), word (kk, n) holds
// B[kk * pack .. kk * pack + pack - 1][n]; up to kNR words are loaded per step. For fp32 that is
// a row-major K x N matrix.
// bf16 with an odd K is padded with a zero element (padding must be zero in one operand and
// finite in the other). Columns of B at or past N are read up to the next multiple of 16 but
// only reach columns of C that are never stored, so they need not be initialised.
// Packing routines convert fp32 or bf16 sources into these layouts (fp32 -> bf16 rounds to
// nearest even). Where the CPU has AMX, bf16 GEMMs run on its tiles instead, on the same layouts
// (Note [AMX tile GEMMs] in cpu_microkernel.cpp).

constexpr int64_t kNR = 64;  // columns of C per micro-kernel block

// Selects the packed micro-kernels (true, the default) or the BLAS tile GEMMs (false) for the
// CPU attention kernel; for tests and benchmarks. Not synchronised with running kernels.
void set_enabled(bool enabled);
bool enabled();

template <typename W>
constexpr int64_t kPack = std::is_same_v<W, float> ? 1 : 2;

template <typename W>
constexpr int64_t words(int64_t k) {
  return (k + kPack<W> - 1) / kPack<W>;
}
inline int64_t round_up(int64_t x, int64_t m) {
  return (x + m - 1) / m * m;
}
// A leading dimension of at least `words` 4-byte words (a multiple of 16 when `words` is) whose
// rows do not all fall into the same L1 cache sets: row strides that are multiples of 4 KiB (K^T
// packs of 1024 or 4096 keys, D x Sk accumulators) would make every row of a tile compete for
// the same 8 ways.
inline int64_t padded_ld(int64_t words) {
  return words + 16;
}

// True when this build has the AVX-512 micro-kernels (W = float) / the AVX512-BF16 ones
// (W = uint32_t); available(): and they are enabled (set_enabled, default on).
template <typename W>
bool compiled();
template <typename W>
bool available() {
  return compiled<W>() && enabled();
}
// bf16 only: whether gemm<uint32_t> runs on AMX tiles (Note [AMX tile GEMMs]): compiled in,
// granted by the OS and enabled (set_amx_enabled, default on; for tests and benchmarks).
bool amx_available();
void set_amx_enabled(bool enabled);
// Releases this thread's AMX tile state, if gemm may have used it; call at the end of a parallel
// region's task that ran bf16 GEMMs.
void release_tiles();

// C[M x N] = alpha * A B + beta * C, C row-major with leading dimension ldc (not read when
// beta == 0). A: M rows of kw words, lda apart. B: kw rows of ldb words (ldb % 16 == 0).
template <typename W>
void gemm(int64_t M, int64_t N, int64_t kw, float alpha, const W* A, int64_t lda, const W* B,
          int64_t ldb, float beta, float* C, int64_t ldc);

// dst "rows" layout of src (rows x cols, leading dimension ld); rows lddw words apart.
template <typename W, typename T>
void pack_rows(const T* src, int64_t ld, int64_t rows, int64_t cols, W* dst, int64_t lddw);

// dst "pairs" layout of src (rows x cols), reduction over src's rows: words(rows) rows of lddw
// words. Columns past cols are left untouched.
template <typename W, typename T>
void pack_pairs(const T* src, int64_t ld, int64_t rows, int64_t cols, W* dst, int64_t lddw);

// dst "pairs" layout of src^T, reduction over src's columns: words(cols) rows of lddw words,
// word (kk, r) from src row r.
template <typename W, typename T>
void pack_pairs_t(const T* src, int64_t ld, int64_t rows, int64_t cols, W* dst, int64_t lddw);

// dst "rows" layout of src^T, reduction over src's rows: cols rows of words(rows) words, lddw
// apart.
template <typename W, typename T>
void pack_rows_t(const T* src, int64_t ld, int64_t rows, int64_t cols, W* dst, int64_t lddw);

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols: a transpose of 32-bit words (fp32
// values or bf16 pairs), in 16 x 16 blocks of AVX-512 shuffles where compiled.
void transpose_words(const uint32_t* src, int64_t lds, int64_t rows, int64_t cols, uint32_t* dst,
                     int64_t ldd);

}  // namespace torchlane::attention::mk
