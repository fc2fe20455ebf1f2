"""Per-rank functions of tests/test_sharding_more.py: parameter groups, sharded checkpoints,
mixed precision (run by tests/dist.py on Gloo ranks)."""

import os

import torch
import torch.distributed as dist
import torchlane
from sharding_cases import Net, _loss, batch
from torch import nn


def groups_of(module, lr_no_decay=2e-2):
    """train_gpt.py's split: matrices decayed, vectors not (with their own lr, so that a group
    mapped onto the wrong elements shows in the losses)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": 0.1},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr_no_decay},
    ]


OPTIMS = {
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.95))),
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
}


def train_groups(rank, world, kind, optim, steps, clip=None, accum=1, grouped=True):
    """Losses of `steps` steps of Net with train_gpt's parameter groups; kind is "ddp" (torch
    optimizer on the full parameters) or a ZeRO stage."""
    torch.manual_seed(0)
    net = Net()
    cls, kw = OPTIMS[optim]
    if kind == "ddp":
        model = torchlane.DistributedDataParallel(net, find_unused_parameters=True)
        groups = groups_of(net) if grouped else [p for p in net.parameters() if p.requires_grad]
        opt = cls(groups, **kw)
    else:
        model = torchlane.ShardedDataParallel(
            net, stage=kind, find_unused_parameters=True, bucket_cap_mb=0.001
        )
        opt = torchlane.ShardedOptimizer(
            model, cls, param_groups=groups_of if grouped else None, **kw
        )
    losses = []
    for step in range(steps):
        for micro in range(accum):
            x, y = batch(step * accum + micro, rank)
            use_extra = (step + rank) % 2 == 0
            last = micro == accum - 1
            if last:
                loss = _loss(model, x, y, use_extra) / accum
                loss.backward()
            else:
                with model.no_sync():
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


def group_trajectories(rank, world, combos, steps):
    out = []
    for stage, optim, clip, accum in combos:
        ref = train_groups(rank, world, "ddp", optim, steps, clip, accum)
        got = train_groups(rank, world, stage, optim, steps, clip, accum)
        out.append(((stage, optim, clip, accum), ref, got))
    # the groups matter: without them (one group, weight decay 0, one lr) the losses differ
    ungrouped = train_groups(rank, world, "ddp", "adamw", steps, grouped=False)
    return out, ungrouped, group_errors(rank, world)


def _message(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def group_errors(rank, world):
    model = torchlane.ShardedDataParallel(Net(), stage=2)
    adam = torch.optim.Adam
    p = next(model.module.parameters())
    out = {
        "foreign": _message(
            lambda: torchlane.ShardedOptimizer(
                model, adam, [{"params": [nn.Parameter(torch.ones(3))]}]
            )
        ),
        "twice": _message(
            lambda: torchlane.ShardedOptimizer(model, adam, [{"params": [p]}, {"params": [p]}])
        ),
        "not_dict": _message(lambda: torchlane.ShardedOptimizer(model, adam, [{"params": [p]}, 3])),
        "empty": _message(lambda: torchlane.ShardedOptimizer(model, adam, [])),
    }
    # frozen parameters are accepted and skipped, as torch.optim does
    opt = torchlane.ShardedOptimizer(model, adam, param_groups=list(model.module.parameters()))
    x, y = batch(0, rank)
    _loss(model, x, y).backward()
    opt.step()
    out["frozen_ok"] = True
    return out


def _steps(model, opt, first, last, rank, world):
    from sharding_cases import _global_loss

    losses = []
    for step in range(first, last):
        losses.append(_global_loss(model, step, rank, world, 6 // world))
        opt.step()
        opt.zero_grad()
    return losses


def sharded_checkpoint(rank, world, stage, directory, save):
    """Global batch of 6 over `world` ranks, train_gpt's groups. save=True: 4 steps with a
    checkpoint after steps 2, 3 and 4 (keep_last=2), then 4 more; save=False: a differently
    initialised model loads the newest checkpoint and trains the same 4 more steps; then a
    corrupt shard file makes the next load raise on every rank."""
    from torchlane import checkpoint

    torch.manual_seed(0 if save else 1)
    model = torchlane.ShardedDataParallel(Net(), stage=stage, bucket_cap_mb=0.001)
    opt = torchlane.ShardedOptimizer(model, torch.optim.AdamW, param_groups=groups_of, lr=1e-2)
    out = {}
    if save:
        _steps(model, opt, 0, 2, rank, world)
        for step in (2, 3, 4):
            if step > 2:
                _steps(model, opt, step - 1, step, rank, world)
            checkpoint.save(directory, model, opt, step, data_position=step, keep_last=2)
        out["files"] = sorted(os.listdir(directory))
        out["full"] = model.full_state_dict()
    else:
        info = checkpoint.load(directory, model, opt)
        out["step"], out["position"] = info.step, info.data_position
    out["losses"] = _steps(model, opt, 4, 8, rank, world)
    if not save:
        dist.barrier()
        if rank == 0:  # flip one byte of the last old rank's shard file
            f = os.path.join(directory, f"ckpt-{4:010d}.shard-2-of-3.pt")
            data = bytearray(open(f, "rb").read())
            data[len(data) // 2] ^= 0xFF
            open(f, "wb").write(bytes(data))
        dist.barrier()
        out["corrupt"] = _message(lambda: checkpoint.load(directory, model, opt))
    return out
