"""Uneven inputs: ranks with fewer batches join early and shadow the others' collectives
(torch's Join context manager), so training finishes without a hang and with the same result
as torch DDP's Join and as a single-process computation of the same updates.
"""

import pickle

import dist
import torch
import torchlane
from torch.distributed.algorithms.join import Join
from torchlane import hooks

BATCHES = (5, 2)  # per rank: rank 1 runs out of data after 2 steps
WORLD = len(BATCHES)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _batch(rank, i):
    g = torch.Generator().manual_seed(1000 * rank + i)
    return torch.randn(4, 6, generator=g)


def _train_with_join(cls, rank, model=None):
    """SGD under Join on this rank's batches; a new cls(_net()) with several buckets unless a
    model is given. Returns the module's state dict."""
    model = model if model is not None else cls(_net(), bucket_cap_mb=0.0005)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with Join([model]):
        for i in range(BATCHES[rank]):
            opt.zero_grad()
            model(_batch(rank, i)).square().sum().backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _uneven(rank, world, impls):
    out = {}
    for impl in impls:
        cls = (
            torch.nn.parallel.DistributedDataParallel
            if impl == "torch"
            else torchlane.DistributedDataParallel
        )
        out[impl] = _train_with_join(cls, rank)
    return pickle.dumps(out)


def _single_process_reference():
    """Step i: the gradient summed over the ranks that still have batch i, divided by the
    initial world size (torch DDP's Join default, divide_by_initial_world_size=True); the
    joined ranks end with the final model of the rank that ran longest."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(max(BATCHES)):
        opt.zero_grad()
        for rank in range(WORLD):
            if i < BATCHES[rank]:
                (model(_batch(rank, i)).square().sum() / WORLD).backward()
        opt.step()
    return model.state_dict()


def test_join_with_uneven_inputs():
    """torch DDP and torchlane DDP under Join, in the same processes, against the reference."""
    impls = ["torch", "torchlane"]
    results = [
        pickle.loads(r) for r in dist.run(_uneven, world_size=WORLD, args=(impls,), pg_timeout=30)
    ]
    reference = _single_process_reference()
    for rank, res in enumerate(results):
        for impl in impls:
            for name, value in reference.items():
                got = res[impl][name]
                assert torch.allclose(got, value, rtol=1e-5, atol=1e-6), (
                    impl,
                    rank,
                    name,
                    (got - value).abs().max(),
                )
        for name in reference:  # torchlane against torch DDP's Join
            assert torch.allclose(
                res["torchlane"][name], res["torch"][name], rtol=1e-6, atol=1e-7
            ), (rank, name)


def _sync_powersgd(state, bucket):
    """torchlane's PowerSGD as a plain Python hook: every bucket is reduced inside the call."""
    return hooks.powersgd(state, bucket)


def _join_powersgd(rank, world):
    """PowerSGD under Join: the joined rank runs the hook on zero buckets, so it must issue the
    same pipelined P/Q all-reduces in the same order as the active rank (Note [PowerSGD
    pipeline]); the result must equal the same hook reducing each bucket inside its call."""
    out = {}
    for mode, hook in (("pipelined", hooks.powersgd), ("synchronous", _sync_powersgd)):
        torch.manual_seed(0)
        # Three buckets: {l2.bias, l2.weight}, {l1.bias} (nothing to compress), {l1.weight}.
        model = torchlane.DistributedDataParallel(_net(), bucket_cap_mb=0.00005)
        state = hooks.PowerSGDState(rank=1, start_powerSGD_iter=2)
        model.register_comm_hook(state, hook)
        out[mode] = (
            _train_with_join(None, rank, model),
            model.comm_stats()["num_buckets"],
            state.iter,
        )
    return pickle.dumps(out)


def test_join_with_powersgd():
    results = [pickle.loads(r) for r in dist.run(_join_powersgd, world_size=WORLD, pg_timeout=30)]
    for rank, res in enumerate(results):
        (pipelined, buckets, iters), (synchronous, _, _) = res["pipelined"], res["synchronous"]
        assert buckets == 3
        assert iters == max(BATCHES)  # the joined rank's hook counted the shadowed steps too
        for name, value in synchronous.items():
            assert torch.equal(pipelined[name], value), (rank, name)
            assert torch.equal(pipelined[name], results[0]["pipelined"][0][name]), (rank, name)
