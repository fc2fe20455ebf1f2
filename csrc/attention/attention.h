#pragma once
// torchlane::attention ops: shared declarations for the CPU and CUDA implementations.
//
// Note [Attention op contract]
// attention_fwd(q, k, v, causal, scale) -> (out, lse)
//   q: (B, H, Sq, D), k and v: (B, Hkv, Sk, D), H a multiple of Hkv (GQA/MQA: query head h reads
//   kv head h / (H / Hkv)). out: (B, H, Sq, D) contiguous in q's dtype. lse: (B, H, Sq), the
//   natural-log logsumexp of the scaled logits, in fp32 (fp64 for fp64 inputs).
//   causal masks key j for query i when j > i: the mask is aligned to the top-left corner, as
//   torch SDPA's is_causal, so when Sq != Sk query i still sees keys 0..i (and every query sees
//   at least key 0, so no row is empty).
// attention_bwd(grad_out, grad_lse?, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)
//   recomputes the probabilities from lse; grad_lse (may be undefined) is the gradient flowing
//   into the lse output: d lse_i / d s_ij = p_ij, so it folds into delta_i = rowsum(dO * O) - dlse_i.
#include <ATen/ATen.h>

#include <tuple>

namespace torchlane::attention {

// TORCH_CHECKs of the public contract above; every message names the argument.
void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            double scale);
void check_attention_backward_inputs(const at::Tensor& grad_out,
                                     const c10::optional<at::Tensor>& grad_lse,
                                     const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& out, const at::Tensor& lse, double scale);

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, bool causal,
                                                     double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    bool causal, double scale);

// A (B, H, S, D) tensor whose last dimension is unit-stride and whose rows do not overlap, as the
// tile GEMMs need; a copy only when the input is not already like that.
at::Tensor rows_unit_stride(const at::Tensor& t);

}  // namespace torchlane::attention
