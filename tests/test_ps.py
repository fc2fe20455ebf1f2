"""torchlane.ps: the asynchronous parameter server (Gloo ranks; rank 0 or ranks 0..S-1 serve).

* One worker, max_staleness 0: bitwise the same as single-process DiLoCo-style training (inner
  AdamW, outer torch.optim.SGD with Nesterov on the flat parameters), with 1 and 2 servers.
* With a bound s, no applied update in the server's log is more than s rounds stale; without a
  bound a slow worker's updates are (so the log measures something).
* A worker killed with SIGKILL mid-run: the other worker finishes, the server drops the dead one,
  and the final parameters are exactly the replay of every applied update.
* Errors: a worker with a different model, bad arguments.
"""

import os
import signal
import time

import dist
import pytest
import torch
import torchlane
from torch import nn


def _model(width=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 2))


def _batch(step, rank):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 4, generator=g)
    return x, torch.cos(x[:, :2])


def _inner(model, opt, step, rank):
    x, y = _batch(step, rank)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


OUTER = dict(outer_lr=0.7, outer_momentum=0.9, nesterov=True)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _ps_rank(rank, world, num_servers, H, rounds, staleness, delays=None, kw=None):
    kw = dict(kw or {})
    die = kw.pop("die", None)
    model = _model()
    ps = torchlane.ps.ParameterServer(
        model, num_servers=num_servers, sync_every=H, max_staleness=staleness, **kw
    )
    if ps.is_server:
        return ps.serve()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(H * rounds):
        if die is not None and rank == die[0] and step == die[1]:
            os.kill(os.getpid(), signal.SIGKILL)
        if delays:
            time.sleep(delays.get(rank, 0.0))
        _inner(model, opt, step, rank)
        ps.step()
    ps.close()
    return _flat(model)


def _single_process(H, rounds, worker_rank):
    """The same algorithm in one process: flat global parameters, torch's SGD as outer step."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    glob = _flat(model).clone()
    outer = torch.optim.SGD([glob], lr=0.7, momentum=0.9, nesterov=True, foreach=False)
    for r in range(rounds):
        for step in range(r * H, (r + 1) * H):
            _inner(model, opt, step, worker_rank)
        glob.grad = glob.detach() - _flat(model)
        outer.step()
        with torch.no_grad():  # copy (vector_to_parameters would alias glob)
            offset = 0
            for p in model.parameters():
                p.copy_(glob[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
    return glob


@pytest.mark.parametrize("num_servers", [1, 2])
def test_ps_one_worker_staleness0_bitwise(num_servers):
    H, rounds = 3, 4
    out = dist.run(_ps_rank, num_servers + 1, args=(num_servers, H, rounds, 0, None, OUTER))
    want = _single_process(H, rounds, worker_rank=num_servers)
    assert torch.equal(out[-1], want)
    assert torch.equal(torch.cat([out[s]["shard"] for s in range(num_servers)]), want)
    assert [r["staleness"] for r in out[0]["log"]] == [0] * rounds


def test_ps_staleness_bound_holds():
    # 1 server, 3 workers; worker 3 is slow. Bound 1: never more than 1 round stale.
    delays = {3: 0.03}
    for bound in (1, None):
        out = dist.run(_ps_rank, 4, args=(1, 1, 8, bound, delays))
        log = out[0]["log"]
        assert len(log) == 3 * 8 and out[0]["version"] == 24
        worst = max(r["staleness"] for r in log)
        if bound is None:
            assert worst >= 2, worst  # unbounded: the fast workers run ahead
        else:
            assert worst <= bound, log
        for w in (1, 2, 3):  # each worker's rounds are applied in order
            assert [r["round"] for r in log if r["worker"] == w] == list(range(8))


def test_ps_worker_killed_others_continue():
    # Lockstep (bound 0) is the strictest: the live worker would wait forever for a dead one
    # that still counted.
    out = dist.run(
        _ps_rank,
        3,
        args=(1, 1, 10, 0, None, dict(die=(2, 4), heartbeat_timeout_s=3.0, _keep_updates=True)),
        may_die=(2,),
    )
    report = out[0]
    assert out[2] is None and report["dead_workers"] == [2]
    workers = [r["worker"] for r in report["log"]]
    assert workers.count(1) == 10 and workers.count(2) == 4
    # No applied update lost: replaying the applied updates gives the final parameters.
    assert torch.equal(_replay(report["updates"]), report["shard"])
    assert torch.equal(out[1], report["shard"])  # the live worker pulled the last version


def _wrong_model_rank(rank, world):
    width = 8 if rank == 0 else 9
    try:
        ps = torchlane.ps.ParameterServer(_model(width), max_staleness=0)
    except ValueError as e:
        return str(e)
    return ps.serve()["dead_workers"]


def test_ps_wrong_model():
    out = dist.run(_wrong_model_rank, 2)
    assert "different model" in out[1]
    assert out[0] == []


def _bad_args(rank, world):
    m = _model()
    bad = [
        (dict(num_servers=0), "num_servers must be >= 1"),
        (dict(num_servers=2), "num_servers must be < the world size"),
        (dict(sync_every=0), "sync_every must be >= 1"),
        (dict(max_staleness=-1), "max_staleness must be >= 0"),
        (dict(heartbeat_timeout_s=0), "heartbeat_timeout_s must be > 0"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            torchlane.ps.ParameterServer(m, **kw)
    with pytest.raises(TypeError, match="max_staleness must be an int or None"):  # torch's rule
        torchlane.ps.ParameterServer(m, max_staleness=1.5)
    return True


def test_ps_errors():
    assert dist.run(_bad_args, 2) == [True, True]


def test_shard_server_rules():
    # Note [Bounded staleness] on the C++ state alone: worker 1 may run 1 round ahead of 2.
    shard = torch.zeros(4)
    s = torchlane._C.ShardServer(shard, 1.0, 0.0, False, 1, [1, 2])
    assert s.record_pull(1) == 0 and s.record_pull(2) == 0
    s.apply(1, torch.ones(4))
    assert s.may_pull(1)  # 1 round ahead
    s.record_pull(1)
    s.apply(1, torch.ones(4))
    assert not s.may_pull(1)  # would be 2 ahead of worker 2
    s.apply(2, torch.ones(4))
    assert s.may_pull(1) and s.version == 3
    assert torch.equal(s.shard, torch.full((4,), -3.0))
    assert [r["staleness"] for r in s.log()] == [0, 1, 0]
    s.remove(2, left=False)
    assert s.dead_workers == [2] and s.live_workers == [1]
    with pytest.raises(ValueError, match="pushed without pulling"):
        s.apply(1, torch.ones(4))
    s.record_pull(1)
    with pytest.raises(ValueError, match="pushed 3 Float elements for a shard of 4"):
        s.apply(1, torch.ones(3))
    with pytest.raises(ValueError, match="rank 7 is not a worker"):
        s.may_pull(7)
    with pytest.raises(ValueError, match="max_staleness must be >= 0"):
        torchlane._C.ShardServer(shard, 1.0, 0.0, False, -1, [1])
    with pytest.raises(ValueError, match="nesterov needs outer_momentum"):
        torchlane._C.ShardServer(shard, 1.0, 0.0, True, None, [1])


# ---- restarts: processes sharing a store hosted by the test (dist.StoreJob) ----


def _store_rank(rank, world, store, num_servers, rounds, kw, die_at=None, delay=0.0, pause=None):
    """A PS rank on a shared store. pause=(step, key): wait at that step for the store key."""
    kw = dict(kw)
    server_kw = kw.pop("server", {})
    model = _model()
    ps = torchlane.ps.ParameterServer(
        model,
        num_servers=num_servers,
        store=store,
        rank=rank,
        world_size=world,
        **(server_kw if rank < num_servers else {}),
        **kw,
    )
    if ps.is_server:
        return ps.serve()
    joined = (_flat(model), list(ps.versions))
    store.set(f"test/joined/{rank}/{ps.incarnation}", "1")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(rounds):
        if step == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if pause and step == pause[0]:
            store.wait([pause[1]])
        time.sleep(delay)
        _inner(model, opt, step, rank)
        ps.step()
        store.add("test/progress", 1)
    ps.close()
    return dict(joined=joined, final=_flat(model), acked=ps.acknowledged, rounds=ps.round)


def _replay(updates, upto=None):
    return _replay_shard(updates[:upto], 0, None)


def test_ps_restarted_worker_rejoins():
    # Lockstep (bound 0): worker 2 dies after 4 rounds, worker 1 goes on alone, worker 2's new
    # process links again, pulls the current parameters and moves in lockstep with worker 1.
    kw = dict(max_staleness=0, heartbeat_timeout_s=20.0, server=dict(_keep_updates=True))
    job = dist.StoreJob(3)
    try:
        job.start(0, _store_rank, (1, 0, kw))
        job.start(1, _store_rank, (1, 20, kw, None, 0.02, (10, "test/joined/2/2")))
        first = job.start(2, _store_rank, (1, 40, kw, 4), may_die=True)
        job.wait_until(lambda: job.procs[first].exitcode is not None, what="worker 2 to die")
        second = job.start(2, _store_rank, (1, 6, kw))
        out = job.wait([(0, 0), (1, 0), second])
    finally:
        job.close()
    report, w1, w2 = out[(0, 0)], out[(1, 0)], out[second]
    log = report["log"]
    assert report["dead_workers"] == []
    links = sorted((e["worker"], e["incarnation"]) for e in report["links"])
    assert links == [(1, 1), (2, 1), (2, 2)]
    assert [r["worker"] for r in log].count(1) == 20 == w1["acked"][0]
    assert [r["worker"] for r in log].count(2) == 4 + 6 and w2["acked"][0] == 6
    assert max(r["staleness"] for r in log) == 0  # the bound held across the rejoin
    # Nothing lost: the final shard is the replay of every applied update; the new process
    # started from the parameters of the version it pulled.
    assert torch.equal(_replay(report["updates"]), report["shard"])
    params, versions = w2["joined"]
    assert versions[0] >= 14 and torch.equal(params, _replay(report["updates"], versions[0]))


def test_ps_server_restarts_from_its_checkpoint(tmp_path):
    # 2 servers, 2 workers; server 1 is killed mid-run and started again on its checkpoint dir.
    # Server 0 loses nothing; server 1 keeps every update it acknowledged.
    kw = dict(
        max_staleness=1,
        heartbeat_timeout_s=20.0,
        server=dict(checkpoint_dir=str(tmp_path), _keep_updates=True),
    )
    rounds = 16
    job = dist.StoreJob(4)
    try:
        job.start(0, _store_rank, (2, 0, kw))
        first = job.start(1, _store_rank, (2, 0, kw))
        for w in (2, 3):
            job.start(w, _store_rank, (2, rounds, kw, None, 0.05))
        job.wait_until(lambda: job.store.add("test/progress", 0) >= 8, what="8 rounds")
        job.kill(first)
        second = job.start(1, _store_rank, (2, 0, kw))
        out = job.wait([(0, 0), second, (2, 0), (3, 0)])
    finally:
        job.close()
    s0, s1 = out[(0, 0)], out[second]
    assert s1["resumed_from"] is not None and s1["incarnation"] == 2
    for s, report in ((0, s0), (1, s1)):
        assert report["dead_workers"] == []
        assert max(r["staleness"] for r in report["log"]) <= 1
        assert report["version"] == len(report["log"]) == len(report["updates"])
        counts = [r["worker"] for r in report["log"]]
        for w in (2, 3):
            acked = out[(w, 0)]["acked"][s]
            if s == 0:
                assert counts.count(w) == acked == rounds
            else:  # at most the one push in flight when it died is not acknowledged
                assert acked <= counts.count(w) <= acked + 1 and acked >= rounds - 1
    n0 = s0["shard"].numel()
    assert torch.equal(_replay_shard(s0["updates"], 0, n0), s0["shard"])
    assert torch.equal(_replay_shard(s1["updates"], n0, None), s1["shard"])


def _replay_shard(updates, lo, hi):
    glob = _flat(_model())[lo:hi].clone()
    for _, update in updates:
        glob.add_(update, alpha=-1.0)
    return glob


def test_ps_server_checkpoint_round_trip_and_errors(tmp_path):
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ps = torchlane.ps.ParameterServer(
        _model(), store=store, rank=0, world_size=3, checkpoint_dir=tmp_path,
        outer_momentum=0.9, nesterov=True,
    )
    assert ps.resumed_from is None
    server = ps.server
    for worker in (1, 2, 1):
        server.record_pull(worker)
        server.apply(worker, torch.randn(server.shard.numel()))
    server.remove(2, left=False)
    ps._save()
    again = torchlane.ps.ParameterServer(
        _model(), store=store, rank=0, world_size=3, checkpoint_dir=tmp_path,
        outer_momentum=0.9, nesterov=True,
    )
    assert again.resumed_from is not None and again.incarnation == 2
    assert torch.equal(again.server.shard, server.shard) and again.server.version == 3
    assert again.server.log() == server.log()
    assert again.server.dead_workers == [] and again.server.live_workers == [1, 2]  # expected back
    assert torch.equal(again.server.state()["momentum_buffer"], server.state()["momentum_buffer"])
    with pytest.raises(ValueError, match="pushed without pulling"):  # restarted: pull first
        again.server.apply(1, torch.zeros(server.shard.numel()))
    with pytest.raises(ValueError, match="checkpoint_dir: .* another model or shard"):
        torchlane.ps.ParameterServer(
            _model(9), store=store, rank=0, world_size=3, checkpoint_dir=tmp_path
        )
    with pytest.raises(ValueError, match="checkpoint_dir: .* written for workers \\[1, 2\\]"):
        torchlane.ps.ParameterServer(
            _model(), store=store, rank=0, world_size=4, checkpoint_dir=tmp_path
        )
    bad = [
        (dict(rank=0), ValueError, "rank and world_size are given together with store="),
        (dict(store=store), ValueError, "store= needs rank= and world_size="),
        (dict(store=object(), rank=0, world_size=2), TypeError, "store must be a torch.distributed.Store"),
        (dict(store=store, rank=2, world_size=2), ValueError, "rank must be < world_size"),
        (dict(store=store, rank=1, world_size=2, checkpoint_dir=tmp_path), ValueError,
         "checkpoint_dir is for servers"),
        (dict(store=store, rank=0, world_size=2, checkpoint_every=0), ValueError,
         "checkpoint_every must be >= 1"),
        (dict(store=store, rank=0, world_size=2, rejoin_timeout_s=-1), ValueError,
         "rejoin_timeout_s must be >= 0"),
    ]
    for kw, error, msg in bad:
        with pytest.raises(error, match=msg):
            torchlane.ps.ParameterServer(_model(), **kw)


def test_ps_worker_restarted_after_the_server_stopped_gets_an_error():
    # Worker 2 dies, worker 1 finishes, the server (rejoin_timeout_s=0) stops; a new process of
    # worker 2 then gets a clear error instead of waiting wait_timeout_s for a link.
    kw = dict(heartbeat_timeout_s=20.0)
    job = dist.StoreJob(3)
    try:
        job.start(0, _store_rank, (1, 0, kw))
        job.start(1, _store_rank, (1, 6, kw))
        first = job.start(2, _store_rank, (1, 40, kw, 2), may_die=True)
        out = job.wait([(0, 0), (1, 0)])
        assert out[(0, 0)]["dead_workers"] == [2] and job.procs[first].exitcode is not None
        second = job.start(2, _store_rank, (1, 6, kw))
        with pytest.raises(dist.RankError, match="server 0 has stopped serving"):
            job.wait([second])
    finally:
        job.close()
