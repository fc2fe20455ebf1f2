"""Data skew and load balancing, side by side: DistributedSampler-style even split vs
torchlane.data.TokenBalancedSampler vs packing; a slowed rank with static vs dynamic
(StragglerBalancer) shares; the monitor's overhead.

    python benchmarks/data_balance.py [--ranks 4] [--steps 12] [--out benchmarks/results/...]

Lengths are log-normal (median ~55 tokens, long tail, capped at --max-len). Each rank runs a
per-token MLP language model on its part of every global step (Gloo, one thread per rank), so
compute grows with the padded tokens. The "plan" numbers (padding, token imbalance) are exact and
deterministic; step times come from a shared, noisy machine and are medians over the steps.
"""

import argparse
import datetime
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp
import torchlane
from torch import nn
from torchlane import data
from torchlane.monitor import Monitor

VOCAB = 256


def lognormal_lengths(n, max_len, seed=0):
    rng = random.Random(seed)
    return [min(max_len, max(2, int(rng.lognormvariate(4.0, 1.0)))) for _ in range(n)]


def even_split(step, world):
    """What DistributedSampler gives: by count, interleaved."""
    return [step[r::world] for r in range(world)]


def plan_stats(lengths, world, batch, max_len, steps):
    """Per strategy: mean over steps of the slowest rank's padded tokens (what the step waits
    for), token imbalance (max / mean of real tokens) and the padding fraction."""
    out = {}
    s_bal = data.TokenBalancedSampler(lengths, batch, world, 0, seed=0, drop_last=True)
    s_pack = data.TokenBalancedSampler(
        lengths, batch, world, 0, seed=0, drop_last=True, pack_len=max_len
    )
    global_steps = s_bal.global_steps()[:steps]
    for name in ("even", "balanced", "packed"):
        slowest, imb, pad, real = [], [], 0, 0
        for step in global_steps:
            if name == "packed":
                parts = s_pack.plan_step(step)
                toks = [sum(seg[2] for row in p for seg in row) for p in parts]
                padded = [max_len * len(p) for p in parts]
            else:
                parts = even_split(step, world) if name == "even" else s_bal.plan_step(step)
                toks = [sum(lengths[i] for i in p) for p in parts]
                padded = [max((lengths[i] for i in p), default=0) * len(p) for p in parts]
            slowest.append(max(padded))
            imb.append(max(toks) / (sum(toks) / world))
            pad += sum(padded) - sum(toks)
            real += sum(toks)
        out[name] = {
            "slowest_rank_padded_tokens": statistics.mean(slowest),
            "token_imbalance_max_over_mean": statistics.mean(imb),
            "padding_fraction": pad / (pad + real),
        }
    return out


class TokenMLP(nn.Module):
    def __init__(self, width=256):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.out = nn.Linear(width, VOCAB)

    def forward(self, x):
        return self.out(self.mlp(self.emb(x)))


def batch_tensors(part, lengths, packed, max_len):
    """Padded (rows, width) input and target (-100 on padding) for this rank's part."""
    if packed:
        rows = [sum(seg[2] for seg in row) for row in part]
        width = max_len
    else:
        rows = [lengths[i] for i in part]
        width = max(rows, default=1)
    x = torch.randint(0, VOCAB, (max(len(rows), 1), width))
    y = x.clone()
    for r, n in enumerate(rows):
        y[r, n:] = -100
    if not rows:
        y[:] = -100
    return x, y, sum(rows)


def worker(rank, world, port, cfg, queue):
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    lengths = lognormal_lengths(cfg["n_docs"], cfg["max_len"])
    model = torchlane.DistributedDataParallel(TokenMLP(cfg["width"]))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    results = {}

    def run(name, packed, strategy, slow, dynamic=False, monitor_dir=None):
        sampler = data.TokenBalancedSampler(
            lengths,
            cfg["batch"],
            world,
            rank,
            seed=0,
            drop_last=True,
            pack_len=cfg["max_len"] if packed else None,
        )
        bal = data.StragglerBalancer(sampler, patience=2, threshold=1.15) if dynamic else None
        mon = Monitor(monitor_dir, model) if monitor_dir else None
        times = []
        mon_s = 0.0  # time spent inside the monitor's calls on this rank
        steps = sampler.global_steps()[: cfg["steps"]]
        for step in steps:
            if strategy == "even":
                part = even_split(step, world)[rank]
            else:
                part = sampler.plan_step(step)[rank]
            x, y, n_local = batch_tensors(part, lengths, packed, cfg["max_len"])
            torch.distributed.barrier()
            t0 = time.perf_counter()
            if mon:
                m0 = time.perf_counter()
                mon.start_step()
                mon_s += time.perf_counter() - m0
            logits = model(x)
            loss_sum = nn.functional.cross_entropy(
                logits.view(-1, VOCAB), y.view(-1), ignore_index=-100, reduction="sum"
            )
            # This rank's own work, measured before any collective: forward + backward is about
            # three forwards. Times that include waiting for a peer at an all-reduce make every
            # rank look as slow as the slowest and mislead the balancer.
            local = 3 * (time.perf_counter() - t0)
            if mon:
                m0 = time.perf_counter()
                mon.mark("forward")
                mon_s += time.perf_counter() - m0
            n = data.global_token_count(n_local)
            data.token_normalized_loss(loss_sum, max(n, 1), world).backward()
            if rank == slow[0]:  # a rank slowed by factor slow[1]: extra time per own work
                time.sleep(local * (slow[1] - 1))
            if mon:
                m0 = time.perf_counter()
                mon.mark("backward")
                mon_s += time.perf_counter() - m0
            opt.step()
            opt.zero_grad()
            if mon:
                m0 = time.perf_counter()
                mon.end_step(loss=loss_sum, tokens=n_local)
                mon_s += time.perf_counter() - m0
            if bal is not None:
                own = local * (slow[1] if rank == slow[0] else 1.0)
                bal.step(own, n_local)
            times.append(time.perf_counter() - t0)
        if mon:
            mon.close()
        # The slowest rank's time is every rank's time (all wait at the all-reduce).
        t = torch.tensor(times, dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        warm = t.tolist()[2:]
        results[name] = {"median_step_ms": statistics.median(warm) * 1e3}
        if mon:
            results[name]["monitor_share_of_step"] = mon_s / sum(times)
        if bal is not None:
            results[name]["share_changes"] = len(bal.changes)
            results[name]["final_shares"] = [round(s, 3) for s in sampler.shares]

    for name, packed, strategy in (
        ("even", False, "even"),
        ("balanced", False, "balanced"),
        ("packed", True, "balanced"),
    ):
        run(f"skew/{name}", packed, strategy, (-1, 1.0))
    for factor in cfg["slow_factors"]:
        for rep in range(cfg["repeats"]):  # interleaved, to spread the machine's noise over both
            run(f"slow{factor}/static{rep}", False, "balanced", (world - 1, factor))
            run(f"slow{factor}/dynamic{rep}", False, "balanced", (world - 1, factor), dynamic=True)
    with tempfile.TemporaryDirectory() as d:
        for rep in range(cfg["repeats"]):
            run(f"monitor/off{rep}", False, "balanced", (-1, 1.0))
            run(f"monitor/on{rep}", False, "balanced", (-1, 1.0), monitor_dir=d)
    torch.distributed.destroy_process_group()
    if rank == 0:
        queue.put(results)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=32, help="documents per global step")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per comparison")
    p.add_argument("--out", default="benchmarks/results/data_balance.json")
    args = p.parse_args(argv)
    cfg = {
        "n_docs": args.batch * (args.steps + 2),
        "max_len": args.max_len,
        "batch": args.batch,
        "steps": args.steps,
        "width": args.width,
        "slow_factors": [1.5, 2.0],
        "repeats": args.repeats,
    }
    lengths = lognormal_lengths(cfg["n_docs"], args.max_len)
    plan = plan_stats(lengths, args.ranks, args.batch, args.max_len, args.steps)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(r, args.ranks, port, cfg, queue))
        for r in range(args.ranks)
    ]
    for pr in procs:
        pr.start()
    measured = queue.get(timeout=3600)
    for pr in procs:
        pr.join()
    def over_repeats(prefix):
        runs = [measured[f"{prefix}{r}"] for r in range(args.repeats)]
        out = {"median_step_ms": statistics.median(x["median_step_ms"] for x in runs)}
        if "final_shares" in runs[-1]:
            out["final_shares"] = runs[-1]["final_shares"]
        return out

    for f in cfg["slow_factors"]:
        for kind in ("static", "dynamic"):
            measured[f"slow{f}/{kind}"] = over_repeats(f"slow{f}/{kind}")
    inside = statistics.median(
        measured[f"monitor/on{r}"]["monitor_share_of_step"] for r in range(args.repeats)
    )
    off = over_repeats("monitor/off")["median_step_ms"]
    on = over_repeats("monitor/on")["median_step_ms"]
    report = {
        "config": cfg | {"ranks": args.ranks, "cpu_count": os.cpu_count()},
        "note": "shared, noisy machine; Gloo on one host; medians over steps after 2 warm-up, "
        "then the median over interleaved repeats",
        "plan": plan,
        "measured": measured,
        "monitor_overhead": on / off - 1,
        "monitor_time_inside_calls": inside,
    }
    print(f"{args.ranks} ranks, {args.batch} log-normal documents/step (max {args.max_len})")
    for name in ("even", "balanced", "packed"):
        pl, me = plan[name], measured[f"skew/{name}"]
        print(
            f"  {name:9s} step {me['median_step_ms']:8.1f} ms  slowest rank padded tokens "
            f"{pl['slowest_rank_padded_tokens']:8.0f}  padding {pl['padding_fraction']:.1%}  "
            f"imbalance x{pl['token_imbalance_max_over_mean']:.2f}"
        )
    e = measured["skew/even"]["median_step_ms"]
    print(
        f"  ratio balanced/even {measured['skew/balanced']['median_step_ms'] / e:.2f}, "
        f"packed/even {measured['skew/packed']['median_step_ms'] / e:.2f}"
    )
    for f in cfg["slow_factors"]:
        st, dy = measured[f"slow{f}/static"], measured[f"slow{f}/dynamic"]
        print(
            f"  one rank x{f}: static {st['median_step_ms']:.1f} ms, dynamic "
            f"{dy['median_step_ms']:.1f} ms (ratio {dy['median_step_ms'] / st['median_step_ms']:.2f}, "
            f"shares {dy['final_shares']}, equal-time share of the slow rank "
            f"{args.ranks / (f * (args.ranks - 1) + 1):.3f})"
        )
    print(
        f"  monitor overhead {report['monitor_overhead']:+.1%} (off {off:.1f} ms, on {on:.1f} ms); "
        f"time inside the monitor's calls {inside:.2%} of rank 0's step time"
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
