"""torchlane.attention at the edges of the float range, side by side with SDPA (issue #16).

Huge finite logits (|scale * q.k| ~1e9) must not overflow the online softmax nor lose the row's
largest weight; rows whose logits are all -inf give 0 (output and gradients) as SDPA does; a -inf
or NaN in the inputs gives NaN exactly where SDPA's math backend does (the rule, with its one
documented difference, is in docs/attention.md "Extreme values"). Each case also runs through the
CUDA kernel source on the CPU (the *_emulated ops: bf16/fp16, head dims 64 and 128). See
Note [Softmax max subtraction] in csrc/attention/cpu_common.h.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import torchlane
from attention_reference import math_attention_grads
from torch.nn.attention import SDPBackend, sdpa_kernel

ATOL = 1e-5  # fp32 accumulation, relative to the reference's magnitude
EPS32 = 2.0**-23
DTYPES = [torch.float32, torch.bfloat16]
NAMES = ["out", "dq", "dk", "dv"]


def _ours(q, k, v, do, causal, scale):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = torchlane.attention(*leaves, causal=causal, scale=scale)
    return (out.detach(), *torch.autograd.grad(out, leaves, do))


def _emulated(q, k, v, do, causal, scale):
    out, lse = torch.ops.torchlane._attention_fwd_emulated(q, k, v, causal, scale)
    dq, dk, dv = torch.ops.torchlane._attention_bwd_emulated(do, q, k, v, out, lse, causal, scale)
    return out, dq, dk, dv


def _sdpa_math(q, k, v, do, causal, scale):
    """torch's scaled_dot_product_attention, math backend (the CPU default would be its flash)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(
            *leaves, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    return (out.detach(), *torch.autograd.grad(out, leaves, do))


def _runs(q, k, v, do, causal, scale):
    """(where, (out, dq, dk, dv)) for the CPU kernels and, where it exists, the CUDA source."""
    runs = [("cpu", _ours(q, k, v, do, causal, scale))]
    if q.dtype == torch.bfloat16 and q.shape[-1] in (64, 128):
        runs.append(("emulated CUDA", _emulated(q, k, v, do, causal, scale)))
    return runs


def _inputs(D, dtype, S=64, seed=0, H=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, S, D, generator=g).to(dtype) for _ in range(4)]


def _check_against_float64(where, ours, q, k, v, do, causal, scale):
    """ours (out, dq, dk, dv) against the float64 math reference.

    The bound is twice the error of SDPA's math backend run in fp32 on the same (upcast) inputs
    (the kernels accumulate in fp32; bf16 math would round the logits to 8 bits) plus:
     - ATOL of the reference's magnitude, and half a bf16 ulp of it for bf16 results;
     - for dq, dk: 4 eps32 * scale * max|dO v^T| * max|k| (resp. |q|). A flash backward forms
       dS = P * (dP - delta) with dP = dO v^T and delta = rowsum(dO * O) summed in different
       orders, so where the exact dS cancels to 0 (here: one-hot P) it leaves rounding noise of a
       few ulps of dP, which dq = scale dS k and dk = scale dS^T q multiply by |k|, |q|. torch's
       own CPU flash kernel shows the same noise (and NaN at D=48, where this one was NaN too).
    """
    ref = math_attention_grads(q, k, v, causal, scale, torch.float64, do)
    ref = [ref[0], *ref[2:]]
    base = _sdpa_math(q.float(), k.float(), v.float(), do.float(), causal, scale)
    v_mha = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    dp = (do.double() @ v_mha.double().transpose(-1, -2)).abs().max().item()
    noise = {
        "dq": 4 * EPS32 * scale * dp * k.double().abs().max().item(),
        "dk": 4 * EPS32 * scale * dp * q.double().abs().max().item(),
    }
    for name, r, b, o in zip(NAMES, ref, base, ours, strict=True):
        assert o.dtype == q.dtype, (where, name, o.dtype)
        assert torch.isfinite(o).all(), f"{where} {name}: {(~torch.isfinite(o)).sum()} non-finite"
        err = (o.double() - r).abs().max().item()
        err_base = (b.double() - r).abs().max().item()
        mag = r.abs().max().item()
        tol = ATOL * max(1.0, mag) + noise.get(name, 0.0)
        if q.dtype == torch.bfloat16:
            tol += 2.0**-8 * mag
        assert err <= 2 * err_base + tol, (
            f"{where} {name}: error {err:.3g}, SDPA math fp32 error {err_base:.3g}, "
            f"tolerance {tol:.3g}"
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [48, 64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_huge_finite_logits_against_float64(D, dtype, causal):
    q, k, v, do = _inputs(D, dtype)
    q, k = q * 3e4, k * 3e4  # scaled logits ~1e8..3e9: NaN, then the wrong argmax, before the fix
    scale = 1 / math.sqrt(D)  # not a power of 2 for D = 48, 128: scale * x must be rounded
    for where, ours in _runs(q, k, v, do, causal, scale):
        _check_against_float64(where, ours, q, k, v, do, causal, scale)


@pytest.fixture
def cpu_path(request, monkeypatch):
    """Selects one CPU kernel path: BLAS tiles, AVX512-BF16 without AMX, a backward schedule."""
    path = request.param
    testing = torchlane._testing
    if path == "blas":
        before = testing.attention_cpu_microkernels(False)
        request.addfinalizer(lambda: testing.attention_cpu_microkernels(before))
    elif path == "no_amx":
        before = testing.attention_cpu_amx(False)
        request.addfinalizer(lambda: testing.attention_cpu_amx(before))
    elif path.startswith("bwd_"):
        monkeypatch.setenv("TORCHLANE_ATTN_CPU_BWD", path[4:])
    return path


@pytest.mark.parametrize(
    "cpu_path", ["blas", "no_amx", "bwd_kv_head", "bwd_q_head", "bwd_tile"], indirect=True
)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
def test_huge_logits_on_every_cpu_path(cpu_path, dtype):
    # 288 keys: several key tiles (the running max moves between tiles), partial tiles; GQA.
    if dtype == torch.float64 and cpu_path != "blas":
        pytest.skip("fp64 runs the BLAS tiles only")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 288, 48, generator=g).to(dtype) * 3e4
    k, v = (torch.randn(1, 2, 288, 48, generator=g).to(dtype) for _ in range(2))
    k = k * 3e4
    do = torch.randn(1, 4, 288, 48, generator=g).to(dtype)
    scale = 1 / math.sqrt(48)
    for causal in (False, True):
        ours = _ours(q, k, v, do, causal, scale)
        _check_against_float64(cpu_path, ours, q, k, v, do, causal, scale)


def test_huge_logits_varlen():
    g = torch.Generator().manual_seed(2)
    q, k, v, do = (torch.randn(2, 150, 48, generator=g) for _ in range(4))
    q, k = q * 3e4, k * 3e4
    cu = torch.tensor([0, 40, 41, 150])
    scale = 1 / math.sqrt(48)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = torchlane.varlen_attention(*leaves, cu, causal=True, scale=scale)
    grads = torch.autograd.grad(out, leaves, do)
    for a, b in zip(cu.tolist(), cu.tolist()[1:], strict=False):
        doc = [t[None, :, a:b] for t in (q, k, v, do)]
        ours = [out.detach()[None, :, a:b]] + [t[None, :, a:b] for t in grads]
        _check_against_float64(f"varlen doc {a}:{b}", ours, *doc, True, scale)


def _sdpa_math_row_by_row(q, k, v, do):
    """Causal attention as SDPA's math backend computes it for each query row i on exactly the
    keys 0..i it sees: (out, dq, dk, dv), dk and dv summed over the rows (in fp32).

    SDPA math on the whole causal problem also turns the masked logits' NaN / +inf into NaN
    (its mask is applied after the product, and a NaN row's 0 * NaN weights reach the masked
    keys' dv); a flash kernel never computes a masked logit, which is this reference.
    """
    outs = torch.zeros_like(q, dtype=torch.float32)
    dq, dk, dv = (torch.zeros_like(t, dtype=torch.float32) for t in (q, k, v))
    for i in range(q.shape[2]):
        sl = slice(0, i + 1)
        o, gq, gk, gv = _sdpa_math(
            q[:, :, i : i + 1], k[:, :, sl], v[:, :, sl], do[:, :, i : i + 1], False, None
        )
        outs[:, :, i : i + 1], dq[:, :, i : i + 1] = o, gq
        dk[:, :, sl] += gk
        dv[:, :, sl] += gv
    return [t.to(q.dtype) for t in (outs, dq, dk, dv)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [48, 64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_rows_of_all_minus_inf_logits_are_zero_like_sdpa(dtype, D, causal):
    q, k, v, do = _inputs(D, dtype, S=40)
    # Rows 0..19: q.k = 1e30 * -1e30 = -inf in every logit (after scaling too); rows 20..39 have
    # 0 there and ordinary logits. (Not k = -1e30 everywhere: that makes the other rows' logits
    # ~1e31 and equal, where the saved lse cannot carry log(40), see docs/attention.md.)
    q[:, :, :20, 0] = 1e30
    q[:, :, 20:, 0] = 0
    k[:, :, :, 0] = -1e30
    want = _sdpa_math(q, k, v, do, causal, None)
    assert torch.equal(want[0][:, :, :20], torch.zeros_like(want[0][:, :, :20]))
    for where, ours in _runs(q, k, v, do, causal, 1 / math.sqrt(D)):
        for name, o, w in zip(NAMES, ours, want, strict=True):
            assert torch.isfinite(o).all() and torch.isfinite(w).all(), (where, name)
        # the -inf rows: output and dq exactly 0, as SDPA's
        for name, o, w in zip(NAMES[:2], ours[:2], want[:2], strict=True):
            assert torch.equal(o[:, :, :20], w[:, :, :20]), (where, name)
        # the finite rows and dk, dv: to which the -inf rows contribute nothing. dq[..., 0] of
        # the finite rows is scale * sum_j dS_ij * -1e30: rounding noise of dS times 1e30 (in
        # SDPA's too), so only its finiteness is compared.
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        cut = [t[..., 1:] if name == "dq" else t for name, t in zip(NAMES, ours, strict=True)]
        cut_want = [t[..., 1:] if name == "dq" else t for name, t in zip(NAMES, want, strict=True)]
        for name, o, w in zip(NAMES, cut, cut_want, strict=True):
            torch.testing.assert_close(o, w, atol=tol, rtol=tol, msg=f"{where} {name}")
    # Every row -inf: output and all gradients exactly 0, as SDPA's.
    q[:, :, :, 0] = 1e30
    want = _sdpa_math(q, k, v, do, causal, None)
    for where, ours in _runs(q, k, v, do, causal, 1 / math.sqrt(D)):
        for name, o, w in zip(NAMES, ours, want, strict=True):
            assert torch.equal(w, torch.zeros_like(w)), ("SDPA", name)
            assert torch.equal(o, torch.zeros_like(o)), (where, name)


def _check_nan_pattern(q, k, v, do, causal):
    """NaN where SDPA's math backend has NaN, close to it elsewhere.

    Causal: at least where SDPA math has NaN computing each row on the keys it sees (a NaN or
    +inf logit, or a NaN value, reaches the outputs and gradients of that row and its keys), at
    most where SDPA math on the whole problem has NaN (which also multiplies the masked keys'
    values and queries by their 0 weights: 0 * NaN = NaN; a flash kernel does so only inside the
    tiles it computes). Without a mask both are the same: exactly SDPA math's NaN.
    """
    whole = _sdpa_math(q, k, v, do, causal, None)
    want = _sdpa_math_row_by_row(q, k, v, do) if causal else whole
    assert torch.isnan(want[0]).any(), "the case must produce NaN rows"
    tol = 1e-5 if q.dtype == torch.float32 else 2e-2
    for where, ours in _runs(q, k, v, do, causal, 1 / math.sqrt(q.shape[-1])):
        for name, o, w, x in zip(NAMES, ours, want, whole, strict=True):
            nan, lo, hi = torch.isnan(o), torch.isnan(w), torch.isnan(x)
            assert (lo <= hi).all(), ("row by row NaN within SDPA's", name)
            assert (lo <= nan).all() and (nan <= hi).all(), (
                f"{where} {name}: NaN at {nan.sum()} places, SDPA math at {lo.sum()} (row by "
                f"row) .. {hi.sum()}; missing {(lo & ~nan).nonzero()[:3].tolist()}, extra "
                f"{(nan & ~hi).nonzero()[:3].tolist()}"
            )
            torch.testing.assert_close(o[~nan], w[~nan], atol=tol, rtol=tol, msg=f"{where} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [48, 64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_minus_inf_in_q_is_nan_where_sdpa_is(dtype, D, causal):
    q, k, v, do = _inputs(D, dtype, S=33)
    q[0, 1, 5, 3] = -math.inf  # row 5's logits are +-inf: +inf - +inf = NaN, as SDPA's
    q[0, 0, 0, 7] = -math.inf  # causal: row 0 sees key 0 only, its one logit +-inf
    _check_nan_pattern(q, k, v, do, causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_in_inputs_is_nan_where_sdpa_is(dtype, causal, where):
    inputs = dict(zip("qkvd", _inputs(64, dtype, S=33), strict=True))
    inputs[where][0, 1, 9, 5] = math.nan
    _check_nan_pattern(inputs["q"], inputs["k"], inputs["v"], inputs["d"], causal)
