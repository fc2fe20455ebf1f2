"""bucket_cap_mb="auto" vs the default 25 MiB vs the best of a manual sweep, side by side.

    python benchmarks/autotune.py                        # 2 ranks, loopback
    python benchmarks/autotune.py --link-mbit 200        # shaped link (root; benchmarks/netns.py)

The example GPT (examples/gpt.py) is wrapped in torchlane.DistributedDataParallel once per manual
cap (--caps) and once with bucket_cap_mb="auto" searching the same caps. The auto model first runs
its search (those steps are timed separately: the tuning cost), then every variant takes turns in
rounds (the order rotates, the first round is warm-up) so a shared machine's noise hits all alike.
A step's time is the slowest rank's; figures are medians over all measured steps. JSON goes to
--json (default benchmarks/results/autotune_<link>.json).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples"), str(HERE.parent / "python")]

import ddp_vs_torch  # noqa: E402  (launcher and model shared with the DDP benchmark)
from run_all import cpu_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a("--world-size", type=int, default=2)
    a("--link-mbit", type=float, default=None, help="shape the ranks' loopback to N Mbit/s (root)")
    a("--caps", default="1,4,10,25,50,100", help="manual sweep, MiB (also the auto candidates)")
    a("--first-caps", default="0.25,1,4", help="first-bucket sizes auto tries, MiB")
    a("--steps-per-trial", type=int, default=4)
    a("--params", type=float, default=None, help="model size in millions (overrides the shape)")
    a("--n-layer", type=int, default=6)
    a("--n-head", type=int, default=4)
    a("--n-embd", type=int, default=256)
    a("--block-size", type=int, default=128)
    a("--batch-size", type=int, default=4)
    a("--rounds", type=int, default=4, help="rounds after the warm-up round")
    a("--steps", type=int, default=4, help="steps per variant per round")
    a("--json", default=None)
    a("--timeout-s", type=float, default=3600)
    args = p.parse_args(argv)
    args.cap_list = [float(c) for c in args.caps.split(",") if c]
    args.first_list = [float(c) for c in args.first_caps.split(",") if c]
    if not args.cap_list or min(args.cap_list) <= 0:
        p.error(f"--caps must be numbers > 0, got {args.caps!r}")
    # ddp_vs_torch's launcher and default_json read these.
    args.hook, args.tag = "none", None
    if args.json is None:
        link = f"link{args.link_mbit:g}" if args.link_mbit else "loopback"
        args.json = str(HERE / "results" / f"autotune_{link}.json")
    return args


def worker(args):
    import datetime

    import torch
    import torch.distributed as dist
    import torchlane

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=900))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = ddp_vs_torch.build_model(args)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randint(0, 256, (args.batch_size, args.block_size), generator=g)
    batch = (x, torch.roll(x, -1, dims=1))
    n_params = sum(p.numel() for p in base.parameters())

    def fresh():
        m = ddp_vs_torch.build_model(args)
        m.load_state_dict(state)
        return m

    variants = [
        (
            f"{c:g}",
            ddp_vs_torch.Variant(
                f"cap {c:g}", torchlane.DistributedDataParallel(fresh(), bucket_cap_mb=c), batch
            ),
        )
        for c in args.cap_list
    ]
    config = torchlane.BucketAutotune(
        candidates_mb=tuple(args.cap_list),
        first_bucket_candidates_mb=tuple(args.first_list),
        warmup_steps=1,
        steps_per_trial=args.steps_per_trial,
    )
    auto = ddp_vs_torch.Variant(
        "auto", torchlane.DistributedDataParallel(fresh(), bucket_cap_mb=config), batch
    )
    if rank == 0:
        print(
            f"[autotune] {world} ranks, {n_params / 1e6:.2f}M params, link="
            f"{f'{args.link_mbit:g} Mbit/s' if args.link_mbit else 'loopback'}, caps={args.cap_list}",
            flush=True,
        )
    # The search: steps until the auto model has settled (bounded, in case it never does).
    dist.barrier()
    t0 = time.perf_counter()
    tuning_steps = 0
    while auto.model.comm_stats()["autotune"]["state"] != "done" and tuning_steps < 500:
        auto.step()
        tuning_steps += 1
    tuning_s = time.perf_counter() - t0
    result_auto = auto.model.comm_stats()["autotune"]

    groups = variants + [("auto", auto)]
    for r in range(args.rounds + 1):
        k = r % len(groups)
        for _key, v in groups[k:] + groups[:k]:
            dist.barrier()
            times = ddp_vs_torch.timed_steps(v, args.steps)
            if r > 0:
                v.times.extend(times)
        if rank == 0:
            print(f"[autotune] round {r}{' (warm-up)' if r == 0 else ''} done", flush=True)

    medians = {}
    for key, v in groups:
        t = torch.tensor(v.times, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        medians[key] = statistics.median(t.tolist())
    if rank == 0:
        manual = {k: medians[k] for k, _ in variants}
        best_key = min(manual, key=manual.get)
        default = manual.get("25")
        res = {
            "world_size": world,
            "link_mbit": args.link_mbit,
            "params_m": n_params / 1e6,
            "cpu": cpu_model(),
            "command": "python benchmarks/autotune.py " + " ".join(sys.argv[1:]),
            "step_ms": medians,
            "best_manual_cap_mb": float(best_key),
            "auto_chosen_cap_mb": result_auto["bucket_cap_mb"],
            "auto_chosen_first_bucket_mb": result_auto["first_bucket_cap_mb"],
            "auto_vs_best_manual": medians["auto"] / manual[best_key],
            "default25_vs_best_manual": default / manual[best_key] if default else None,
            "tuning_steps": tuning_steps,
            "tuning_s": tuning_s,
            "trials": result_auto["trials"],
        }
        out = Path(os.environ.get("TORCHLANE_BENCH_JSON") or args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        print("cap (MiB)   step ms")
        for k, _ in variants:
            print(f"{k:>9}   {manual[k]:8.1f}{'   <- best manual' if k == best_key else ''}")
        print(
            f"     auto   {medians['auto']:8.1f}   (chose {res['auto_chosen_cap_mb']:g} MiB, first "
            f"bucket {res['auto_chosen_first_bucket_mb']:g} MiB, after {tuning_steps} steps / {tuning_s:.1f} s)"
        )
        print(
            f"auto / best manual = {res['auto_vs_best_manual']:.3f}"
            + (
                f", default 25 / best manual = {res['default25_vs_best_manual']:.3f}"
                if default
                else ""
            )
        )
        print(f"[autotune] wrote {out}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" not in os.environ:
        # ddp_vs_torch's launcher re-runs *its* file; point it at this one.
        ddp_vs_torch.__file__ = __file__
        sys.exit(ddp_vs_torch.launch(args, argv))
    worker(args)


if __name__ == "__main__":
    main()
