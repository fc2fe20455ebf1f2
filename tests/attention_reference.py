"""Reference attention for the tests: plain PyTorch math in any dtype (float64 = the reference)."""

import torch


def math_attention(q, k, v, causal, scale, dtype):
    """softmax(q k^T * scale) v and its logsumexp, computed with torch ops in `dtype`.

    Top-left aligned causal mask (key j hidden from query i when j > i). GQA by repeating kv heads.
    """
    q, k, v = (t.to(dtype) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        sq, sk = s.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return s.softmax(-1) @ v, lse


def math_attention_grads(q, k, v, causal, scale, dtype, grad_out):
    """(out, lse, dq, dk, dv) of math_attention in `dtype` for the upstream gradient grad_out."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = math_attention(*leaves, causal, scale, dtype)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    return (out.detach(), lse.detach(), *grads)
