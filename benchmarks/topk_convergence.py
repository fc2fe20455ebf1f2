"""Top-k compression recipes on the tiny GPT of tests/test_hooks_ddp.py, over several seeds.

    python benchmarks/topk_convergence.py                  # 5 seeds, all recipes (~5 min, 2 cores)
    python benchmarks/topk_convergence.py --seeds 0 --steps 20 --recipes 0.1-dgc   # a quick look

Two Gloo ranks train the test's character-level transformer (Adam, lr 3e-3, 300 steps) without a
hook and with torchlane.hooks.topk under each recipe, and report the final held-out loss relative
to the uncompressed run of the same seed, and the bytes each rank sent as a fraction of the
uncompressed bytes (warm-up steps included). Seed 0 is exactly the test's run; other seeds change
the initial weights and the training batches. A markdown table goes to stdout, JSON to --json.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "python")]

import dist  # noqa: E402
import test_hooks_ddp as gpt  # noqa: E402

# name -> TopKState arguments; the test uses 0.1-dgc and 0.01-dgc-layerwise.
RECIPES = {
    "0.1": dict(ratio=0.1),
    "0.1-start10": dict(ratio=0.1, start_iter=10),
    "0.1-dgc": dict(ratio=0.1, start_iter=10, ratio_warmup_iters=30),
    "0.1-dgc-layerwise": dict(ratio=0.1, start_iter=10, ratio_warmup_iters=30, layerwise=True),
    "0.01": dict(ratio=0.01),
    "0.01-start10": dict(ratio=0.01, start_iter=10),
    "0.01-start10-layerwise": dict(ratio=0.01, start_iter=10, layerwise=True),
    "0.01-dgc": dict(ratio=0.01, start_iter=10, ratio_warmup_iters=100),
    "0.01-dgc-layerwise": dict(ratio=0.01, start_iter=10, ratio_warmup_iters=100, layerwise=True),
}


def _job(rank, world, recipes, seeds, steps):
    import torchlane
    from torchlane import hooks

    gpt.GPT_STEPS = steps
    data, vocab = gpt._corpus()
    out = {}
    for seed in seeds:
        ddp = torchlane.DistributedDataParallel
        out[("none", seed)] = (gpt._train_gpt(ddp, None, None, rank, data, vocab, seed=seed), 1.0)
        for name in recipes:
            sent = []
            state = hooks.TopKState(**RECIPES[name])
            loss = gpt._train_gpt(ddp, state, hooks.topk, rank, data, vocab, sent, seed=seed)
            out[(name, seed)] = (loss, sum(sent) / len(sent))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=gpt.GPT_STEPS)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = args.recipes.split(",")
    for name in recipes:
        if name not in RECIPES:
            parser.error(f"--recipes: unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    res = dist.run(_job, world_size=2, args=(recipes, seeds, args.steps), timeout=7200)[0]

    rows = []
    print(f"tiny GPT, 2 ranks, Adam lr 3e-3, {args.steps} steps; final held-out loss")
    head = " | ".join(f"seed {s}" for s in seeds)
    print(f"| recipe | TopKState | {head} | mean | worst | bytes sent |")
    print("|---|---|" + "---|" * len(seeds) + "---|---|---|")
    base = [res[("none", s)][0] for s in seeds]
    print("| none | - | " + " | ".join(f"{b:.4f}" for b in base) + " | | | 1.000 |")
    for name in recipes:
        losses = [res[(name, s)][0] for s in seeds]
        rel = [100 * (loss / b - 1) for loss, b in zip(losses, base, strict=True)]
        sent = statistics.mean(res[(name, s)][1] for s in seeds)
        kwargs = ", ".join(f"{k}={v}" for k, v in RECIPES[name].items())
        cells = " | ".join(f"{loss:.4f} ({r:+.1f}%)" for loss, r in zip(losses, rel, strict=True))
        print(
            f"| {name} | {kwargs} | {cells} | {statistics.mean(rel):+.2f}% | {max(rel):+.2f}% "
            f"| {sent:.3f} |"
        )
        rows.append(
            dict(
                recipe=name,
                state=RECIPES[name],
                losses=losses,
                relative_pct=rel,
                bytes_sent_fraction=sent,
            )
        )
    if args.json:
        cmd = "python benchmarks/topk_convergence.py " + " ".join(sys.argv[1:])
        out = dict(command=cmd.strip(), steps=args.steps, seeds=seeds, none=base, recipes=rows)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
