"""Training routines that run inside spawned ranks (see tests/dist.py) for test_ddp.py."""

import contextlib

import torch
import torch.distributed as dist
import torchlane
from models import MultiOutput, batch, loss_fn, make_model
from torch import nn

PER_RANK = 4
LR = 0.1


def shard(t, rank):
    return t[rank * PER_RANK : (rank + 1) * PER_RANK]


def params_of(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ---- torchlane DDP alone, compared with single-process training by the test ----


def train_torchlane(rank, world, cases, steps=5):
    out = []
    for name, kwargs in cases:
        model = torchlane.DistributedDataParallel(make_model(name), **kwargs)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for step in range(steps):
            x, y = batch(name, step, world * PER_RANK)
            opt.zero_grad()
            loss_fn(name, model(shard(x, rank)), shard(y, rank)).backward()
            opt.step()
        out.append((params_of(model.module), model.comm_stats()))
    return out


def train_reference(name, world, steps=5):
    """Single-process training on the concatenated batch. A model with BatchNorm runs each rank's
    shard separately (its statistics are per shard under DDP) and keeps rank 0's running
    statistics, which DDP broadcasts before every forward."""
    model = make_model(name)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(steps):
        x, y = batch(name, step, world * PER_RANK)
        opt.zero_grad()
        if name != "convbn":
            loss_fn(name, model(x), y).backward()
        else:
            start = {n: b.clone() for n, b in model.named_buffers()}
            rank0 = None
            for r in range(world):
                with torch.no_grad():
                    for n, b in model.named_buffers():
                        b.copy_(start[n])
                (loss_fn(name, model(shard(x, r)), shard(y, r)) / world).backward()
                if r == 0:
                    rank0 = {n: b.clone() for n, b in model.named_buffers()}
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(rank0[n])
        opt.step()
    return params_of(model)


# ---- torchlane DDP and torch DDP side by side in the same processes ----


def _sync_step(model, opt, name, step, rank, world, scenario):
    x, y = batch(name, step, world * PER_RANK)
    xs, ys = shard(x, rank), shard(y, rank)
    opt.zero_grad()
    if scenario in ("no_sync", "flag"):
        # Two local micro-batches accumulate without communication, the third synchronises.
        micro = [(xs[:2], ys[:2]), (xs[2:3], ys[2:3]), (xs[3:], ys[3:])]
        for i, (mx, my) in enumerate(micro):
            last = i == len(micro) - 1
            if scenario == "no_sync":
                ctx = contextlib.nullcontext() if last else model.no_sync()
            else:
                model.require_backward_grad_sync = last
                ctx = contextlib.nullcontext()
            with ctx:
                loss_fn(name, model(mx), my).backward()
        opt.step()
        return
    if scenario == "fwd_no_bwd" and step == 2:
        model(xs)  # a forward whose backward never runs
    if scenario == "eval_rank0" and rank == 0:
        with torch.no_grad():
            model(xs)  # evaluation through the wrapper on rank 0 only
    out = model(xs)
    if scenario.startswith(("unused_output", "all_outputs")):
        fields = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(
            out, tuple) else [out.main, out.side]
        loss = loss_fn(name, fields[0], ys)
        if scenario.startswith("all_outputs"):
            loss = loss + fields[1].pow(2).mean()
        loss.backward()
    elif scenario == "create_graph" and isinstance(model, torchlane.DistributedDataParallel):
        # (torch DDP itself raises "a leaf Variable that requires grad is being used in an
        # in-place operation" here; it runs a plain backward instead, which must give the same
        # parameters.)
        loss_fn(name, out, ys).backward(create_graph=True)
    elif scenario == "inplace_output":
        out.mul_(2)  # in-place on an output that went through the unused-parameter pass-through
        loss_fn(name, out, ys).backward()
    else:
        loss_fn(name, out, ys).backward()
    opt.step()


def _build(name, scenario):
    if ":" in scenario:
        kind = scenario.split(":")[1]
        torch.manual_seed(0)
        return MultiOutput(kind)
    return make_model(name)


TORCHLANE_ONLY = {"check_finite", "verify_layout"}


def compare_with_torch(rank, world, cases, steps=5):
    """Each case is (model name, kwargs for both DDPs, scenario). Returns, per case, the largest
    parameter difference after each step, whether `.grad is None` agreed, and torchlane's
    comm_stats() after the first and the last step."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    results = []
    for name, kwargs, scenario in cases:
        ours = torchlane.DistributedDataParallel(_build(name, scenario), **kwargs)
        torch_kwargs = {k: v for k, v in kwargs.items() if k not in TORCHLANE_ONLY}
        theirs = nn.parallel.DistributedDataParallel(_build(name, scenario), **torch_kwargs)
        if scenario == "hook_fp16":
            ours.register_comm_hook(None, default_hooks.fp16_compress_hook)
            theirs.register_comm_hook(None, default_hooks.fp16_compress_hook)
        opt_ours = torch.optim.SGD(ours.parameters(), lr=LR)
        opt_theirs = torch.optim.SGD(theirs.parameters(), lr=LR)
        diffs, grads_agree, stats, raised = [], True, [], None
        for step in range(steps):
            raised = [_message(lambda m=m, o=o: _sync_step(m, o, name, step, rank, world, scenario))  # noqa: B023 (called at once)
                      for m, o in ((ours, opt_ours), (theirs, opt_theirs))]
            if any(raised):
                break  # compared by the test: torch DDP must have raised the same way
            diff = 0.0
            for (_, p), q in zip(ours.module.named_parameters(), theirs.module.parameters(), strict=True):
                diff = max(diff, (p.float() - q.float()).abs().max().item())
                grads_agree &= (p.grad is None) == (q.grad is None)
            diffs.append(diff)
            if step in (0, steps - 1):
                stats.append(ours.comm_stats())
        results.append(
            {"diffs": diffs, "grads_agree": grads_agree, "stats": stats, "raised": raised}
        )
    return results


# ---- errors ----


def _message(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test inspects type and text
        return type(e).__name__, str(e)
    return None


def errors(rank, world):
    from torch.utils.checkpoint import checkpoint

    out = {}
    # Parameters that differ across ranks: caught at construction, on every rank.
    width = 16 if rank == 0 else 17
    out["shape"] = _message(
        lambda: torchlane.DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, width)))
    )
    out["bucket_cap"] = _message(lambda: torchlane.DistributedDataParallel(nn.Linear(2, 2), bucket_cap_mb=0))
    out["bucket_cap_neg"] = _message(
        lambda: torchlane.DistributedDataParallel(nn.Linear(2, 2), bucket_cap_mb=-1)
    )
    frozen = nn.Linear(2, 2).requires_grad_(False)
    out["no_params"] = _message(lambda: torchlane.DistributedDataParallel(frozen))
    out["device_ids"] = _message(lambda: torchlane.DistributedDataParallel(nn.Linear(2, 2), device_ids=[0]))

    # A parameter that gets no gradient without find_unused_parameters: the next forward says so.
    model = torchlane.DistributedDataParallel(make_model("unused"))
    x = torch.randn(4, 12)
    model(x).sum().backward()

    out["unused"] = _message(lambda: model(x))

    # A parameter whose gradient arrives twice in one backward (reentrant checkpointing).
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(8, 8)
            self.other = nn.Linear(8, 8)

        def forward(self, x):
            x = checkpoint(self.shared, x, use_reentrant=True)
            x = checkpoint(lambda t: self.other(self.shared(t)), x, use_reentrant=True)
            return x

    twice = torchlane.DistributedDataParallel(Twice())
    inp = torch.randn(2, 8, requires_grad=True)
    out["twice"] = _message(lambda: twice(inp).sum().backward())

    # Comm hooks: twice, after the first backward, wrong result shape.
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    m = torchlane.DistributedDataParallel(nn.Linear(4, 4))
    m.register_comm_hook(None, default_hooks.allreduce_hook)
    out["hook_twice"] = _message(lambda: m.register_comm_hook(None, default_hooks.allreduce_hook))
    m2 = torchlane.DistributedDataParallel(nn.Linear(4, 4))
    m2(torch.randn(2, 4)).sum().backward()
    out["hook_late"] = _message(lambda: m2.register_comm_hook(None, default_hooks.allreduce_hook))
    out["hook_not_callable"] = _message(
        lambda: torchlane.DistributedDataParallel(nn.Linear(4, 4)).register_comm_hook(None, 3)
    )

    def bad_hook(state, bucket):
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer()[:1].clone())
        return fut

    m3 = torchlane.DistributedDataParallel(nn.Linear(4, 4))
    m3.register_comm_hook(None, bad_hook)
    out["hook_shape"] = _message(lambda: m3(torch.randn(2, 4)).sum().backward())
    dist.barrier()
    return out


# ---- overlap and profiler ----


def overlap(rank, world):
    """A deep MLP with many small buckets: the first bucket's all-reduce must start while the
    backward pass is still running."""
    model = torchlane.DistributedDataParallel(
        make_model("mlp", d_in=256, hidden=256, d_out=256, layers=12), bucket_cap_mb=0.3
    )
    x = torch.randn(64, 256)
    for _ in range(3):
        model(x).pow(2).mean().backward()
    stats = model.comm_stats()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x).pow(2).mean().backward()
    names = {e.name for e in prof.events()}
    return stats, "torchlane::allreduce_bucket" in names


# ---- non-finite gradients ----


def nonfinite(rank, world, gradient_as_bucket_view):
    """A NaN in rank 1's input at step 2: every rank must see grads_finite False at that step only,
    skip it, and stay equal to torch DDP skipping the same step."""
    ours = torchlane.DistributedDataParallel(
        make_model("mlp"), check_finite=True, gradient_as_bucket_view=gradient_as_bucket_view
    )
    theirs = nn.parallel.DistributedDataParallel(make_model("mlp"))
    opt_ours = torch.optim.SGD(ours.parameters(), lr=LR)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=LR)
    flags = []
    for step in range(4):
        x, y = batch("mlp", step, world * PER_RANK)
        xs, ys = shard(x, rank), shard(y, rank)
        if step == 2 and rank == 1:
            xs = xs.clone()
            xs[0, 0] = float("nan")
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            loss_fn("mlp", model(xs), ys).backward()
        flags.append(ours.grads_finite)
        if ours.grads_finite:
            opt_ours.step()
        if all(torch.isfinite(p.grad).all() for p in theirs.parameters()):
            opt_theirs.step()
    diff = max((p - q).abs().max().item() for p, q in zip(ours.parameters(), theirs.parameters(), strict=True))
    return flags, diff


# ---- layout verification ----


def layout_mismatch(rank, world):
    """Rank 1 skips a layer: with verify_layout every rank raises, naming what rank 1 lacks."""

    class Conditional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(12, 12)
            self.b = nn.Linear(12, 12)

        def forward(self, x):
            h = self.a(x)
            return self.b(h) if rank == 0 else h

    torch.manual_seed(0)
    model = torchlane.DistributedDataParallel(Conditional(), verify_layout=True)
    return _message(lambda: model(torch.randn(4, 12)).sum().backward())


# ---- Work objects of the collectives (Note [Releasing collectives' Work objects]) ----


def kept_works(rank, world):
    """The c10d Work of every collective the reducer and a C++ hook launch, counted by torchlane:
    how many it launched and how many it destroyed itself (its last reference dropped on a
    torchlane thread, never on Gloo's worker), over 4 steps of a plain and a bf16-hooked model."""
    before = torchlane._testing.kept_work_stats()
    num_buckets = []
    for hook in (None, torchlane.hooks.bf16_compress):
        model = torchlane.DistributedDataParallel(
            make_model("mlp", d_in=64, hidden=64, d_out=64, layers=6), bucket_cap_mb=0.02
        )
        if hook is not None:
            model.register_comm_hook(None, hook)
        x = torch.randn(8, 64)
        for _ in range(4):
            model(x).pow(2).mean().backward()
        num_buckets.append(model.comm_stats()["num_buckets"])
        del model
    shared = torchlane._C._release_kept_works(10.0)
    after = torchlane._testing.kept_work_stats()
    delta = {k: after[k] - before[k] for k in ("launched", "destroyed_here")}
    return num_buckets, delta, shared, after["kept"]
