#pragma once
// CUDA backend of the tile primitives: tensor-core mma.sync.m16n8k16 (sm80+) with fp32
// accumulators in the mma fragment layout. See Note [Tile primitives].
//
// Note [mma fragment layout]
// For mma.m16n8k16 with lane = 4 g + t (g in 0..7, t in 0..3):
//   A (16 x 16, row-major) a0: (g, 2t..2t+1)  a1: (g+8, 2t..2t+1)  a2: (g, 2t+8..+9)  a3: (g+8, 2t+8..+9)
//   B (16 x 8, k x n)      b0: (2t..2t+1, g)  b1: (2t+8..2t+9, g)
//   C (16 x 8, fp32)       c0, c1: (g, 2t), (g, 2t+1)   c2, c3: (g+8, 2t), (g+8, 2t+1)
// A warp owns a 16-row slab of every accumulator tile: Acc<M, N> holds, per lane, N/8 such C
// fragments, so a lane holds two rows (g and g+8, RowVec slots 0 and 1) and a row is spread over
// the four lanes of a quad (row reductions: two xor-shuffles). The C fragments of two adjacent
// n8 tiles are exactly the A fragment of a k16 step, which is how P stays in registers for P V.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/tile_common.h"

namespace torchlane::kernels {

TL_DEVICE float to_float(__half x) {
  return __half2float(x);
}
TL_DEVICE float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename E>
TL_DEVICE E from_float(float f);
template <>
TL_DEVICE __half from_float<__half>(float f) {
  return __float2half_rn(f);
}
template <>
TL_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float f) {
  return __float2bfloat16_rn(f);
}

template <typename E>
TL_DEVICE uint32_t pack2(E lo, E hi) {
  const uint16_t l = *reinterpret_cast<const uint16_t*>(&lo);
  const uint16_t h = *reinterpret_cast<const uint16_t*>(&hi);
  return uint32_t(l) | (uint32_t(h) << 16);
}

template <typename E>
TL_DEVICE uint32_t pack2f(float lo, float hi) {
  return pack2(from_float<E>(lo), from_float<E>(hi));
}

template <typename E>
TL_DEVICE uint32_t load2(const E* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

template <typename E>
TL_DEVICE void mma16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
TL_DEVICE void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
TL_DEVICE void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <int kNWarps>
struct CudaTile {
  static constexpr int kThreads = kNWarps * 32;

  template <int M, int N>
  struct Acc {
    static_assert(M == 16 * kNWarps, "a tile has 16 rows per warp");
    static_assert(N % 8 == 0, "tile columns come in n8 fragments");
    float v[N / 8][4];
  };
  template <int M>
  struct RowVec {
    float v[2];
    TL_DEVICE float& operator[](int i) {
      return v[i];
    }
    TL_DEVICE float operator[](int i) const {
      return v[i];
    }
  };

  static TL_DEVICE int lane() {
    return threadIdx.x & 31;
  }
  static TL_DEVICE int warp() {
    return threadIdx.x >> 5;
  }
  static TL_DEVICE void barrier() {
    __syncthreads();
  }

  // 16-byte vector copies spread over the block; global rows must be 16-byte aligned.
  template <typename E, int ROWS, int COLS>
  static TL_DEVICE void load_tile(E* s, int ld, const E* g, int64_t stride, int valid_rows) {
    constexpr int kPerVec = 16 / int(sizeof(E));
    constexpr int kVecsPerRow = COLS / kPerVec;
    static_assert(COLS % kPerVec == 0, "tile rows are copied in 16-byte vectors");
#pragma unroll
    for (int i = threadIdx.x; i < ROWS * kVecsPerRow; i += kThreads) {
      const int r = i / kVecsPerRow, c = (i % kVecsPerRow) * kPerVec;
      uint4 x = make_uint4(0, 0, 0, 0);
      if (r < valid_rows) x = *reinterpret_cast<const uint4*>(g + r * stride + c);
      *reinterpret_cast<uint4*>(s + r * ld + c) = x;
    }
  }

  template <int ROWS>
  static TL_DEVICE void load_rows(float* s, const float* g, int valid_rows) {
    for (int i = threadIdx.x; i < ROWS; i += kThreads) s[i] = i < valid_rows ? g[i] : 0.f;
  }

  template <int M, int N>
  static TL_DEVICE void zero(Acc<M, N>& a) {
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) a.v[j][e] = 0.f;
    }
  }

  template <int M>
  static TL_DEVICE void fill(RowVec<M>& r, float x) {
    r.v[0] = x;
    r.v[1] = x;
  }

  // c += A B^T; A: M x K (this warp reads its 16 rows), B: N x K, both row-major in smem.
  template <typename E, int K, int M, int N>
  static TL_DEVICE void gemm_nt(Acc<M, N>& c, const E* sA, int lda, const E* sB, int ldb) {
    const int g = lane() >> 2, t = lane() & 3;
    const E* a_rows = sA + (warp() * 16 + g) * lda + 2 * t;
#pragma unroll
    for (int kk = 0; kk < K; kk += 16) {
      const uint32_t a[4] = {load2(a_rows + kk), load2(a_rows + 8 * lda + kk),
                             load2(a_rows + kk + 8), load2(a_rows + 8 * lda + kk + 8)};
#pragma unroll
      for (int j = 0; j < N / 8; ++j) {
        const E* b_row = sB + (8 * j + g) * ldb + kk + 2 * t;
        const uint32_t b[2] = {load2(b_row), load2(b_row + 8)};
        mma16816<E>(c.v[j], a, b);
      }
    }
  }

  // c += round_E(P) B; P: M x K accumulator (A fragments straight from registers), B: K x N.
  template <typename E, int K, int M, int N>
  static TL_DEVICE void gemm_pv(Acc<M, N>& c, const Acc<M, K>& p, const E* sB, int ldb) {
    const int g = lane() >> 2, t = lane() & 3;
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      const uint32_t a[4] = {pack2f<E>(p.v[2 * kk][0], p.v[2 * kk][1]),
                             pack2f<E>(p.v[2 * kk][2], p.v[2 * kk][3]),
                             pack2f<E>(p.v[2 * kk + 1][0], p.v[2 * kk + 1][1]),
                             pack2f<E>(p.v[2 * kk + 1][2], p.v[2 * kk + 1][3])};
      const E* b_col = sB + (16 * kk + 2 * t) * ldb + g;
#pragma unroll
      for (int j = 0; j < N / 8; ++j) {
        const E* bc = b_col + 8 * j;
        const uint32_t b[2] = {pack2(bc[0], bc[ldb]), pack2(bc[8 * ldb], bc[9 * ldb])};
        mma16816<E>(c.v[j], a, b);
      }
    }
  }

  // c += A^T B; A: K x M, B: K x N, both row-major in smem.
  template <typename E, int K, int M, int N>
  static TL_DEVICE void gemm_tn(Acc<M, N>& c, const E* sA, int lda, const E* sB, int ldb) {
    const int g = lane() >> 2, t = lane() & 3;
    const int m = warp() * 16 + g;
#pragma unroll
    for (int kk = 0; kk < K; kk += 16) {
      const E* ac = sA + (kk + 2 * t) * lda + m;
      const uint32_t a[4] = {pack2(ac[0], ac[lda]), pack2(ac[8], ac[lda + 8]),
                             pack2(ac[8 * lda], ac[9 * lda]),
                             pack2(ac[8 * lda + 8], ac[9 * lda + 8])};
      const E* b_col = sB + (kk + 2 * t) * ldb + g;
#pragma unroll
      for (int j = 0; j < N / 8; ++j) {
        const E* bc = b_col + 8 * j;
        const uint32_t b[2] = {pack2(bc[0], bc[ldb]), pack2(bc[8 * ldb], bc[9 * ldb])};
        mma16816<E>(c.v[j], a, b);
      }
    }
  }

  template <int M, int N, typename F>
  static TL_DEVICE void for_each(Acc<M, N>& a, F&& f) {
    const int g = lane() >> 2, t = lane() & 3, r0 = warp() * 16 + g;
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) f(a.v[j][e], e >> 1, r0 + (e >> 1) * 8, 8 * j + 2 * t + (e & 1));
    }
  }

  template <int M, typename F>
  static TL_DEVICE void for_each_row(F&& f) {
    const int r0 = warp() * 16 + (lane() >> 2);
    f(0, r0);
    f(1, r0 + 8);
  }

  template <int M, int N>
  static TL_DEVICE void row_max(const Acc<M, N>& a, RowVec<M>& out) {
#pragma unroll
    for (int sl = 0; sl < 2; ++sl) {
      float m = kNegInf;
#pragma unroll
      for (int j = 0; j < N / 8; ++j) m = fmaxf(m, fmaxf(a.v[j][2 * sl], a.v[j][2 * sl + 1]));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      out.v[sl] = m;
    }
  }

  template <int M, int N>
  static TL_DEVICE void row_sum(const Acc<M, N>& a, RowVec<M>& out) {
#pragma unroll
    for (int sl = 0; sl < 2; ++sl) {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < N / 8; ++j) s += a.v[j][2 * sl] + a.v[j][2 * sl + 1];
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      out.v[sl] = s;
    }
  }

  template <int M, int N>
  static TL_DEVICE void mul(Acc<M, N>& a, const Acc<M, N>& b) {
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) a.v[j][e] *= b.v[j][e];
    }
  }

  template <int M, int N>
  static TL_DEVICE void scale_rows(Acc<M, N>& a, const RowVec<M>& s) {
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) a.v[j][e] *= s.v[e >> 1];
    }
  }

  template <typename E, int M, int N>
  static TL_DEVICE void store_acc(E* g, int64_t stride, int valid_rows, const Acc<M, N>& a,
                                  const RowVec<M>& row_scale) {
    const int r0 = warp() * 16 + (lane() >> 2), c0 = 2 * (lane() & 3);
#pragma unroll
    for (int sl = 0; sl < 2; ++sl) {
      const int r = r0 + 8 * sl;
      if (r >= valid_rows) continue;
#pragma unroll
      for (int j = 0; j < N / 8; ++j) {
        E* dst = g + r * stride + 8 * j + c0;
        dst[0] = from_float<E>(a.v[j][2 * sl] * row_scale.v[sl]);
        dst[1] = from_float<E>(a.v[j][2 * sl + 1] * row_scale.v[sl]);
      }
    }
  }

  template <typename E, int M, int N>
  static TL_DEVICE void store_acc_shared(E* s, int ld, const Acc<M, N>& a) {
    const int r0 = warp() * 16 + (lane() >> 2), c0 = 2 * (lane() & 3);
#pragma unroll
    for (int sl = 0; sl < 2; ++sl) {
#pragma unroll
      for (int j = 0; j < N / 8; ++j) {
        *reinterpret_cast<uint32_t*>(s + (r0 + 8 * sl) * ld + 8 * j + c0) =
            pack2f<E>(a.v[j][2 * sl], a.v[j][2 * sl + 1]);
      }
    }
  }

  // g[col][row] += a[row][col] * scale for cols < valid_cols.
  template <int M, int N>
  static TL_DEVICE void atomic_add_acc_transposed(float* g, int64_t stride, int valid_cols,
                                                  const Acc<M, N>& a, float scale) {
    const int r0 = warp() * 16 + (lane() >> 2), c0 = 2 * (lane() & 3);
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = r0 + (e >> 1) * 8, c = 8 * j + c0 + (e & 1);
        if (c < valid_cols) atomicAdd(g + c * stride + r, a.v[j][e] * scale);
      }
    }
  }

  template <int M>
  static TL_DEVICE void store_rows(float* g, int valid_rows, const RowVec<M>& r) {
    if ((lane() & 3) != 0) return;
    const int r0 = warp() * 16 + (lane() >> 2);
    if (r0 < valid_rows) g[r0] = r.v[0];
    if (r0 + 8 < valid_rows) g[r0 + 8] = r.v[1];
  }

  static TL_DEVICE float exp(float x) {
    return exp2f(x * kLog2e);
  }
  static TL_DEVICE float log(float x) {
    return logf(x);
  }
};

}  // namespace torchlane::kernels
