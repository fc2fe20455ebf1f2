"""torch DDP vs torchlane DDP, side by side in the same processes.

    python benchmarks/ddp_vs_torch.py                                  # launches 2 ranks itself
    torchrun --nproc-per-node 2 benchmarks/ddp_vs_torch.py             # or under torchrun
    python benchmarks/ddp_vs_torch.py --bucket-cap-mb 1,5,25,100       # bucket-size sweep
    python benchmarks/ddp_vs_torch.py --link-mbit 200 --hook bf16      # shaped link (root), compression

The same GPT-style model (examples/gpt.py) is trained with no DDP ("bare", every rank alone: the
compute-only step), with torch.nn.parallel.DistributedDataParallel and with
torchlane.DistributedDataParallel, all starting from the same weights, in the same processes.
Variants take turns in rounds (the order rotates every round, the first round is warm-up), so
the noise of a shared machine hits all of them alike; each step's time is the slowest rank's,
and the figures are medians over all measured steps. A comm-only round all-reduces buffers of the
same bucket sizes with nothing else running (T_comm), which gives the overlap efficiency

    efficiency = (T_compute + T_comm - T_step) / min(T_compute, T_comm)   (1.0: comm fully hidden)

--hook picks gradient compression: torch DDP gets its own equivalent hook from
torch.distributed.algorithms.ddp_comm_hooks (top-k has none: torch runs without a hook) and
torchlane gets torchlane.hooks.*; torch DDP without a hook is measured beside them.
--link-mbit N runs every rank in a fresh network namespace whose loopback is shaped to N Mbit/s
(benchmarks/netns.py; needs root). JSON goes to --json (default benchmarks/results/ddp_*.json).
"""

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "examples"), str(ROOT / "python")]

from train_gpt import register_hook  # noqa: E402  (the example's hook choice, both sides)

HOOKS = ("none", "fp16", "bf16", "powersgd", "topk")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a("--world-size", type=int, default=2, help="ranks to launch (when not started by torchrun)")
    a("--link-mbit", type=float, default=None, help="shape the ranks' loopback to N Mbit/s (root)")
    a("--hook", choices=HOOKS, default="none")
    a("--bucket-cap-mb", default="25", help="comma-separated list: a bucket-size sweep")
    a("--params", type=float, default=None, help="target model size in millions (overrides shape)")
    a("--n-layer", type=int, default=4)
    a("--n-head", type=int, default=4)
    a("--n-embd", type=int, default=128)
    a("--block-size", type=int, default=128)
    a("--batch-size", type=int, default=8)
    a("--rounds", type=int, default=5, help="rounds after the warm-up round")
    a("--steps", type=int, default=5, help="steps per variant per round")
    a("--variants", default="bare,torch,torchlane", help="subset of bare,torch,torchlane")
    a("--no-comm-round", action="store_true", help="skip the comm-only measurement")
    a("--json", default=None, help="output path (default: benchmarks/results/ddp_<tag>.json)")
    a("--tag", default=None, help="name used in the default JSON path")
    a("--timeout-s", type=float, default=1800)
    args = p.parse_args(argv)
    try:
        args.caps = [float(c) for c in args.bucket_cap_mb.split(",") if c]
    except ValueError:
        p.error(f"--bucket-cap-mb must be comma-separated numbers, got {args.bucket_cap_mb!r}")
    if not args.caps or min(args.caps) <= 0:
        p.error(f"--bucket-cap-mb values must be > 0, got {args.bucket_cap_mb!r}")
    args.variant_list = [v for v in args.variants.split(",") if v]
    bad = set(args.variant_list) - {"bare", "torch", "torchlane"}
    if bad:
        p.error(f"--variants: unknown {sorted(bad)}; choose from bare,torch,torchlane")
    if args.world_size < 1 or args.rounds < 1 or args.steps < 1:
        p.error("--world-size, --rounds and --steps must be >= 1")
    return args


def default_json(args):
    if args.json:
        return Path(args.json)
    tag = args.tag or "_".join(
        ["ddp"]
        + ([f"link{args.link_mbit:g}"] if args.link_mbit else ["loopback"])
        + [f"n{args.world_size if 'WORLD_SIZE' not in os.environ else os.environ['WORLD_SIZE']}"]
        + ([f"hook-{args.hook}"] if args.hook != "none" else [])
        + ([f"{args.params:g}M"] if args.params else [])
    )
    return HERE / "results" / f"{tag}.json"


# ----------------------------------------------------------------------------- launcher


def launch(args, argv):
    """Start args.world_size ranks with torchrun, inside a shaped namespace when --link-mbit is set."""
    import netns

    return netns.torchrun_ranks(
        "ddp_vs_torch",
        Path(__file__).resolve(),
        args.world_size,
        argv,
        args.link_mbit,
        default_json(args),
        args.timeout_s,
    )


# ----------------------------------------------------------------------------- models


def build_model(args):
    from gpt import GPT, GPTConfig, config_for_params

    if args.params:
        cfg = config_for_params(args.params * 1e6, args.block_size, attention="sdpa")
    else:
        cfg = GPTConfig(256, args.block_size, args.n_layer, args.n_head, args.n_embd, 0.0, "sdpa")
    return GPT(cfg)


def torch_hook(ddp, hook):
    # torch has no top-k hook: torch DDP runs uncompressed in the top-k comparison.
    if hook not in ("none", "topk"):
        register_hook(ddp, "torch", hook)


def torchlane_hook(ddp, hook):
    if hook != "none":
        register_hook(ddp, "torchlane", hook)


def torchlane_ddp_class():
    try:
        import torchlane
    except ImportError as e:
        return None, f"torchlane does not import ({e})"
    if not hasattr(torchlane, "DistributedDataParallel"):
        return None, "this torchlane build has no DistributedDataParallel yet"
    return torchlane.DistributedDataParallel, None


def torchlane_has_hooks():
    try:
        import torchlane.hooks  # noqa: F401
    except ImportError:
        return False
    return True


class Variant:
    """One model copy + optimizer; step() runs forward, backward and the optimizer."""

    def __init__(self, name, model, batch):
        import torch

        self.name, self.model, self.batch = name, model, batch
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        self.times = []

    def step(self):
        x, y = self.batch
        _, loss = self.model(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def make_variants(args, world, state, batch, cap):
    """The variants for one bucket cap: [(key, Variant)] (bare is shared across caps)."""
    import torch.nn.parallel as tp

    out = []

    def fresh():
        m = build_model(args)
        m.load_state_dict(state)
        return m

    if "torch" in args.variant_list:
        m = tp.DistributedDataParallel(fresh(), bucket_cap_mb=cap)
        torch_hook(m, args.hook)
        out.append(("torch", Variant(f"torch@{cap:g}", m, batch)))
        if args.hook != "none":
            out.append(
                (
                    "torch_nohook",
                    Variant(
                        f"torch_nohook@{cap:g}",
                        tp.DistributedDataParallel(fresh(), bucket_cap_mb=cap),
                        batch,
                    ),
                )
            )
    if "torchlane" in args.variant_list:
        cls, why = torchlane_ddp_class()
        if cls is not None and args.hook != "none" and not torchlane_has_hooks():
            cls, why = None, "this torchlane build has no torchlane.hooks yet"
        if cls is None:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"[ddp_vs_torch] skipping torchlane: {why}", flush=True)
        else:
            m = cls(fresh(), bucket_cap_mb=cap)
            torchlane_hook(m, args.hook)
            out.append(("torchlane", Variant(f"torchlane@{cap:g}", m, batch)))
    return out


# ----------------------------------------------------------------------------- measurements


def timed_steps(variant, n):
    """Run n steps; return each step's time in ms on this rank."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        variant.step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def comm_only_ms(bucket_bytes, dtype_bytes, reps=3):
    """All-reduce buffers of the given sizes back to back (async, as DDP launches them); ms."""
    import torch
    import torch.distributed as dist

    dtype = {4: torch.float32, 2: torch.bfloat16}[dtype_bytes]
    bufs = [torch.zeros(max(1, b // dtype_bytes), dtype=dtype) for b in bucket_bytes]
    out = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        works = [dist.all_reduce(b, async_op=True) for b in bufs]
        for w in works:
            w.wait()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def profile_bare_step(model, batch, reps=3):
    """Per-parameter gradient-ready times (ms from the start of backward) of the bare model, plus
    forward / backward / optimizer times: the input of benchmarks/scale_model.py."""
    import torch

    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    ready = [0.0] * len(params)
    t_bwd = [0.0]
    handles = []
    for i, p in enumerate(params):

        def hook(_p, i=i):
            ready[i] = (time.perf_counter() - t_bwd[0]) * 1e3

        handles.append(p.register_post_accumulate_grad_hook(hook))
    samples = []
    x, y = batch
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        t_bwd[0] = time.perf_counter()
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        samples.append(((t_bwd[0] - t0) * 1e3, (t1 - t_bwd[0]) * 1e3, (t2 - t1) * 1e3, list(ready)))
    for h in handles:
        h.remove()
    samples = samples[1:]  # first is warm-up
    med = statistics.median
    return {
        "forward_ms": med(s[0] for s in samples),
        "backward_ms": med(s[1] for s in samples),
        "optimizer_ms": med(s[2] for s in samples),
        "param_ready_ms": [med(s[3][i] for s in samples) for i in range(len(params))],
        "param_bytes": [p.numel() * p.element_size() for p in params],
        "param_names": [n for n, _ in model.named_parameters()],
    }


def comm_stats_of(model):
    fn = getattr(model, "comm_stats", None)
    if fn is None:
        return None
    try:
        return json.loads(json.dumps(fn(), default=str))
    except Exception as e:  # stats are a bonus: never fail the benchmark on them
        return {"error": repr(e)}


# ----------------------------------------------------------------------------- worker


def worker(args):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    bare = build_model(args)
    state = {k: v.clone() for k, v in bare.state_dict().items()}
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randint(0, 256, (args.batch_size, args.block_size), generator=g)
    batch = (x, torch.roll(x, -1, dims=1))
    n_params = sum(p.numel() for p in bare.parameters())
    param_bytes = [p.numel() * p.element_size() for p in bare.parameters()]

    # The bare model is independent of the bucket cap; each cap gets its own DDP copies.
    groups = [("bare", None, Variant("bare", bare, batch))] if "bare" in args.variant_list else []
    for cap in args.caps:
        groups += [(key, cap, v) for key, v in make_variants(args, world, state, batch, cap)]
    dtype_bytes = 2 if args.hook in ("fp16", "bf16") else 4
    comm_keys = {}
    if not args.no_comm_round and args.hook in ("none", "fp16", "bf16"):
        from scale_model import bucket_plan

        for cap in args.caps:
            plan = bucket_plan(param_bytes, int(cap * 1024 * 1024))
            comm_keys[cap] = [sum(param_bytes[i] for i in b) * dtype_bytes // 4 for b in plan]
    comm_times = {cap: [] for cap in comm_keys}

    if rank == 0:
        print(
            f"[ddp_vs_torch] {world} ranks, {n_params / 1e6:.2f}M params ({sum(param_bytes) / 1e6:.1f} MB of "
            f"fp32 gradients), hook={args.hook}, link={f'{args.link_mbit:g} Mbit/s' if args.link_mbit else 'loopback'}, caps={args.caps}, "
            f"variants={[v.name for _, _, v in groups]}, {args.rounds}+1 rounds x {args.steps} steps",
            flush=True,
        )
    for r in range(args.rounds + 1):
        k = r % len(groups)
        order = groups[k:] + groups[:k]  # rotate so no variant always runs first
        for _key, _cap, v in order:
            dist.barrier()
            times = timed_steps(v, args.steps)
            if r > 0:
                v.times.extend(times)
        for cap, sizes in comm_keys.items():
            t = comm_only_ms(sizes, dtype_bytes)
            if r > 0:
                comm_times[cap].extend(t)
        if rank == 0:
            print(f"[ddp_vs_torch] round {r}{' (warm-up)' if r == 0 else ''} done", flush=True)

    # Slowest rank per step, then the median over steps.
    def reduce_max(values):
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    medians, spreads = {}, {}
    for key, cap, v in groups:
        slowest = reduce_max(v.times)
        medians[(key, cap)] = statistics.median(slowest)
        q = statistics.quantiles(slowest, n=4) if len(slowest) > 1 else [slowest[0]] * 3
        spreads[(key, cap)] = [q[0], q[2]]
    comm_ms = {cap: statistics.median(reduce_max(t)) for cap, t in comm_times.items()}

    # Every rank profiles at once, so the compute runs under the same CPU contention as the steps.
    dist.barrier()
    profile = profile_bare_step(bare, batch)
    stats = {
        key: comm_stats_of(v.model)
        for key, cap, v in groups
        if key == "torchlane" and cap == args.caps[-1]
    }
    all_stats = [None] * world
    dist.all_gather_object(all_stats, stats.get("torchlane"))

    if rank == 0:
        result = summarize(
            args, world, n_params, sum(param_bytes), medians, comm_ms, profile, all_stats, bare
        )
        result["quartiles_ms"] = {
            f"{key}@{cap:g}" if cap is not None else key: q for (key, cap), q in spreads.items()
        }
        out = Path(os.environ.get("TORCHLANE_BENCH_JSON") or default_json(args))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print_table(result)
        print(f"[ddp_vs_torch] wrote {out}", flush=True)
    dist.barrier()
    # The DDP models (torch's Reducer keeps its last collective's Work) go while the interpreter
    # is alive, before the group: a Work destroyed later on Gloo's thread during finalization
    # aborts the process (Note [Releasing collectives' Work objects]; seen once in the smoke test).
    groups = order = v = bare = None
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def efficiency(t_compute, t_comm, t_step):
    """Overlap efficiency: 1.0 when communication is fully hidden behind compute, 0 when serial."""
    if t_compute is None or t_comm is None or t_step is None or min(t_compute, t_comm) <= 0:
        return None
    return (t_compute + t_comm - t_step) / min(t_compute, t_comm)


def summarize(args, world, n_params, grad_bytes, medians, comm_ms, profile, all_stats, bare):
    bare_ms = medians.get(("bare", None))
    rows = []
    for cap in args.caps:
        row = {"bucket_cap_mb": cap, "bare_ms": bare_ms}
        for key in ("torch", "torch_nohook", "torchlane"):
            row[f"{key}_ms"] = medians.get((key, cap))
        row["ratio"] = (
            row["torchlane_ms"] / row["torch_ms"]
            if row["torchlane_ms"] and row["torch_ms"]
            else None
        )
        if row.get("torch_nohook_ms") and row["torchlane_ms"]:
            row["speedup_vs_torch_nohook"] = row["torch_nohook_ms"] / row["torchlane_ms"]
        if row["torch_ms"] and row.get("torch_nohook_ms"):
            row["torch_hook_speedup_vs_nohook"] = row["torch_nohook_ms"] / row["torch_ms"]
        row["comm_ms"] = comm_ms.get(cap)
        row["efficiency_torch"] = efficiency(bare_ms, row["comm_ms"], row["torch_ms"])
        row["efficiency_torchlane"] = efficiency(bare_ms, row["comm_ms"], row["torchlane_ms"])
        rows.append(row)
    default = next((r for r in rows if r["bucket_cap_mb"] == 25.0), rows[0])

    def best(key):
        cands = [(r[key], r["bucket_cap_mb"]) for r in rows if r.get(key)]
        return min(cands) if cands else (None, None)

    (bt, bt_cap), (bl, bl_cap) = best("torch_ms"), best("torchlane_ms")
    return {
        "benchmark": "ddp_vs_torch",
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "world_size": world,
        "link_mbit": args.link_mbit,
        "hook": args.hook,
        "params": n_params,
        "grad_bytes": grad_bytes,
        "model": bare.cfg.to_dict(),
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        # The default bucket cap's figures at the top level (issue 2's JSON contract).
        "bare_ms": default["bare_ms"],
        "torch_ms": default["torch_ms"],
        "torchlane_ms": default["torchlane_ms"],
        "ratio": default["ratio"],
        "best": {
            "torch_ms": bt,
            "torch_cap_mb": bt_cap,
            "torchlane_ms": bl,
            "torchlane_cap_mb": bl_cap,
            "ratio": bl / bt if bl and bt else None,
        },
        "results": rows,
        "profile": profile,
        "torchlane_comm_stats": all_stats,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def print_table(res):
    print(
        f"\nDDP step time, {res['world_size']} ranks, {res['params'] / 1e6:.2f}M params, hook={res['hook']}, "
        f"link={str(res['link_mbit']) + ' Mbit/s' if res['link_mbit'] else 'loopback'} (median ms over {res['rounds']}x{res['steps_per_round']} steps)"
    )
    head = [
        "cap MB",
        "bare",
        "torch",
        "torch nohook",
        "torchlane",
        "ratio",
        "T_comm",
        "eff torch",
        "eff torchlane",
    ]
    print(" | ".join(f"{h:>12}" for h in head))
    for r in res["results"]:
        cells = [
            fmt(r["bucket_cap_mb"], "g"),
            fmt(r["bare_ms"]),
            fmt(r["torch_ms"]),
            fmt(r.get("torch_nohook_ms")),
            fmt(r["torchlane_ms"]),
            fmt(r["ratio"], ".3f"),
            fmt(r["comm_ms"]),
            fmt(r["efficiency_torch"], ".2f"),
            fmt(r["efficiency_torchlane"], ".2f"),
        ]
        print(" | ".join(f"{c:>12}" for c in cells))
    b = res["best"]
    print(
        f"best: torch {fmt(b['torch_ms'])} ms @ {fmt(b['torch_cap_mb'], 'g')} MB, torchlane "
        f"{fmt(b['torchlane_ms'])} ms @ {fmt(b['torchlane_cap_mb'], 'g')} MB, ratio {fmt(b['ratio'], '.3f')}"
    )
    line = overlap_line((res.get("torchlane_comm_stats") or [None])[0])
    if line:
        print(line)


def overlap_line(stats):
    """How the last torchlane step's communication sat against its backward pass (rank 0):
    the time the backward thread spent inside bucket launches (comm hook calls), and, for hooks
    that record them (PowerSGD), each collective's launch time."""
    events = (stats or {}).get("bucket_events") or []
    if not events or "return_ms" not in events[0]:
        return None
    held = sum(e["return_ms"] - e["launch_ms"] for e in events)
    line = (
        f"torchlane last step (rank 0, ms from the first gradient hook): launches held the "
        f"backward thread {held:.1f} ms over {len(events)} buckets; backward ended at "
        f"{stats['backward_end_ms']:.1f}, communication at {stats['comm_end_ms']:.1f}"
    )
    collectives = stats.get("collectives") or []
    if collectives:
        line += "; collectives: " + " ".join(
            f"{c['op']}{c['bucket']}@{c['launch_ms']:.1f}" for c in collectives
        )
    return line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" not in os.environ:
        sys.exit(launch(args, argv))
    if args.link_mbit and "TORCHLANE_BENCH_JSON" not in os.environ:
        # Started by the user's own torchrun: the ranks are already running outside a namespace.
        raise SystemExit(
            "--link-mbit: start this script with plain `python benchmarks/ddp_vs_torch.py --world-size N "
            "--link-mbit M ...` (not under torchrun): it launches the ranks inside the shaped namespace."
        )
    worker(args)


if __name__ == "__main__":
    main()
