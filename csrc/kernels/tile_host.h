#pragma once
// Host backend of the tile primitives: the block's tiles as plain arrays, executed sequentially.
// See Note [Tile primitives]. Compiled by the host C++ compiler only.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/tile_common.h"

namespace torchlane::kernels {

// 16-bit element types with the bit layout of __nv_bfloat16 / __half (round to nearest even).
struct HostBf16 {
  uint16_t bits;
};
struct HostHalf {
  _Float16 value;
};

inline float to_float(HostBf16 x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float to_float(HostHalf x) {
  return static_cast<float>(x.value);
}

template <typename E>
E from_float(float f);

template <>
inline HostBf16 from_float<HostBf16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if (std::isnan(f)) return HostBf16{uint16_t(0x7fc0)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return HostBf16{uint16_t(u >> 16)};
}
template <>
inline HostHalf from_float<HostHalf>(float f) {
  return HostHalf{static_cast<_Float16>(f)};
}

template <int kNWarps>
struct HostTile {
  template <int M, int N>
  struct Acc {
    static_assert(M == 16 * kNWarps, "a tile has 16 rows per warp");
    float v[M][N];
  };
  template <int M>
  struct RowVec {
    float v[M];
    float& operator[](int i) {
      return v[i];
    }
    float operator[](int i) const {
      return v[i];
    }
  };

  static void barrier() {}

  template <typename E, int ROWS, int COLS>
  static void load_tile(E* s, int ld, const E* g, int64_t stride, int valid_rows) {
    for (int r = 0; r < ROWS; ++r) {
      for (int c = 0; c < COLS; ++c) s[r * ld + c] = r < valid_rows ? g[r * stride + c] : E{};
    }
  }

  template <int ROWS>
  static void load_rows(float* s, const float* g, int valid_rows) {
    for (int r = 0; r < ROWS; ++r) s[r] = r < valid_rows ? g[r] : 0.f;
  }

  template <int M, int N>
  static void zero(Acc<M, N>& a) {
    std::memset(a.v, 0, sizeof(a.v));
  }

  template <int M>
  static void fill(RowVec<M>& r, float x) {
    for (int i = 0; i < M; ++i) r[i] = x;
  }

  // c += A B^T, A: M x K at sA (leading dimension lda), B: N x K at sB.
  template <typename E, int K, int M, int N>
  static void gemm_nt(Acc<M, N>& c, const E* sA, int lda, const E* sB, int ldb) {
    for (int i = 0; i < M; ++i) {
      for (int j = 0; j < N; ++j) {
        float s = 0.f;
        for (int k = 0; k < K; ++k) s += to_float(sA[i * lda + k]) * to_float(sB[j * ldb + k]);
        c.v[i][j] += s;
      }
    }
  }

  // c += round_E(P) B, P: M x K accumulator tile, B: K x N at sB.
  template <typename E, int K, int M, int N>
  static void gemm_pv(Acc<M, N>& c, const Acc<M, K>& p, const E* sB, int ldb) {
    for (int i = 0; i < M; ++i) {
      float pr[K];
      for (int k = 0; k < K; ++k) pr[k] = to_float(from_float<E>(p.v[i][k]));
      for (int j = 0; j < N; ++j) {
        float s = 0.f;
        for (int k = 0; k < K; ++k) s += pr[k] * to_float(sB[k * ldb + j]);
        c.v[i][j] += s;
      }
    }
  }

  // c += A^T B, A: K x M at sA, B: K x N at sB.
  template <typename E, int K, int M, int N>
  static void gemm_tn(Acc<M, N>& c, const E* sA, int lda, const E* sB, int ldb) {
    for (int i = 0; i < M; ++i) {
      for (int j = 0; j < N; ++j) {
        float s = 0.f;
        for (int k = 0; k < K; ++k) s += to_float(sA[k * lda + i]) * to_float(sB[k * ldb + j]);
        c.v[i][j] += s;
      }
    }
  }

  // f(float& x, int slot, int row, int col); slot indexes the RowVec entry of the row.
  template <int M, int N, typename F>
  static void for_each(Acc<M, N>& a, F&& f) {
    for (int i = 0; i < M; ++i) {
      for (int j = 0; j < N; ++j) f(a.v[i][j], i, i, j);
    }
  }

  // f(int slot, int row) for every row of an M-row tile.
  template <int M, typename F>
  static void for_each_row(F&& f) {
    for (int i = 0; i < M; ++i) f(i, i);
  }

  template <int M, int N>
  static void row_max(const Acc<M, N>& a, RowVec<M>& out) {
    for (int i = 0; i < M; ++i) {
      float m = kNegInf;
      for (int j = 0; j < N; ++j) m = std::fmax(m, a.v[i][j]);
      out[i] = m;
    }
  }

  template <int M, int N>
  static void row_sum(const Acc<M, N>& a, RowVec<M>& out) {
    for (int i = 0; i < M; ++i) {
      float s = 0.f;
      for (int j = 0; j < N; ++j) s += a.v[i][j];
      out[i] = s;
    }
  }

  // a *= b elementwise.
  template <int M, int N>
  static void mul(Acc<M, N>& a, const Acc<M, N>& b) {
    for (int i = 0; i < M; ++i) {
      for (int j = 0; j < N; ++j) a.v[i][j] *= b.v[i][j];
    }
  }

  template <int M, int N>
  static void scale_rows(Acc<M, N>& a, const RowVec<M>& s) {
    for (int i = 0; i < M; ++i) {
      for (int j = 0; j < N; ++j) a.v[i][j] *= s[i];
    }
  }

  // g[row][col] = round_E(a[row][col] * row_scale[row]) for rows < valid_rows.
  template <typename E, int M, int N>
  static void store_acc(E* g, int64_t stride, int valid_rows, const Acc<M, N>& a,
                        const RowVec<M>& row_scale) {
    for (int i = 0; i < M && i < valid_rows; ++i) {
      for (int j = 0; j < N; ++j) g[i * stride + j] = from_float<E>(a.v[i][j] * row_scale[i]);
    }
  }

  // Shared-memory copy of the tile in the element type (all rows).
  template <typename E, int M, int N>
  static void store_acc_shared(E* s, int ld, const Acc<M, N>& a) {
    for (int i = 0; i < M; ++i) {
      for (int j = 0; j < N; ++j) s[i * ld + j] = from_float<E>(a.v[i][j]);
    }
  }

  // g[col][row] += a[row][col] * scale for cols < valid_cols (atomicAdd on the GPU).
  template <int M, int N>
  static void atomic_add_acc_transposed(float* g, int64_t stride, int valid_cols,
                                        const Acc<M, N>& a, float scale) {
    for (int i = 0; i < M; ++i) {
      for (int j = 0; j < N && j < valid_cols; ++j) g[j * stride + i] += a.v[i][j] * scale;
    }
  }

  template <int M>
  static void store_rows(float* g, int valid_rows, const RowVec<M>& r) {
    for (int i = 0; i < M && i < valid_rows; ++i) g[i] = r[i];
  }

  static float exp(float x) {
    return std::exp2(x * kLog2e);
  }
  static float log(float x) {
    return std::log(x);
  }
};

}  // namespace torchlane::kernels
