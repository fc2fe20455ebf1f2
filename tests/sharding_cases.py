"""Per-rank functions of tests/test_sharding.py (run by tests/dist.py on Gloo ranks)."""

import os

import torch
import torch.distributed as dist
import torchlane
from torch import nn


class Net(nn.Module):
    """Tied embedding/head, a frozen layer, a branch each rank skips on alternate steps; 468
    trainable elements plus odd biases, so buckets need padding on 2 and 3 ranks."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 7)
        self.fc = nn.Linear(7, 13)
        self.frozen = nn.Linear(13, 13)
        self.frozen.requires_grad_(False)
        self.extra = nn.Linear(13, 13)
        self.proj = nn.Linear(13, 7)
        self.head = nn.Linear(7, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx, use_extra=True):
        h = torch.tanh(self.fc(self.emb(idx)))
        h = torch.tanh(self.frozen(h))
        if use_extra:
            h = h + torch.tanh(self.extra(h))
        return self.head(self.proj(h))


OPTIMS = {
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "adagrad": (torch.optim.Adagrad, dict(lr=0.05)),
}


def batch(step, rank, per_rank=4, seq=5, offset=None):
    """Rank `rank`'s slice of the global batch of `step` (global rows are seeded per step)."""
    g = torch.Generator().manual_seed(1000 + step)
    rows = torch.randint(0, 11, (per_rank * 6, seq + 1), generator=g)
    start = rank * per_rank if offset is None else offset
    x = rows[start : start + per_rank]
    return x[:, :-1], x[:, 1:]


def _loss(model, x, y, use_extra=True):
    out = model(x, use_extra)
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _train(rank, world, kind, optim, steps, clip=None, accum=1):
    torch.manual_seed(0)
    net = Net()
    cls, kw = OPTIMS[optim]
    if kind == "ddp":
        model = torchlane.DistributedDataParallel(net, find_unused_parameters=True)
        opt = cls([p for p in model.parameters() if p.requires_grad], **kw)
    else:
        model = torchlane.ShardedDataParallel(
            net, stage=kind, find_unused_parameters=True, bucket_cap_mb=0.001
        )
        opt = torchlane.ShardedOptimizer(model, cls, **kw)
    return run_steps(rank, kind, net, model, opt, steps, clip, accum)


def run_steps(rank, kind, net, model, opt, steps, clip=None, accum=1):
    """Train `steps` steps of `accum` micro-batches (no_sync on all but the last; Net's extra
    layer locally unused on alternate steps), clipping as kind ("ddp" or a stage) does; the
    per-micro-batch losses."""
    losses = []
    for step in range(steps):
        for micro in range(accum):
            x, y = batch(step * accum + micro, rank)
            use_extra = (step + rank) % 2 == 0  # locally unused on alternate steps
            sync = micro == accum - 1
            ctx = model.no_sync() if not sync else _null()
            with ctx:
                loss = _loss(model, x, y, use_extra) / accum
                loss.backward()
            losses.append(loss.item())
        if clip is not None:
            if kind == "ddp":
                torch.nn.utils.clip_grad_norm_(
                    [p for p in net.parameters() if p.grad is not None], clip
                )
            else:
                opt.clip_grad_norm_(clip)
        opt.step()
        opt.zero_grad()
    return losses


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def trajectories(rank, world, combos, steps):
    """For each (stage, optim, clip, accum): (DDP losses, sharded losses) on this rank."""
    out = []
    for stage, optim, clip, accum in combos:
        ref = _train(rank, world, "ddp", optim, steps, clip, accum)
        got = _train(rank, world, stage, optim, steps, clip, accum)
        out.append(((stage, optim, clip, accum), ref, got))
    return out


def memory(rank, world):
    """Gradient and optimizer bytes per rank after a step, per stage."""
    res = {}
    for stage in (1, 2, 3):
        torch.manual_seed(0)
        model = torchlane.ShardedDataParallel(Net(), stage=stage)
        opt = torchlane.ShardedOptimizer(model, torch.optim.Adam, lr=1e-3)
        x, y = batch(0, rank)
        _loss(model, x, y).backward()
        opt.step()
        res[stage] = model.per_rank_bytes(opt)
        res[stage]["full_grads"] = sum(p.grad is not None for p in model._params)
        res[stage]["storage"] = [f.untyped_storage().nbytes() for f in model._flats]
    return res


def _message(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def errors(rank, world):
    out = {}
    out["stage0"] = _message(lambda: torchlane.ShardedDataParallel(Net(), stage=0))
    out["stage_str"] = _message(lambda: torchlane.ShardedDataParallel(Net(), stage="2"))
    out["mismatch"] = _message(lambda: torchlane.ShardedDataParallel(Net(), stage=1 + rank))
    model = torchlane.ShardedDataParallel(Net(), stage=2)
    out["not_sdp"] = _message(lambda: torchlane.ShardedOptimizer(Net(), torch.optim.Adam))
    full = torch.optim.Adam(model.parameters(), lr=1e-3)
    out["instance"] = _message(lambda: torchlane.ShardedOptimizer(model, full))
    x, y = batch(0, rank)
    _loss(model, x, y).backward()
    out["full_opt"] = _message(full.step)
    # still usable after the errors: every rank is in step
    opt = torchlane.ShardedOptimizer(model, torch.optim.Adam, lr=1e-3)
    opt.step()
    out["clip"] = _message(lambda: opt.clip_grad_norm_(-1.0))
    return out


def _global_loss(model, step, rank, world, per_rank):
    x, y = batch(step, rank, per_rank=per_rank)
    loss = _loss(model, x, y)
    loss.backward()
    t = loss.detach().reshape(1).double() / world
    dist.all_reduce(t)
    return float(t)


def reshard(rank, world, stage, path, steps_before, steps_after, save):
    """Global batch of 6 split over `world` ranks. save=True: train steps_before, write the full
    state, train steps_after more; else load the state and train steps_after."""
    per_rank = 6 // world
    torch.manual_seed(0)
    model = torchlane.ShardedDataParallel(Net(), stage=stage, bucket_cap_mb=0.001)
    opt = torchlane.ShardedOptimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    losses = []
    if save:
        for step in range(steps_before):
            _global_loss(model, step, rank, world, per_rank)
            opt.step()
            opt.zero_grad()
        full = opt.full_state()
        if rank == 0:
            torch.save(full, path + ".tmp")
            os.replace(path + ".tmp", path)
        dist.barrier()
    else:
        opt.load_full_state(torch.load(path, weights_only=False))
    for step in range(steps_before, steps_before + steps_after):
        losses.append(_global_loss(model, step, rank, world, per_rank))
        opt.step()
        opt.zero_grad()
    full_sd = model.full_state_dict()
    return losses, full_sd
