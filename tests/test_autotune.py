"""bucket_cap_mb="auto": the bucket-cap search (Note [Bucket cap autotuning]).

The choice logic is checked with an injected clock (each rank reports its own step time per cap;
every rank must pick the cap whose slowest rank is fastest), and the training it drives is checked
against torch DDP's trajectory on the same data while the buckets are re-planned under it."""

import dist
import pytest
import torch
import torchlane
from torch import nn


def _model():
    torch.manual_seed(0)
    # ~ 4 KB, 40 KB, 160 KB, 40 KB of fp32 parameters: the candidate caps below cut it differently.
    return nn.Sequential(
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Linear(32, 300),
        nn.Tanh(),
        nn.Linear(300, 130),
        nn.Tanh(),
        nn.Linear(130, 8),
    )


def _batches(rank, steps):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(6, 32, generator=g), torch.randn(6, 8, generator=g)) for _ in range(steps)]


class FakeClock:
    """Step time = cost[cap] on this rank: advances when read at each synchronised forward."""

    def __init__(self, model_ref, costs):
        self.t = 0.0
        self.model_ref = model_ref
        self.costs = costs

    def __call__(self):
        model = self.model_ref[0]
        cap_mb = model.bucket_bytes_cap / (1024 * 1024)
        key = min(self.costs, key=lambda c: abs(c - cap_mb))
        self.t += self.costs[key]
        return self.t


def _run_choice(rank, world_size, costs_per_rank):
    ref = [None]
    config = torchlane.BucketAutotune(
        candidates_mb=(0.01, 0.1, 1.0),
        first_bucket_candidates_mb=(0.001, 0.01),
        warmup_steps=1,
        steps_per_trial=2,
        timer=FakeClock(ref, costs_per_rank[rank]),
    )
    model = torchlane.DistributedDataParallel(_model(), bucket_cap_mb=config)
    ref[0] = model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    layouts = []
    for x, y in _batches(rank, 16):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        layouts.append(model.comm_stats()["num_buckets"])
    stats = model.comm_stats()
    return stats["autotune"], layouts, model.bucket_bytes_cap


def test_every_rank_picks_the_cap_whose_slowest_rank_is_fastest():
    # Rank 0 alone would pick 0.01 MiB; rank 1 is slow there, so the agreed best is 0.1 MiB.
    costs = [{0.01: 1.0, 0.1: 2.0, 1.0: 3.0}, {0.01: 9.0, 0.1: 2.5, 1.0: 3.0}]
    results = dist.run(_run_choice, world_size=2, args=(costs,))
    (auto0, layouts0, cap0), (auto1, layouts1, cap1) = results
    assert [t["step_ms"] for t in auto0["trials"]] == [t["step_ms"] for t in auto1["trials"]]
    assert auto0["state"] == "done"
    assert auto0["bucket_cap_mb"] == auto1["bucket_cap_mb"] == 0.1
    assert cap0 == cap1 == int(0.1 * 1024 * 1024)
    cap_trials = [t for t in auto0["trials"] if t["phase"] == "cap"]
    assert [t["bucket_cap_mb"] for t in cap_trials] == [0.01, 0.1, 1.0]
    # The agreed time of a try is the slowest rank's (the median of its timed steps).
    assert [t["step_ms"] for t in cap_trials] == [9000.0, 2500.0, 3000.0]
    # The caps really re-planned the buckets: 0.01 MiB cuts more buckets than 1 MiB.
    assert cap_trials[0]["num_buckets"] > cap_trials[2]["num_buckets"]
    assert layouts0 == layouts1
    # Then the first-bucket sizes not above the winner were tried with it.
    first_trials = [t for t in auto0["trials"] if t["phase"] == "first_bucket"]
    assert first_trials and all(t["bucket_cap_mb"] == 0.1 for t in first_trials)


def _run_training(rank, world_size, auto):
    model = _model()
    ref = torch.nn.parallel.DistributedDataParallel(_model())
    if auto:
        config = torchlane.BucketAutotune(
            candidates_mb=(0.01, 0.05, 1.0),
            first_bucket_candidates_mb=(0.005,),
            warmup_steps=1,
            steps_per_trial=1,
        )
        ours = torchlane.DistributedDataParallel(
            model, bucket_cap_mb=config, gradient_as_bucket_view=True
        )
    else:
        with pytest.raises(ValueError, match='bucket_cap_mb must be a number or "auto"'):
            torchlane.DistributedDataParallel(_model(), bucket_cap_mb="fast")
        ours = torchlane.DistributedDataParallel(model, bucket_cap_mb="auto")
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ours, ref)]
    for i, (x, y) in enumerate(_batches(rank, 12)):
        for m, opt in zip((ours, ref), opts, strict=True):
            if i % 3 == 1:  # gradient accumulation across a re-plan
                with m.no_sync():
                    nn.functional.mse_loss(m(x), y).backward()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad()
    diffs = [
        (a - b).abs().max().item()
        for a, b in zip(ours.module.parameters(), ref.module.parameters(), strict=True)
    ]
    return diffs, ours.comm_stats()["autotune"]


@pytest.mark.parametrize("auto", [True, False], ids=["short-search", "default-auto"])
def test_training_while_tuning_matches_torch_ddp(auto):
    for diffs, state in dist.run(_run_training, world_size=2, args=(auto,)):
        assert max(diffs) < 1e-6, diffs
        assert state["state"] == "done"
        if auto:
            assert len(state["trials"]) == 4
        else:
            # The model (~200 KB) fits in one bucket under every default cap (1-100 MiB) and
            # first-bucket size, so one try is timed and the other six reuse it.
            assert len(state["trials"]) == 7
            assert sum("same_as" in t for t in state["trials"]) == 6
            assert state["bucket_cap_mb"] == 1.0


def test_bad_bucket_cap_mb():
    with pytest.raises(ValueError, match="candidates_mb"):
        torchlane.BucketAutotune(candidates_mb=())
    with pytest.raises(ValueError, match="steps_per_trial"):
        torchlane.BucketAutotune(steps_per_trial=0)
    with pytest.raises(TypeError, match="candidates_mb"):
        torchlane.BucketAutotune(candidates_mb=("big",))


def _run_with_powersgd(rank, world_size):
    config = torchlane.BucketAutotune(
        candidates_mb=(0.01, 1.0),
        first_bucket_candidates_mb=(0.005,),
        warmup_steps=0,
        steps_per_trial=1,
    )
    model = torchlane.DistributedDataParallel(_model(), bucket_cap_mb=config)
    state = torchlane.hooks.PowerSGDState(rank=2, start_powerSGD_iter=2)
    model.register_comm_hook(state, torchlane.hooks.powersgd)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for x, y in _batches(0, 8):  # the same data on both ranks: the reduced gradient is exact
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model.comm_stats()["autotune"]["state"]


def test_stateful_hook_survives_replanning():
    # PowerSGD's per-bucket memories restart at each re-plan (CommHook::reset_bucket_state); the
    # run must go on with finite, identical losses on both ranks.
    (l0, s0), (l1, s1) = dist.run(_run_with_powersgd, world_size=2)
    assert s0 == s1 == "done"
    assert l0 == l1 and all(torch.isfinite(torch.tensor(l0)))
