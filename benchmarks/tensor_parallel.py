"""Tensor parallelism (torchlane.parallel) vs DDP and vs torch's own DTensor tensor parallelism.

    python benchmarks/tensor_parallel.py                      # launches 4 ranks itself (Gloo, CPU)
    torchrun --nproc-per-node 4 benchmarks/tensor_parallel.py

On one 4-rank job, with the same GPT (examples/gpt.py), the same initial weights and the same
global batch every step (each data-parallel replica reads its rows of it):

  ddp           dp=4        torchlane DDP, whole model per rank
  tp2           dp=2 tp=2   torchlane TP (examples/gpt_tp.py plan) + torchlane DDP over dp
  tp2_sp        dp=2 tp=2   the same with sequence parallelism
  tp4_blocks    dp=1 tp=4   torchlane TP of the blocks only (attention + MLP; embeddings
                            and head replicated)
  torch_tp4_blocks  dp=1 tp=4  torch.distributed.tensor.parallel ColwiseParallel /
                            RowwiseParallel on the same modules and the same mesh

Variants take turns in rounds (the order rotates; the first round is warm-up). A step's time is
the slowest rank's; figures are medians. Every variant trains the same model on the same data,
so all loss trajectories must agree (checked and reported). Per-rank memory: parameter bytes and
the bytes autograd saves for the backward during one forward (saved_tensors_hooks, unique
storages), at the same global batch. JSON goes to benchmarks/results/tensor_parallel.json.
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "python")]

VARIANTS = ("ddp", "tp2", "tp2_sp", "tp4_blocks", "torch_tp4_blocks")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a("--world-size", type=int, default=4, help="ranks to launch (when not under torchrun)")
    a("--n-layer", type=int, default=2)
    a("--n-head", type=int, default=8)
    a("--n-embd", type=int, default=256)
    a("--block-size", type=int, default=128)
    a("--global-batch", type=int, default=8, help="sequences per step, all replicas together")
    a("--rounds", type=int, default=3, help="rounds after the warm-up round")
    a("--steps", type=int, default=3, help="steps per variant per round")
    a("--json", default=str(HERE / "results" / "tensor_parallel.json"))
    return p.parse_args(argv)


def launch(args, argv):
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.world_size}",
        str(Path(__file__).resolve()),
        *argv,
    ]
    return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode


def blocks_plan_torchlane(cfg):
    from torchlane.parallel import ColwiseParallel, RowwiseParallel, ShardAttribute

    e = cfg.n_embd
    return {
        "blocks.*.attn.qkv": ColwiseParallel(parts=(e, e, e)),
        "blocks.*.attn.proj": RowwiseParallel(),
        "blocks.*.attn": ShardAttribute("n_head"),
        "blocks.*.mlp.0": ColwiseParallel(),
        "blocks.*.mlp.2": RowwiseParallel(),
    }


def torch_tp_blocks(model, tp_mesh):
    """torch's DTensor TP on the same modules. ColwiseParallel shards qkv's rows contiguously, so
    the rows are first permuted to [q_0 k_0 v_0 q_1 k_1 v_1 ...]: rank r's shard is then q, k
    and v of its own heads, as in torchlane's parts=(E, E, E) layout."""
    import torch
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    n = tp_mesh.size()
    plan = {}
    for i, block in enumerate(model.blocks):
        with torch.no_grad():
            for t in (block.attn.qkv.weight, block.attn.qkv.bias):
                parts = [p.chunk(n, 0) for p in t.chunk(3, 0)]
                t.copy_(torch.cat([parts[j][r] for r in range(n) for j in range(3)], 0))
        block.attn.n_head //= n
        plan.update(
            {
                f"blocks.{i}.attn.qkv": ColwiseParallel(),
                f"blocks.{i}.attn.proj": RowwiseParallel(),
                f"blocks.{i}.mlp.0": ColwiseParallel(),
                f"blocks.{i}.mlp.2": RowwiseParallel(),
            }
        )
    return parallelize_module(model, tp_mesh, plan)


def build(name, base, cfg):
    import torchlane
    from gpt_tp import parallelize_gpt
    from torchlane.parallel import init_mesh, tensor_parallel

    model = copy.deepcopy(base)
    if name == "ddp":
        mesh = init_mesh(dp=4, tp=1)
    elif name in ("tp2", "tp2_sp"):
        mesh = init_mesh(dp=2, tp=2)
        parallelize_gpt(model, mesh["tp"], sequence_parallel=name == "tp2_sp")
    elif name == "tp4_blocks":
        mesh = init_mesh(dp=1, tp=4)
        tensor_parallel(model, mesh["tp"], blocks_plan_torchlane(cfg))
    else:
        mesh = init_mesh(dp=1, tp=4)
        model = torch_tp_blocks(model, mesh["tp"])
    dp = mesh["dp"]
    wrapped = (
        torchlane.DistributedDataParallel(model, process_group=dp.get_group())
        if dp.size() > 1
        else model
    )
    return model, wrapped, dp.get_local_rank(), dp.size()


def local_param_bytes(model):
    import torch

    total = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
    del torch
    return total


def saved_activation_bytes(model, x, y):
    import torch

    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            local = t.to_local() if hasattr(t, "to_local") else t
            try:
                key = local.untyped_storage().data_ptr()
                seen[key] = max(seen.get(key, 0), local.untyped_storage().nbytes())
            except (RuntimeError, NotImplementedError):
                pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def worker(args):
    import torch
    import torch.distributed as dist
    from gpt import GPT, GPTConfig

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 4:
        raise SystemExit("tensor_parallel.py: the variants are laid out for 4 ranks")
    torch.set_num_threads(1)
    cfg = GPTConfig(256, args.block_size, args.n_layer, args.n_head, args.n_embd, 0.0, "sdpa")
    torch.manual_seed(0)
    base = GPT(cfg)

    def batch(step):
        g = torch.Generator().manual_seed(1000 + step)
        shape = (args.global_batch, args.block_size)
        return torch.randint(0, 256, shape, generator=g), torch.randint(0, 256, shape, generator=g)

    runs = {}
    for name in VARIANTS:
        model, wrapped, dp_rank, dp_size = build(name, base, cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
        x, y = batch(0)
        rows = slice(dp_rank * len(x) // dp_size, (dp_rank + 1) * len(x) // dp_size)
        runs[name] = {
            "model": model,
            "wrapped": wrapped,
            "opt": opt,
            "rows": (dp_rank, dp_size),
            "losses": [],
            "times": [],
            "param_bytes": local_param_bytes(model),
            "activation_bytes": saved_activation_bytes(model, x[rows], y[rows]),
        }

    def one_step(run, step, timed):
        dp_rank, dp_size = run["rows"]
        x, y = batch(step)
        rows = slice(dp_rank * len(x) // dp_size, (dp_rank + 1) * len(x) // dp_size)
        dist.barrier()
        t0 = time.perf_counter()
        _, loss = run["wrapped"](x[rows], y[rows])
        loss.backward()
        run["opt"].step()
        run["opt"].zero_grad(set_to_none=True)
        dt = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        mean_loss = loss.detach().reshape(1).clone()
        dist.all_reduce(mean_loss)  # tp ranks hold equal losses; average over all ranks
        run["losses"].append(mean_loss.item() / world)
        if timed:
            run["times"].append(dt.item() * 1e3)

    step_of = dict.fromkeys(VARIANTS, 0)
    for rnd in range(args.rounds + 1):
        order = VARIANTS[rnd % len(VARIANTS) :] + VARIANTS[: rnd % len(VARIANTS)]
        for name in order:
            for _ in range(args.steps):
                one_step(runs[name], step_of[name], timed=rnd > 0)
                step_of[name] += 1

    if rank == 0:
        ref = runs["ddp"]["losses"]
        result = {
            "config": cfg.to_dict(),
            "global_batch": args.global_batch,
            "world_size": world,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "note": "shared 2-core machine, 4 Gloo ranks on CPU: timings are noisy",
            "variants": {},
        }
        for name, run in runs.items():
            med = statistics.median(run["times"])
            diff = max(abs(a - b) / abs(b) for a, b in zip(run["losses"], ref, strict=True))
            result["variants"][name] = {
                "median_step_ms": med,
                "step_time_vs_ddp": med / statistics.median(runs["ddp"]["times"]),
                "param_bytes_per_rank": run["param_bytes"],
                "param_bytes_vs_ddp": run["param_bytes"] / runs["ddp"]["param_bytes"],
                "saved_activation_bytes_per_rank": run["activation_bytes"],
                "activation_bytes_vs_ddp": run["activation_bytes"]
                / runs["ddp"]["activation_bytes"],
                "losses": run["losses"],
                "max_rel_loss_diff_vs_ddp": diff,
            }
        tl, th = result["variants"]["tp4_blocks"], result["variants"]["torch_tp4_blocks"]
        result["torchlane_vs_torch_tp4_step_time_ratio"] = (
            tl["median_step_ms"] / th["median_step_ms"]
        )
        print(
            f"{'variant':18s} {'step ms':>8s} {'vs ddp':>7s} {'params MB':>10s} "
            f"{'vs ddp':>7s} {'saved act MB':>13s} {'vs ddp':>7s} {'loss diff':>10s}"
        )
        for name, v in result["variants"].items():
            print(
                f"{name:18s} {v['median_step_ms']:8.1f} {v['step_time_vs_ddp']:7.2f} "
                f"{v['param_bytes_per_rank'] / 1e6:10.2f} {v['param_bytes_vs_ddp']:7.2f} "
                f"{v['saved_activation_bytes_per_rank'] / 1e6:13.2f} "
                f"{v['activation_bytes_vs_ddp']:7.2f} {v['max_rel_loss_diff_vs_ddp']:10.2e}"
            )
        print(
            "torchlane TP / torch DTensor TP step time (tp=4, blocks): "
            f"{result['torchlane_vs_torch_tp4_step_time_ratio']:.2f}"
        )
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" not in os.environ:
        sys.exit(launch(args, argv))
    worker(args)


if __name__ == "__main__":
    main()
