"""The CUDA flash kernels' source, run on the CPU through the host tile backend.

torch.ops.torchlane._attention_{fwd,bwd}_emulated execute csrc/kernels/flash_{fwd,bwd}_block.h
block by block with HostTile (see Note [Tile primitives]): the same tiling, masking, online
softmax, recomputation and rounding points as on the GPU, with the mma fragments replaced by
plain loops. Checked against the float64 reference with the rule of test_attention.py.
"""

import itertools
import math

import pytest
import torch
from attention_reference import math_attention_grads

import torchlane  # noqa: F401  (registers the ops)

ATOL = {torch.bfloat16: 1e-3, torch.float16: 1e-4}
CASES = [
    # B, H, Hkv, Sq, Sk
    (1, 2, 2, 1, 1),
    (2, 4, 2, 17, 17),
    (1, 2, 1, 100, 70),
    (1, 2, 2, 70, 130),
    (1, 1, 1, 128, 128),
]


def _emulated(q, k, v, do, causal, scale):
    out, lse = torch.ops.torchlane._attention_fwd_emulated(q, k, v, causal, scale)
    dq, dk, dv = torch.ops.torchlane._attention_bwd_emulated(do, q, k, v, out, lse, causal, scale)
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_emulated_kernel_against_float64(D, dtype):
    g = torch.Generator().manual_seed(D)
    for (B, H, Hkv, Sq, Sk), causal in itertools.product(CASES, [False, True]):
        q = torch.randn(B, H, Sq, D, generator=g).to(dtype)
        k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
        do = torch.randn(B, H, Sq, D, generator=g).to(dtype)
        scale = 1 / math.sqrt(D)
        ref = math_attention_grads(q, k, v, causal, scale, torch.float64, do)
        pt = math_attention_grads(q, k, v, causal, scale, dtype, do)
        ours = _emulated(q, k, v, do, causal, scale)
        for name, r, p, o in zip(["out", "lse", "dq", "dk", "dv"], ref, pt, ours, strict=True):
            err = (o.double() - r).abs().max().item()
            err_pt = (p.double() - r).abs().max().item()
            assert err <= 2 * err_pt + ATOL[dtype], (
                f"{name}: emulated kernel error {err:.3g} > 2 x math error {err_pt:.3g} "
                f"(B={B} H={H} Hkv={Hkv} Sq={Sq} Sk={Sk} D={D} causal={causal})"
            )


def test_emulated_kernel_strided_and_errors():
    x = torch.randn(1, 40, 6, 64).to(torch.bfloat16)
    q, k, v = x.transpose(1, 2).split([2, 2, 2], dim=1)  # row stride 6*64: no copy needed
    out, _ = torch.ops.torchlane._attention_fwd_emulated(q, k, v, True, 0.125)
    ref, _ = torch.ops.torchlane._attention_fwd_emulated(q.contiguous(), k.contiguous(), v.contiguous(), True, 0.125)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="head dim D"):
        torch.ops.torchlane._attention_fwd_emulated(q[..., :32], k[..., :32], v[..., :32], False, 1.0)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        torch.ops.torchlane._attention_fwd_emulated(q.float(), k.float(), v.float(), False, 1.0)
