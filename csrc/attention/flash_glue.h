#pragma once
// Torch-side setup shared by the CUDA flash kernels (attention_cuda.cu) and their CPU emulation
// (attention_emulated.cpp): input checks, layouts and the params structs.
#include <ATen/ATen.h>

#include "attention/attention.h"
#include "kernels/flash_params.h"

namespace torchlane::attention {

// The flash kernels copy rows in 16-byte vectors: unit stride in D, every other stride a multiple
// of 8 elements and a 16-byte aligned base; anything else is copied first.
inline at::Tensor flash_layout(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && t.stride(2) % 8 == 0 && t.stride(1) % 8 == 0 &&
                  t.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.contiguous();
}

inline void check_flash_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               double scale, const char* what) {
  check_attention_inputs(q, k, v, scale);
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, what,
                   ": q, k and v must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(q.size(3) == 64 || q.size(3) == 128, what,
                    ": the head dim D (q.size(3)) must be 64 or 128, got ", q.size(3));
  TORCH_CHECK_VALUE(q.size(2) < (int64_t(1) << 31) && k.size(2) < (int64_t(1) << 31), what,
                    ": sequence lengths must be below 2^31");
}

inline kernels::FlashFwdParams make_fwd_params(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const at::Tensor& out,
                                               const at::Tensor& lse, bool causal,
                                               double scale) {
  kernels::FlashFwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.o_batch_stride = out.stride(0), p.o_head_stride = out.stride(1);
  p.o_row_stride = out.stride(2);
  p.b = static_cast<int>(q.size(0));
  p.h = static_cast<int>(q.size(1));
  p.h_kv = static_cast<int>(k.size(1));
  p.seqlen_q = static_cast<int>(q.size(2));
  p.seqlen_k = static_cast<int>(k.size(2));
  p.d = static_cast<int>(q.size(3));
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  return p;
}

// dq_accum (fp32, zeroed) and delta are allocated by the caller; dk, dv contiguous.
inline kernels::FlashBwdParams make_bwd_params(const at::Tensor& dout, const at::Tensor& q,
                                               const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& out, const at::Tensor& lse,
                                               const at::Tensor& delta,
                                               const at::Tensor& dq_accum, const at::Tensor& dk,
                                               const at::Tensor& dv, bool causal, double scale) {
  kernels::FlashBwdParams p{};
  static_cast<kernels::FlashFwdParams&>(p) = make_fwd_params(q, k, v, out, lse, causal, scale);
  p.dout = dout.data_ptr();
  p.do_batch_stride = dout.stride(0), p.do_head_stride = dout.stride(1);
  p.do_row_stride = dout.stride(2);
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  return p;
}

}  // namespace torchlane::attention
