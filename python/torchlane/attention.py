"""Fused flash-style attention: ``torchlane.attention(q, k, v, causal=..., scale=...)``.

The op pair ``torch.ops.torchlane.attention_fwd`` / ``attention_bwd`` is implemented in C++ (CPU)
and CUDA (fp16/bf16, sm80+); this module gives them a fake kernel (for torch.compile and meta
tensors) and autograd. See Note [Attention op contract] in csrc/attention/attention.h.
"""

from __future__ import annotations

import math

import torch

from torchlane import _C  # also loads the op registrations

__all__ = ["attention", "varlen_attention"]


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


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
):
    """Attention within each document of a packed sequence (block-diagonal, flash's varlen form).

    Args:
        q: (H, T, D) queries of T packed tokens; k, v: (Hkv, T, D).
        cu_seqlens: (n + 1,) integer offsets ``[0, l0, l0 + l1, ..., T]`` of the n documents
            (:func:`torchlane.data.cu_seqlens_for_row` builds it from a packed row).
        causal: causal within each document (top-left aligned per document).
        scale: as in :func:`attention`.

    Returns:
        (H, T, D): token t of document d attends only to tokens of d (and, when causal, only to
        the earlier ones). Computed as one :func:`attention` call per document on its slice (the
        fused CPU/CUDA kernels take no offsets), so its accuracy and gradients are those of the
        op; the cost is one op launch per document. See docs/data.md.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"torchlane.varlen_attention: {name} must be a torch.Tensor, got {type(t).__name__}"
            )
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            "torchlane.varlen_attention: q, k, v must be 3-D (heads, tokens, head_dim), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    total = q.shape[1]
    if k.shape[1] != total or v.shape[1] != total:
        raise ValueError(
            "torchlane.varlen_attention: q, k, v must have the same number of tokens, got "
            f"{total}, {k.shape[1]}, {v.shape[1]}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            "torchlane.varlen_attention: cu_seqlens must be a 1-D int32/int64 tensor, got "
            f"shape {tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}"
        )
    offs = cu_seqlens.tolist()
    if len(offs) < 2 or offs[0] != 0 or offs[-1] != total:
        raise ValueError(
            f"torchlane.varlen_attention: cu_seqlens must start at 0 and end at the token count "
            f"{total}, got {offs}"
        )
    if any(b <= a for a, b in zip(offs, offs[1:], strict=False)):
        raise ValueError(
            f"torchlane.varlen_attention: cu_seqlens must be strictly increasing, got {offs}"
        )
    outs = [
        attention(q[None, :, a:b], k[None, :, a:b], v[None, :, a:b], causal=causal, scale=scale)[0]
        for a, b in zip(offs, offs[1:], strict=False)
    ]
    return torch.cat(outs, dim=1)
