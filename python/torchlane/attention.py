"""Fused flash-style attention: ``torchlane.attention(q, k, v, causal=..., scale=...)``.

The op pair ``torch.ops.torchlane.attention_fwd`` / ``attention_bwd`` is implemented in C++ (CPU)
and CUDA (fp16/bf16, sm80+); this module gives them a fake kernel (for torch.compile and meta
tensors) and autograd. See Note [Attention op contract] in csrc/attention/attention.h.
"""

from __future__ import annotations

import math

import torch

from torchlane import _C  # also loads the op registrations

__all__ = ["attention"]

def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Exact attention ``softmax(q @ k^T * scale) @ v`` without materialising the score matrix.

    Args:
        q: (B, H, Sq, D) queries.
        k, v: (B, Hkv, Sk, D) keys and values; H must be a multiple of Hkv (GQA / MQA).
        causal: mask key j for query i when j > i. The mask is aligned to the top-left corner
            (as ``scaled_dot_product_attention(is_causal=True)``), also when Sq != Sk.
        scale: multiplies the logits; default ``1 / sqrt(D)``.
        return_lse: also return the (B, H, Sq) logsumexp of the scaled logits (fp32, or fp64
            for fp64 inputs); it is differentiable.

    Returns:
        out (B, H, Sq, D) in q's dtype, or ``(out, lse)`` when ``return_lse``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"torchlane.attention: {name} must be a torch.Tensor, got {type(t).__name__}"
            )
    if not isinstance(causal, bool):
        raise TypeError(f"torchlane.attention: causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        if q.dim() != 4:
            _check_inputs(q, k, v, 1.0)  # raises the rank error
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(
            f"torchlane.attention: scale must be a float or None, got {type(scale).__name__}"
        )
    out, lse = torch.ops.torchlane.attention_fwd(q, k, v, causal, float(scale))
    return (out, lse) if return_lse else out


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(q, k, v, scale):
    """The op's input rules, from their one copy in C++ (csrc/attention/attention_checks.cpp).

    Fake tensors with symbolic sizes are checked by the real kernel when it runs.
    """
    sizes = (*q.shape, *k.shape, *v.shape)
    if all(isinstance(s, int) for s in sizes):
        _C._check_attention_inputs(q, k, v, float(scale))


@torch.library.register_fake("torchlane::attention_fwd")
def _attention_fwd_fake(q, k, v, causal, scale):
    _check_inputs(q, k, v, scale)
    B, H, Sq, D = q.shape
    out = q.new_empty((B, H, Sq, D))
    lse = q.new_empty((B, H, Sq), dtype=_acc_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("torchlane::attention_bwd")
def _attention_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, causal, scale):
    _check_inputs(q, k, v, scale)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal = causal
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.torchlane.attention_bwd(
        grad_out, grad_lse, q, k, v, out, lse, ctx.causal, ctx.scale
    )
    return dq, dk, dv, None, None


torch.library.register_autograd("torchlane::attention_fwd", _backward, setup_context=_setup_context)
