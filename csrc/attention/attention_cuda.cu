// CUDA implementation of torchlane::attention_fwd / attention_bwd: thin torch glue around the
// flash kernels of csrc/kernels (fp16/bf16, head dim 64 or 128, sm80+). Compiled only when torch
// has CUDA (setup.py); never executed in this repository's CI, see the README.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "attention/flash_glue.h"
#include "kernels/flash_api.h"
#include "kernels/static_switch.h"

namespace torchlane::attention {
namespace {

void check_device(const at::Tensor& q) {
  const auto* props = at::cuda::getDeviceProperties(q.get_device());
  TORCH_CHECK(props->major >= 8, "torchlane.attention on CUDA needs compute capability 8.0+ ",
              "(tensor-core mma for fp16/bf16), got ", props->major, ".", props->minor);
}

template <typename F>
void dispatch(at::ScalarType t, int64_t d, F&& f) {
  TORCHLANE_HEADDIM_SWITCH(d, [&] {
    if (t == at::kBFloat16) {
      f(__nv_bfloat16{}, std::integral_constant<int, kHeadDim>{});
    } else {
      f(__half{}, std::integral_constant<int, kHeadDim>{});
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in,
                                                      const at::Tensor& k_in,
                                                      const at::Tensor& v_in, bool causal,
                                                      double scale) {
  check_flash_inputs(q_in, k_in, v_in, scale, "torchlane.attention (CUDA)");
  const c10::cuda::CUDAGuard guard(q_in.device());
  check_device(q_in);
  const at::Tensor q = flash_layout(q_in), k = flash_layout(k_in), v = flash_layout(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const auto p = make_fwd_params(q, k, v, out, lse, causal, scale);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type(), q.size(3), [&](auto e, auto d) {
    C10_CUDA_CHECK((kernels::run_flash_fwd<decltype(e), decltype(d)::value>(p, stream)));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse,
    bool causal, double scale) {
  check_flash_inputs(q_in, k_in, v_in, scale, "torchlane.attention backward (CUDA)");
  check_attention_backward_inputs(grad_out, grad_lse, q_in, k_in, v_in, out, lse, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = flash_layout(q_in), k = flash_layout(k_in), v = flash_layout(v_in),
                   dout = flash_layout(grad_out);
  // delta = rowsum(dO * O) - dlse, see Note [Attention op contract].
  at::Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1);
  if (grad_lse.has_value() && grad_lse->defined()) delta.sub_(grad_lse->to(at::kFloat));
  delta = delta.contiguous();
  at::Tensor dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  const at::Tensor lse_c = lse.contiguous();
  const auto p =
      make_bwd_params(dout, q, k, v, out, lse_c, delta, dq_accum, dk, dv, causal, scale);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type(), q.size(3), [&](auto e, auto d) {
    C10_CUDA_CHECK((kernels::run_flash_bwd<decltype(e), decltype(d)::value>(p, stream)));
  });
  return {dq_accum.to(q.scalar_type()), dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlane, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace torchlane::attention
