"""matplotlib figures for the benchmark results (PNG, headless)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"bare": "#888888", "torch": "#ee4c2c", "torch_nohook": "#f4a582", "torchlane": "#2166ac"}


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_size_sweep(runs, path):
    """Step time vs parameter count for bare / torch DDP / torchlane DDP (one run per size)."""
    runs = sorted(runs, key=lambda r: r["params"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [r["params"] / 1e6 for r in runs]
    for key, label in (
        ("bare", "no DDP (compute only)"),
        ("torch", "torch DDP"),
        ("torchlane", "torchlane DDP"),
    ):
        ys = [r.get(f"{key}_ms") for r in runs]
        pts = [(a, b) for a, b in zip(x, ys, strict=True) if b]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=COLORS[key], label=label)
    ax.set(
        xscale="log", yscale="log", xlabel="parameters (millions)", ylabel="step time (ms, median)"
    )
    ax.set_title(f"GPT step time, {runs[0]['world_size']} ranks, Gloo over loopback")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    ratios = [(a, r["ratio"]) for a, r in zip(x, runs, strict=True) if r.get("ratio")]
    if ratios:
        ax2.plot(*zip(*ratios, strict=True), "o-", color=COLORS["torchlane"])
    ax2.axhline(1.0, color="k", lw=0.8, ls="--")
    ax2.set(xscale="log", xlabel="parameters (millions)", ylabel="torchlane / torch step time")
    ax2.set_title("ratio (< 1: torchlane faster)")
    ax2.grid(True, which="both", alpha=0.3)
    _save(fig, path)


def plot_attention(result, path):
    """GFLOP/s against sequence length from a benchmarks/attention.py run: forward and
    forward + backward, one line per implementation and (dtype, D, causal) configuration."""
    rows = result["rows"]
    configs = sorted({(r["dtype"], r["D"], r["causal"]) for r in rows})
    seqs = sorted({r["S"] for r in rows})
    impls = {
        "sdpa": ("torch SDPA", COLORS["torch"]),
        "torchlane": ("torchlane.attention", COLORS["torchlane"]),
        "math": ("math composition", COLORS["bare"]),
    }

    def describe(dtype, D, causal):
        return f"{dtype} D={D}{' causal' if causal else ''}"

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, backward, title in ((axes[0], False, "forward"), (axes[1], True, "forward + backward")):
        for ci, config in enumerate(configs):
            sel = sorted(
                (r for r in rows if (r["dtype"], r["D"], r["causal"]) == config),
                key=lambda r: r["S"],
            )
            for impl, (label, color) in impls.items():
                pts = [
                    (r["S"], r["gflops"][impl])
                    for r in sel
                    if r["backward"] == backward and impl in r["gflops"]
                ]
                if pts:
                    if len(configs) > 1:
                        label = f"{label}, {describe(*config)}"
                    ls = ("-", "--", ":", "-.")[ci % 4]
                    ax.plot(*zip(*pts, strict=True), ls, marker="o", color=color, label=label)
        ax.set(xscale="log", xlabel="sequence length", ylabel=f"GFLOP/s ({result['stat']} time)")
        ax.set_xticks(seqs, [str(s) for s in seqs])
        ax.minorticks_off()
        config = f" {describe(*configs[0])}," if len(configs) == 1 else ","
        ax.set_title(
            f"{title}: {result['device']}{config} B={result['batch']} H={result['heads']}, "
            f"{result['threads']} thread(s)",
            fontsize=9,
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def bucket_events(stats):
    """Find the per-bucket {ready_ms, launch_ms, done_ms} records in a comm_stats() dict."""
    if not isinstance(stats, dict):
        return []
    for key in ("bucket_events", "timeline", "events", "last_step", "buckets"):
        val = stats.get(key)
        if isinstance(val, dict):
            found = bucket_events(val)
            if found:
                return found
        if isinstance(val, list) and val and isinstance(val[0], dict) and "launch_ms" in val[0]:
            return val
    return []


def backward_end_ms(stats):
    if not isinstance(stats, dict):
        return None
    if "backward_end_ms" in stats:
        return stats["backward_end_ms"]
    for val in stats.values():
        if isinstance(val, dict) and "backward_end_ms" in val:
            return val["backward_end_ms"]
    return None


def plot_timeline(result, path):
    """One training step per rank: backward compute and each bucket's all-reduce on a time axis
    (torchlane's comm_stats: times from the first gradient hook)."""
    per_rank = [s for s in result.get("torchlane_comm_stats") or [] if s]
    per_rank = [
        (r, s) for r, s in enumerate(result.get("torchlane_comm_stats") or []) if bucket_events(s)
    ]
    if not per_rank:
        return False
    n_buckets = max(len(bucket_events(s)) for _, s in per_rank)
    # Each rank's times start at its own first gradient hook (comm_stats has no common clock).
    shifts = {r: 0.0 for r, _ in per_rank}
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.35 * len(per_rank) * (n_buckets + 1)))
    y, ticks, labels = 0, [], []
    for rank, stats in per_rank:
        sh = shifts[rank]
        bwd = backward_end_ms(stats)
        if bwd is not None:
            ax.barh(y, bwd, left=sh, color="#999999", height=0.7)
            ticks.append(y)
            labels.append(f"rank {rank} backward")
            y += 1
        for ev in bucket_events(stats):
            ready, launch, done = ev.get("ready_ms"), ev.get("launch_ms"), ev.get("done_ms")
            if launch is None or done is None:
                continue
            ready, launch, done = (None if ready is None else ready + sh), launch + sh, done + sh
            if ready is not None and launch > ready:
                ax.barh(y, launch - ready, left=ready, color="#fdb863", height=0.7)
            ax.barh(y, done - launch, left=launch, color=COLORS["torchlane"], height=0.7)
            ticks.append(y)
            labels.append(f"rank {rank} bucket {ev.get('index', '?')}")
            y += 1
        y += 0.5
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms from each rank's own first gradient hook (last synchronised step of the run)")
    mbit = result.get("link_mbit")
    ax.set_title(
        f"torchlane DDP, one step: backward (grey), bucket waiting to launch (orange), all-reduce (blue); "
        f"{result['params'] / 1e6:.2f}M params, {result['world_size']} ranks, "
        f"{f'{mbit:g} Mbit/s link' if mbit else 'loopback'}",
        fontsize=9,
    )
    ax.grid(True, axis="x", alpha=0.3)
    _save(fig, path)
    return True


def default_row(run, cap=25.0):
    return {
        **run,
        **next((r for r in run["results"] if r["bucket_cap_mb"] == cap), run["results"][0]),
    }


def plot_hooks(runs, path):
    """Step time per compression hook on a shaped link, each group from one run: no DDP, torch DDP
    without a hook, torch DDP + its equivalent hook, torchlane DDP + the hook."""
    runs = [default_row(r) for r in runs]
    if not runs:
        return False
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.2
    series = (
        ("bare", "no DDP (compute only)"),
        ("torch_nohook", "torch DDP, no hook"),
        ("torch", "torch DDP + its hook"),
        ("torchlane", "torchlane DDP + hook"),
    )
    for j, (key, label) in enumerate(series):
        xs, ys = [], []
        for i, r in enumerate(runs):
            if key == "torch_nohook":
                v = r.get("torch_ms") if r["hook"] == "none" else r.get("torch_nohook_ms")
            elif key == "torch":
                v = (
                    None if r["hook"] in ("none", "topk") else r.get("torch_ms")
                )  # topk: no torch hook
            else:
                v = r.get(f"{key}_ms")
            if v:
                xs.append(i + (j - 1.5) * width)
                ys.append(v)
        ax.bar(xs, ys, width, label=label, color=COLORS[key])
    ax.set_xticks(range(len(runs)), [r["hook"] for r in runs])
    ax.set_ylabel("step time (ms, median)")
    ax.set_title(
        f"compression hooks, {runs[0]['world_size']} ranks, {runs[0]['link_mbit']:g} Mbit/s shaped "
        f"loopback, {runs[0]['params'] / 1e6:.2f}M params (one run per group)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    _save(fig, path)
    return True


def plot_scale_model(result, path):
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    links = [entry["name"] for entry in result["links"]]
    scales = sorted({e.get("compute_scale", 1.0) for e in result["extrapolation"]}, reverse=True)
    styles = ["-", "--", ":", "-."]
    for li, name in enumerate(links):
        for si, k in enumerate(scales):
            rows = [
                e
                for e in result["extrapolation"]
                if e["link"] == name and e.get("compute_scale", 1.0) == k
            ]
            ax.plot(
                [e["world_size"] for e in rows],
                [e["efficiency"] for e in rows],
                styles[si % 4],
                marker="o",
                ms=3,
                color=f"C{li}",
                label=f"{name}, compute x{k:g}",
            )
    ax.set(xlabel="ranks N", ylabel="scaling efficiency T(1) / T(N)", ylim=(0, 1.05))
    ax.set_xscale("log", base=2)
    ax.set_title(
        f"predicted: ring all-reduce, alpha 5 us, {(result.get('model_params') or 0) / 1e6:.1f}M "
        f"params, measured step {result.get('compute_ms', 0):.0f} ms x compute scale",
        fontsize=8,
    )
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    val = result.get("validation") or []
    if val:
        meas = [v["measured_ms"] for v in val]
        pred = [v["predicted_ms"] for v in val]
        for v in val:
            marker = "o" if v["variant"] == "torchlane" else "s"
            color = COLORS.get(v["variant"], "k")
            ax2.scatter(v["measured_ms"], v["predicted_ms"], marker=marker, color=color)
            ax2.annotate(
                f"N={v['world_size']} {v['hook']} {v['bucket_cap_mb']:g}MB",
                (v["measured_ms"], v["predicted_ms"]),
                fontsize=7,
            )
        lo, hi = min(meas + pred) * 0.8, max(meas + pred) * 1.2
        ax2.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax2.fill_between(
            [lo, hi], [lo * 0.85, hi * 0.85], [lo * 1.15, hi * 1.15], color="k", alpha=0.08
        )
        ax2.set(
            xlabel="measured step (ms)", ylabel="predicted step (ms)", xlim=(lo, hi), ylim=(lo, hi)
        )
        ax2.set_title(
            "validation on the shaped loopback (band: +-15%; o torchlane, s torch)", fontsize=9
        )
        ax2.grid(True, alpha=0.3)
    _save(fig, path)
