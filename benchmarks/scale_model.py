"""Scaling past one machine: an alpha-beta model of ring all-reduce driven by a measured step.

    python benchmarks/scale_model.py benchmarks/results/ddp_link200_n2.json [more.json ...]

Input: JSON written by benchmarks/ddp_vs_torch.py, whose "profile" holds one real step's forward
time, optimizer time and every parameter's gradient-ready time in backward (measured on the bare
model), and the measured torch DDP / torchlane step times. The model:

  * ring all-reduce of S bytes over N ranks: 2 (N - 1) alpha + 2 (N - 1) / N * S / B
    (B = per-rank link bandwidth, full duplex: a switched cluster). On the benchmark's shaped
    loopback every byte of every rank goes through one shared queue (Note [Shaped loopback is a
    shared medium] in netns.py), so there the bandwidth term is 2 (N - 1) S / B.
  * the bucket schedule: a bucket is ready when its last parameter's gradient is ready; buckets
    are all-reduced one at a time in launch order, each starting when it is ready and the
    previous one is done. step = forward + max(backward, last all-reduce done) + optimizer.
  * torchlane's bucket plan and torch DDP's plan are computed by bucket_plan(), the same rule
    both use (reverse registration order, first bucket 1 MiB, then bucket_cap_mb, close at >= cap).

It validates itself against the measured shaped-loopback step times (predicted vs measured) and
predicts step time and scaling efficiency (T_step(1) / T_step(N)) for N = 2..1024 on the stated
links, writing benchmarks/results/scale_model.json and scale_model.png.
"""

import argparse
import json
from pathlib import Path

MiB = 1024 * 1024

# Stated cluster links: (name, bandwidth in Gbit/s per rank, alpha in seconds).
LINKS = [("25 Gbit/s", 25.0, 5e-6), ("100 Gbit/s", 100.0, 5e-6), ("400 Gbit/s", 400.0, 5e-6)]
WORLD_SIZES = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def bucket_plan(param_bytes, cap_bytes=25 * MiB, first_cap_bytes=1 * MiB, order=None):
    """Bucket assignment of DDP (torch's and torchlane's rule) for one dtype/device group.

    param_bytes: bytes of each parameter in registration order; order: the order parameters are
    walked in (default: reverse registration order; after the first iteration both DDPs rebuild
    their buckets from the observed gradient-ready order). Returns a list of buckets, each a list
    of parameter indices, in launch order; a bucket closes once it holds >= its cap (the first
    bucket's cap is first_cap_bytes).
    """
    if cap_bytes <= 0 or first_cap_bytes <= 0:
        raise ValueError(
            f"caps must be > 0, got cap_bytes={cap_bytes}, first_cap_bytes={first_cap_bytes}"
        )
    order = list(reversed(range(len(param_bytes)))) if order is None else list(order)
    if sorted(order) != list(range(len(param_bytes))):
        raise ValueError("order must be a permutation of the parameter indices")
    buckets, current, size = [], [], 0
    for i in order:
        current.append(i)
        size += param_bytes[i]
        if size >= (first_cap_bytes if not buckets else cap_bytes):
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


def ring_allreduce_s(nbytes, n, alpha_s, bw_bytes_per_s, shared_medium=False):
    """Seconds for a ring all-reduce of nbytes over n ranks (alpha-beta model)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1 or nbytes == 0:
        return 0.0
    steps = 2 * (n - 1)
    wire = steps * nbytes if shared_medium else steps * nbytes / n
    return steps * alpha_s + wire / bw_bytes_per_s


def simulate_step(bucket_ready_s, bucket_comm_s, forward_s, backward_s, optimizer_s):
    """Step time of one data-parallel step with buckets reduced one at a time in order.

    bucket_ready_s: time each bucket is ready, from the start of backward (launch order);
    bucket_comm_s: its all-reduce time. Returns (step_s, comm_end_s from backward start).
    """
    end = 0.0
    for ready, comm in zip(bucket_ready_s, bucket_comm_s, strict=True):
        end = max(end, ready) + comm
    return forward_s + max(backward_s, end) + optimizer_s, end


def bucket_ready_times(buckets, param_ready_s):
    return [max(param_ready_s[i] for i in b) for b in buckets]


def predict(
    profile,
    n,
    alpha_s,
    bw_bytes_per_s,
    cap_mb=25.0,
    shared_medium=False,
    bytes_scale=1.0,
    plan=None,
):
    """Predicted step seconds for the profiled model at n ranks (bytes_scale: 0.5 for bf16).

    plan: buckets as lists of parameter indices in launch order (e.g. torchlane's own, from
    comm_stats); default: bucket_plan() over the observed gradient-ready order, which is what
    both DDPs use after their one-time bucket rebuild.
    """
    pbytes, ready_ms = profile["param_bytes"], profile["param_ready_ms"]
    observed = sorted(range(len(pbytes)), key=lambda i: (ready_ms[i], -i))  # rebuilt-bucket order
    buckets = plan or bucket_plan(pbytes, int(cap_mb * MiB), order=observed)
    ready = bucket_ready_times(buckets, [t / 1e3 for t in ready_ms])
    comm = [
        ring_allreduce_s(
            sum(pbytes[i] for i in b) * bytes_scale, n, alpha_s, bw_bytes_per_s, shared_medium
        )
        for b in buckets
    ]
    step, _ = simulate_step(
        ready,
        comm,
        profile["forward_ms"] / 1e3,
        profile["backward_ms"] / 1e3,
        profile["optimizer_ms"] / 1e3,
    )
    return step


def calibrated(profile, compute_ms):
    """The profile with every time scaled so forward + backward + optimizer = compute_ms.

    The profile is one instrumented step; compute_ms is the median bare step of the same run
    (same CPU contention), so the scaled profile keeps the measured shape and the measured total.
    """
    total = profile["forward_ms"] + profile["backward_ms"] + profile["optimizer_ms"]
    k = compute_ms / total
    out = dict(profile)
    for key in ("forward_ms", "backward_ms", "optimizer_ms"):
        out[key] = profile[key] * k
    out["param_ready_ms"] = [t * k for t in profile["param_ready_ms"]]
    return out


def compute_step_s(profile):
    return (profile["forward_ms"] + profile["backward_ms"] + profile["optimizer_ms"]) / 1e3


def torchlane_plan(result):
    """torchlane's actual buckets (rank 0's comm_stats, last bucket cap of the run) as parameter
    indices of the profile, or None."""
    stats = (result.get("torchlane_comm_stats") or [None])[0]
    names = (result.get("profile") or {}).get("param_names")
    if not stats or not names or not stats.get("buckets"):
        return None
    index = {name: i for i, name in enumerate(names)}
    try:
        return [[index[p.removeprefix("module.")] for p in b["params"]] for b in stats["buckets"]]
    except (KeyError, TypeError):
        return None


def validate(result):
    """Predicted vs measured step times of one ddp_vs_torch.py run on a shaped link."""
    prof, n, mbit = result["profile"], result["world_size"], result.get("link_mbit")
    if not mbit:
        return None
    scale = {"none": 1.0, "fp16": 0.5, "bf16": 0.5}.get(result.get("hook", "none"))
    if scale is None:
        return None  # PowerSGD / top-k volumes are not modelled by a plain all-reduce
    alpha = result.get("alpha_s", 50e-6)
    if result.get("bare_ms"):
        prof = calibrated(prof, result["bare_ms"])
    tl_plan = torchlane_plan(result)
    rows = []
    for row in result["results"]:
        for key in ("torch_ms", "torchlane_ms"):
            plan = tl_plan if key == "torchlane_ms" and row is result["results"][-1] else None
            pred = predict(prof, n, alpha, mbit * 1e6 / 8, row["bucket_cap_mb"], True, scale, plan)
            pred *= 1e3
            if row.get(key):
                rows.append(
                    {
                        "world_size": n,
                        "link_mbit": mbit,
                        "hook": result.get("hook", "none"),
                        "bucket_cap_mb": row["bucket_cap_mb"],
                        "variant": key[:-3],
                        "measured_ms": row[key],
                        "predicted_ms": pred,
                        "error": pred / row[key] - 1.0,
                    }
                )
    return rows


def scaled(profile, k):
    """The profile with every compute time multiplied by k (k = 0.01: compute 100x faster)."""
    out = dict(profile)
    for key in ("forward_ms", "backward_ms", "optimizer_ms"):
        out[key] = profile[key] * k
    out["param_ready_ms"] = [t * k for t in profile["param_ready_ms"]]
    return out


def extrapolate(profile, cap_mb=25.0, compute_scales=(1.0,)):
    """Step time and scaling efficiency T(1) / T(N) for N in WORLD_SIZES on each stated link,
    for the measured compute and for compute scaled by each factor in compute_scales."""
    out = []
    for k in compute_scales:
        prof = scaled(profile, k)
        t1 = compute_step_s(prof)
        for name, gbit, alpha in LINKS:
            for n in WORLD_SIZES:
                step = predict(prof, n, alpha, gbit * 1e9 / 8, cap_mb)
                out.append(
                    {
                        "link": name,
                        "compute_scale": k,
                        "world_size": n,
                        "step_ms": step * 1e3,
                        "efficiency": t1 / step,
                    }
                )
    return out


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "runs", nargs="+", help="ddp_vs_torch.py JSON results (shaped-link runs validate)"
    )
    p.add_argument(
        "--base",
        default=None,
        help="run whose profile is extrapolated (default: the first run given)",
    )
    p.add_argument(
        "--compute-scale",
        default="1,0.01",
        help="compute-time factors to extrapolate with (0.01: a 100x faster device, e.g. a GPU)",
    )
    p.add_argument("--out", default="benchmarks/results/scale_model.json")
    p.add_argument("--plot", default="benchmarks/results/scale_model.png")
    args = p.parse_args()
    missing = [f for f in args.runs if not Path(f).exists()]
    if missing:
        print(f"scale_model: skipping missing run(s): {', '.join(missing)}")
    runs = [json.loads(Path(f).read_text()) for f in args.runs if Path(f).exists()]
    if not runs:
        raise SystemExit("scale_model: none of the given runs exists")
    validation = [row for r in runs for row in (validate(r) or [])]
    base = json.loads(Path(args.base).read_text()) if args.base else runs[0]
    scales = [float(x) for x in args.compute_scale.split(",") if x]
    if not base.get("profile"):
        raise SystemExit("scale_model: the base run has no profile (rerun ddp_vs_torch.py)")
    # Extrapolate the measured bare step of the base run (its median, the profile's shape).
    prof = calibrated(base["profile"], base["bare_ms"]) if base.get("bare_ms") else base["profile"]
    result = {
        "source": args.runs,
        "base": args.base or args.runs[0],
        "model_params": base.get("params"),
        "compute_ms": compute_step_s(prof) * 1e3,
        "validation": validation,
        "extrapolation": extrapolate(prof, compute_scales=scales),
        "links": [{"name": n, "gbit": g, "alpha_s": a} for n, g, a in LINKS],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("validation (shaped loopback, shared medium):")
    for v in validation:
        print(
            f"  N={v['world_size']} {v['link_mbit']:g} Mbit/s hook={v['hook']} cap={v['bucket_cap_mb']:g} MB "
            f"{v['variant']:>9}: measured {v['measured_ms']:8.1f} ms  predicted {v['predicted_ms']:8.1f} ms  "
            f"error {v['error'] * 100:+.1f}%"
        )
    print(
        f"predicted scaling efficiency, {base.get('params', 0) / 1e6:.1f}M params, measured compute "
        f"{result['compute_ms']:.0f} ms x compute scale:"
    )
    for k in scales:
        for name, _, _ in LINKS:
            effs = [
                f"N={e['world_size']}: {e['efficiency']:.2f}"
                for e in result["extrapolation"]
                if e["link"] == name and e["compute_scale"] == k
            ]
            print(f"  x{k:g} {name}: " + ", ".join(effs))
    if args.plot:
        from plots import plot_scale_model

        plot_scale_model(result, args.plot)
        print(f"wrote {args.out}, {args.plot}")


if __name__ == "__main__":
    main()
