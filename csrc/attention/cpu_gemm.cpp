#include "attention/cpu_gemm.h"

// Note [Tile GEMMs on the CPU]
// The CPU attention kernel multiplies tiles of Q, K, V that stay in cache (e.g. 64 x 256 x D).
// at::mm on such tiles costs a dispatcher round trip and a tensor allocation per call, and
// at::native::cpublas::gemm's fast overloads are not exported from libtorch_cpu. x86 builds of
// torch link MKL statically and export its BLAS entry points (sgemm_, dgemm_,
// cblas_gemm_bf16bf16f32, cblas_gemm_f16f16f32), so we declare them weak: when present we call
// them directly (MKL runs single-threaded inside at::parallel_for's OpenMP region); when a torch
// build lacks them the weak symbols are null and we fall back to at::mm on tensor views of the
// tiles, which is slower but exact to the same fp32 accumulation.

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's CBLAS_LAYOUT / CBLAS_TRANSPOSE are plain enums with these values.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                          float* c, int ldc) __attribute__((weak));
// The C entry point; the lower-case symbol is the Fortran one (arguments by pointer).
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

namespace torchlane::attention {
namespace {

constexpr int kCblasRowMajor = 101;
constexpr int kCblasNoTrans = 111;
constexpr int kCblasTrans = 112;

// Strided view of a row-major matrix that is rows x cols with leading dimension ld.
at::Tensor view_of(const void* p, int64_t rows, int64_t cols, int64_t ld, at::ScalarType t) {
  return at::from_blob(const_cast<void*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(t));
}

template <typename in_t, typename out_t>
void gemm_fallback(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const in_t* A,
                   int64_t lda, const in_t* B, int64_t ldb, double beta, out_t* C, int64_t ldc) {
  auto acc = c10::CppTypeToScalarType<out_t>::value;
  auto in = c10::CppTypeToScalarType<in_t>::value;
  at::Tensor a = ta ? view_of(A, K, M, lda, in).t() : view_of(A, M, K, lda, in);
  at::Tensor b = tb ? view_of(B, N, K, ldb, in).t() : view_of(B, K, N, ldb, in);
  at::Tensor c = view_of(C, M, N, ldc, acc);
  at::Tensor prod = at::mm(a.to(acc), b.to(acc));
  if (beta == 0) {
    c.copy_(prod.mul_(alpha));
  } else {
    c.mul_(beta).add_(prod, alpha);
  }
}

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
template <typename T, typename Fn>
void fortran_gemm(Fn fn, bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                  int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const char tra = tb ? 'T' : 'N';
  const char trb = ta ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  fn(&tra, &trb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

template <typename Fn>
void cblas_mixed(Fn fn, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                 const void* A, int64_t lda, const void* B, int64_t ldb, float beta, float* C,
                 int64_t ldc) {
  fn(kCblasRowMajor, ta ? kCblasTrans : kCblasNoTrans, tb ? kCblasTrans : kCblasNoTrans,
     static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), alpha,
     static_cast<const uint16_t*>(A), static_cast<int>(lda), static_cast<const uint16_t*>(B),
     static_cast<int>(ldb), beta, C, static_cast<int>(ldc));
}

}  // namespace

SingleThreadedBlas::SingleThreadedBlas() {
  if (MKL_Set_Num_Threads_Local != nullptr) previous_ = MKL_Set_Num_Threads_Local(1);
}

SingleThreadedBlas::~SingleThreadedBlas() {
  // 0 restores the global setting, which is what a thread starts with.
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
}

bool tile_gemm_uses_blas() {
  return sgemm_ != nullptr && dgemm_ != nullptr && cblas_gemm_bf16bf16f32 != nullptr &&
         cblas_gemm_f16f16f32 != nullptr;
}

void tile_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
               int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (sgemm_ != nullptr) {
    fortran_gemm<float>(sgemm_, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {
    gemm_fallback(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

void tile_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
               int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  if (dgemm_ != nullptr) {
    fortran_gemm<double>(dgemm_, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {
    gemm_fallback(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

void tile_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
               const at::BFloat16* A, int64_t lda, const at::BFloat16* B, int64_t ldb, float beta,
               float* C, int64_t ldc) {
  if (cblas_gemm_bf16bf16f32 != nullptr) {
    cblas_mixed(cblas_gemm_bf16bf16f32, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {
    gemm_fallback(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

void tile_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const at::Half* A,
               int64_t lda, const at::Half* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (cblas_gemm_f16f16f32 != nullptr) {
    cblas_mixed(cblas_gemm_f16f16f32, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {
    gemm_fallback(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

}  // namespace torchlane::attention
