"""torchlane.attention on the CPU against a float64 math reference.

Tolerance rule (flash-attention's): for every output (out, lse, dq, dk, dv) the kernel's max
abs error against the float64 reference is at most twice the error of the plain PyTorch math
implementation run in the same dtype, plus a small floor (ATOL) for outputs whose math-path
error is exactly zero by cancellation (e.g. dq when Sk = 1, where softmax's gradient is 0).
"""

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch
import torchlane
from attention_reference import math_attention, math_attention_grads

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}
HEADS = [(4, 4), (4, 1), (6, 2)]
SEQS = [(1, 1), (17, 17), (64, 64), (113, 203), (256, 128)]
DIMS = [16, 40, 64, 80, 128]
# Sq = Sk = 1000 costs ~20x the others: sampled, see the README ("what the grid covers").
LONG = [(64, torch.float32), (128, torch.float32), (40, torch.bfloat16), (128, torch.bfloat16)]


def _inputs(B, H, Hkv, Sq, Sk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    do = torch.randn(B, H, Sq, D, generator=g).to(dtype)
    return q, k, v, do


def _torchlane_grads(q, k, v, causal, scale, do):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = torchlane.attention(*leaves, causal=causal, scale=scale, return_lse=True)
    grads = torch.autograd.grad(out, leaves, do)
    return (out.detach(), lse.detach(), *grads)


def check_against_reference(B, H, Hkv, Sq, Sk, D, causal, dtype, seed=0, scale=None):
    q, k, v, do = _inputs(B, H, Hkv, Sq, Sk, D, dtype, seed)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ref = math_attention_grads(q, k, v, causal, scale, torch.float64, do)
    pt = math_attention_grads(q, k, v, causal, scale, dtype, do)
    ours = _torchlane_grads(q, k, v, causal, scale, do)
    assert ours[0].dtype == dtype and ours[0].shape == (B, H, Sq, D)
    assert ours[1].dtype == torch.float32 and ours[1].shape == (B, H, Sq)
    for name, r, p, o in zip(["out", "lse", "dq", "dk", "dv"], ref, pt, ours, strict=True):
        assert o.shape == r.shape, name
        err = (o.double() - r).abs().max().item()
        err_pt = (p.double() - r).abs().max().item()
        bound = 2 * err_pt + ATOL[dtype]
        assert err <= bound, (
            f"{name}: torchlane error {err:.3g} > 2 x math-{dtype} error {err_pt:.3g} + "
            f"{ATOL[dtype]:g} (B={B} H={H} Hkv={Hkv} Sq={Sq} Sk={Sk} D={D} causal={causal})"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("seqs", SEQS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_grid_against_float64(seqs, D, dtype):
    for B, (H, Hkv), causal in itertools.product([1, 2], HEADS, [False, True]):
        check_against_reference(B, H, Hkv, *seqs, D, causal, dtype)


@pytest.mark.parametrize("D,dtype", LONG, ids=lambda x: str(x))
def test_grid_long_sequences(D, dtype):
    # B=1 and B=2 alternate over the head layouts to halve the cost; both causal modes run.
    for (B, (H, Hkv)), causal in itertools.product(
        zip([1, 2, 1], HEADS, strict=True), [False, True]
    ):
        check_against_reference(B, H, Hkv, 1000, 1000, D, causal, dtype)


def test_float16_and_other_head_dims():
    check_against_reference(2, 4, 2, 70, 90, 64, True, torch.float16)
    for D in (1, 256):
        check_against_reference(1, 2, 1, 33, 65, D, True, torch.float32)
    for D in (1, 3, 256):  # odd D: the bf16 micro-kernel's pair padding
        check_against_reference(1, 2, 1, 33, 65, D, True, torch.bfloat16)


@pytest.fixture
def blas_tile_gemms():
    """Selects the BLAS tile-GEMM kernels instead of the packed AVX-512 micro-kernels."""
    before = torchlane._testing.attention_cpu_microkernels(False)
    yield
    torchlane._testing.attention_cpu_microkernels(before)


def test_packed_microkernels_are_used_where_compiled():
    fp32, bf16 = torchlane._testing.attention_cpu_microkernels_compiled()
    print(f"packed micro-kernels compiled: fp32 {fp32}, bf16 {bf16}")
    assert torchlane._testing.attention_cpu_microkernels()  # enabled by default
    if not fp32:
        pytest.skip("this build has no AVX-512 micro-kernels: the grid ran the BLAS kernels")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_blas_tile_gemm_kernels_against_float64(blas_tile_gemms, dtype):
    # The grid above runs the packed micro-kernels where compiled; this covers the BLAS kernels
    # (used for fp16/fp64 and builds without AVX-512) on part of it.
    for seqs, D in itertools.product([(17, 17), (113, 203), (1000, 1000)], [40, 64]):
        for (H, Hkv), causal in zip(HEADS, [False, True, True], strict=True):
            check_against_reference(1 if seqs[0] == 1000 else 2, H, Hkv, *seqs, D, causal, dtype)


def test_packed_and_blas_kernels_agree(blas_tile_gemms):
    q, k, v, do = _inputs(2, 4, 2, 150, 130, 64, torch.float32)
    blas = _torchlane_grads(q, k, v, True, 0.2, do)
    torchlane._testing.attention_cpu_microkernels(True)
    packed = _torchlane_grads(q, k, v, True, 0.2, do)
    for a, b in zip(blas, packed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture
def no_amx():
    """Runs the bf16 micro-kernel GEMMs on AVX512-BF16 even where AMX tiles are available."""
    before = torchlane._testing.attention_cpu_amx(False)
    yield before
    torchlane._testing.attention_cpu_amx(before)


def test_bf16_without_amx_against_float64(no_amx):
    # Where the CPU has AMX the grid above ran the bf16 GEMMs on tiles (whole 16 x 16 blocks,
    # AVX512-BF16 for the edges); this keeps the all-AVX512 path covered there too. D = 40 and
    # 203 keys: tile edges in K, N and M.
    print(f"AMX available: {no_amx}")
    for (H, Hkv), causal in zip(HEADS, [False, True, True], strict=True):
        check_against_reference(2, H, Hkv, 113, 203, 40, causal, torch.bfloat16)
        check_against_reference(1, H, Hkv, 256, 128, 128, causal, torch.bfloat16)


def test_amx_and_avx512_bf16_agree(no_amx):
    if not no_amx:
        pytest.skip("no AMX here (CPU, kernel or build): the grid ran the AVX512-BF16 kernels")
    q, k, v, do = _inputs(2, 4, 2, 150, 130, 64, torch.bfloat16)
    vector = _torchlane_grads(q, k, v, True, 0.2, do)
    torchlane._testing.attention_cpu_amx(True)
    tiles = _torchlane_grads(q, k, v, True, 0.2, do)
    for a, b in zip(vector, tiles, strict=True):  # same bf16 operands, fp32 sums in another order
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_and_negative_scale(dtype):
    # A positive scale is applied inside the softmax's exp; others go through the GEMM.
    for scale in (-0.3, 0.0):
        check_against_reference(1, 4, 2, 70, 90, 64, True, dtype, scale=scale)
        check_against_reference(1, 4, 4, 33, 33, 40, False, dtype, scale=scale)


def test_backward_schedule_follows_thread_count():
    # B * Hkv = 2, B * H = 8: the "by kv head" schedule with 1 thread, "by query head" with 2
    # (Note [CPU flash attention]); both add in the same order (Note [Backward summation order]),
    # so the results are identical.
    q, k, v, do = _inputs(2, 4, 1, 150, 130, 32, torch.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_torchlane_grads(q, k, v, True, 0.2, do))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 1), (6, 2), (2, 2)])
def test_backward_schedules_agree_bitwise(monkeypatch, dtype, heads):
    # The packed kernels' three backward schedules, forced (Note [Backward summation order]).
    fp32, bf16 = torchlane._testing.attention_cpu_microkernels_compiled()
    if not (fp32 if dtype == torch.float32 else bf16):
        pytest.skip("no packed micro-kernels for this dtype in this build")
    H, Hkv = heads
    q, k, v, do = _inputs(2, H, Hkv, 150, 130, 40, dtype)
    results = {}
    for schedule in ("kv_head", "q_head", "tile"):
        monkeypatch.setenv("TORCHLANE_ATTN_CPU_BWD", schedule)
        results[schedule] = _torchlane_grads(q, k, v, True, 0.2, do)[2:]
        check_against_reference(2, H, Hkv, 150, 130, 40, True, dtype, scale=0.2)
    for schedule in ("q_head", "tile"):
        for a, b in zip(results["kv_head"], results[schedule], strict=True):
            assert torch.equal(a, b), schedule


def test_small_tiles_in_a_subprocess():
    # The default tiles (Blocks in csrc/attention/cpu_common.h: 128 x 256 in the backward) cover
    # most of the grid's shapes with a single tile; this reruns part of this file with 32 x 64
    # tiles and 4096-float key chunks, so that every shape has several tiles, partial ones and
    # several key chunks (TORCHLANE_ATTN_CPU_BLOCKS is read once per process).
    env = dict(os.environ, TORCHLANE_ATTN_CPU_BLOCKS="32,64,32,64,4096")
    selection = (
        "(grid_against_float64 and (113x203 or 256x128)) or schedules_agree or long_sequences"
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selection]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    # 0: everything selected passed (5 would mean nothing was selected)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_deterministic():
    q, k, v, do = _inputs(1, 4, 2, 200, 200, 64, torch.bfloat16)
    a = _torchlane_grads(q, k, v, True, 0.125, do)
    b = _torchlane_grads(q, k, v, True, 0.125, do)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_causal_is_top_left_aligned_like_sdpa():
    q, k, v, _ = _inputs(1, 2, 2, 5, 9, 16, torch.float64)
    ours = torchlane.attention(q, k, v, causal=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, sdpa)
    # Query 0 sees key 0 only, whatever Sk is.
    torch.testing.assert_close(ours[:, :, 0], v[:, :, 0])


def test_scale_and_lse_gradient():
    q, k, v, do = _inputs(2, 4, 2, 40, 50, 24, torch.float64)
    g_lse = torch.randn(2, 4, 40, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = torchlane.attention(*leaves, causal=True, scale=0.7, return_lse=True)
    ours = torch.autograd.grad((out * do).sum() + (lse * g_lse).sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    r_out, r_lse = math_attention(*ref_leaves, True, 0.7, torch.float64)
    ref = torch.autograd.grad((r_out * do).sum() + (r_lse * g_lse).sum(), ref_leaves)
    torch.testing.assert_close(out, r_out)
    torch.testing.assert_close(lse, r_lse)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_strided_inputs():
    B, S, H, Hkv, D = 2, 37, 4, 2, 32
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, S, H + 2 * Hkv, D, generator=g)
    q, k, v = x.transpose(1, 2).split([H, Hkv, Hkv], dim=1)  # (B, *, S, D) views of one buffer
    assert not q.is_contiguous()
    k_bcast = torch.randn(B, 1, S, D, generator=g).expand(B, Hkv, S, D)  # stride 0 over heads
    v_cols = torch.randn(B, Hkv, S, 2 * D, generator=g)[..., ::2]  # last-dim stride 2
    do = torch.randn(B, H, S, D, generator=g)
    for kk, vv in ((k, v), (k_bcast, v_cols)):
        got = _torchlane_grads(q, kk, vv, True, 0.3, do)
        want = _torchlane_grads(q.contiguous(), kk.contiguous(), vv.contiguous(), True, 0.3, do)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(causal):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 9, 8, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 2, 9, 8, dtype=torch.float64, generator=g, requires_grad=True)

    def fn(q, k, v):
        return torchlane.attention(q, k, v, causal=causal, scale=0.5, return_lse=True)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(dtype):
    q, k, v, do = _inputs(2, 4, 2, 19, 23, 16, dtype)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 0.25)
    torch.library.opcheck(torch.ops.torchlane.attention_fwd.default, args)
    out, lse = torch.ops.torchlane.attention_fwd(*args)
    bwd_args = (
        do,
        torch.randn_like(lse),
        q.detach(),
        k.detach(),
        v.detach(),
        out.detach(),
        lse.detach(),
        True,
        0.25,
    )
    torch.library.opcheck(torch.ops.torchlane.attention_bwd.default, bwd_args)
    torch.library.opcheck(torch.ops.torchlane.attention_bwd.default, (do, None, *bwd_args[2:]))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v, do = _inputs(1, 4, 2, 33, 33, 16, torch.float32)

    def step(q, k, v):
        out = torchlane.attention(q.sin(), k, v, causal=True)
        return (out * do).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled(*leaves).backward()
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    step(*ref_leaves).backward()
    for a, b in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_multihead_self_attention_matches_sdpa_backend(n_kv_head):
    torch.manual_seed(0)
    ours = torchlane.nn.MultiheadSelfAttention(64, 4, n_kv_head, causal=True)
    ref = torchlane.nn.MultiheadSelfAttention(64, 4, n_kv_head, causal=True, backend="sdpa")
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 37, 64)
    y, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="n_head=4 must be a multiple of n_kv_head=3"):
        torchlane.nn.MultiheadSelfAttention(64, 4, 3)
    with pytest.raises(ValueError, match="backend"):
        torchlane.nn.MultiheadSelfAttention(64, 4, backend="flash")
