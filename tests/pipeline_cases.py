"""Rank functions for tests/test_pipeline.py (module level, so tests/dist.py can spawn them)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from gpt import GPT, GPTConfig, lm_loss, pipeline_layers  # noqa: E402
from torchlane.parallel import pipeline  # noqa: E402
from torchlane.parallel.pipeline import slow_layer_for_testing  # noqa: E402


def _gpt(n_layer=2, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(64, 16, n_layer, 2, 32, 0.0, "sdpa"))


def _batch(step, global_batch, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    x = torch.randint(0, 64, (global_batch, 16), generator=g)
    y = torch.randint(0, 64, (global_batch, 16), generator=g)
    return x, y


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _mesh(dp, pp, tp=1):
    return init_device_mesh("cpu", (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))


def _named_owned(model, pipe):
    owned = {id(p) for p in pipe.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in owned}


def _tp_model(n_layer, mesh, tp):
    m = _gpt(n_layer)
    if tp > 1:
        from gpt_tp import parallelize_gpt

        parallelize_gpt(m, mesh["tp"])
    return m


def _compare(owned, ref_p, tp_group, of_grads):
    """Max relative error of this stage's tensors (grads or values) against the reference: a
    replicated tensor directly, a tp-sharded one (another shape) by its norm over the tp group."""
    worst = 0.0
    for n in sorted(owned):
        a = owned[n].grad if of_grads else owned[n].detach()
        b = ref_p[n].grad if of_grads else ref_p[n].detach()
        if a.shape == b.shape:
            worst = max(worst, _rel(a, b))
        else:
            sq = a.double().pow(2).sum()
            dist.all_reduce(sq, group=tp_group)
            worst = max(worst, abs(sq.sqrt().item() / b.double().norm().item() - 1))
    return worst


def match_reference(rank, world, dp, pp, steps, n_layer, rebalance=None, tp=1):
    """GPipe and 1F1B pipelines (x dp replicas) side by side against the one-process model on the
    same global batch: the loss and this stage's gradients after the first step (1e-5 rel), the
    parameters after `steps` AdamW steps (1e-4). With rebalance=(step, balance) a third (1F1B)
    pipeline runs alongside, re-balanced by force after that step; its parameters must equal the
    plain 1F1B run's (1e-6)."""
    mesh = _mesh(dp, pp, tp)
    tp_group = mesh["tp"].get_group()
    dp_rank, dp_size = mesh["dp"].get_local_rank(), dp
    schedules = ["gpipe", "1f1b"] + (["1f1b"] if rebalance is not None else [])
    runs = [_tp_model(n_layer, mesh, tp) for _ in schedules]
    ref = _gpt(n_layer)
    pipes, opts = [], []
    for m, schedule in zip(runs, schedules, strict=False):
        pipe = pipeline(pipeline_layers(m), mesh, n_microbatches=4, schedule=schedule)
        pipe.loss_fn = m.cross_entropy  # the vocab-parallel loss under tp
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        pipes.append(pipe.attach_optimizer(opt))
        opts.append(opt)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    res = {s: {"loss": [], "grad_rel": 0.0} for s in schedules[:2]}
    ref_p = dict(ref.named_parameters())
    for step in range(steps):
        x, y = _batch(step, 8 * dp_size)
        local = slice(dp_rank * 8, (dp_rank + 1) * 8)
        _, ref_loss = ref(x, y)
        ref_loss.backward()
        for k, (pipe, schedule) in enumerate(zip(pipes, schedules, strict=False)):
            loss = pipe.step(x[local], y[local], pipe.loss_fn)
            dist.all_reduce(loss, group=mesh["dp"].get_group())
            if k >= 2:
                continue
            res[schedule]["loss"].append((loss.item() / dp_size, ref_loss.item()))
            if step == 0:
                owned = _named_owned(runs[k], pipe)
                res[schedule]["grad_rel"] = _compare(owned, ref_p, tp_group, True)
                if tp == 1:  # the pipeline-wide norm (max_norm large: nothing is scaled)
                    norm = pipe.clip_grad_norm_(1e9).item()
                    ref_norm = torch.nn.utils.get_total_norm([q.grad for q in ref.parameters()])
                    res[schedule]["norm_rel"] = abs(norm / ref_norm.item() - 1)
        for opt in (*opts, ref_opt):
            opt.step()
            opt.zero_grad(set_to_none=True)
        if rebalance is not None and step == rebalance[0]:
            res["moved"] = pipes[2].rebalance(rebalance[1], reason="test")
    for k, schedule in enumerate(schedules[:2]):
        owned = _named_owned(runs[k], pipes[k])
        res[schedule]["owned"] = sorted(owned)
        # Over this stage's parameters as one vector: the attention key bias has an exactly
        # zero gradient (softmax ignores a per-query shift), so AdamW turns the rounding noise
        # of either run into lr-sized steps of that one tensor (per tensor: ~1e-4 after 3 steps).
        names = sorted(n for n in owned if owned[n].shape == ref_p[n].shape)
        flat = torch.cat([owned[n].detach().reshape(-1) for n in names])
        res[schedule]["param_rel"] = _rel(
            flat, torch.cat([ref_p[n].detach().reshape(-1) for n in names])
        )
        sharded = {n: p for n, p in owned.items() if n not in names}
        res[schedule]["sharded_param_rel"] = _compare(sharded, ref_p, tp_group, False)
    if rebalance is not None:
        g = mesh["pp"].get_group()
        res["owned_after"] = sorted(_named_owned(runs[2], pipes[2]))
        mine = [
            {n: p.detach().clone() for n, p in _named_owned(runs[k], pipes[k]).items()}
            for k in (1, 2)
        ]
        gathered = [None] * pp
        dist.all_gather_object(gathered, mine, group=g)
        plain = {n: t for d in gathered for n, t in d[0].items()}
        moved = {n: t for d in gathered for n, t in d[1].items()}
        assert sorted(plain) == sorted(moved) == sorted(n for n, _ in runs[2].named_parameters())
        res["rebalance_rel"] = max(_rel(moved[n], plain[n]) for n in plain)
        res["balance_after"] = pipes[2].balance
        res["opt_state_moved"] = all(p in opts[2].state for p in pipes[2].parameters())
    return res


def errors(rank, world):
    """Bad inputs raise sentences naming the argument."""
    group = dist.group.WORLD
    msgs = {}

    def catch(key, fn):
        try:
            fn()
        except (ValueError, TypeError) as e:
            msgs[key] = str(e)

    model = _gpt(n_layer=1)
    layers = pipeline_layers(model)  # 3 layers
    catch("stages", lambda: pipeline(layers[:1], group))
    catch("balance_sum", lambda: pipeline(layers, group, balance=[1, 1]))
    catch("balance_len", lambda: pipeline(layers, group, balance=[3]))
    catch("balance_kind", lambda: pipeline(layers, group, balance="fast"))
    catch("schedule", lambda: pipeline(layers, group, schedule="zb"))
    catch("microbatches", lambda: pipeline(layers, group, n_microbatches=0))
    catch("group", lambda: pipeline(layers, "pp"))
    pipe = pipeline(layers, group, n_microbatches=3)
    x, y = _batch(0, 8)
    catch("divide", lambda: pipe.step(x, y, lm_loss))
    catch("y", lambda: pipe.step(x[:6], y[:3], lm_loss))
    catch("rebalance", lambda: pipe.rebalance([3, 0]))
    return msgs


def balancing(rank, world, slow_layer, delay):
    """balance='profile' with one slowed layer, then dynamic re-balancing when a layer on a stage
    slows down mid-training; losses still follow the one-process model."""
    mesh = _mesh(1, world)
    out = {}
    model, ref = _gpt(4), _gpt(4)
    layers = pipeline_layers(model)  # 6 layers
    handle = slow_layer_for_testing(layers[slow_layer], delay)
    pipe = pipeline(layers, mesh["pp"], n_microbatches=2, balance="profile")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pipe.attach_optimizer(opt)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    x, y = _batch(0, 4)
    pipe.step(x, y, lm_loss)
    out["profile_balance"] = pipe.balance
    handle.remove()
    # Now slow every layer of the last stage (as a loaded rank would be) and turn dynamic
    # balancing on: the stage takes ~4x the other one, so layers move to stage 0.
    handles = [slow_layer_for_testing(m, delay / 4) for m in layers[2:]]
    pipe.rebalance_threshold = 0.3
    _, ref_loss = ref(x, y)
    ref_loss.backward()
    ref_opt.step()
    ref_opt.zero_grad(set_to_none=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for step in range(1, 4):
        x, y = _batch(step, 4)
        loss = pipe.step(x, y, lm_loss)
        _, ref_loss = ref(x, y)
        ref_loss.backward()
        out.setdefault("loss", []).append((loss.item(), ref_loss.item()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    out["log"] = pipe.rebalance_log
    out["balance"] = pipe.balance
    out["errors"] = errors(rank, world)
    return out
