"""Modules built on torchlane's ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchlane.attention import attention

__all__ = ["MultiheadSelfAttention"]

_BACKENDS = ("torchlane", "sdpa")


class MultiheadSelfAttention(nn.Module):
    """Multi-head self-attention over (B, S, E) inputs, with grouped-query attention.

    Args:
        embed_dim: E, a multiple of n_head.
        n_head: number of query heads.
        n_kv_head: number of key/value heads (default n_head; a divisor of n_head: GQA/MQA).
        causal: mask future positions (the usual decoder mask).
        bias: whether the projections have a bias.
        backend: "torchlane" (torchlane.attention) or "sdpa"
            (torch.nn.functional.scaled_dot_product_attention), to compare the two.
    """

    def __init__(
        self,
        embed_dim: int,
        n_head: int,
        n_kv_head: int | None = None,
        *,
        causal: bool = True,
        bias: bool = True,
        backend: str = "torchlane",
        device=None,
        dtype=None,
    ):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_head <= 0 or embed_dim % n_head != 0:
            raise ValueError(f"MultiheadSelfAttention: embed_dim={embed_dim} must be a positive multiple of n_head={n_head}")
        if n_kv_head <= 0 or n_head % n_kv_head != 0:
            raise ValueError(f"MultiheadSelfAttention: n_head={n_head} must be a multiple of n_kv_head={n_kv_head}")
        if backend not in _BACKENDS:
            raise ValueError(f"MultiheadSelfAttention: backend must be one of {_BACKENDS}, got {backend!r}")
        self.embed_dim, self.n_head, self.n_kv_head = embed_dim, n_head, n_kv_head
        self.head_dim = embed_dim // n_head
        self.causal = causal
        self.backend = backend
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.kv_proj = nn.Linear(embed_dim, 2 * n_kv_head * self.head_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"MultiheadSelfAttention: x must have shape (B, S, {self.embed_dim}), got {list(x.shape)}"
            )
        B, S, _ = x.shape
        hd = self.head_dim
        q = self.q_proj(x).view(B, S, self.n_head, hd).transpose(1, 2)
        k, v = self.kv_proj(x).view(B, S, 2, self.n_kv_head, hd).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if self.backend == "torchlane":
            y = attention(q, k, v, causal=self.causal)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=self.causal, enable_gqa=self.n_kv_head != self.n_head
            )
        return self.out_proj(y.transpose(1, 2).reshape(B, S, self.embed_dim))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, n_head={self.n_head}, n_kv_head={self.n_kv_head}, "
            f"causal={self.causal}, backend={self.backend!r}"
        )
