"""Run every benchmark and write benchmarks/results/: JSON per run, summary.md and PNG plots.

    python benchmarks/run_all.py                    # what `make bench` runs (~15-25 min on 2 cores)
    python benchmarks/run_all.py --quick            # fewer rounds and sizes (a few minutes)
    python benchmarks/run_all.py --only attention,ddp
    python benchmarks/run_all.py --report-only      # rebuild summary.md and plots from the JSON

Parts (each one command, printed before it runs and recorded in summary.md):
  ddp        torch DDP vs torchlane DDP, 2 ranks over loopback, bucket-size sweep 1,5,25,100 MB
  sizes      step time vs model size (1M..50M parameters): bare / torch DDP / torchlane DDP
  attention  attention.py: torchlane.attention vs SDPA, GFLOP/s vs sequence length 128..2048
             (B=1, H=4, D=64, fp32, causal, 1 thread)
  hooks      at 200 Mbit/s (shaped loopback, root): every compression hook vs torch's equivalent
  n4         the same link with 4 ranks (validates the scale model at N = 2 and 4)
  scale      scale_model.py: validation + prediction for N = 2..1024 (uses hooks and n4)
--link-mbit needs root; without it the shaped parts are skipped with the reason in summary.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

PARTS = ("ddp", "sizes", "attention", "hooks", "n4", "scale")
SIZES_M = (1, 3, 10, 25, 50)
LINK_MBIT = 200
HOOKS = ("none", "fp16", "bf16", "powersgd", "topk")


def commands(quick, hooks=HOOKS):
    """(part, json name, argv) for every benchmark run, in order."""
    py = ["python"]
    r = ["--rounds", "2", "--steps", "3"] if quick else ["--rounds", "5", "--steps", "5"]
    out = [
        (
            "ddp",
            "ddp_loopback_n2.json",
            py
            + [
                "benchmarks/ddp_vs_torch.py",
                "--bucket-cap-mb",
                "1,5,25,100",
                *r,
                "--json",
                "benchmarks/results/ddp_loopback_n2.json",
            ],
        )
    ]
    for m in SIZES_M[:3] if quick else SIZES_M:
        if quick:
            rr = ["--rounds", "2", "--steps", "2"]
        elif m >= 25:
            rr = ["--rounds", "4", "--steps", "2"]
        else:
            rr = ["--rounds", "4", "--steps", "3"]
        out.append(
            (
                "sizes",
                f"ddp_size_{m}M.json",
                py
                + [
                    "benchmarks/ddp_vs_torch.py",
                    "--params",
                    str(m),
                    "--block-size",
                    "64",
                    "--batch-size",
                    "4",
                    "--no-comm-round",
                    *rr,
                    "--json",
                    f"benchmarks/results/ddp_size_{m}M.json",
                ],
            )
        )
    out.append(
        (
            "attention",
            "attention_seq.json",
            py
            + [
                "benchmarks/attention.py",
                *("--seqs", "128", "256", "512", "1024", "2048"),
                *("--dims", "64", "--dtypes", "fp32", "--causal", "yes"),
                *("--batch", "1", "--heads", "4", "--threads", "1"),
                *("--rounds", "2" if quick else "5", "--stat", "median"),
                *("--memory-seq", "0", "--no-math"),
                *("--out", "benchmarks/results/attention_seq.json"),
            ],
        )
    )
    rh = ["--rounds", "2", "--steps", "3"] if quick else ["--rounds", "4", "--steps", "4"]
    for hook in hooks:
        out.append(
            (
                "hooks",
                f"ddp_link{LINK_MBIT}_n2_hook-{hook}.json",
                py
                + [
                    "benchmarks/ddp_vs_torch.py",
                    "--link-mbit",
                    str(LINK_MBIT),
                    "--hook",
                    hook,
                    *(["--bucket-cap-mb", "1,25"] if hook == "none" else []),
                    *rh,
                    "--json",
                    f"benchmarks/results/ddp_link{LINK_MBIT}_n2_hook-{hook}.json",
                ],
            )
        )
    out.append(
        (
            "n4",
            f"ddp_link{LINK_MBIT}_n4.json",
            py
            + [
                "benchmarks/ddp_vs_torch.py",
                "--world-size",
                "4",
                "--link-mbit",
                str(LINK_MBIT),
                *rh,
                "--json",
                f"benchmarks/results/ddp_link{LINK_MBIT}_n4.json",
            ],
        )
    )
    out.append(
        (
            "scale",
            "scale_model.json",
            py
            + [
                "benchmarks/scale_model.py",
                f"benchmarks/results/ddp_link{LINK_MBIT}_n2_hook-none.json",
                f"benchmarks/results/ddp_link{LINK_MBIT}_n2_hook-bf16.json",
                f"benchmarks/results/ddp_link{LINK_MBIT}_n4.json",
                "--base",
                "benchmarks/results/ddp_size_50M.json",
            ],
        )
    )
    return out


def run_parts(parts, quick, log, hooks=HOOKS):
    for part, name, argv in commands(quick, hooks):
        if part not in parts:
            continue
        if part in ("hooks", "n4") and os.geteuid() != 0:
            log[name] = {"skipped": "needs root for the shaped link (network namespace + tc)"}
            print(f"[run_all] skip {name}: not root", flush=True)
            continue
        cmd = " ".join(argv)
        print(f"\n[run_all] $ {cmd}", flush=True)
        t0 = time.time()
        rc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT).returncode
        log[name] = {
            "command": cmd,
            "rc": rc,
            "seconds": round(time.time() - t0, 1),
            "cpu": cpu_model(),
        }
        if rc != 0:
            print(f"[run_all] {name} failed with exit status {rc}", flush=True)


def load(name):
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def efficiency_bound(run, row):
    """Overlap efficiency of the scale model's predicted step for this run's link and buckets."""
    import scale_model as sm
    from ddp_vs_torch import efficiency

    if not run.get("profile") or not run.get("link_mbit") or not row.get("comm_ms"):
        return None
    scale = {"none": 1.0, "fp16": 0.5, "bf16": 0.5}.get(run["hook"])
    if scale is None:
        return None
    prof = sm.calibrated(run["profile"], row["bare_ms"])
    step = sm.predict(
        prof,
        run["world_size"],
        50e-6,
        run["link_mbit"] * 1e6 / 8,
        row["bucket_cap_mb"],
        True,
        scale,
    )
    return efficiency(row["bare_ms"], row["comm_ms"], step * 1e3)


def with_iqr(run, key, cap, median):
    """'median [p25-p75]' from a ddp_vs_torch run's quartiles."""
    q = (run.get("quartiles_ms") or {}).get(key if cap is None else f"{key}@{cap:g}")
    if median is None or not q:
        return fmt(median)
    return f"{median:.1f} [{q[0]:.0f}-{q[1]:.0f}]"


def cpu_model():
    """The CPU's model name as /proc/cpuinfo gives it (or the platform's processor string)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(log, quick):
    """summary.md + PNGs from whatever JSON is present."""
    import plots

    cmds = {name: " ".join(argv) for _, name, argv in commands(quick)}
    prev = RESULTS / "run_log.json"
    if prev.exists():  # keep the commands of parts run earlier (--only / --report-only)
        for k, v in json.loads(prev.read_text()).items():
            log.setdefault(k, v)
    prev.write_text(json.dumps(log, indent=1))

    def cmd_of(name):
        return f"`{log.get(name, {}).get('command') or cmds.get(name)}`"

    md = [
        "# torchlane benchmark results",
        "",
        "Generated by `make bench` (`python benchmarks/run_all.py`). Machine: "
        f"{os.cpu_count()} CPU cores (shared and noisy: variants alternate in rounds and the figures are medians; "
        "each step time is the slowest rank's; [p25-p75] is the interquartile range of the steps). "
        "ratio = torchlane / torch (< 1: torchlane faster).",
        "",
    ]

    cpus = {}
    for name, entry in log.items():
        if entry.get("command"):
            cpus.setdefault(entry.get("cpu", "not recorded"), []).append(name)
    for cpu, names in sorted(cpus.items()):
        md += [f"CPU {cpu}: {', '.join(sorted(names))}.", ""]

    d = load("ddp_loopback_n2.json")
    if d:
        md += [
            "## torch DDP vs torchlane DDP (2 ranks, Gloo, loopback)",
            "",
            f"Command: {cmd_of('ddp_loopback_n2.json')}",
            "",
            f"Model: {d['params'] / 1e6:.2f}M-parameter GPT ({d['model']['n_layer']} layers, width "
            f"{d['model']['n_embd']}, {d['model']['n_head']} heads, {d['model']['block_size']} tokens), "
            f"batch {d['batch_size']} per rank, SGD; {d['rounds']} rounds x {d['steps_per_round']} steps "
            "per variant after a warm-up round.",
            "",
        ]
        rows = [
            [
                fmt(r["bucket_cap_mb"], "g"),
                with_iqr(d, "bare", None, r["bare_ms"]),
                with_iqr(d, "torch", r["bucket_cap_mb"], r["torch_ms"]),
                with_iqr(d, "torchlane", r["bucket_cap_mb"], r["torchlane_ms"]),
                fmt(r["ratio"], ".3f"),
            ]
            for r in d["results"]
        ]
        md += [
            md_table(["bucket_cap_mb", "bare ms", "torch DDP ms", "torchlane ms", "ratio"], rows),
            "",
        ]
        b = d["best"]
        md += [
            f"Best bucket size: torch {fmt(b['torch_ms'])} ms at {fmt(b['torch_cap_mb'], 'g')} MB, torchlane "
            f"{fmt(b['torchlane_ms'])} ms at {fmt(b['torchlane_cap_mb'], 'g')} MB: ratio {fmt(b['ratio'], '.3f')}.",
            "",
        ]

    sizes = [x for x in (load(f"ddp_size_{m}M.json") for m in SIZES_M) if x]
    if sizes:
        plots.plot_size_sweep(sizes, RESULTS / "step_time_vs_size.png")
        md += [
            "## Step time vs model size (2 ranks, loopback)",
            "",
            "![step time vs size](step_time_vs_size.png)",
            "",
        ]
        rows = [
            [
                f"{s['params'] / 1e6:.1f}M",
                with_iqr(s, "bare", None, s["bare_ms"]),
                with_iqr(s, "torch", 25.0, s["torch_ms"]),
                with_iqr(s, "torchlane", 25.0, s["torchlane_ms"]),
                fmt(s["ratio"], ".3f"),
            ]
            for s in sorted(sizes, key=lambda s: s["params"])
        ]
        md += [
            md_table(["params", "bare ms", "torch DDP ms", "torchlane ms", "ratio"], rows),
            "",
            "Commands: "
            + ", ".join(
                cmd_of(f"ddp_size_{m}M.json") for m in SIZES_M if load(f"ddp_size_{m}M.json")
            ),
            "",
        ]

    a = load("attention_seq.json")
    if a:
        plots.plot_attention(a, RESULTS / "attention.png")
        md += [
            "## Attention: torchlane.attention vs SDPA",
            "",
            f"Command: {cmd_of('attention_seq.json')}",
            "",
            "![attention GFLOP/s](attention.png)",
            "",
        ]
        rows = [
            [
                r["dtype"],
                r["S"],
                r["D"],
                "yes" if r["causal"] else "no",
                "fwd+bwd" if r["backward"] else "fwd",
                fmt(r["gflops"]["sdpa"], ".2f"),
                fmt(r["gflops"]["torchlane"], ".2f"),
                fmt(r["ratio_sdpa"], ".2f"),
                fmt(r["frac_matmul"], ".2f"),
            ]
            for r in a["rows"]
        ]
        md += [
            md_table(
                [
                    "dtype",
                    "S",
                    "D",
                    "causal",
                    "pass",
                    "SDPA GFLOP/s",
                    "torchlane GFLOP/s",
                    "speed-up (SDPA time / torchlane)",
                    "torchlane / matmul",
                ],
                rows,
            ),
            "",
            f"{a['device']}, B={a['batch']}, H={a['heads']}, {a['threads']} thread(s), "
            f"{a['stat']} time of {a['rounds']} interleaved rounds."
            + (f" {a['note']}" if a.get("note") else ""),
            "",
        ]

    hooks = [
        x
        for x in (
            load(f"ddp_link{LINK_MBIT}_n2_hook-{h}.json")
            for h in ("none", "fp16", "bf16", "powersgd", "topk")
        )
        if x
    ]
    if hooks:
        plots.plot_hooks(hooks, RESULTS / "hooks.png")
        md += [
            f"## Gradient compression at {LINK_MBIT} Mbit/s (2 ranks, shaped loopback)",
            "",
            "![hooks](hooks.png)",
            "",
        ]
        rows = []
        for h in hooks:
            h = {
                **h,
                **next((r for r in h["results"] if r["bucket_cap_mb"] == 25.0), h["results"][0]),
            }
            nohook = h.get("torch_nohook_ms") if h["hook"] != "none" else h["torch_ms"]
            rows.append(
                [
                    h["hook"],
                    fmt(h["bare_ms"]),
                    fmt(nohook),
                    fmt(h["torch_ms"] if h["hook"] != "topk" else None),
                    fmt(h["torchlane_ms"]),
                    fmt(
                        nohook / h["torchlane_ms"] if nohook and h["torchlane_ms"] else None, ".2f"
                    ),
                    fmt(h["ratio"] if h["hook"] != "topk" else None, ".3f"),
                    cmd_of(f"ddp_link{LINK_MBIT}_n2_hook-{h['hook']}.json"),
                ]
            )
        md += [
            md_table(
                [
                    "hook",
                    "bare ms",
                    "torch no hook ms",
                    "torch + same hook ms",
                    "torchlane + hook ms",
                    "speed-up vs torch no hook",
                    "torchlane / torch same hook",
                    "command",
                ],
                rows,
            ),
            "",
        ]
        eff = [(h, r) for h in hooks for r in h["results"] if r.get("efficiency_torch") is not None]
        if eff:
            md += [
                "Overlap efficiency (T_compute + T_comm - T_step) / min(T_compute, T_comm), 1.0 = "
                "fully hidden. 'bound' is the efficiency of the scale model's step (forward + "
                "max(backward, last bucket done) + optimizer, the same buckets, measured gradient-ready "
                "times): what a DDP that launches every bucket the moment it is ready can reach, since "
                "no gradient can be reduced before it exists nor the optimizer run before all are.",
                "",
                md_table(
                    [
                        "hook",
                        "bucket MB",
                        "T_compute ms",
                        "T_comm ms",
                        "torch DDP",
                        "torchlane",
                        "bound",
                    ],
                    [
                        [
                            h["hook"],
                            fmt(r["bucket_cap_mb"], "g"),
                            fmt(r["bare_ms"]),
                            fmt(r["comm_ms"]),
                            fmt(r["efficiency_torch"], ".2f"),
                            fmt(r["efficiency_torchlane"], ".2f"),
                            fmt(efficiency_bound(h, r), ".2f"),
                        ]
                        for h, r in eff
                    ],
                ),
                "",
            ]
        none = load(f"ddp_link{LINK_MBIT}_n2_hook-none.json")
        if none and plots.plot_timeline(none, RESULTS / "timeline.png"):
            md += [
                "### One step on the timeline (torchlane, comm_stats)",
                "",
                "![timeline](timeline.png)",
                "",
            ]

    s = load("scale_model.json")
    if s:
        md += [
            "## Scaling model (benchmarks/scale_model.py)",
            "",
            f"Command: {cmd_of('scale_model.json')}",
            "",
            "![scale model](scale_model.png)",
            "",
        ]
        if s["validation"]:
            md += [
                md_table(
                    [
                        "N",
                        "link",
                        "hook",
                        "bucket MB",
                        "variant",
                        "measured ms",
                        "predicted ms",
                        "error",
                    ],
                    [
                        [
                            v["world_size"],
                            f"{v['link_mbit']:g} Mbit/s",
                            v["hook"],
                            fmt(v["bucket_cap_mb"], "g"),
                            v["variant"],
                            fmt(v["measured_ms"]),
                            fmt(v["predicted_ms"]),
                            f"{v['error'] * 100:+.1f}%",
                        ]
                        for v in s["validation"]
                    ],
                ),
                "",
            ]
        ns = [2, 8, 64, 256, 1024]
        scales = sorted({e.get("compute_scale", 1.0) for e in s["extrapolation"]}, reverse=True)
        rows = []
        for k in scales:
            for entry in s["links"]:
                effs = {
                    e["world_size"]: e["efficiency"]
                    for e in s["extrapolation"]
                    if e["link"] == entry["name"] and e.get("compute_scale", 1.0) == k
                }
                rows.append([entry["name"], f"x{k:g}"] + [fmt(effs.get(n), ".2f") for n in ns])
        md += [
            f"Predicted scaling efficiency T(1)/T(N) for the {(s.get('model_params') or 0) / 1e6:.1f}M-"
            f"parameter GPT (measured step {s.get('compute_ms', 0):.0f} ms on this CPU; x0.01 = the same "
            "step on a device 100x faster), ring all-reduce, alpha 5 us, 25 MB buckets:",
            "",
            md_table(["link", "compute"] + [f"N={n}" for n in ns], rows),
            "",
        ]

    skipped = [f"- {k}: {v['skipped']}" for k, v in log.items() if "skipped" in v]
    failed = [f"- {k}: exit status {v['rc']}" for k, v in log.items() if v.get("rc")]
    if skipped or failed:
        md += ["## Not run", ""] + skipped + failed + [""]
    (RESULTS / "summary.md").write_text("\n".join(md))
    print(f"[run_all] wrote {RESULTS / 'summary.md'}")


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--hooks", default=",".join(HOOKS), help="hooks for the 'hooks' part")
    args = p.parse_args()
    parts = [x for x in args.only.split(",") if x]
    bad = set(parts) - set(PARTS)
    if bad:
        p.error(f"--only: unknown part(s) {sorted(bad)}; choose from {','.join(PARTS)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = {}
    if not args.report_only:
        hooks = [h for h in args.hooks.split(",") if h]
        if set(hooks) - set(HOOKS):
            p.error(
                f"--hooks: unknown {sorted(set(hooks) - set(HOOKS))}; choose from {','.join(HOOKS)}"
            )
        run_parts(parts, args.quick, log, hooks)
    report(log, args.quick)


if __name__ == "__main__":
    main()
