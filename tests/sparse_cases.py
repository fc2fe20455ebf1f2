"""Rank functions for tests/test_sparse.py: sparse gradients (nn.Embedding(sparse=True)) under
torchlane DDP side by side with torch DDP on the same model and data (Note [Sparse gradients])."""

import torch
import torch.distributed as tdist
import torchlane
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torchlane import hooks

NUM_EMB, NUM_BAG, DIM = 64, 48, 8


class Mixed(nn.Module):
    """Two sparse-gradient tables (Embedding, EmbeddingBag) and a dense head. small_head: one
    dense parameter, so that torch DDP's dense bucket and torchlane's hold the same bytes in the
    same layout (on 3 ranks Gloo's ring sums each chunk of a bucket in an order that depends on
    where the chunk lies, so differently laid out buckets differ in the last bit)."""

    def __init__(self, sparse=True, small_head=False):
        super().__init__()
        self.emb = nn.Embedding(NUM_EMB, DIM, sparse=sparse)
        self.bag = nn.EmbeddingBag(NUM_BAG, DIM, mode="sum", sparse=sparse)
        if small_head:
            self.head = nn.Sequential(nn.Linear(DIM, 4, bias=False), nn.Tanh())
        else:
            self.head = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, idx, bag_idx, use_emb=True):
        h = self.bag(bag_idx)
        if use_emb:
            h = h + self.emb(idx).mean(1)
        return self.head(h)


def batch(step, rank, b=4, length=5):
    g = torch.Generator().manual_seed(100 * step + rank)
    # Few rows, so that ranks overlap and one rank repeats rows (coalescing matters).
    return (
        torch.randint(0, NUM_EMB, (b, length), generator=g),
        torch.randint(0, NUM_BAG, (b, length), generator=g),
    )


def snapshot_grads(model):
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            out[name] = None
        elif g.is_sparse:
            out[name] = ("sparse", g._indices().clone(), g._values().clone(), g.is_coalesced())
        else:
            out[name] = ("dense", g.clone())
    return out


def _always(step, rank):
    return True


def train(
    kind,
    rank,
    world_size,
    steps=3,
    sparse=True,
    no_sync=False,
    hook=None,
    state=None,
    use_emb=_always,
    small_head=False,
    head_lr=0.1,
    **ddp_kwargs,
):
    torch.manual_seed(0)
    model = Mixed(sparse=sparse, small_head=small_head)
    cls = (
        torch.nn.parallel.DistributedDataParallel
        if kind == "torch"
        else (torchlane.DistributedDataParallel)
    )
    ddp = cls(model, **ddp_kwargs)
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(
        [
            {"params": [model.emb.weight, model.bag.weight]},
            {"params": model.head.parameters(), "lr": head_lr},
        ],
        lr=0.1,
    )
    grads = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        if no_sync:
            with ddp.no_sync():
                idx, bag = batch(1000 + step, rank)
                ddp(idx, bag, use_emb(step, rank)).square().mean().backward()
        idx, bag = batch(step, rank)
        ddp(idx, bag, use_emb(step, rank)).square().mean().backward()
        grads.append(snapshot_grads(model))
        opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = ddp.comm_stats() if kind == "torchlane" else None
    return grads, params, stats


def same(a, b):
    """Bitwise equality of two snapshot_grads() results (indices, values, coalesced flag)."""
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        assert x[0] == y[0], (name, x[0], y[0])
        for u, v in zip(x[1:], y[1:], strict=True):
            if isinstance(u, torch.Tensor):
                assert u.shape == v.shape and torch.equal(u, v), name
            else:
                assert u == v, name
    return True


def case_parity(rank, world_size):
    """Plain, gradient_as_bucket_view, no_sync: torchlane's gradients equal torch DDP's bitwise."""
    checked = []
    small_head = world_size > 2  # see Mixed
    for options in ({}, {"gradient_as_bucket_view": True}, {"no_sync": True}):
        t = train("torch", rank, world_size, small_head=small_head, **options)
        ours = train("torchlane", rank, world_size, small_head=small_head, **options)
        for gt, go in zip(t[0], ours[0], strict=True):
            same(gt, go)
        for n in t[1]:
            assert torch.equal(t[1][n], ours[1][n]), n
        emb = ours[0][-1]["emb.weight"]
        assert emb[0] == "sparse" and emb[3], "the reduced gradient is a coalesced sparse tensor"
        kinds = sorted(str(b["sparse"]) for b in ours[2]["buckets"])
        checked.append((sorted(options), kinds))
    return checked


def recording_hook(state, bucket):
    buf = bucket.buffer()
    state.append(
        {
            "sparse": buf.is_sparse,
            "indices": buf._indices().clone() if buf.is_sparse else None,
            "values": (buf._values() if buf.is_sparse else buf).clone(),
            "gradients": len(bucket.gradients()),
            "shapes": [tuple(p.shape) for p in bucket.parameters()],
            "is_last": bucket.is_last(),
        }
    )
    return default_hooks.allreduce_hook(None, bucket)


def case_python_hook(rank, world_size):
    """A Python hook sees the same sparse buckets under both DDPs and gives the same result."""
    records = {}
    for kind in ("torch", "torchlane"):
        seen = []
        grads, params, _ = train(kind, rank, world_size, steps=2, hook=recording_hook, state=seen)
        records[kind] = (seen, grads, params)
    (ts, tg, tp), (os_, og, op) = records["torch"], records["torchlane"]
    for a, b in zip(tg, og, strict=True):
        same(a, b)
    for n in tp:
        assert torch.equal(tp[n], op[n]), n

    def key(r):
        return (r["sparse"], r["shapes"])

    assert len(ts) == len(os_)
    sparse_t = sorted((r for r in ts if r["sparse"]), key=key)
    sparse_o = sorted((r for r in os_ if r["sparse"]), key=key)
    assert len(sparse_t) == len(sparse_o) == 4  # two tables, two steps
    for a, b in zip(sparse_t, sparse_o, strict=True):
        assert a["shapes"] == b["shapes"] and a["gradients"] == b["gradients"] == 0
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["values"], b["values"])
    assert sum(r["is_last"] for r in os_) == 2
    return len(os_)


def case_cpp_hooks(rank, world_size):
    """torchlane's C++ hooks pass sparse buckets through uncompressed: the tables' gradients
    equal torch DDP's (no hook) bitwise; the dense head is compressed as usual (its learning rate
    is 0, so that its compressed gradients do not change the tables' later gradients)."""
    ref = train("torch", rank, world_size, steps=3, head_lr=0.0)[0]
    out = {}
    for name, hook, state in (
        ("bf16", hooks.bf16_compress, None),
        ("powersgd", hooks.powersgd, hooks.PowerSGDState(start_powerSGD_iter=2)),
        ("topk", hooks.topk, hooks.TopKState(ratio=0.05)),
    ):
        grads, _, stats = train(
            "torchlane", rank, world_size, steps=3, hook=hook, state=state, head_lr=0.0
        )
        assert not torch.equal(ref[-1]["head.0.weight"][1], grads[-1]["head.0.weight"][1]), name
        for a, b in zip(ref, grads, strict=True):
            for table in ("emb.weight", "bag.weight"):
                same({table: a[table]}, {table: b[table]})
        out[name] = stats["bytes_sent"]
    # The same hooks as plain Python hooks inside torch DDP (a sparse buffer() reaches C++ there).
    grads = train("torch", rank, world_size, steps=3, hook=hooks.bf16_compress, head_lr=0.0)[0]
    for a, b in zip(ref, grads, strict=True):
        for table in ("emb.weight", "bag.weight"):
            same({table: a[table]}, {table: b[table]})
    return out


def case_unused(rank, world_size):
    """find_unused_parameters with the Embedding unused on rank 1 (torch DDP raises "Expected
    sparse gradient to be defined." there) and unused everywhere in the last step: the reduced
    gradient is the mean over the ranks that used it, as the one-process model on the global
    batch computes it; a table unused on every rank keeps its .grad (None)."""

    def use(step, r):
        return step < 2 and r == 0

    grads, _, _ = train(
        "torchlane", rank, world_size, steps=3, use_emb=use, find_unused_parameters=True
    )
    # One-process reference: the same model, the mean of the ranks' losses.
    torch.manual_seed(0)
    model = Mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        loss = sum(model(*batch(step, r), use(step, r)).square().mean() for r in range(world_size))
        (loss / world_size).backward()
        for name, p in model.named_parameters():
            ours = grads[step][name]
            if p.grad is None:
                assert ours is None, (step, name)
                continue
            dense = (
                torch.sparse_coo_tensor(ours[1], ours[2], p.shape).to_dense()
                if ours[0] == "sparse"
                else ours[1]
            )
            ref = p.grad.to_dense() if p.grad.is_sparse else p.grad
            torch.testing.assert_close(dense, ref, rtol=1e-5, atol=1e-6)
        opt.step()
    return [grads[s]["emb.weight"] is None for s in range(3)]


def case_row_sparse(rank, world_size):
    """row_sparse_params: dense-storage tables reduced as (row, values) pairs give the dense
    all-reduce's gradients (to fp32 rounding) and report the bytes saved."""
    dense = train("torchlane", rank, world_size, steps=2, sparse=False)
    rows = train(
        "torchlane",
        rank,
        world_size,
        steps=2,
        sparse=False,
        row_sparse_params=["emb.weight", "bag.weight"],
    )
    for a, b in zip(dense[0], rows[0], strict=True):
        for name in a:
            assert b[name][0] == "dense", name
            torch.testing.assert_close(a[name][1], b[name][1], rtol=1e-6, atol=1e-7)
    stats = rows[2]
    idx, bag = batch(1, rank)
    expected = 0
    for ids, num in ((idx, NUM_EMB), (bag, NUM_BAG)):
        touched = ids.unique().numel()  # rows with a nonzero gradient on this rank
        expected += num * DIM * 4 - touched * (8 + DIM * 4)
    assert stats["row_sparse_bytes_saved"] == expected, (stats["row_sparse_bytes_saved"], expected)
    kinds = sorted(str(b["sparse"]) for b in stats["buckets"])
    assert kinds.count("row") == 2
    return stats["row_sparse_bytes_saved"], dense[2]["bytes_sent"], stats["bytes_sent"]


def case_hook_contract(rank, world_size):
    """register_comm_hook's checks raise what torch DDP raises, torch's sentence first."""
    import torch.futures

    def bad_bucket(state, bucket: int):
        return None

    def bad_return(state, bucket: tdist.GradBucket) -> int:
        return None

    def good(state, bucket: tdist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        return default_hooks.allreduce_hook(None, bucket)

    messages = []
    for case in ("not_callable", "bad_bucket", "bad_return", "twice"):
        pair = []
        for cls in (torch.nn.parallel.DistributedDataParallel, torchlane.DistributedDataParallel):
            torch.manual_seed(0)
            ddp = cls(Mixed())
            try:
                if case == "not_callable":
                    ddp.register_comm_hook(None, 3)
                elif case == "bad_bucket":
                    ddp.register_comm_hook(None, bad_bucket)
                elif case == "bad_return":
                    ddp.register_comm_hook(None, bad_return)
                else:
                    ddp.register_comm_hook(None, good)
                    ddp.register_comm_hook(None, good)
            except Exception as e:  # noqa: BLE001 - the type is compared below
                pair.append((type(e).__name__, str(e)))
            else:
                pair.append(None)
        messages.append((case, pair))
    return messages


def case_join(rank, world_size):
    """Uneven inputs under model.join(): rank 1 runs out after 1 step; its zero sparse bucket
    (Note [Join]) leaves rank 0's later gradients its own divided by the initial world size, as
    the one-process model computes them."""
    torch.manual_seed(0)
    model = Mixed()
    ddp = torchlane.DistributedDataParallel(model)
    grads = []
    with ddp.join():
        for step in range(3 if rank == 0 else 1):
            model.zero_grad(set_to_none=True)
            ddp(*batch(step, rank)).square().mean().backward()
            grads.append(snapshot_grads(model)["emb.weight"])
    if rank != 0:
        return len(grads)
    torch.manual_seed(0)
    ref = Mixed()
    for step in range(3):
        ref.zero_grad(set_to_none=True)
        ranks = range(world_size) if step == 0 else [0]
        sum(ref(*batch(step, r)).square().mean() for r in ranks).div(world_size).backward()
        kind, idx, val, _ = grads[step]
        got = torch.sparse_coo_tensor(idx, val, ref.emb.weight.shape).to_dense()
        torch.testing.assert_close(got, ref.emb.weight.grad.to_dense(), rtol=1e-6, atol=1e-7)
    return len(grads)


def case_two_ranks(rank, world_size):
    """Everything that runs on 2 ranks, in one spawn (tests stay fast on a shared machine)."""
    return {
        "parity": case_parity(rank, world_size),
        "python_hook": case_python_hook(rank, world_size),
        "cpp_hooks": case_cpp_hooks(rank, world_size),
        "unused": case_unused(rank, world_size),
        "row_sparse": case_row_sparse(rank, world_size),
        "join": case_join(rank, world_size),
    }


def case_one_rank(rank, world_size):
    return {
        "hook_contract": case_hook_contract(rank, world_size),
        "errors": case_errors(rank, world_size),
    }


def case_errors(rank, world_size):
    """Bad row_sparse_params raise naming the argument."""
    out = []
    for value in ("emb.weight", ["nope"], [3], ["emb.weight"], [torch.zeros(2)]):
        torch.manual_seed(0)
        model = Mixed(sparse=isinstance(value, list) and value == ["emb.weight"])
        try:
            torchlane.DistributedDataParallel(model, row_sparse_params=value)
        except (TypeError, ValueError) as e:
            out.append((type(e).__name__, str(e)))
        else:
            out.append(None)
    return out
