"""torchlane's C++ compression hooks against float64 references (tests/hook_refs.py).

The compression math is tested alone in this process; the hooks themselves run on buckets built
by `_C._run_comm_hook` with a real 3-rank Gloo group (one spawned job for all of them), without
DistributedDataParallel.
"""

import math

import dist
import hook_refs
import numpy as np
import pytest
import torch
import torchlane  # noqa: F401
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd
from torchlane import _C, _testing, hooks

# ---- state validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name, error",
    [
        ({"rank": 0}, "rank", ValueError),
        ({"rank": 1.5}, "rank", TypeError),
        ({"start_powerSGD_iter": -1}, "start_powerSGD_iter", ValueError),
        ({"start_powerSGD_iter": 1}, "start_powerSGD_iter", ValueError),
        ({"min_compression_rate": -0.5}, "min_compression_rate", ValueError),
        ({"min_compression_rate": "2"}, "min_compression_rate", TypeError),
        ({"use_error_feedback": 1}, "use_error_feedback", TypeError),
        ({"warm_start": None}, "warm_start", TypeError),
        ({"orthogonalization_epsilon": -1e-8}, "orthogonalization_epsilon", ValueError),
        ({"orthogonalization_epsilon": float("inf")}, "orthogonalization_epsilon", ValueError),
        ({"random_seed": -1}, "random_seed", ValueError),
        ({"random_seed": 2**32}, "random_seed", ValueError),
    ],
)
def test_powersgd_state_rejects_bad_arguments(kwargs, name, error):
    # Torch's convention: a wrong type raises TypeError, a wrong value ValueError.
    with pytest.raises(error, match=name):
        hooks.PowerSGDState(**kwargs)


def test_powersgd_state_accepts_torch_settings():
    s = hooks.PowerSGDState(rank=4, start_powerSGD_iter=2, min_compression_rate=0.5)
    assert (s.rank, s.start_powerSGD_iter, s.min_compression_rate) == (4, 2, 0.5)
    # Without error feedback and warm start, PowerSGD may start at step 0 (as in torch).
    hooks.PowerSGDState(start_powerSGD_iter=0, use_error_feedback=False, warm_start=False)


@pytest.mark.parametrize(
    "ratio, error",
    [(0, ValueError), (-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
     ("0.1", TypeError), (True, TypeError)],
)
def test_topk_state_rejects_bad_ratio(ratio, error):
    with pytest.raises(error, match="ratio"):
        hooks.TopKState(ratio=ratio)


@pytest.mark.parametrize(
    "kwargs, name, error",
    [
        ({"start_iter": -1}, "start_iter", ValueError),
        ({"start_iter": 2.0}, "start_iter", TypeError),
        ({"ratio_warmup_iters": -5}, "ratio_warmup_iters", ValueError),
        ({"ratio_warmup_iters": None}, "ratio_warmup_iters", TypeError),
        ({"min_compression_rate": -1}, "min_compression_rate", ValueError),
        ({"min_compression_rate": float("inf")}, "min_compression_rate", ValueError),
        ({"layerwise": 1}, "layerwise", TypeError),
    ],
)
def test_topk_state_rejects_bad_arguments(kwargs, name, error):
    with pytest.raises(error, match=name):
        hooks.TopKState(**kwargs)


def test_topk_state_defaults():
    s = hooks.TopKState()
    assert (s.ratio, s.start_iter, s.ratio_warmup_iters) == (0.01, 0, 0)
    assert (s.min_compression_rate, s.layerwise, s.iter) == (2.0, False, 0)
    assert "ratio_warmup_iters=0" in repr(s)


def test_hooks_carry_cpp_factories():
    for h in (hooks.bf16_compress, hooks.fp16_compress, hooks.powersgd, hooks.topk):
        assert callable(h._torchlane_make_cpp_hook)
    with pytest.raises(TypeError, match="PowerSGDState"):
        hooks.powersgd._torchlane_make_cpp_hook(hooks.TopKState(), None)
    with pytest.raises(TypeError, match="TopKState"):
        hooks.topk._torchlane_make_cpp_hook(None, None)
    with pytest.raises(TypeError, match="state must be None"):
        hooks.bf16_compress._torchlane_make_cpp_hook(hooks.TopKState(), None)


# ---- pure compression math ----------------------------------------------------------------------


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.float64])
def test_cast_compress_rounds_like_torch_hook(wire, src_dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(10_000, generator=g, dtype=torch.float64) * 3).to(src_dtype)
    x[:4] = torch.tensor([0.0, -0.0, 1e-30, 7e4])  # zero, tiny, fp16-overflowing
    for world in (1, 3, 4):
        ours = torch.ops.torchlane.cast_compress(x, wire, world)
        torch_hook = x.to(wire).div_(world)  # what torch's fp16/bf16_compress_hook sends
        assert ours.dtype == wire
        assert torch.equal(ours.view(torch.int16), torch_hook.view(torch.int16))
    back = torch.ops.torchlane.cast_decompress(ours, torch.float32)
    assert torch.equal(back, ours.float())


def test_topk_compress_matches_reference():
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        grad = torch.randn(1000, generator=g, dtype=dtype)
        residual = torch.randn(1000, generator=g, dtype=dtype) * 0.1
        for k in (1, 37, 1000):
            res = residual.clone()
            values, indices = torch.ops.torchlane.topk_compress_(res, grad, k)
            acc = grad + residual
            ref_idx = acc.abs().topk(k).indices.sort().values
            assert indices.dtype == torch.int32
            assert torch.equal(indices.long(), ref_idx)
            assert torch.equal(values, acc[ref_idx])
            expected = acc.clone()
            expected[ref_idx] = 0
            assert torch.equal(res, expected)


def test_topk_compress_breaks_ties_towards_lower_index():
    grad = torch.tensor([1.0, -3.0, 3.0, 2.0, -3.0, 0.5])
    res = torch.zeros(6)
    values, indices = torch.ops.torchlane.topk_compress_(res, grad, 2)
    assert indices.tolist() == [1, 2] and values.tolist() == [-3.0, 3.0]
    assert res.tolist() == [1.0, 0.0, 0.0, 2.0, -3.0, 0.5]


def test_topk_plan_matches_reference():
    shapes = [[16, 12], [12], [8, 3, 2, 2], [3, 4], [1, 100], [100, 1], [0, 5], [], [2, 2]]
    for ratio, rate, size in ((0.1, 2.0, 4), (0.1, 4.0, 4), (0.01, 0.0, 8), (0.3, 1.0, 4)):
        compressed, offsets, dense = _testing.topk_plan(shapes, ratio, rate, size)
        ref_c, ref_d = hook_refs.topk_plan(shapes, ratio, rate, size)
        assert (compressed, dense) == (ref_c, ref_d)
        assert offsets == list(np.cumsum([0] + [math.prod(shapes[t]) for t in ref_c])[:-1])
        assert 1 in dense and 7 in dense  # 1-D and 0-D tensors are never compressed
    # Top-k with int32 indices never halves a float32 tensor at ratio 0.25: all dense.
    assert _testing.topk_plan(shapes, 0.25, 2.0, 4)[0] == []


def test_topk_ratio_warms_up_exponentially():
    assert [_testing.topk_ratio_at(0.01, 3, j) for j in range(5)] == pytest.approx(
        [0.01**0.25, 0.01**0.5, 0.01**0.75, 0.01, 0.01]
    )
    assert _testing.topk_ratio_at(0.1, 0, 0) == 0.1


def test_topk_scatter_add_sums_repeated_positions():
    out = torch.zeros(5, dtype=torch.float64)
    torch.ops.torchlane.topk_scatter_add_(
        out, torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64), torch.tensor([3, 0, 3]).int(), 0.5
    )
    assert out.tolist() == [1.0, 0.0, 0.0, 2.5, 0.0]
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.torchlane.topk_scatter_add_(
            out, torch.ones(1).double(), torch.tensor([5]).int(), 1.0
        )


@pytest.mark.parametrize("bad", ["k0", "k_big", "dtype", "shape"])
def test_topk_compress_rejects_bad_inputs(bad):
    res, grad, k = torch.zeros(8), torch.ones(8), 2
    if bad == "k0":
        k = 0
    elif bad == "k_big":
        k = 9
    elif bad == "dtype":
        res, grad = res.half(), grad.half()
    else:
        grad = torch.ones(7)
    with pytest.raises(RuntimeError, match="topk_compress_"):
        torch.ops.torchlane.topk_compress_(res, grad, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_orthogonalize_matches_gram_schmidt_reference(dtype, eps):
    g = torch.Generator().manual_seed(2)
    for rows, cols in ((50, 1), (50, 4), (7, 7)):
        a = torch.randn(rows, cols, generator=g, dtype=torch.float64)
        m = a.to(dtype).clone()
        torch.ops.torchlane.orthogonalize_(m, eps)
        ref = hook_refs.gram_schmidt(a.to(dtype), eps)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(m.double(), ref, rtol=tol, atol=tol)
        if eps == 0:
            eye = torch.eye(cols).double()
            torch.testing.assert_close(m.double().T @ m.double(), eye, atol=10 * tol, rtol=0)
    # A non-contiguous (transposed) matrix goes through the device-generic path.
    a = torch.randn(4, 30, generator=g, dtype=dtype)
    m = a.clone().T
    torch.ops.torchlane.orthogonalize_(m, eps)
    torch.testing.assert_close(m.double(), hook_refs.gram_schmidt(a.T, eps), rtol=1e-5, atol=1e-5)


def test_orthogonalize_zero_column_stays_finite():
    m = torch.zeros(6, 3)
    m[:, 1] = 1.0
    torch.ops.torchlane.orthogonalize_(m, 0.0)
    assert torch.isfinite(m).all()
    assert torch.equal(m[:, 0], torch.zeros(6))
    torch.testing.assert_close(m[:, 1], torch.full((6,), 1 / math.sqrt(6)))


def test_powersgd_seeds_match_numpy_random_state():
    for seed in (0, 1, 12345, 2**32 - 1):
        rng = np.random.RandomState(seed)
        assert _testing.powersgd_seeds(seed, 20) == [rng.randint(1_000_000_000) for _ in range(20)]


def test_powersgd_plan_matches_torch_rule():
    shapes = [[16, 12], [12], [8, 3, 2, 2], [3, 4], [16, 12], [1, 100], [100, 1], [0, 5], []]
    for rank, rate in ((1, 2.0), (2, 2.0), (4, 1.0), (4, 0.5), (64, 0.0)):
        compressed, uncompressed = _testing.powersgd_plan(shapes, rank, rate)
        ref_c, ref_u = hook_refs.powersgd_plan(shapes, rank, rate)
        assert [c[:4] for c in compressed] == [tuple(c) for c in ref_c]
        assert sorted(uncompressed) == sorted(ref_u)
        for _t, n, m, r in ref_c:  # torch's own predicate agrees on every 2-D+ tensor
            assert torch_powersgd._should_compress(n, m, r, rate)[0]
        p_offsets = np.cumsum([0] + [n * r for _, n, _, r in ref_c])[:-1]
        q_offsets = np.cumsum([0] + [m * r for _, _, m, r in ref_c])[:-1]
        assert [c[4] for c in compressed] == list(p_offsets)
        assert [c[5] for c in compressed] == list(q_offsets)


def test_compression_ops_pass_opcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, generator=g)
    torch.library.opcheck(torch.ops.torchlane.cast_compress.default, (x, torch.bfloat16, 2))
    torch.library.opcheck(torch.ops.torchlane.cast_decompress.default, (x.half(), torch.float32))
    torch.library.opcheck(torch.ops.torchlane.topk_compress_.default, (torch.zeros(64), x, 5))
    torch.library.opcheck(
        torch.ops.torchlane.topk_scatter_add_.default,
        (torch.zeros(64), torch.ones(3), torch.tensor([1, 5, 1]).int(), 0.5),
    )
    torch.library.opcheck(torch.ops.torchlane.orthogonalize_.default, (torch.randn(10, 3), 0.0))


# ---- the hooks on buckets, 3 Gloo ranks ---------------------------------------------------------

WORLD = 3
# Two buckets. Bucket 0 has two same-shaped matrices apart from a third one (the plan groups by
# shape), a bias, a 4-D conv-like weight and a matrix too small to be worth compressing.
BUCKETS = [
    [(16, 12), (12,), (8, 3, 2, 2), (3, 4), (16, 12)],
    [(10, 20), (20,)],
]


def _grad(step, rank, index, dtype=torch.float32):
    numel = sum(math.prod(s) for s in BUCKETS[index])
    g = torch.Generator().manual_seed(10_000 * step + 100 * index + rank)
    return torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)


def _run(hook, step, rank, index):
    params = [torch.empty(s) for s in BUCKETS[index]]
    return _C._run_comm_hook(hook, _grad(step, rank, index), index, len(BUCKETS), params)


def _check_cast(rank, world, pg):
    out = {}
    for name, wire, unit in (("bf16", "bfloat16", 2.0**-8), ("fp16", "float16", 2.0**-11)):
        hook = _C.CastCompressHook(pg, wire)
        dtype = torch.bfloat16 if wire == "bfloat16" else torch.float16
        assert hook.name == f"{name}_compress"
        worst = 0.0
        for index in range(len(BUCKETS)):
            got = _run(hook, 0, rank, index)
            grads = [_grad(0, r, index).double() for r in range(world)]
            mean = sum(grads) / world
            # Each rank's value is rounded twice, the sum once per addition: a few units.
            bound = 4 * unit * sum(g.abs() for g in grads) / world
            err = (got.double() - mean).abs()
            assert (err <= bound).all(), f"{name}: error {err.max()} above bound"
            assert torch.equal(got.to(dtype).float(), got)  # really went through the wire dtype
            # torch's hook: buffer.to(dtype).div_(world), all-reduce, copy back. Bit for bit.
            wire_t = _grad(0, rank, index).to(dtype).div_(world)
            torch.distributed.all_reduce(wire_t)
            assert torch.equal(got, wire_t.float())
            assert hook.take_bytes_sent() == got.numel() * 2
            worst = max(worst, (err / (mean.abs() + 1e-3)).median().item())
        out[name] = worst
    return out


def _check_powersgd(rank, world, pg, config, steps):
    hook = _C.PowerSGDHook(pg, **config)
    ref = hook_refs.PowerSGDReference(
        world,
        config["rank"],
        config["start_powerSGD_iter"],
        config["min_compression_rate"],
        config["use_error_feedback"],
        config["warm_start"],
        config["orthogonalization_epsilon"],
        config["random_seed"],
    )
    worst = 0.0
    for step in range(steps):
        for index, shapes in enumerate(BUCKETS):
            got = _run(hook, step, rank, index)
            grads = [_grad(step, r, index).double() for r in range(world)]
            expected = ref.step(index, index == len(BUCKETS) - 1, shapes, grads)
            scale = expected.abs().max().item()
            torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5 * scale)
            worst = max(worst, (got.double() - expected).abs().max().item() / scale)
            compressed = step >= config["start_powerSGD_iter"]
            p, q, err = hook._memory(index)
            if not compressed:
                assert p is None and hook.take_bytes_sent() == got.numel() * 4
                continue
            # P, Q and the error memory after this step equal the reference, step by step.
            ref_p, ref_q = ref.flat_pq(index)
            if config["warm_start"]:
                torch.testing.assert_close(p.double(), ref_p, rtol=0, atol=1e-4)
                torch.testing.assert_close(
                    q.double(), ref_q, rtol=0, atol=1e-4 * ref_q.abs().max().item()
                )
            else:
                assert p is None and q is None  # memories are not kept without warm start
            if config["use_error_feedback"]:
                torch.testing.assert_close(
                    err.double(), ref.err[index][rank], rtol=0, atol=2e-5 * scale
                )
            else:
                assert err is None
            compressed_plan, unc = hook_refs.powersgd_plan(
                shapes, config["rank"], config["min_compression_rate"]
            )
            sent = sum(math.prod(shapes[t]) for t in unc) + sum(
                (n + m) * r for _, n, m, r in compressed_plan
            )
            assert hook.take_bytes_sent() == sent * 4
    assert hook.iter == steps
    return worst


def _check_topk(rank, world, pg, config, steps, dtype=torch.float32):
    hook = _C.TopKHook(pg, **config)
    ref = hook_refs.TopKReference(world, **config)
    size = torch.empty(0, dtype=dtype).element_size()
    worst = 0.0

    def check(step, index, shapes):
        params = [torch.empty(s, dtype=dtype) for s in shapes]
        local = _grad(step, rank, index, dtype)
        got = _C._run_comm_hook(hook, local, index, len(BUCKETS), params)
        grads = [_grad(step, r, index, dtype) for r in range(world)]
        last = index == len(BUCKETS) - 1
        expected, (k, dense) = ref.step(index, last, shapes, grads, element_size=size)
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
        if step >= config["start_iter"]:
            torch.testing.assert_close(
                hook._residual(index).double(), ref.residual(index, rank), rtol=0, atol=1e-6
            )
            assert (hook._residual(index) == 0).sum() >= k
        # a value and an int32 index per entry, a value per uncompressed element
        assert hook.take_bytes_sent() == k * (size + 4) + dense * size
        return (got.double() - expected).abs().max().item()

    for step in range(steps):
        for index, shapes in enumerate(BUCKETS):
            worst = max(worst, check(step, index, shapes))
    assert hook.iter == steps
    # A rebuilt bucket (another layout, same size) starts from a fresh residual.
    worst = max(worst, check(steps, 0, BUCKETS[0][::-1]))
    return worst


def _check_errors(rank, world, pg):
    hook = _C.TopKHook(pg, 0.5)
    with pytest.raises(RuntimeError, match="params hold"):
        _C._run_comm_hook(hook, torch.zeros(10), 0, 1, [torch.empty(3)])
    with pytest.raises(RuntimeError, match="index must be in"):
        _C._run_comm_hook(hook, torch.zeros(3), 1, 1, [torch.empty(3)])
    # Buckets of a dtype the hook does not compress are all-reduced uncompressed (mean).
    psgd = _C.PowerSGDHook(pg, 1, 0, 0.0, False, False, 0.0, 0)
    for h in (hook, psgd):
        local = torch.arange(12.0).view(3, 4).add(rank).bfloat16()
        got = _C._run_comm_hook(h, local.reshape(-1).clone(), 0, 1, [torch.empty(3, 4)])
        expected = torch.arange(12.0) + (world - 1) / 2  # mean over ranks of arange + rank
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=0)
        assert h.take_bytes_sent() == 12 * 2
    assert psgd.iter == 1
    with pytest.raises(ValueError, match="ratio"):
        _C.TopKHook(pg, 0.0)
    with pytest.raises(ValueError, match="start_iter"):
        _C.TopKHook(pg, 0.1, start_iter=-1)
    with pytest.raises(ValueError, match="ratio_warmup_iters"):
        _C.TopKHook(pg, 0.1, ratio_warmup_iters=-1)
    with pytest.raises(ValueError, match="min_compression_rate"):
        _C.TopKHook(pg, 0.1, min_compression_rate=float("nan"))
    with pytest.raises(ValueError, match="wire_dtype"):
        _C.CastCompressHook(pg, "int8")
    with pytest.raises(ValueError, match="start_powerSGD_iter"):
        _C.PowerSGDHook(pg, 1, 1, 2.0, True, True, 0.0, 0)


def _bucket_job(rank, world):
    pg = torch.distributed.distributed_c10d._get_default_group()
    out = {"cast": _check_cast(rank, world, pg)}
    base = dict(
        rank=2,
        start_powerSGD_iter=2,
        min_compression_rate=2.0,
        use_error_feedback=True,
        warm_start=True,
        orthogonalization_epsilon=0.0,
        random_seed=7,
    )
    out["powersgd_ef_warm"] = _check_powersgd(rank, world, pg, base, steps=5)
    cold = dict(
        base,
        rank=4,
        start_powerSGD_iter=0,
        min_compression_rate=1.0,
        use_error_feedback=False,
        warm_start=False,
        orthogonalization_epsilon=1e-8,
    )
    out["powersgd_cold"] = _check_powersgd(rank, world, pg, cold, steps=2)
    topk = dict(
        ratio=0.1, start_iter=1, ratio_warmup_iters=2, min_compression_rate=4.0, layerwise=False
    )
    out["topk_global"] = _check_topk(rank, world, pg, topk, steps=5)
    layerwise = dict(topk, start_iter=0, ratio_warmup_iters=3, min_compression_rate=2.0)
    out["topk_layerwise"] = _check_topk(rank, world, pg, dict(layerwise, layerwise=True), steps=4)
    # float64, with an odd number of entries (35 of 492) before the uncompressed part.
    f64 = dict(topk, ratio=0.07, start_iter=0, ratio_warmup_iters=0, min_compression_rate=2.0)
    out["topk_float64"] = _check_topk(rank, world, pg, f64, steps=2, dtype=torch.float64)
    _check_errors(rank, world, pg)
    return out


def test_hooks_on_buckets_match_float64_references():
    results = dist.run(_bucket_job, world_size=WORLD)
    print("worst relative errors per rank:", results)


def test_topk_compress_sends_nan_and_inf_first():
    grad = torch.tensor([1.0, float("nan"), -2.0, float("-inf"), 0.5])
    res = torch.zeros(5)
    values, indices = torch.ops.torchlane.topk_compress_(res, grad, 3)
    assert indices.tolist() == [1, 2, 3]
    assert values[0].isnan() and values[1] == -2.0 and values[2] == float("-inf")
    assert res.tolist() == [1.0, 0.0, 0.0, 0.0, 0.5]
    nan = torch.full((4,), float("nan"))
    values, indices = torch.ops.torchlane.topk_compress_(torch.zeros(4), nan, 2)
    assert indices.tolist() == [0, 1]
