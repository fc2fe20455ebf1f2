"""benchmarks/sharding.py at 2 and 4 ranks for three GPT sizes, and one figure of the results.

    python benchmarks/sharding_sweep.py                 # runs the 6 configurations (~25 min)
    python benchmarks/sharding_sweep.py --report-only   # the table and figure from the JSON

Sizes: n_embd 256 / 6 layers (4.8M parameters), 512 / 8 (25.4M), 768 / 14 (99.5M); batch 4 x 64
tokens per rank, 3 steps (the first untimed). Writes benchmarks/results/sharding_n{2,4}_{5M,25M,
100M}.json (one per run) and sharding_sweep.png: per-rank counted bytes (parameters, gradients,
optimizer state) and peak RSS against the parameter count, per variant.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SIZES = (("5M", 256, 6), ("25M", 512, 8), ("100M", 768, 14))
WORLDS = (2, 4)


def path(world, name):
    return RESULTS / f"sharding_n{world}_{name}.json"


def run():
    for world in WORLDS:
        for name, n_embd, n_layer in SIZES:
            cmd = [sys.executable, str(HERE / "sharding.py"), "--world", str(world)]
            cmd += ["--n-embd", str(n_embd), "--n-layer", str(n_layer), "--steps", "3"]
            cmd += ["--batch", "4", "--block-size", "64", "--out", str(path(world, name))]
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True)


def report():
    runs = {}
    for world in WORLDS:
        for name, _, _ in SIZES:
            if path(world, name).exists():
                runs[(world, name)] = json.loads(path(world, name).read_text())
    if not runs:
        raise SystemExit("no results: run without --report-only first")
    print("| ranks | params | variant | MB/rank counted | ZeRO formula | peak RSS MB | step / DDP |")
    print("|---|---|---|---|---|---|---|")
    for (world, _name), d in runs.items():
        ddp = d["results"]["ddp"]["step_ms"]
        for v, r in d["results"].items():
            if "error" in r:
                continue
            print(
                f"| {world} | {d['n_params'] / 1e6:.1f}M | {v} | "
                f"{r['total_bytes_max_rank'] / 1e6:.0f} | {r['formula_bytes'] / 1e6:.0f} | "
                f"{r['rss_peak_bytes_max_rank'] / 1e6:.0f} | {r['step_ms'] / ddp:.2f} |"
            )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(2, len(WORLDS), figsize=(11, 8), squeeze=False)
    for col, world in enumerate(WORLDS):
        mine = [d for (w, _), d in runs.items() if w == world]
        variants = list(mine[0]["results"]) if mine else []
        for v in variants:
            pts = [(d["n_params"] / 1e6, d["results"][v]) for d in mine]
            pts = [(p, r) for p, r in pts if "error" not in r]
            xs = [p for p, _ in pts]
            axes[0][col].plot(xs, [r["total_bytes_max_rank"] / 1e6 for _, r in pts], "o-",
                              label=v)  # fmt: skip
            axes[1][col].plot(xs, [r["rss_peak_bytes_max_rank"] / 1e6 for _, r in pts], "o-",
                              label=v)  # fmt: skip
        axes[0][col].set(title=f"{world} Gloo ranks: params + grads + optimizer state",
                         ylabel="MB per rank (counted)")  # fmt: skip
        axes[1][col].set(title=f"{world} ranks: peak RSS (torch included)",
                         ylabel="MB per rank", xlabel="GPT parameters (M)")  # fmt: skip
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "sharding_sweep.png", dpi=100)
    print(f"wrote {RESULTS / 'sharding_sweep.png'}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if not args.report_only:
        run()
    report()


if __name__ == "__main__":
    main()
