#pragma once
// Small row-major GEMMs on tiles for the CPU attention kernel.
#include <ATen/ATen.h>

#include <cstdint>

namespace torchlane::attention {

// C[M x N] = alpha * op(A) * op(B) + beta * C, all row-major; op(X) = X^T when trans_x.
// A is M x K (K x M when trans_a), B is K x N (N x K when trans_b). Low-precision inputs
// accumulate and write in fp32. See Note [Tile GEMMs on the CPU].
void tile_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
               int64_t ldc);
void tile_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
               const double* A, int64_t lda, const double* B, int64_t ldb, double beta, double* C,
               int64_t ldc);
void tile_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               const at::BFloat16* A, int64_t lda, const at::BFloat16* B, int64_t ldb, float beta,
               float* C, int64_t ldc);
void tile_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               const at::Half* A, int64_t lda, const at::Half* B, int64_t ldb, float beta,
               float* C, int64_t ldc);

// Makes the BLAS calls of the current thread single-threaded for the guard's lifetime. The
// kernel's tasks already run on every core (at::parallel_for); MKL called from those workers
// would otherwise start its own thread team per call and oversubscribe the cores.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas();
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_ = 0;
};

// True when the fast BLAS entry points were found (reported by the benchmark).
bool tile_gemm_uses_blas();

}  // namespace torchlane::attention
