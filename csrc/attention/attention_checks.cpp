#include <cmath>

#include "attention/attention.h"

namespace torchlane::attention {
namespace {

void check_rank4(const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == 4, "torchlane.attention: ", name, " must be a 4-D tensor ", layout,
                    ", got a ", t.dim(), "-D tensor of shape ", t.sizes());
}

void check_float(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf || s == at::kDouble,
                   "torchlane.attention: ", name,
                   " must be a floating-point tensor (float32, bfloat16, float16 or float64), got ",
                   s);
}

}  // namespace

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            double scale) {
  check_rank4(q, "q", "(B, H, Sq, D)");
  check_rank4(k, "k", "(B, Hkv, Sk, D)");
  check_rank4(v, "v", "(B, Hkv, Sk, D)");
  check_float(q, "q");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "torchlane.attention: k must have q's dtype ",
                   q.scalar_type(), ", got ", k.scalar_type());
  TORCH_CHECK_TYPE(v.scalar_type() == q.scalar_type(), "torchlane.attention: v must have q's dtype ",
                   q.scalar_type(), ", got ", v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device(), "torchlane.attention: k must be on q's device ",
                    q.device(), ", got ", k.device());
  TORCH_CHECK_VALUE(v.device() == q.device(), "torchlane.attention: v must be on q's device ",
                    q.device(), ", got ", v.device());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0),
                    "torchlane.attention: k and v must have q's batch size ", q.size(0),
                    ", got k ", k.size(0), " and v ", v.size(0));
  TORCH_CHECK_VALUE(k.size(3) == q.size(3) && v.size(3) == q.size(3),
                    "torchlane.attention: k and v must have q's head dim D=", q.size(3), ", got k ",
                    k.size(3), " and v ", v.size(3));
  TORCH_CHECK_VALUE(v.size(1) == k.size(1), "torchlane.attention: v must have k's number of heads ",
                    k.size(1), ", got ", v.size(1));
  TORCH_CHECK_VALUE(v.size(2) == k.size(2),
                    "torchlane.attention: v must have k's sequence length Sk=", k.size(2), ", got ",
                    v.size(2));
  TORCH_CHECK_VALUE(q.size(0) > 0 && q.size(1) > 0 && q.size(2) > 0 && q.size(3) > 0,
                    "torchlane.attention: q must have no empty dimension, got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.size(1) > 0 && k.size(2) > 0,
                    "torchlane.attention: k and v must have at least one head and one key, got k "
                    "of shape ",
                    k.sizes());
  TORCH_CHECK_VALUE(q.size(1) % k.size(1) == 0,
                    "torchlane.attention: the number of query heads H=", q.size(1),
                    " (q.size(1)) must be a multiple of the number of kv heads Hkv=", k.size(1),
                    " (k.size(1))");
  TORCH_CHECK_VALUE(std::isfinite(scale), "torchlane.attention: scale must be finite, got ", scale);
}

void check_attention_backward_inputs(const at::Tensor& grad_out,
                                     const c10::optional<at::Tensor>& grad_lse,
                                     const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& out, const at::Tensor& lse, double scale) {
  check_attention_inputs(q, k, v, scale);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type(),
                    "torchlane.attention backward: grad_out must match q's shape ", q.sizes(),
                    " and dtype ", q.scalar_type(), ", got ", grad_out.sizes(), " ",
                    grad_out.scalar_type());
  TORCH_CHECK_VALUE(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
                    "torchlane.attention backward: out must match q's shape ", q.sizes(),
                    " and dtype ", q.scalar_type(), ", got ", out.sizes(), " ", out.scalar_type());
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> lse_shape{q.size(0), q.size(1), q.size(2)};
  TORCH_CHECK_VALUE(lse.sizes() == lse_shape && lse.scalar_type() == acc,
                    "torchlane.attention backward: lse must be ", acc, " of shape ", lse_shape,
                    ", got ", lse.scalar_type(), " of shape ", lse.sizes());
  if (grad_lse.has_value() && grad_lse->defined()) {
    TORCH_CHECK_VALUE(grad_lse->sizes() == lse_shape,
                      "torchlane.attention backward: grad_lse must have shape ", lse_shape,
                      ", got ", grad_lse->sizes());
  }
  for (const at::Tensor* t : {&grad_out, &out, &lse}) {
    TORCH_CHECK_VALUE(t->device() == q.device(),
                      "torchlane.attention backward: all tensors must be on q's device ",
                      q.device(), ", got ", t->device());
  }
}

at::Tensor rows_unit_stride(const at::Tensor& t) {
  const int64_t d = t.size(3);
  const bool ok = t.stride(3) == 1 && (t.size(2) == 1 || t.stride(2) >= d) && t.stride(2) >= 0 &&
                  t.stride(1) >= 0 && t.stride(0) >= 0;
  return ok ? t : t.contiguous();
}

}  // namespace torchlane::attention
