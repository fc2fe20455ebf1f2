"""Sparse gradients: a 1M x 64 embedding with a small dense head, 2 ranks, side by side:

    torch_sparse       torch DDP, nn.Embedding(sparse=True) (Gloo's sparse all-reduce)
    dense              torchlane DDP, sparse=False: the whole 256 MB table is all-reduced
    sparse             torchlane DDP, nn.Embedding(sparse=True) (Note [Sparse gradients])
    row_sparse         torchlane DDP, sparse=False + row_sparse_params=["emb.weight"]

    python benchmarks/sparse.py                      # launches 2 ranks itself, plain loopback
    python benchmarks/sparse.py --link-mbit 200      # ranks in a namespace shaped to 200 Mbit/s

Each rank looks up --batch x --bag rows per step. Step time (forward, backward, reduction,
SGD step) is the slowest rank's, median over --steps measured steps after one warm-up step
(--dense-steps for the dense variant, whose step moves the whole table). Prints each variant's
ratio to torch DDP's sparse step and torchlane's bytes sent per rank; JSON goes to
benchmarks/results/sparse_<link>.json.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "python")]

VARIANTS = ("torch_sparse", "dense", "sparse", "row_sparse")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--bag", type=int, default=8, help="rows looked up per sample")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dense-steps", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--link-mbit", type=float, default=None)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--timeout-s", type=float, default=900)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    for v in args.variants.split(","):
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    return args


def default_json(args):
    link = f"link{args.link_mbit:g}" if args.link_mbit else "loopback"
    return ROOT / "benchmarks" / "results" / f"sparse_{link}.json"


def launch(args, argv):
    import netns

    return netns.torchrun_ranks(
        "sparse",
        Path(__file__).resolve(),
        args.world_size,
        argv,
        args.link_mbit,
        args.json or default_json(args),
        args.timeout_s,
    )


def run_variant(name, args, rank, world):
    import torch
    import torch.distributed as dist
    import torchlane
    from torch import nn

    torch.manual_seed(0)
    sparse = name in ("torch_sparse", "sparse")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.EmbeddingBag(args.rows, args.dim, mode="sum", sparse=sparse)
            self.head = nn.Sequential(nn.Linear(args.dim, 64), nn.ReLU(), nn.Linear(64, 1))

        def forward(self, idx):
            return self.head(self.emb(idx))

    model = Model()
    if name == "torch_sparse":
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    else:
        extra = {"row_sparse_params": ["emb.weight"]} if name == "row_sparse" else {}
        ddp = torchlane.DistributedDataParallel(model, **extra)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    steps = args.dense_steps if name == "dense" else args.steps
    times = []
    for step in range(steps + 1):
        idx = torch.randint(0, args.rows, (args.batch, args.bag), generator=g)
        y = torch.randn(args.batch, 1, generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(ddp(idx), y).backward()
        opt.step()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        if step > 0:
            times.append(dt.item())
    out = {"step_s": statistics.median(times), "steps": times}
    if name != "torch_sparse":
        stats = ddp.comm_stats()
        out["bytes_sent"] = stats["bytes_sent"]
        out["bytes_reduced"] = stats["bytes_reduced"]
        out["row_sparse_bytes_saved"] = stats["row_sparse_bytes_saved"]
    del ddp, model, opt
    return out


def main(args):
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name in args.variants.split(","):
        results[name] = run_variant(name, args, rank, world)
        if rank == 0:
            print(f"[sparse] {name:12s} {results[name]['step_s'] * 1e3:9.1f} ms/step", flush=True)
    if rank == 0:
        base = results.get("torch_sparse", {}).get("step_s")
        print(f"\n{'variant':12s} {'ms/step':>9s} {'vs torch sparse':>16s} {'MB sent/rank':>13s}")
        for name, r in results.items():
            ratio = f"{r['step_s'] / base:.2f}x" if base else "-"
            sent = f"{r['bytes_sent'] / 1e6:.2f}" if "bytes_sent" in r else "-"
            print(f"{name:12s} {r['step_s'] * 1e3:9.1f} {ratio:>16s} {sent:>13s}")
        path = Path(os.environ.get("TORCHLANE_BENCH_JSON") or args.json or default_json(args))
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "benchmark": "sparse",
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "world_size": world,
            "note": "2 cores shared by several engineers' jobs: timings are noisy",
            "results": results,
        }
        path.write_text(json.dumps(doc, indent=2))
        print(f"[sparse] wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    argv = sys.argv[1:]
    args = parse_args(argv)
    if "RANK" in os.environ:
        main(args)
    else:
        sys.exit(launch(args, argv))
