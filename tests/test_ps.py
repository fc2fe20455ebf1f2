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
    glob = _flat(_model()).clone()
    for _, update in report["updates"]:
        glob.add_(update, alpha=-1.0)
    assert torch.equal(glob, report["shard"])
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
