#pragma once
// Parameters of the flash attention kernels: raw pointers, sizes and strides (in elements).
// No torch headers: see DESIGN.md "Kernels are pure".
#include <cstdint>

namespace torchlane::kernels {

struct FlashFwdParams {
  const void* q;  // (b, h, seqlen_q, d), unit stride in d
  const void* k;  // (b, h_kv, seqlen_k, d)
  const void* v;  // (b, h_kv, seqlen_k, d)
  void* o;        // (b, h, seqlen_q, d)
  float* lse;     // (b, h, seqlen_q), contiguous
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t o_batch_stride, o_head_stride, o_row_stride;
  int b, h, h_kv, seqlen_q, seqlen_k, d;
  float scale;  // multiplies q k^T
  bool causal;  // top-left aligned: key j hidden from query i when j > i
};

struct FlashBwdParams : FlashFwdParams {
  const void* dout;     // like o
  const float* delta;   // (b, h, seqlen_q): rowsum(dout * o) - dlse, contiguous
  float* dq_accum;      // (b, h, seqlen_q, d) fp32, contiguous, zero-initialised
  void* dk;             // (b, h_kv, seqlen_k, d), contiguous
  void* dv;             // (b, h_kv, seqlen_k, d), contiguous
  int64_t do_batch_stride, do_head_stride, do_row_stride;
};

}  // namespace torchlane::kernels
