"""torchlane.data: token-balanced sampling, packing, the global-token loss, straggler shares."""

import random

import dist
import pytest
import torch
from data_cases import ddp_grads, reference_grads
from torchlane import data


def lognormal_lengths(n, seed=0):
    rng = random.Random(seed)
    return [max(1, int(rng.lognormvariate(4.0, 1.0))) for _ in range(n)]


@pytest.mark.parametrize("world,batch,drop_last", [(2, 8, False), (4, 32, False), (3, 10, True)])
def test_every_example_once_same_plan_everywhere(world, batch, drop_last):
    lengths = lognormal_lengths(101)
    samplers = [
        data.TokenBalancedSampler(lengths, batch, world, r, seed=7, drop_last=drop_last)
        for r in range(world)
    ]
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in samplers]
        plans = [s.plan() for s in samplers]
        assert all(p == plans[0] for p in plans)  # every rank computes the same assignment
        seen = [i for rank_steps in per_rank for step in rank_steps for i in step]
        expected = (101 // batch) * batch if drop_last else 101
        assert len(seen) == expected and len(set(seen)) == expected
        for step, parts in enumerate(plans[0]):
            for r in range(world):
                assert per_rank[r][step] == parts[r]
    # The epoch changes the permutation; the seed fixes it.
    a = data.TokenBalancedSampler(lengths, batch, world, 0, seed=7)
    b = data.TokenBalancedSampler(lengths, batch, world, 0, seed=7)
    b.set_epoch(1)
    assert a.plan() != b.plan()
    b.set_epoch(0)
    assert a.plan() == b.plan()


def test_token_imbalance_is_bounded_and_beats_even_split():
    lengths = lognormal_lengths(4096, seed=1)
    world, batch = 4, 64
    s = data.TokenBalancedSampler(lengths, batch, world, 0, seed=0, drop_last=True)
    for step in s.global_steps():
        parts = s.plan_step(step)
        toks = [sum(lengths[i] for i in p) for p in parts]
        mean = sum(toks) / world
        # LPT: the fullest rank exceeds the mean by at most the longest example of the step.
        assert max(toks) <= mean + max(lengths[i] for i in step)
    balanced = s.imbalance()["max_over_mean_mean"]
    # An even split by count (what DistributedSampler does) on the same steps:
    even = []
    for step in s.global_steps():
        toks = [sum(lengths[i] for i in step[r::world]) for r in range(world)]
        even.append(max(toks) / (sum(toks) / world))
    assert balanced < sum(even) / len(even)
    assert balanced < 1.1, balanced


def test_shares_give_proportional_tokens():
    lengths = lognormal_lengths(2000, seed=2)
    parts = data.balance_step(list(range(2000)), lengths, 2, shares=[1.0, 3.0])
    t0, t1 = (sum(lengths[i] for i in p) for p in parts)
    assert abs(t1 / (t0 + t1) - 0.75) < 0.01


def test_packing_covers_every_token_once_within_rows():
    lengths = lognormal_lengths(60, seed=3)
    rows = data.pack_documents(list(range(60)), lengths, 128)
    covered = {}
    for row in rows:
        assert sum(seg[2] for seg in row) <= 128
        for i, start, n in row:
            for t in range(start, start + n):
                assert (i, t) not in covered
                covered[(i, t)] = True
    assert len(covered) == sum(lengths)
    # First-fit decreasing uses at most 11/9 OPT + 1 rows; OPT >= total / row_len.
    assert len(rows) <= 11 / 9 * (sum(lengths) / 128) + 2
    cu = data.cu_seqlens_for_row(rows[0])
    assert cu[0] == 0 and cu[-1] == sum(seg[2] for seg in rows[0])
    s = data.TokenBalancedSampler(lengths, 30, 2, 1, pack_len=128, seed=0)
    segs = [seg for step in s for row in step for seg in row]
    other = data.TokenBalancedSampler(lengths, 30, 2, 0, pack_len=128, seed=0)
    segs += [seg for step in other for row in step for seg in row]
    assert sum(seg[2] for seg in segs) == sum(lengths)
    assert s.imbalance()["padding_fraction"] < 0.3


@pytest.mark.parametrize("shares", [None, [1.0, 3.0]])
def test_gradient_equals_full_batch(shares):
    """Token-balanced (and straggler-weighted) parts with the global-token loss give exactly
    the single-process gradient of the whole global batch's per-token mean loss."""
    lengths = lognormal_lengths(12, seed=4)
    lengths = [min(n, 200) for n in lengths]
    world, batch = 2, 12
    results = dist.run(ddp_grads, world, args=(lengths, batch, shares))
    parts = [r[1] for r in results]
    assert sorted(parts[0] + parts[1]) == sorted(
        data.TokenBalancedSampler(lengths, batch, world, 0, seed=3).global_steps()[0]
    )
    assert results[0][2] == sum(lengths)
    ref = reference_grads(parts[0] + parts[1], lengths)
    for r in range(world):
        for k, g in ref.items():
            torch.testing.assert_close(results[r][0][k], g, rtol=1e-5, atol=1e-6)
    if shares is not None:  # the weighted split really was uneven
        t = [sum(lengths[i] for i in p) for p in parts]
        assert t[1] > t[0]


def test_straggler_balancer_shifts_tokens_and_logs():
    s = data.TokenBalancedSampler(lognormal_lengths(100), 20, 2, 0)
    log = []
    bal = data.StragglerBalancer(s, patience=2, threshold=1.2, ema=1.0, log=log.append)
    assert bal.observe([1.0, 1.05], [100, 100]) == [1.0, 1.0]  # within threshold
    bal.observe([1.0, 2.0], [100, 100])
    assert s.shares == [1.0, 1.0]  # one slow step is not persistent
    shares = bal.observe([1.0, 2.0], [100, 100])
    # Halfway from [1, 1] to the measured throughput split [4/3, 2/3].
    assert shares == pytest.approx([7 / 6, 5 / 6]) and len(log) == 1
    assert log[0]["slowest_rank"] == 1 and log[0]["old_shares"] == [1.0, 1.0]


def test_straggler_balancer_judges_speed_not_time():
    # Rank 1 took twice as long but processed three times the tokens: it is the faster rank
    # (75 vs 50 tokens/s), so it gets more, not less: halfway from [1, 1] to [0.8, 1.2].
    s = data.TokenBalancedSampler(lognormal_lengths(100), 20, 2, 0)
    bal = data.StragglerBalancer(s, patience=1, threshold=1.2, ema=1.0)
    assert bal.observe([1.0, 2.0], [50, 150]) == pytest.approx([0.9, 1.1])


def test_bad_inputs():
    with pytest.raises(ValueError, match="lengths\\[1\\]"):
        data.TokenBalancedSampler([3, 0], 2, 1, 0)
    with pytest.raises(ValueError, match="batch_size"):
        data.TokenBalancedSampler([3], 0, 1, 0)
    with pytest.raises(ValueError, match="rank"):
        data.TokenBalancedSampler([3], 1, 2, 2)
    with pytest.raises(ValueError, match="pack_len"):
        data.TokenBalancedSampler([3], 1, 1, 0, pack_len=0)
    with pytest.raises(ValueError, match="shares"):
        data.TokenBalancedSampler([3], 1, 2, 0, shares=[1.0, -1.0])
    with pytest.raises(TypeError, match="lengths"):
        data.TokenBalancedSampler(None, 1, 1, 0)
    with pytest.raises(ValueError, match="global_tokens"):
        data.token_normalized_loss(torch.tensor(1.0), 0, 2)
    with pytest.raises(ValueError, match="num_replicas and rank"):
        data.TokenBalancedSampler([3], 1)
    with pytest.raises(ValueError, match="threshold"):
        data.StragglerBalancer(data.TokenBalancedSampler([3], 1, 1, 0), threshold=1.0)
