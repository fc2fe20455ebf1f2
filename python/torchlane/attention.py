"""Fused flash-style attention: ``torchlane.attention(q, k, v, causal=..., scale=...)``.

The op pair ``torch.ops.torchlane.attention_fwd`` / ``attention_bwd`` is implemented in C++ (CPU)
and CUDA (fp16/bf16, sm80+); this module gives them a fake kernel (for torch.compile and meta
tensors) and autograd. See Note [Attention op contract] in csrc/attention/attention.h.
"""

from __future__ import annotations

import math

import torch

from torchlane import _C  # noqa: F401  (loads the op registrations)

__all__ = ["attention"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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
            raise TypeError(f"torchlane.attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"torchlane.attention: causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        if q.dim() != 4:
            _check_inputs(q, k, v, 1.0)  # raises the rank error
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"torchlane.attention: scale must be a float or None, got {type(scale).__name__}")
    out, lse = torch.ops.torchlane.attention_fwd(q, k, v, causal, float(scale))
    return (out, lse) if return_lse else out


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(q, k, v, scale):
    """The C++ checks of csrc/attention/attention_checks.cpp, for fake tensors."""
    for name, t, layout in (("q", q, "(B, H, Sq, D)"), ("k", k, "(B, Hkv, Sk, D)"), ("v", v, "(B, Hkv, Sk, D)")):
        if t.dim() != 4:
            raise ValueError(
                f"torchlane.attention: {name} must be a 4-D tensor {layout}, got a {t.dim()}-D "
                f"tensor of shape {list(t.shape)}"
            )
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            "torchlane.attention: q must be a floating-point tensor (float32, bfloat16, float16 "
            f"or float64), got {q.dtype}"
        )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"torchlane.attention: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"torchlane.attention: {name} must be on q's device {q.device}, got {t.device}")
    B, H, _, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"torchlane.attention: k and v must have q's batch size {B}, got k {k.shape[0]} and v {v.shape[0]}")
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"torchlane.attention: k and v must have q's head dim D={D}, got k {k.shape[3]} and v {v.shape[3]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"torchlane.attention: v must have k's number of heads {k.shape[1]}, got {v.shape[1]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"torchlane.attention: v must have k's sequence length Sk={k.shape[2]}, got {v.shape[2]}")
    if min(q.shape) == 0 or k.shape[1] == 0 or k.shape[2] == 0:
        raise ValueError(f"torchlane.attention: q, k and v must have no empty dimension, got q {list(q.shape)}, k {list(k.shape)}")
    if H % k.shape[1] != 0:
        raise ValueError(
            f"torchlane.attention: the number of query heads H={H} (q.size(1)) must be a multiple "
            f"of the number of kv heads Hkv={k.shape[1]} (k.size(1))"
        )
    if not math.isfinite(scale):
        raise ValueError(f"torchlane.attention: scale must be finite, got {scale}")


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
