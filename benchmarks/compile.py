"""torch.compile of torchlane DDP beside torch.compile of torch DDP, in the same processes.

    python benchmarks/compile.py                       # starts 2 ranks with torchrun
    python benchmarks/compile.py --steps 20 --n-embd 128 --n-layer 4 --backend inductor

The GPT of examples/gpt.py (SDPA attention, random byte tokens), AdamW, 2 Gloo ranks. Four
variants take turns in rounds (the first round is warm-up and compilation): torch DDP and
torchlane DDP, each eager and under torch.compile. A step (forward, backward with the bucketed
all-reduce, optimizer step) is timed on every rank and taken as the slowest rank's; the figures
are medians over the measured rounds. Also recorded: dynamo's graph-break reasons and the number
of graphs DDPOptimizer produced, and whether each variant's losses equal its eager twin's.
JSON to --json (default benchmarks/results/compile.json).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples"), str(HERE.parent / "python")]
VARIANTS = ("torch_eager", "torchlane_eager", "torch_compiled", "torchlane_compiled")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--block", type=int, default=64, help="sequence length")
    p.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds (the first is warm-up)")
    p.add_argument("--bucket-cap-mb", type=float, default=1.0)
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--json", default=str(HERE / "results" / "compile.json"))
    return p.parse_args()


def build(variant, args):
    import torch.distributed as dist
    import torchlane
    from gpt import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(n_embd=args.n_embd, n_layer=args.n_layer, block_size=args.block)
    cfg.attention = "sdpa"
    model = GPT(cfg)
    cls = (
        torchlane.DistributedDataParallel
        if variant.startswith("torchlane")
        else torch.nn.parallel.DistributedDataParallel
    )
    ddp = cls(model, bucket_cap_mb=args.bucket_cap_mb)
    run = torch.compile(ddp, backend=args.backend) if variant.endswith("compiled") else ddp
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    return {"run": run, "opt": opt, "model": model, "gen": gen, "losses": [], "times": []}


def step(v, args):
    x = torch.randint(0, 256, (args.batch, args.block + 1), generator=v["gen"])
    t0 = time.perf_counter()
    logits, loss = v["run"](x[:, :-1], x[:, 1:])
    loss.backward()
    v["opt"].step()
    v["opt"].zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    v["losses"].append(loss.item())
    return dt


def ranks(args):
    import torch._dynamo
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch._dynamo.config.cache_size_limit = 64
    state, breaks = {}, {}
    for name in VARIANTS:
        counters.clear()
        state[name] = build(name, args)
        step(state[name], args)  # compiles (compiled variants)
        breaks[name] = sorted(
            {str(k).splitlines()[0] for k in counters["graph_break"]} if "compiled" in name else []
        )
    for rnd in range(args.rounds):
        order = VARIANTS if rnd % 2 == 0 else tuple(reversed(VARIANTS))
        for name in order:
            for _ in range(args.steps):
                dt = torch.tensor([step(state[name], args)], dtype=torch.float64)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                if rnd > 0:
                    state[name]["times"].append(dt.item() * 1e3)
    if rank == 0:
        med = {n: statistics.median(state[n]["times"]) for n in VARIANTS}
        out = {
            "benchmark": "compile",
            "world_size": world,
            "config": vars(args),
            "step_ms": med,
            "compiled_vs_eager": {
                "torch": med["torch_compiled"] / med["torch_eager"],
                "torchlane": med["torchlane_compiled"] / med["torchlane_eager"],
            },
            "torchlane_vs_torch": {
                "eager": med["torchlane_eager"] / med["torch_eager"],
                "compiled": med["torchlane_compiled"] / med["torch_compiled"],
            },
            "graph_breaks": breaks,
            "losses_equal_to_torch": {
                mode: state[f"torchlane_{mode}"]["losses"] == state[f"torch_{mode}"]["losses"]
                for mode in ("eager", "compiled")
            },
            "max_loss_diff_compiled_vs_eager": max(
                abs(a - b)
                for a, b in zip(
                    state["torchlane_compiled"]["losses"],
                    state["torchlane_eager"]["losses"],
                    strict=True,
                )
            ),
            "command": "python " + " ".join([os.path.relpath(__file__, HERE.parent)] + sys.argv[1:]),
        }
        print(json.dumps(out, indent=1))
        Path(os.environ.get("TORCHLANE_BENCH_JSON", args.json)).write_text(json.dumps(out, indent=1))
        print(f"wrote {os.environ.get('TORCHLANE_BENCH_JSON', args.json)}")
    dist.destroy_process_group()


def main():
    args = parse_args()
    if "RANK" in os.environ:
        return ranks(args)
    import netns

    return netns.torchrun_ranks(
        "compile",
        Path(__file__).resolve(),
        args.world_size,
        sys.argv[1:],
        None,
        args.json,
        args.timeout_s,
    )


if __name__ == "__main__":
    sys.exit(main())
