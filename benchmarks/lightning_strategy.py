"""Lightning's "ddp" strategy vs torchlane's "torchlane_ddp", side by side in the same processes.

    python benchmarks/lightning_strategy.py                   # Lightning launches the 2 ranks
    torchrun --nproc-per-node 2 benchmarks/lightning_strategy.py
    python benchmarks/lightning_strategy.py --params 3e6 --steps 40 --rounds 3

The GPT-style model of examples/gpt.py (random byte tokens) is trained by a LightningModule with
Trainer(strategy="ddp") and Trainer(strategy="torchlane_ddp") on CPU/Gloo, the same weights and
data for both. The two take turns in rounds (the order alternates; the first round is warm-up),
each step is timed from on_train_batch_start to on_train_batch_end (forward, backward with the
gradient all-reduce, optimizer step) and taken as the slowest rank's; the figures are medians
over the measured steps. The losses of the two strategies are compared bitwise. JSON goes to
--json (default benchmarks/results/lightning_strategy.json).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples"), str(HERE.parent / "python")]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=2, help="ranks (CPU processes)")
    p.add_argument("--params", type=float, default=1e6, help="GPT size in parameters")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--block", type=int, default=64, help="sequence length")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per fit")
    p.add_argument("--skip", type=int, default=3, help="first steps of each fit not timed")
    p.add_argument("--rounds", type=int, default=3, help="rounds (the first is warm-up)")
    p.add_argument("--json", default=str(HERE / "results" / "lightning_strategy.json"))
    args = p.parse_args()
    for name in ("devices", "batch", "block", "steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.skip < args.steps:
        p.error(f"--skip must be in [0, --steps), got {args.skip}")
    if args.params <= 0:
        p.error(f"--params must be positive, got {args.params}")
    return args


def make_module(cfg):
    import lightning.pytorch as pl
    from gpt import GPT

    class LitGPT(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.gpt = GPT(cfg)
            self.losses, self.step_times = [], []

        def on_train_batch_start(self, batch, batch_idx):
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.step_times.append(time.perf_counter() - self._t0)

        def training_step(self, batch, _):
            x, y = batch
            _, loss = self.gpt(x, y)
            self.losses.append(loss.detach().clone())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return LitGPT()


def fit(strategy, cfg, args):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(1)
    n = args.devices * args.batch * args.steps
    tokens = torch.randint(0, cfg.vocab_size, (n, args.block + 1), generator=g)
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=args.batch)
    module = make_module(cfg)
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
        logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, data)
    times = torch.tensor(module.step_times[args.skip:], dtype=torch.float64)
    torch.distributed.all_reduce(times, op=torch.distributed.ReduceOp.MAX)  # slowest rank
    return torch.stack(module.losses), times.tolist(), trainer.global_rank


def main():
    args = parse_args()
    import torchlane.integrations.lightning  # noqa: F401  (registers "torchlane_ddp")
    from gpt import config_for_params

    torch.set_num_threads(1)
    cfg = config_for_params(args.params, block_size=args.block, attention="sdpa")
    strategies = ("ddp", "torchlane_ddp")
    times = {s: [] for s in strategies}
    losses, rank = {}, 0
    for r in range(args.rounds):
        for s in strategies if r % 2 == 0 else strategies[::-1]:
            loss, t, rank = fit(s, cfg, args)
            losses[s] = loss
            if r > 0:
                times[s] += t
    if rank != 0:
        return
    med = {s: statistics.median(times[s]) for s in strategies}
    same = torch.equal(losses["ddp"], losses["torchlane_ddp"])
    from gpt import count_params

    print(f"GPT {count_params(cfg) / 1e6:.2f}M params, {args.devices} ranks, batch {args.batch}x"
          f"{args.block}, {args.steps} steps x {args.rounds - 1} measured rounds")
    for s in strategies:
        print(f"  {s:14s} median step {med[s] * 1e3:8.1f} ms")
    ratio = med["ddp"] / med["torchlane_ddp"]
    print(f"  torchlane_ddp / ddp speed: {ratio:.3f}x   losses bitwise equal: {same}")
    out = {"params": count_params(cfg), "devices": args.devices, "batch": args.batch,
           "block": args.block, "steps": args.steps, "rounds": args.rounds,
           "median_step_s": med, "speedup_vs_ddp": ratio, "losses_bitwise_equal": same,
           "final_loss": {s: float(losses[s][-1]) for s in strategies},
           "threads_per_rank": 1, "host_cpus": os.cpu_count()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
