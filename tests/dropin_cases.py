"""Rank functions for test_dropin.py: torchlane DDP where code expects torch DDP."""

import contextlib
import copy
import io

import torch
import torch.distributed as dist
import torchlane
from torch import nn

TorchDDP = torch.nn.parallel.DistributedDataParallel


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def data(rank, step, n=4):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def grads(model):
    return [p.grad.detach().clone() for p in model.module.parameters()]


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test inspects the type and the text
        return type(e).__name__, str(e)
    return None


# ---- the protocol other libraries drive (Lightning, accelerate) ----


def _second_backward(model, rank, prepare):
    """Lightning's manual optimisation: two backwards per forward, the second one armed through
    model.reducer.prepare_for_backward as Lightning does for torch DDP."""
    x, y = data(rank, 0)
    model.zero_grad()
    out = model(x)
    loss = ((out - y) ** 2).mean()
    loss.backward(retain_graph=True)
    if prepare:
        model.reducer.prepare_for_backward(loss)
    (2 * loss).backward()
    return grads(model)


def _trigger_sync(model, rank):
    """accelerate's trigger_sync_in_backward: forward under no_sync, then arm the reducer with
    prepare_for_backward([]) and flip the flags back before the backward."""
    x, y = data(rank, 1)
    model.zero_grad()
    with model.no_sync():
        out = model(x)
        model.require_backward_grad_sync = True
        model.require_forward_param_sync = True
        model.reducer.prepare_for_backward([])
        ((out - y) ** 2).mean().backward()
    return grads(model)


def protocol(rank, world):
    res = {}
    tl = torchlane.DistributedDataParallel(make_model())
    th = TorchDDP(make_model())
    res["isinstance"] = isinstance(tl, TorchDDP)
    for m in (tl, th):  # one plain step first: torch rebuilds its buckets after it
        x, y = data(rank, 9)
        ((m(x) - y) ** 2).mean().backward()
    res["second_backward"] = (_second_backward(tl, rank, True), _second_backward(th, rank, True))
    res["trigger_sync"] = (_trigger_sync(tl, rank), _trigger_sync(th, rank))
    # No silent gradient loss: a second backward nobody armed raises instead of skipping.
    res["unprepared_second"] = _error(lambda: _second_backward(tl, rank, False))
    x, y = data(rank, 2)
    res["through_module"] = _error(lambda: tl.module(x).sum().backward())
    # ... but local accumulation is still what no_sync() gives, with the backward inside or after.
    tl.zero_grad()
    with tl.no_sync():
        tl.module(x).sum().backward()
        out = tl(x)
    out.sum().backward()
    local = grads(tl)
    ref = make_model()
    (ref(x).sum() * 2).backward()
    res["no_sync_local"] = (local, [p.grad for p in ref.parameters()])
    # Whether no_sync-accumulated gradients got synchronised by the next synced step, as torch.
    for m in (tl, th):
        m.zero_grad()
        with m.no_sync():
            m(x).sum().backward()
        m(y[:, :1].expand(-1, 6)).sum().backward()
    res["accumulate"] = (grads(tl), grads(th))
    res["no_sync_unused"] = _no_sync_unused(rank)
    return res


class _RankBranches(nn.Module):
    # A different layer per rank and per micro-batch (torch's
    # test_grads_same_across_ranks_with_no_sync): the layers used inside no_sync() are unused,
    # on every rank, in the synchronised micro-batch.
    def __init__(self, rank):
        super().__init__()
        torch.manual_seed(0)
        self.rank = rank
        self.layers = nn.ModuleList(nn.Linear(3, 2) for _ in range(4))
        self.calls = 0

    def forward(self, x):
        i = 2 * (self.calls % 2) + (self.rank % 2)
        self.calls += 1
        return self.layers[i](x)


def _no_sync_unused(rank):
    out = []
    for cls in (torchlane.DistributedDataParallel, TorchDDP):
        m = cls(_RankBranches(rank), find_unused_parameters=True)
        for step in range(2):  # twice: the second accumulation starts from the synced grads
            for micro in range(2):
                x, y = data(rank, 10 * step + micro)
                ctx = m.no_sync() if micro == 0 else contextlib.nullcontext()
                with ctx:
                    ((m(x[:, :3]) - y[:, :2]) ** 2).mean().backward()
        out.append([p.grad for p in m.parameters()])
    return tuple(out)


# ---- torch DDP's private API, pickling, profiler ranges ----


def api(rank, world):
    res = {}
    tl = torchlane.DistributedDataParallel(make_model())
    tl._set_static_graph()
    th = TorchDDP(make_model(), static_graph=True)
    for m in (tl, th):
        for step in range(3):
            x, y = data(rank, step)
            m.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
    res["static_graph"] = (tl.static_graph, grads(tl), grads(th))
    res["static_late"] = _error(tl._set_static_graph)  # already static: a warning, no error
    late = torchlane.DistributedDataParallel(make_model())
    late(data(rank, 0)[0]).sum().backward()
    res["static_after_forward"] = _error(late._set_static_graph)
    res["logging"] = tl._get_ddp_logging_data()
    res["logging_torch"] = th._get_ddp_logging_data()
    res["sample_rate_bad"] = _error(lambda: tl._set_ddp_runtime_logging_sample_rate(0))
    tl._set_ddp_runtime_logging_sample_rate(5)
    res["fused_optim"] = _error(lambda: tl._register_fused_optim(torch.optim.SGD, lr=0.1))
    res["inherited"] = _error(lambda: tl._sync_buffers())
    res["reducer_unknown"] = _error(lambda: tl.reducer._push_all_rebuilt_params())
    res["rebuild"] = tl.reducer._rebuild_buckets()

    # copy.deepcopy and torch.save/torch.load: the copy is a working torchlane DDP.
    model = torchlane.DistributedDataParallel(make_model())
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    out = {}
    for name, m in (("orig", model), ("copy", twin), ("loaded", loaded)):
        x, y = data(rank, 0)
        m.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        out[name] = (type(m).__name__, grads(m))
    res["pickled"] = out
    res["shares_params"] = any(
        a is b for a, b in zip(model.parameters(), twin.parameters(), strict=False)
    )

    # Profiler ranges for the write-back and the C++ compression steps.
    hooked = torchlane.DistributedDataParallel(make_model())
    hooked.register_comm_hook(None, torchlane.hooks.fp16_compress)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for m in (model, hooked):
            x, y = data(rank, 1)
            ((m(x) - y) ** 2).mean().backward()
        # The hook decompresses in its all-reduce's completion callback, which runs on Gloo's
        # worker thread whenever the all-reduce is still in flight when the callback is attached,
        # and the profiler records the calling thread only: the decompression's range is checked
        # through the op itself.
        wire = torch.ops.torchlane.cast_compress(torch.ones(8), torch.float16, 1)
        torch.ops.torchlane.cast_decompress(wire, torch.float32)
    res["ranges"] = sorted({e.name for e in prof.events() if e.name.startswith("torchlane::")})
    # PowerSGD's compression steps: iterations 0 and 1 all-reduce plainly, 2 compresses.
    psgd = torchlane.DistributedDataParallel(make_model())
    psgd.register_comm_hook(
        torchlane.hooks.PowerSGDState(rank=1, start_powerSGD_iter=2), torchlane.hooks.powersgd
    )
    x, y = data(rank, 1)
    for _ in range(2):
        ((psgd(x) - y) ** 2).mean().backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ((psgd(x) - y) ** 2).mean().backward()
    res["powersgd_ranges"] = sorted(
        {e.name for e in prof.events() if e.name.startswith("torchlane::")}
    )
    res["runtime_logging"] = _runtime_logging(rank)
    return res


_RUNTIME_KEYS = (
    "forward_compute_time",
    "backward_compute_time",
    "backward_comm_time",
    "backward_compute_comm_overlap_time",
)


def _runtime_logging(rank):
    # torch's sampled runtime stats (test_ddp_logging_data_cpu): which iteration each step's
    # logging data names, with no_sync and no_grad forwards in between, torchlane beside torch.
    out = {}
    for tag, cls in (("tl", torchlane.DistributedDataParallel), ("th", TorchDDP)):
        m = cls(make_model())
        m._set_ddp_runtime_logging_sample_rate(3)
        seen = []
        for step in range(14):
            x, y = data(rank, step)
            if step == 4:
                with m.no_sync():
                    ((m(x) - y) ** 2).mean().backward()
            if step == 7:
                with torch.no_grad():
                    m(x)
            ((m(x) - y) ** 2).mean().backward()
            d = m._get_ddp_logging_data()
            times = {k: d.get(k) for k in _RUNTIME_KEYS + tuple(f"avg_{k}" for k in _RUNTIME_KEYS)}
            seen.append((d.get("iteration"), times))
        out[tag] = seen
        out[f"{tag}_final"] = m._get_ddp_logging_data()
    return out


# ---- torch.distributed.checkpoint ----


def _train(model, rank, steps=2):
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(steps):
        x, y = data(rank, step)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return opt


def _flat(state):
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _flat(v).items()})
        else:
            out[k] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return out


def dcp(rank, world, tmp):
    import torch.distributed.checkpoint as dcp_mod
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    res = {}
    for src_cls, dst_cls, tag in (
        (TorchDDP, torchlane.DistributedDataParallel, "th2tl"),
        (torchlane.DistributedDataParallel, TorchDDP, "tl2th"),
    ):
        src = src_cls(make_model(1))
        src_opt = _train(src, rank)
        msd, osd = get_state_dict(src, src_opt)
        path = f"{tmp}/{tag}"
        dcp_mod.save({"model": msd, "optim": osd}, checkpoint_id=path)
        dst = dst_cls(make_model(2))
        dst_opt = _train(dst, rank, steps=1)
        dmsd, dosd = get_state_dict(dst, dst_opt)
        dst_keys = sorted(dmsd)  # set_state_dict below renames the keys of the dict it is given
        state = {"model": dmsd, "optim": dosd}
        dcp_mod.load(state, checkpoint_id=path)
        set_state_dict(
            dst, dst_opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        after_m, after_o = get_state_dict(dst, dst_opt)
        res[tag] = {
            "keys": (sorted(msd), dst_keys),
            "src": (_flat(msd), _flat(osd)),
            "dst": (_flat(after_m), _flat(after_o)),
        }
        dist.barrier()
    return res


# ---- torch.compile ----


class _Blocks(nn.Module):
    """A user-defined module: dynamo compiles its forward as a frame of its own (it skips frames
    of torch.nn's own modules, such as nn.Sequential, which run eagerly under either DDP)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(32, 32) for _ in range(4)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def compiled(rank, world):
    """torch.compile of torchlane DDP beside torch.compile of torch DDP, and eager torchlane."""
    import torch._dynamo
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.utils import counters

    aot_eager = lookup_backend("aot_eager")
    # DDPOptimizer takes its first bucket's size from this torch constant (1 MiB) and asserts it
    # is not above the cap, as torch DDP with a cap under 1 MiB does too; torchlane's first bucket
    # is min(1 MiB, cap), so the test's small cap is mirrored here.
    torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = 32 * 33 * 4
    res = {}
    for tag in ("eager", "compiled", "torch_compiled"):
        torch._dynamo.reset()
        counters.clear()
        seen = []

        def backend(gm, inputs, seen=seen):  # aot_eager (AOT autograd, no codegen), counting graphs
            seen.append(len(gm.graph.nodes))
            return aot_eager(gm, inputs)

        torch.manual_seed(0)
        cls = (
            nn.parallel.DistributedDataParallel
            if tag == "torch_compiled"
            else torchlane.DistributedDataParallel
        )
        # A small bucket cap so that DDPOptimizer has bucket boundaries to split at.
        ddp = cls(_Blocks(), bucket_cap_mb=32 * 33 * 4 / 2**20)
        run = ddp if tag == "eager" else torch.compile(ddp, backend=backend)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        losses = []
        for step in range(3):
            g = torch.Generator().manual_seed(10 * step + rank)
            x = torch.randn(4, 32, generator=g)
            opt.zero_grad()
            loss = run(x).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        res[tag] = {
            "losses": losses,
            # The reason of each graph break, without dynamo's free-text explanation.
            "breaks": sorted(
                str(k).split("\n")[0] + " @ " + _qualname(str(k)) for k in counters["graph_break"]
            ),
            "graphs": seen,
        }
        if tag != "torch_compiled":
            stats = ddp.comm_stats()
            # Overlap: buckets launched from the hooks before the backward pass ended.
            res[tag]["overlap"] = (
                stats["num_buckets"],
                sum(e["launch_ms"] < stats["backward_end_ms"] for e in stats["bucket_events"]),
            )
    return res


def _qualname(reason):
    for line in reason.splitlines():
        if "qualname:" in line:
            return line.split("qualname:")[1].split(",")[0].strip()
    return "?"


# ---- HF accelerate (test-only extra) ----


def _accelerate_run(accelerator, model, rank, steps, tmp, tag):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prepared, opt = accelerator.prepare(model, opt)
    losses = []
    for step in range(steps):
        x, y = data(rank, step)
        with accelerator.accumulate(prepared):
            loss = ((prepared(x) - y) ** 2).mean()
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    keys = sorted(accelerator.get_state_dict(prepared))
    accelerator.save_state(f"{tmp}/{tag}")
    accelerator.wait_for_everyone()  # the main process writes; the others read the files below
    params = [p.detach().clone() for p in accelerator.unwrap_model(prepared).parameters()]
    return prepared, losses, keys, params


def accelerate_case(rank, world, tmp, port):
    import os

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import accelerate
    from safetensors.torch import load_file
    from torchlane.integrations.accelerate import Accelerator

    res = {}
    ref = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    th, res["torch_losses"], res["torch_keys"], res["torch_params"] = _accelerate_run(
        ref, make_model(3), rank, 6, tmp, "torch"
    )
    res["torch_type"] = type(th).__module__
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    wrapped = torchlane.DistributedDataParallel(make_model(3))
    tl, res["tl_losses"], res["tl_keys"], res["tl_params"] = _accelerate_run(
        acc, wrapped, rank, 6, tmp, "tl"
    )
    res["used_as_is"] = tl is wrapped
    res["unwrapped"] = acc.unwrap_model(tl) is wrapped.module
    files = {}
    for tag in ("torch", "tl"):
        f = f"{tmp}/{tag}/model.safetensors"
        files[tag] = sorted(load_file(f)) if os.path.exists(f) else None
    res["saved_keys"] = files
    # Unwrapped model given to torchlane's Accelerator: wrapped in torchlane, not torch DDP.
    res["auto_type"] = type(acc.prepare(make_model(3))).__module__
    return res
