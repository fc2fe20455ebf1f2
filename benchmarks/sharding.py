"""ZeRO stages (torchlane.ShardedDataParallel) vs torchlane DDP vs torch's ZeroRedundancyOptimizer
+ DDP and torch FSDP2 fully_shard, per-rank counted memory and step time, side by side.

    python benchmarks/sharding.py --world 2 --n-embd 128 --n-layer 4 --steps 6

Launches `--world` Gloo ranks on 127.0.0.1 (CPU). Every variant trains the same GPT
(examples/gpt.py) with AdamW from the same weights on the same data. Counted bytes per rank,
after a step: parameters (full copies + master shards), gradients (kept between steps: .grad and
persistent reduce buffers) and optimizer state (tensors in optimizer.state); compared with the
ZeRO formula for fp32 Adam: DDP 16 B/param; stage 1 4+4+8/N; stage 2 4+(4+8)/N; stage 3 16/N.
(torchlane keeps a separate fp32 master shard, +4/N B/param for stages 1 and 2.)
Step time: median of the slowest rank over the timed steps, the first step excluded. Peak RSS:
the largest VmHWM over the ranks, each variant run in fresh processes (torch itself included). The
machine these figures were taken on is shared and noisy. JSON (+ PNG) in benchmarks/results/.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "python"), str(ROOT / "tests")]

VARIANTS = (
    "ddp",
    "zero1",
    "zero2",
    "zero3",
    "zero3_prefetch",
    "torch_zero_redundancy",
    "torch_fsdp2",
)


def _bytes(ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _optim_bytes(opt):
    return sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for v in st.values()
        if hasattr(v, "dim") and v.dim() > 0
    )


def _build(variant, cfg):
    import torch
    import torchlane
    from gpt import GPT

    torch.manual_seed(0)
    model = GPT(cfg)
    kw = dict(lr=1e-3, weight_decay=0.0)
    if variant == "ddp":
        m = torchlane.DistributedDataParallel(model)
        return m, torch.optim.AdamW(m.parameters(), **kw), None
    if variant == "zero3_prefetch":  # bucket by bucket: 1 MB buckets, so there are several
        m = torchlane.ShardedDataParallel(
            model, stage=3, reshard_after_forward=True, bucket_cap_mb=1.0
        )
        return m, torchlane.ShardedOptimizer(m, torch.optim.AdamW, **kw), None
    if variant.startswith("zero"):
        m = torchlane.ShardedDataParallel(model, stage=int(variant[-1]))
        return m, torchlane.ShardedOptimizer(m, torch.optim.AdamW, **kw), None
    if variant == "torch_zero_redundancy":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        m = torch.nn.parallel.DistributedDataParallel(model)
        return m, ZeroRedundancyOptimizer(m.parameters(), torch.optim.AdamW, **kw), None
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks if hasattr(model, "blocks") else []:
        fully_shard(block)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), **kw), None


def _counted(variant, m, opt):
    import torch

    if variant.startswith("zero"):
        b = m.per_rank_bytes(opt)
        return b["params"], b["grads"], b["optim"]
    if variant == "torch_fsdp2":
        params = _bytes([p.to_local() if hasattr(p, "to_local") else p for p in m.parameters()])
        grads = _bytes([p.grad.to_local() if p.grad is not None else None for p in m.parameters()])
        return params, grads, _optim_bytes(opt)
    params = _bytes(list(m.parameters()))
    grads = _bytes([p.grad for p in m.parameters()])
    if variant == "torch_zero_redundancy":
        st = opt.optim.state
        state = sum(
            v.numel() * v.element_size()
            for s in st.values()
            for v in s.values()
            if torch.is_tensor(v) and v.dim() > 0
        )
        return params, grads, state
    return params, grads, _optim_bytes(opt)


def _rss(field):
    """VmRSS / VmHWM (peak since the last _reset_peak) of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def _reset_peak():
    """Linux: writing 5 to clear_refs resets VmHWM, so each variant's peak is its own."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_rank(rank, world, args, variants=VARIANTS):
    import torch
    import torch.distributed as dist
    from gpt import GPTConfig

    cfg = GPTConfig(256, args.block_size, args.n_layer, 4, args.n_embd, 0.0, "sdpa")
    out = {}
    g = torch.Generator().manual_seed(rank)
    data = [
        torch.randint(0, 256, (args.batch, args.block_size + 1), generator=g)
        for _ in range(args.steps)
    ]
    for variant in variants:
        _reset_peak()
        rss_before = _rss("VmRSS")
        try:
            m, opt, _ = _build(variant, cfg)
        except Exception as e:  # noqa: BLE001 (reported: e.g. FSDP2 not on Gloo/CPU)
            out[variant] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        times, losses = [], []
        try:
            for x in data:
                dist.barrier()
                t0 = time.perf_counter()
                _, loss = m(x[:, :-1], x[:, 1:])
                loss.backward()
                opt.step()
                # counted after step, before zero_grad: gradients as held at their peak
                counted = _counted(variant, m, opt)
                opt.zero_grad(set_to_none=True)
                t = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                times.append(float(t))
                losses.append(loss.item())
        except Exception as e:  # noqa: BLE001
            out[variant] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        n_params = sum(p.numel() for p in m.parameters()) if variant != "torch_fsdp2" else None
        out[variant] = {
            "params_bytes": counted[0],
            "grads_bytes": counted[1],
            "optim_bytes": counted[2],
            "total_bytes": sum(counted),
            "step_ms": 1e3 * statistics.median(times[1:]),
            "losses": losses,
            "n_params": n_params,
            # peak resident memory of the rank during this variant, and before it was built
            "rss_peak_bytes": _rss("VmHWM"),
            "rss_before_bytes": rss_before,
            # stage 3: most bytes of full (gathered) parameters held at once during a step
            "peak_full_param_bytes": (
                (
                    m._gatherer.peak_bytes
                    if m._gatherer is not None
                    else sum(f.numel() * f.element_size() for f in m._flats)
                )
                if variant.startswith("zero3")
                else None
            ),
        }
        del m, opt
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=str(HERE / "results" / "sharding.json"))
    p.add_argument("--variants", default=",".join(VARIANTS), help="a comma-separated subset")
    args = p.parse_args(argv)
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    if "ddp" not in variants or len(variants) != len(args.variants.split(",")):
        p.error(f"--variants: a subset of {','.join(VARIANTS)} that includes ddp")
    import dist as tdist

    # Each variant in its own processes: the peak RSS is then its own (freed memory stays in a
    # process's heap, so variants sharing one process would inherit each other's).
    res = [{} for _ in range(args.world)]
    for v in variants:
        one = tdist.run(run_rank, args.world, args=(args, (v,)), timeout=1800, pg_timeout=600)
        for r, out in zip(res, one, strict=True):
            r.update(out)
    r0 = res[0]
    P = r0["ddp"]["n_params"]
    N = args.world
    formula = {
        "ddp": 16 * P,
        "zero1": (4 + 4 + 8 / N) * P,
        "zero2": (4 + 12 / N) * P,
        "zero3": 16 * P / N,
        "zero3_prefetch": 16 * P / N,
        "torch_zero_redundancy": (4 + 4 + 8 / N) * P,
        "torch_fsdp2": 16 * P / N,
    }
    print(f"GPT {P / 1e6:.2f}M params, {N} ranks (Gloo/CPU, shared noisy machine)")
    print(
        f"{'variant':24s} {'MB/rank':>9s} {'formula':>9s} {'ratio':>6s} {'step ms':>8s} "
        f"{'vs ddp':>7s} {'RSS peak MB':>12s} {'peak gathered MB':>17s}"
    )
    for v in variants:
        r = r0[v]
        if "error" in r:
            print(f"{v:24s} did not run: {r['error']}")
            continue
        r["formula_bytes"] = formula[v]
        # per-rank max over ranks: shards differ by padding only
        r["total_bytes_max_rank"] = max(x[v]["total_bytes"] for x in res)
        r["rss_peak_bytes_max_rank"] = max(x[v]["rss_peak_bytes"] or 0 for x in res)
        print(
            f"{v:24s} {r['total_bytes_max_rank'] / 1e6:9.2f} {formula[v] / 1e6:9.2f} "
            f"{r['total_bytes_max_rank'] / formula[v]:6.2f} {r['step_ms']:8.1f} "
            f"{r['step_ms'] / r0['ddp']['step_ms']:7.2f} "
            f"{r['rss_peak_bytes_max_rank'] / 1e6:12.0f} "
            + (
                f"{r['peak_full_param_bytes'] / 1e6:17.2f}"
                if r.get("peak_full_param_bytes")
                else ""
            )
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "world": N, "n_params": P, "results": r0}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [v for v in variants if "error" not in r0[v]]
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        ax[0].bar(ok, [r0[v]["total_bytes_max_rank"] / 1e6 for v in ok], label="counted")
        ax[0].plot(ok, [formula[v] / 1e6 for v in ok], "rx", label="ZeRO formula")
        ax[0].set_ylabel("MB per rank (params+grads+optim)")
        ax[0].legend()
        ax[1].bar(ok, [r0[v]["step_ms"] for v in ok])
        ax[1].set_ylabel("step ms (median, noisy shared CPU)")
        for a in ax:
            a.tick_params(axis="x", rotation=45)
        fig.tight_layout()
        fig.savefig(args.out.replace(".json", ".png"))
    except ImportError:
        pass


if __name__ == "__main__":
    main()
