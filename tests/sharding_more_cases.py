"""Per-rank functions of tests/test_sharding_more.py: parameter groups, sharded checkpoints,
mixed precision (run by tests/dist.py on Gloo ranks)."""

import os

import torch
import torch.distributed as dist
import torchlane
from sharding_cases import Net, _loss, _message, batch, run_steps
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
    return run_steps(rank, kind, net, model, opt, steps, clip, accum)


def group_trajectories(rank, world, combos, steps):
    out = []
    for stage, optim, clip, accum in combos:
        ref = train_groups(rank, world, "ddp", optim, steps, clip, accum)
        got = train_groups(rank, world, stage, optim, steps, clip, accum)
        out.append(((stage, optim, clip, accum), ref, got))
    # the groups matter: without them (one group, weight decay 0, one lr) the losses differ
    ungrouped = train_groups(rank, world, "ddp", "adamw", steps, grouped=False)
    return out, ungrouped, group_errors(rank, world)


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


def _saver_or_loader(stage, save):
    """The model and optimizer that save (seed 0) or load (seed 1, another bucket plan, so that
    elements are mapped parameter by parameter) a sharded checkpoint."""
    torch.manual_seed(0 if save else 1)
    cap = 0.001 if save else 0.0004
    model = torchlane.ShardedDataParallel(Net(), stage=stage, bucket_cap_mb=cap)
    opt = torchlane.ShardedOptimizer(model, torch.optim.AdamW, param_groups=groups_of, lr=1e-2)
    return model, opt


def sharded_checkpoint(rank, world, stage, directory, save):
    """Global batch of 6 over `world` ranks, train_gpt's groups. save=True: 4 steps with a
    checkpoint after steps 2, 3 and 4 (keep_last=2), then 4 more; save=False: a differently
    initialised model loads the newest checkpoint and trains the same 4 more steps; then a
    corrupt shard file makes the next load raise on every rank."""
    from torchlane import checkpoint

    model, opt = _saver_or_loader(stage, save)
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
        out["buckets"] = len(model._flats)
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
        other = torchlane.ShardedDataParallel(nn.Sequential(nn.Linear(7, 13)), stage=2)
        out["other_model"] = _message(
            lambda: checkpoint.load(os.path.join(directory, f"ckpt-{3:010d}.pt"), other)
        )
        out["torch_optim"] = _message(
            lambda: checkpoint.save(directory, model, torch.optim.SGD(model.parameters()), 9)
        )
    return out


def _reference_mixed(rank, world, steps, reduce_dtype):
    """FSDP2-style mixed precision written out in plain torch: a bf16 compute copy of an fp32
    master model; bf16 gradients cast to reduce_dtype (bf16 when None), divided by the world
    size, all-reduced, applied to the fp32 masters by AdamW, cast back into the compute copy."""
    import copy

    torch.manual_seed(0)
    master = Net()
    compute = copy.deepcopy(master).to(torch.bfloat16)
    opt = torch.optim.AdamW(groups_of(master), lr=1e-2)
    pairs = [
        (m, c)
        for m, c in zip(master.parameters(), compute.parameters(), strict=True)
        if m.requires_grad
    ]
    losses = []
    for step in range(steps):
        x, y = batch(step, rank)
        loss = _loss(compute, x, y)
        loss.backward()
        losses.append(loss.item())
        for m, c in pairs:
            g = c.grad if c.grad is not None else torch.zeros_like(c)
            g = g.to(reduce_dtype or torch.bfloat16) / world
            dist.all_reduce(g)
            m.grad = g.float()
            c.grad = None
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for m, c in pairs:
                c.copy_(m)
    return losses


def _sharded_mixed(rank, world, steps, stage, mp):
    torch.manual_seed(0)
    model = torchlane.ShardedDataParallel(
        Net(), stage=stage, bucket_cap_mb=0.001, mixed_precision=mp
    )
    opt = torchlane.ShardedOptimizer(model, torch.optim.AdamW, param_groups=groups_of, lr=1e-2)
    losses = []
    for step in range(steps):
        x, y = batch(step, rank)
        loss = _loss(model, x, y)
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            dtypes = (
                sorted({str(p.dtype) for p in model.module.parameters()}),
                sorted({str(s.dtype) for s in model._shards}),
                sorted({str(s.grad.dtype) for s in model._shards}),
            )
        opt.step()
        opt.zero_grad()
    return losses, dtypes, model.full_state_dict()


def mixed_precision(rank, world, steps):
    bf16 = torch.bfloat16
    out = {"fp32": _sharded_mixed(rank, world, steps, 2, None)[0], "runs": []}
    for stage, reduce_dtype in ((2, torch.float32), (3, None), (1, torch.float32)):
        mp = torchlane.MixedPrecision(param_dtype=bf16, reduce_dtype=reduce_dtype)
        got, dtypes, full = _sharded_mixed(rank, world, steps, stage, mp)
        ref = _reference_mixed(rank, world, steps, reduce_dtype)
        out["runs"].append(((stage, str(reduce_dtype)), ref, got, dtypes))
    out["full_dtypes"] = sorted({str(v.dtype) for v in full.values()})
    out["full"] = full
    try:  # torch's own policy object is accepted as it is
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=torch.float32)
        out["torch_policy"] = _sharded_mixed(rank, world, steps, 2, policy)[0]
    except ImportError:
        out["torch_policy"] = None
    out["bad"] = _message(
        lambda: torchlane.ShardedDataParallel(
            Net(), mixed_precision=torchlane.MixedPrecision(param_dtype=torch.int8)
        )
    )
    out["both"] = _message(
        lambda: torchlane.ShardedDataParallel(
            Net(), reduce_dtype=bf16, mixed_precision=torchlane.MixedPrecision(param_dtype=bf16)
        )
    )
    return out


def per_bucket_stage3(rank, world, steps):
    """Stage 3 with reshard_after_forward=True (one parameter per bucket) against torchlane DDP:
    train_gpt's groups, grad accumulation over 2 micro-batches through no_sync, global-norm clip."""
    out = {}
    for kind in ("ddp", 3):
        torch.manual_seed(0)
        net = Net()
        if kind == "ddp":
            model = torchlane.DistributedDataParallel(net)
            opt = torch.optim.AdamW(groups_of(net), lr=1e-2)
        else:
            model = torchlane.ShardedDataParallel(
                net, stage=3, bucket_cap_mb=0.0001, reshard_after_forward=True
            )
            opt = torchlane.ShardedOptimizer(
                model, torch.optim.AdamW, param_groups=groups_of, lr=1e-2
            )
        losses = []
        for step in range(steps):
            for micro in range(2):
                x, y = batch(2 * step + micro, rank)
                if micro == 0:
                    with model.no_sync():
                        (_loss(model, x, y) / 2).backward()
                else:
                    loss = _loss(model, x, y) / 2
                    loss.backward()
                    losses.append(loss.item())
            if kind == "ddp":
                torch.nn.utils.clip_grad_norm_(
                    [p for p in net.parameters() if p.grad is not None], 0.05
                )
            else:
                opt.clip_grad_norm_(0.05)
            opt.step()
            opt.zero_grad()
        out[kind] = losses
    out["deep"] = _deep_memory(rank, steps)
    g = model._gatherer
    out["stats"] = {
        "buckets": len(model._flats),
        "full_bytes": sum(f.numel() * f.element_size() for f in model._flats),
        "peak_bytes": g.peak_bytes,
        "gathers": g.gathers,
        "prefetch_hits": g.prefetch_hits,
        "held_after_step": sum(f.untyped_storage().nbytes() for f in model._flats),
    }
    with model.summon_full_params():  # evaluation with everything gathered, then freed again
        x, y = batch(0, rank)
        with torch.no_grad():
            out["eval"] = _loss(model.module, x, y).item()
        out["held_in_summon"] = sum(f.untyped_storage().nbytes() for f in model._flats)
    out["held_after_summon"] = sum(f.untyped_storage().nbytes() for f in model._flats)
    out["stage2"] = _message(
        lambda: torchlane.ShardedDataParallel(Net(), stage=2, reshard_after_forward=True)
    )
    return out


def _deep_memory(rank, steps):
    """8 linear layers, one bucket each: the full parameters held at once during a step."""
    torch.manual_seed(0)
    layers = [m for _ in range(8) for m in (nn.Linear(32, 32), nn.Tanh())]
    model = torchlane.ShardedDataParallel(
        nn.Sequential(*layers), stage=3, bucket_cap_mb=0.001, reshard_after_forward=True
    )
    opt = torchlane.ShardedOptimizer(model, torch.optim.SGD, lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        x = torch.randn(4, 32, generator=g)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return {
        "buckets": len(model._flats),
        "full_bytes": sum(f.numel() * f.element_size() for f in model._flats),
        "peak_bytes": model._gatherer.peak_bytes,
        "prefetch_hits": model._gatherer.prefetch_hits,
    }


def sharded_dcp(rank, world, stage, directory, save):
    """torch.distributed.checkpoint through torchlane.ShardedCheckpoint. save=True: 4 steps,
    dcp.save, 4 more steps; save=False: a differently initialised model with another stage and
    bucket plan loads it (fresh optimizer) and trains the same 4 more steps."""
    import torch.distributed.checkpoint as dcp

    model, opt = _saver_or_loader(stage, save)
    out = {}
    if save:
        _steps(model, opt, 0, 4, rank, world)
        dcp.save({"app": torchlane.ShardedCheckpoint(model, opt)}, checkpoint_id=directory)
        out["full"] = model.full_state_dict()
        out["full_optim"] = opt.full_state()
    else:
        dcp.load({"app": torchlane.ShardedCheckpoint(model, opt)}, checkpoint_id=directory)
        out["buckets"] = len(model._flats)
        out["errors"] = {
            "model": _message(lambda: torchlane.ShardedCheckpoint(Net())),
            "optim": _message(
                lambda: torchlane.ShardedCheckpoint(model, torch.optim.SGD(Net().parameters()))
            ),
        }
    out["losses"] = _steps(model, opt, 4, 8, rank, world)
    return out


class _Scaled(nn.Module):
    """A zero-dimensional parameter between two layers (written whole by ShardedCheckpoint)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.randn(()))
        self.b = nn.Linear(3, 2)

    def forward(self, x):
        return self.b(self.a(x) * self.scale)


def sharded_dcp_scalar(rank, world, directory):
    """Saves a trained _Scaled (Adam, one step) with ShardedCheckpoint, loads it into a
    differently initialised one: the same full state_dict and optimizer state."""
    import torch.distributed.checkpoint as dcp

    out = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = torchlane.ShardedDataParallel(_Scaled(), stage=2, bucket_cap_mb=0.0001)
        opt = torchlane.ShardedOptimizer(model, torch.optim.Adam, lr=0.1)
        ckpt = torchlane.ShardedCheckpoint(model, opt)
        if seed == 0:
            model(torch.randn(4, 5, generator=torch.Generator().manual_seed(rank))).sum().backward()
            opt.step()
            dcp.save({"app": ckpt}, checkpoint_id=directory)
        else:
            dcp.load({"app": ckpt}, checkpoint_id=directory)
        out[seed] = (model.full_state_dict(), opt.full_state())
    return out


def sharded_dcp_mixed(rank, world, directory):
    """bf16 compute on fp32 masters: stage 2 saves through ShardedCheckpoint after 3 steps and
    trains 3 more; a stage-3 model (another seed) loads and trains the same 3."""
    import torch.distributed.checkpoint as dcp

    out = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        mp = torchlane.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model = torchlane.ShardedDataParallel(
            Net(), stage=3 if seed else 2, bucket_cap_mb=0.001, mixed_precision=mp
        )
        opt = torchlane.ShardedOptimizer(model, torch.optim.AdamW, param_groups=groups_of, lr=1e-2)
        ckpt = {"app": torchlane.ShardedCheckpoint(model, opt)}
        if seed == 0:
            _steps(model, opt, 0, 3, rank, world)
            dcp.save(ckpt, checkpoint_id=directory)
        else:
            dcp.load(ckpt, checkpoint_id=directory)
        out[seed] = {
            "full": model.full_state_dict(),
            "losses": _steps(model, opt, 3, 6, rank, world),
        }
    return out


def _mlp():
    return nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 9), nn.Tanh(), nn.Linear(9, 3))


def _mlp_steps(model, opt, first, last, rank, world):
    """Global batch of 12 rows per step split over the ranks; returns the global mean losses."""
    losses = []
    for step in range(first, last):
        g = torch.Generator().manual_seed(500 + step)
        x, y = torch.randn(12, 6, generator=g), torch.randn(12, 3, generator=g)
        n = 12 // world
        loss = nn.functional.mse_loss(model(x[rank * n : (rank + 1) * n]), y[rank * n : (rank + 1) * n])
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def sharded_dcp_to_torch(rank, world, directory, loader):
    """ShardedCheckpoint -> torch: stage 3 trains 3 steps, dcp.save, 3 more (the reference).
    loader "fsdp2": torch's fully_shard model (another init) with torch.optim.AdamW loads the
    files through torch.distributed.checkpoint.state_dict.get_state_dict/set_state_dict, then
    trains the same 3 steps; "ddp": torch DDP the same way."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    kw = dict(lr=1e-2, weight_decay=0.1)
    if loader is None:
        torch.manual_seed(0)
        model = torchlane.ShardedDataParallel(_mlp(), stage=3, bucket_cap_mb=0.0005)
        opt = torchlane.ShardedOptimizer(model, torch.optim.AdamW, **kw)
        _mlp_steps(model, opt, 0, 3, rank, world)
        dcp.save({"app": torchlane.ShardedCheckpoint(model, opt)}, checkpoint_id=directory)
        return {"losses": _mlp_steps(model, opt, 3, 6, rank, world), "buckets": len(model._flats)}
    torch.manual_seed(1)
    model = _mlp()
    if loader == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), **kw)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"app": {"model": model_sd, "optim": optim_sd}}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return {"losses": _mlp_steps(model, opt, 3, 6, rank, world)}
