"""torchlane.parallel.pipeline: schedules and partitions (pure), and pipelines on 2-4 Gloo ranks
against the one-process GPT on the same global batch (tests/pipeline_cases.py)."""

import dist
import pipeline_cases as cases
import pytest
from torchlane.parallel.pipeline import (
    even_balance,
    max_in_flight,
    partition,
    schedule_actions,
)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 2), (3, 5)])
def test_schedule_runs_each_microbatch_once_forward_before_backward(schedule, p, m):
    for s in range(p):
        acts = schedule_actions(schedule, p, s, m)
        assert sorted(acts) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
        assert all(acts.index(("F", i)) < acts.index(("B", i)) for i in range(m))
        peak = max_in_flight(acts)
        assert peak == (m if schedule == "gpipe" else min(p - s, m))


def test_partition_minimises_the_slowest_stage():
    assert partition([1, 1, 1, 1], 2) == [2, 2]
    assert partition([1, 5, 1, 1, 1, 1], 2) == [2, 4]
    assert partition([4, 1, 1, 1, 1, 4], 3) == [1, 4, 1]
    # Brute force over every split of a small uneven list.
    import itertools

    costs = [3, 1, 4, 1, 5, 9, 2, 6]
    best = min(
        max(sum(costs[a:b]) for a, b in zip((0, *cut), (*cut, len(costs)), strict=False))
        for cut in itertools.combinations(range(1, len(costs)), 3)
    )
    sizes = partition(costs, 4)
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    assert (
        min(sizes) >= 1
        and max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)) == best
    )
    assert even_balance(7, 3) == [3, 2, 2]
    with pytest.raises(ValueError, match="more pipeline stages"):
        even_balance(2, 3)
    with pytest.raises(ValueError, match="schedule"):
        schedule_actions("zb", 2, 0, 4)


# (dp, tp, pp, n_layer): n_layer + 2 pipeline layers. (2, 2, 2) is the one 8-rank test.
CONFIGS = [(1, 1, 2, 2), (1, 1, 4, 4), (2, 1, 2, 2), (1, 2, 2, 2), (2, 2, 2, 2)]


@pytest.mark.parametrize("dp,tp,pp,n_layer", CONFIGS)
def test_pipeline_matches_one_process_model(dp, tp, pp, n_layer):
    # (1, 1, 2) also runs a third pipeline re-balanced by force from [2, 2] to [1, 3] after step 1.
    rebalance = (1, [1, 3]) if (dp, tp, pp) == (1, 1, 2) else None
    steps = 2 if dp * tp * pp == 8 else 3
    res = dist.run(cases.match_reference, dp * tp * pp, (dp, pp, steps, n_layer, rebalance, tp))
    for r in res:
        for schedule in ("gpipe", "1f1b"):
            s = r[schedule]
            assert s["grad_rel"] < 1e-5, (schedule, s["grad_rel"])
            for pipe_loss, ref_loss in s["loss"]:
                assert abs(pipe_loss - ref_loss) <= 1e-5 * abs(ref_loss), (schedule, s["loss"])
            assert s["param_rel"] < 1e-4, (schedule, s["param_rel"])
            assert s["sharded_param_rel"] < 1e-4, (schedule, s["sharded_param_rel"])
            assert s.get("norm_rel", 0.0) < 1e-5, (schedule, s["norm_rel"])
    # Every parameter lives on some stage; the tied embedding on the first and the last.
    owned = [set(r["1f1b"]["owned"]) for r in res]
    assert "tok_emb.weight" in owned[0] and "tok_emb.weight" in owned[-1]
    if rebalance is not None:
        # A forced re-balance changes nothing: the moved run equals the plain 1F1B run.
        for r in res:
            assert r["moved"] > 0 and r["balance_after"] == [1, 3]
            assert r["rebalance_rel"] <= 1e-6, r["rebalance_rel"]
            assert r["opt_state_moved"]
        assert "blocks.0.ln1.weight" in res[1]["owned_after"]
        assert "blocks.0.ln1.weight" not in res[0]["owned_after"]


def test_balancing_and_errors():
    # Layer 1 (block 0) sleeps 40 ms: profile gives stage 0 [embed, block 0] alone. Then every
    # layer of the last stage sleeps 10 ms: the dynamic balancer moves layers to stage 0.
    res = dist.run(cases.balancing, 2, (1, 0.04))
    for r in res:
        assert r["profile_balance"] == [2, 4]
        assert r["log"], "no re-balance happened"
        assert r["log"][0]["from"] == [2, 4] and r["log"][0]["to"][1] < 4
        assert "above the mean" in r["log"][0]["reason"]
        for pipe_loss, ref_loss in r["loss"]:
            assert abs(pipe_loss - ref_loss) <= 1e-5 * abs(ref_loss), r["loss"]
    msgs = res[0]["errors"]
    assert "more pipeline stages (2) than layers (1)" in msgs["stages"]
    assert "sums to 2" in msgs["balance_sum"] and "3 layers" in msgs["balance_sum"]
    assert "2 positive layer counts" in msgs["balance_len"]
    assert "balance must be" in msgs["balance_kind"]
    assert "schedule" in msgs["schedule"] and "microbatches" in msgs["microbatches"]
    assert "ProcessGroup or a DeviceMesh" in msgs["group"]
    assert "n_microbatches (3) must divide the batch size (8)" in msgs["divide"]
    assert "y must be" in msgs["y"]
    assert "positive layer counts" in msgs["rebalance"]
