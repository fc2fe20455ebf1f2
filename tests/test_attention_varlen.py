"""torchlane.varlen_attention (packed documents, cu_seqlens) against per-document float64 math.

Accuracy rule of tests/test_attention.py: the error against the float64 reference is at most
twice the plain PyTorch math error in the same dtype plus a small floor.
"""

import math

import pytest
import torch
import torchlane
from attention_reference import math_attention

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


def per_document(q, k, v, offs, causal, scale, dtype):
    outs = []
    for a, b in zip(offs, offs[1:], strict=False):
        o, _ = math_attention(
            q[None, :, a:b], k[None, :, a:b], v[None, :, a:b], causal, scale, dtype
        )
        outs.append(o[0])
    return torch.cat(outs, dim=1)


def grads_of(fn, q, k, v, do):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, do.to(out.dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lens,H,Hkv,D", [([5, 1, 17, 40], 4, 2, 32), ([64], 2, 2, 16)])
def test_matches_per_document_attention(lens, H, Hkv, D, causal, dtype):
    g = torch.Generator().manual_seed(0)
    T = sum(lens)
    q, k, v = (torch.randn(h, T, D, generator=g).to(dtype) for h in (H, Hkv, Hkv))
    do = torch.randn(H, T, D, generator=g)
    offs = [0]
    for n in lens:
        offs.append(offs[-1] + n)
    cu = torch.tensor(offs, dtype=torch.int32)
    scale = 1.0 / math.sqrt(D)
    ref = grads_of(lambda *t: per_document(*t, offs, causal, scale, torch.float64), q, k, v, do)
    pt = grads_of(lambda *t: per_document(*t, offs, causal, scale, dtype), q, k, v, do)
    ours = grads_of(lambda *t: torchlane.varlen_attention(*t, cu, causal=causal), q, k, v, do)
    assert ours[0].shape == (H, T, D) and ours[0].dtype == dtype
    for name, r, p, o in zip(["out", "dq", "dk", "dv"], ref, pt, ours, strict=True):
        err = (o.double() - r.double()).abs().max().item()
        err_pt = (p.double() - r.double()).abs().max().item()
        assert err <= 2 * err_pt + ATOL[dtype], (name, err, err_pt)
    if len(lens) > 1:  # attention really stays inside each document
        full, _ = math_attention(q[None], k[None], v[None], causal, scale, torch.float64)
        assert (full[0] - ref[0].double()).abs().max() > 1e-2


def test_bad_inputs():
    q = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        torchlane.varlen_attention(q, q, q, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="strictly increasing"):
        torchlane.varlen_attention(q, q, q, torch.tensor([0, 3, 3, 8]))
    with pytest.raises(ValueError, match="int32/int64"):
        torchlane.varlen_attention(q, q, q, torch.tensor([0.0, 8.0]))
    with pytest.raises(ValueError, match="3-D"):
        torchlane.varlen_attention(q[None], q, q, torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="same number of tokens"):
        torchlane.varlen_attention(q, q[:, :4], q, torch.tensor([0, 8]))
    with pytest.raises(TypeError, match="cu_seqlens"):
        torchlane.varlen_attention(q, q, q, [0, 8])
