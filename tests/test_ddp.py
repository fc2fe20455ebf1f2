"""torchlane.DistributedDataParallel against single-process training and torch DDP (Gloo)."""

import ddp_cases
import dist
import pytest
import torch
import torchlane
from torch import nn
from torchlane import _C

# ---- pure bucket assignment (Note [Bucket assignment]) ----

F32, BF16 = torch.float32, torch.bfloat16


def assign(sizes, dtypes=None, order=None, first=100, cap=250):
    dtypes = dtypes or [F32] * len(sizes)
    order = list(reversed(range(len(sizes)))) if order is None else order
    return _C.compute_bucket_assignment(sizes, dtypes, order, first, cap)


def test_bucket_assignment_caps_and_order():
    # Walked in reverse order: 5 (60), 4 (60) -> first bucket closes at >= 100 bytes.
    assert assign([60] * 6) == [[5, 4], [3, 2, 1, 0]]
    # Later buckets close at >= 250 bytes.
    assert assign([100] * 8, first=100, cap=250) == [[7], [6, 5, 4], [3, 2, 1], [0]]
    # A parameter bigger than the cap is a bucket of its own.
    assert assign([10, 1000, 10], first=5, cap=50) == [[2], [1], [0]]


def test_bucket_assignment_separates_dtypes():
    plan = assign([40] * 4, dtypes=[F32, BF16, F32, BF16], first=1000, cap=1000)
    assert sorted(map(sorted, plan)) == [[0, 2], [1, 3]]
    for bucket in plan:
        assert len({[F32, BF16, F32, BF16][i] for i in bucket}) == 1
    # Buckets follow the position of their first member in the walk order.
    assert plan[0][0] == 3


def test_bucket_assignment_follows_given_order():
    assert assign([60] * 4, order=[0, 1, 2, 3], first=100, cap=100) == [[0, 1], [2, 3]]


def test_bucket_assignment_rejects_bad_order():
    with pytest.raises(RuntimeError, match="twice"):
        assign([1, 1], order=[0, 0])
    with pytest.raises(RuntimeError, match="out of range"):
        assign([1, 1], order=[0, 5])


# ---- without a process group ----


def test_requires_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        torchlane.DistributedDataParallel(nn.Linear(2, 2))


# ---- equal to single-process training on the concatenated batch ----

SINGLE_CASES = [
    ("mlp", {}),
    ("convbn", {}),
    ("transformer", {}),
    ("frozen", {}),
    ("unused", {"find_unused_parameters": True}),
    ("mixed", {}),
]


def _assert_params_close(got, want, name):
    assert got.keys() == want.keys()
    for key in want:
        if name == "mixed":
            # bf16 gradients are summed in bf16 by the all-reduce (one rounding per step, which
            # also reaches the fp32 layers below through the bf16 activations' gradients). The
            # exact check for this model is the torch DDP parity test.
            tol = dict(rtol=2e-2, atol=2e-3)
        else:
            tol = dict(rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got[key], want[key], **tol, msg=lambda m: f"{name}.{key}: {m}")  # noqa: B023


@pytest.mark.parametrize("world", [2, 3])
def test_matches_single_process_training(world):
    results = dist.run(ddp_cases.train_torchlane, world, args=(SINGLE_CASES,))
    for (name, _), per_rank in zip(SINGLE_CASES, zip(*results, strict=True), strict=True):
        want = ddp_cases.train_reference(name, world)
        for params, _ in per_rank:
            _assert_params_close(params, want, name)
    # fp32 and bf16 parameters never share a bucket.
    mixed_stats = results[0][SINGLE_CASES.index(("mixed", {}))][1]
    assert {b["dtype"] for b in mixed_stats["buckets"]} == {"Float", "BFloat16"}
    for b in mixed_stats["buckets"]:
        dtypes = {"BFloat16" if n.startswith("b.") else "Float" for n in b["params"]}
        assert dtypes == {b["dtype"]}


# ---- the same trajectory as torch DDP ----

TORCH_CASES = [
    ("mlp", {}, "plain"),
    ("mlp", {}, "no_sync"),
    ("mlp", {}, "flag"),
    ("mlp", {"gradient_as_bucket_view": True}, "plain"),
    ("mlp", {"gradient_as_bucket_view": True}, "no_sync"),
    ("mlp", {"static_graph": True}, "plain"),
    ("reordered", {}, "plain"),
    ("mlp", {"bucket_cap_mb": 1e-6}, "plain"),
    ("mlp", {"bucket_cap_mb": 1000}, "plain"),
    ("convbn", {}, "plain"),
    ("transformer", {"bucket_cap_mb": 0.001}, "plain"),
    ("mlp", {}, "fwd_no_bwd"),
    ("mlp", {}, "eval_rank0"),
    ("unused", {"find_unused_parameters": True}, "unused_output:tuple"),
    ("unused", {"find_unused_parameters": True}, "unused_output:dict"),
    ("unused", {"find_unused_parameters": True}, "all_outputs:dataclass"),
    # A dataclass output is one leaf to torch DDP's output pass-through, so a field left out of
    # the loss leaves its parameters unreduced: torch DDP raises at the next forward, so do we.
    ("unused", {"find_unused_parameters": True}, "unused_output:dataclass"),
    ("mlp", {}, "hook_fp16"),
    ("mixed", {}, "plain"),
    ("reordered", {"verify_layout": True}, "plain"),
    ("mlp", {}, "create_graph"),
    ("mlp", {"find_unused_parameters": True}, "inplace_output"),
]


@pytest.fixture(scope="module")
def torch_parity():
    return dist.run(ddp_cases.compare_with_torch, 2, args=(TORCH_CASES,))


@pytest.mark.parametrize("case", range(len(TORCH_CASES)), ids=[f"{c[0]}-{c[2]}-{c[1]}" for c in TORCH_CASES])
def test_same_trajectory_as_torch_ddp(torch_parity, case):
    for rank_results in torch_parity:
        result = rank_results[case]
        ours, theirs = result["raised"]
        if TORCH_CASES[case][2] == "unused_output:dataclass":
            assert ours and theirs and ours[0] == theirs[0] == "RuntimeError"
            assert "Expected to have finished reduction" in ours[1] and "side.weight" in ours[1]
            continue
        assert ours is None and theirs is None, result["raised"]
        # Same math (pre-division fused into the copy, elementwise sum): equal up to rounding.
        assert max(result["diffs"]) <= 1e-6, result["diffs"]
        assert result["grads_agree"]


def test_bucket_layout_and_rebuild(torch_parity):
    def stats(*case):
        return torch_parity[0][TORCH_CASES.index(case)]["stats"]

    tiny = stats("mlp", {"bucket_cap_mb": 1e-6}, "plain")[-1]
    assert tiny["num_buckets"] == 6  # one parameter per bucket
    huge = stats("mlp", {"bucket_cap_mb": 1000}, "plain")[-1]
    assert huge["num_buckets"] == 1
    # Reordered: registered c, b, a; gradients become ready c, b, a. Before the rebuild the
    # buckets follow reverse registration order (a first), afterwards the observed order (c first).
    first, last = stats("reordered", {}, "plain")
    assert first["buckets"][0]["params"][0].startswith("a.")
    assert last["buckets"][0]["params"][0].startswith("c.")
    for s in (first, last):
        assert s["bytes_reduced"] == sum(b["bytes"] for b in s["buckets"])
        assert s["bytes_sent"] == s["bytes_reduced"]


# ---- errors ----


@pytest.fixture(scope="module")
def error_messages():
    return dist.run(ddp_cases.errors, 2)


def test_mismatched_parameters_are_named_on_every_rank(error_messages):
    for messages in error_messages:
        kind, text = messages["shape"]
        assert kind == "RuntimeError"
        assert "'1.weight'" in text and "[16, 8]" in text and "[17, 8]" in text


def test_invalid_arguments(error_messages):
    m = error_messages[0]
    assert m["bucket_cap"][0] == "ValueError" and "bucket_cap_mb" in m["bucket_cap"][1]
    assert m["bucket_cap_neg"][0] == "ValueError"
    assert m["no_params"][0] == "RuntimeError" and "requires a gradient" in m["no_params"][1]
    assert m["device_ids"][0] == "ValueError" and "device_ids" in m["device_ids"][1]


def test_unused_parameter_error_names_parameters(error_messages):
    kind, text = error_messages[0]["unused"]
    assert kind == "RuntimeError"
    assert "find_unused_parameters=True" in text
    assert "side.weight" in text and "unused.weight" in text and "main.weight" not in text


def test_gradient_twice_in_one_backward(error_messages):
    kind, text = error_messages[0]["twice"]
    assert kind == "RuntimeError" and "more than once" in text and "'shared." in text


def test_comm_hook_errors(error_messages):
    m = error_messages[0]
    assert m["hook_twice"][0] == "RuntimeError" and "only be called once" in m["hook_twice"][1]
    assert m["hook_late"][0] == "RuntimeError" and "before the first backward" in m["hook_late"][1]
    assert m["hook_not_callable"][0] == "TypeError"
    assert m["hook_shape"][0] == "RuntimeError" and "numel" in m["hook_shape"][1]


# ---- overlap ----


def test_first_bucket_launched_before_backward_ends():
    for stats, profiled in dist.run(ddp_cases.overlap, 2):
        events = stats["bucket_events"]
        assert stats["num_buckets"] >= 4
        # Launched in bucket order, the first one long before the backward pass finished.
        launches = [e["launch_ms"] for e in events]
        assert launches == sorted(launches)
        assert events[0]["launch_ms"] < events[-1]["ready_ms"] <= stats["backward_end_ms"]
        assert all(e["launch_ms"] <= e["done_ms"] <= stats["comm_end_ms"] + 1e-6 for e in events)
        assert profiled, "no torchlane::allreduce_bucket range in the profiler trace"


# ---- non-finite gradients ----


@pytest.mark.parametrize("as_view", [False, True])
def test_check_finite_skips_the_same_step_on_every_rank(as_view):
    for flags, diff in dist.run(ddp_cases.nonfinite, 2, args=(as_view,)):
        assert flags == [True, True, False, True]
        assert diff == 0.0


def test_verify_layout_names_missing_parameters_on_every_rank():
    for kind, text in dist.run(ddp_cases.layout_mismatch, 2, pg_timeout=30):
        assert kind == "RuntimeError"
        assert "rank 1 got no gradient for: b.weight, b.bias" in text or (
            "rank 1 got no gradient for: b.bias, b.weight" in text
        )
        assert "rank 0 got no gradient" not in text


# ---- Work objects (Note [Releasing collectives' Work objects]) ----


def test_collective_works_are_destroyed_by_torchlane():
    for num_buckets, delta, shared, kept in dist.run(ddp_cases.kept_works, 2):
        # at least one all-reduce per bucket and step went through comm::launched ...
        assert delta["launched"] >= 4 * sum(num_buckets)
        # ... and every one of them was destroyed on a torchlane thread, none left to Gloo's
        # worker, after _release_kept_works (what the atexit hook calls) waited for all
        assert delta["destroyed_here"] == delta["launched"]
        assert shared == 0 and kept == 0
