"""Train a small byte-level GPT with data parallelism.

    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py            # what `make demo` runs
    torchrun --nproc-per-node 2 examples/train_gpt.py --ddp torch --attention sdpa   # the torch baseline
    torchrun --nproc-per-node 8 examples/train_gpt.py --device cuda --dtype bf16 --data my.txt
    python examples/train_gpt.py --max-steps 20                                # one process, no DDP

CPU with Gloo by default, --device cuda with NCCL. The corpus defaults to the Python standard
library's source (present on every machine); --data takes any text file or folder. Rank 0 shows a
progress bar, evaluates periodically, writes a JSON-lines log and checkpoints to --out-dir, and
prints sampled text at the end. --resume continues from the last checkpoint in --out-dir;
under torchrun the default is --resume auto: a restarted attempt (--max-restarts) resumes from the
newest valid checkpoint and appends to log.jsonl, a first attempt without one starts fresh.
"""

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# Use the checkout's torchlane (built in place by `make build`) when run from the repository.
if (HERE.parent / "python" / "torchlane" / "__init__.py").exists():
    sys.path.insert(1, str(HERE.parent / "python"))

import corpus  # noqa: E402
from gpt import ATTENTION_BACKENDS, GPT, GPTConfig  # noqa: E402

HOOKS = ("none", "fp16", "bf16", "powersgd", "topk")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a("--data", default=None, help="text file or folder (default: the Python stdlib's source)")
    a("--max-data-mb", type=float, default=4.0, help="read at most this many MB of the corpus")
    a("--device", choices=("cpu", "cuda"), default="cpu")
    a("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    a("--ddp", choices=("torchlane", "torch"), default="torchlane")
    a(
        "--attention",
        choices=("auto", *ATTENTION_BACKENDS),
        default="auto",
        help="auto: torchlane.attention when this torchlane build has it, else sdpa",
    )
    a("--hook", choices=HOOKS, default="none", help="gradient compression comm hook")
    a("--bucket-cap-mb", type=float, default=25.0)
    a("--n-layer", type=int, default=4)
    a("--n-head", type=int, default=4)
    a("--n-embd", type=int, default=128)
    a("--block-size", type=int, default=128)
    a("--dropout", type=float, default=0.0)
    a("--batch-size", type=int, default=8, help="sequences per rank per micro-step")
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--max-steps", type=int, default=500)
    a("--lr", type=float, default=3e-3)
    a("--min-lr", type=float, default=3e-4)
    a("--warmup-steps", type=int, default=20)
    a("--weight-decay", type=float, default=0.1)
    a("--clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    a("--eval-every", type=int, default=100)
    a("--eval-batches", type=int, default=8)
    a("--ckpt-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    a("--out-dir", default="runs/train_gpt")
    a(
        "--resume",
        nargs="?",
        const="yes",
        choices=("auto", "yes", "no"),
        default=None,
        help="yes (the bare flag): continue from the newest checkpoint in <out-dir>/checkpoints, "
        "which must exist; auto: from it if there is one, else start fresh (the default under "
        "torchrun, so that --max-restarts resumes); no: start fresh (the default otherwise)",
    )
    a(
        "--stop-at",
        type=int,
        default=None,
        help="stop with a checkpoint at this step (the schedule still runs to --max-steps): split a run into jobs",
    )
    a("--sample-tokens", type=int, default=300)
    a("--prompt", default="def ")
    a("--seed", type=int, default=1337)
    a("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    args = p.parse_args(argv)
    if args.resume is None:  # torchrun (elastic agent) sets TORCHELASTIC_RESTART_COUNT
        args.resume = "auto" if "TORCHELASTIC_RESTART_COUNT" in os.environ else "no"
    if args.attention == "auto":
        args.attention = "torchlane" if _torchlane_has("attention") else "sdpa"
    for name in (
        "max_steps",
        "batch_size",
        "grad_accum",
        "block_size",
        "eval_every",
        "eval_batches",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _torchlane_has(name):
    try:
        import torchlane
    except ImportError:
        return False
    return hasattr(torchlane, name)


# ----------------------------------------------------------------------------- distributed set-up


def setup_distributed(args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # One compute thread per rank per core, so ranks do not oversubscribe the CPU.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    return rank, world, device


def wrap_ddp(model, args, device):
    kwargs = {"bucket_cap_mb": args.bucket_cap_mb}
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index]
    if args.ddp == "torch":
        from torch.nn.parallel import DistributedDataParallel as DDP
    else:
        import torchlane

        if not hasattr(torchlane, "DistributedDataParallel"):
            raise SystemExit(
                "--ddp torchlane: this build of torchlane has no DistributedDataParallel yet; "
                "run with --ddp torch, or rebuild torchlane (make build)."
            )
        DDP = torchlane.DistributedDataParallel
    ddp = DDP(model, **kwargs)
    if args.hook != "none":
        register_hook(ddp, args.ddp, args.hook)
    return ddp


def torch_bf16_compress_hook(process_group, bucket):
    """torch's bf16_compress_hook, whose name torch DDP refuses unless the backend is NCCL: the
    same body (torch's own default_hooks._compress_hook) under another name, so it runs on Gloo."""
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks._compress_hook(torch.bfloat16, process_group, bucket)


def register_hook(ddp, flavour, hook):
    """The same compression on both sides: torch's own Python hooks vs torchlane.hooks."""
    if flavour == "torch":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks as dh
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

        if hook == "fp16":
            ddp.register_comm_hook(None, dh.fp16_compress_hook)
        elif hook == "bf16":
            # torch DDP refuses bf16_compress_hook by name unless on NCCL; register its body.
            ddp.register_comm_hook(None, torch_bf16_compress_hook)
        elif hook == "powersgd":
            state = ps.PowerSGDState(None, matrix_approximation_rank=4, start_powerSGD_iter=2)
            ddp.register_comm_hook(state, ps.powerSGD_hook)
        else:
            raise SystemExit(f"--hook {hook}: torch DDP has no built-in equivalent")
        return
    import torchlane.hooks as th

    if hook == "fp16":
        ddp.register_comm_hook(None, th.fp16_compress)
    elif hook == "bf16":
        ddp.register_comm_hook(None, th.bf16_compress)
    elif hook == "powersgd":
        ddp.register_comm_hook(th.PowerSGDState(rank=4, start_powerSGD_iter=2), th.powersgd)
    elif hook == "topk":
        ddp.register_comm_hook(th.TopKState(ratio=0.01), th.topk)


# ----------------------------------------------------------------------------- optimisation


def make_optimizer(model, args):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def lr_at(step, args):
    """Linear warm-up, then cosine decay from lr to min_lr over the remaining steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    span = max(1, args.max_steps - args.warmup_steps)
    progress = min(1.0, (step - args.warmup_steps) / span)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def autocast(args, device):
    if args.dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(raw_model, val_tokens, args, device, world):
    """Mean validation loss over the same eval_batches windows on every call, averaged over ranks.

    Runs on the unwrapped module, so no collective is issued by the forward passes.
    """
    raw_model.eval()
    g = torch.Generator().manual_seed(args.seed + 7 + int(os.environ.get("RANK", "0")))
    total = torch.zeros((), device=device)
    for _ in range(args.eval_batches):
        x, y = corpus.random_batch(val_tokens, args.block_size, args.batch_size, g)
        with autocast(args, device):
            _, loss = raw_model(x.to(device), y.to(device))
        total += loss.float()
    total /= args.eval_batches
    if world > 1:
        dist.all_reduce(total)
        total /= world
    raw_model.train()
    return total.item()


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint_module():
    try:
        from torchlane import checkpoint
    except ImportError:
        return None
    return checkpoint


def save_checkpoint(ckpt_dir, raw_model, optimizer, step, batches, best_val, rank):
    """Every rank calls this. torchlane.checkpoint when available (crash-safe file per step,
    every rank's RNG state, replicas checked to agree); otherwise rank 0 writes a plain
    torch.save file, renamed into place so a crash never leaves a truncated checkpoint."""
    best = float("nan") if best_val is None else float(best_val)
    ck = _checkpoint_module()
    if ck is not None:
        # A run's steps only go forward, unless it started fresh (--resume no) in an out-dir
        # that holds an older run's later steps: those are replaced (Note [Checkpoint retention]).
        return ck.save(
            ckpt_dir,
            raw_model,
            optimizer,
            step,
            data_position=batches.state(),
            best_val=best,
            discard_newer=True,
        )
    path = Path(ckpt_dir) / "last.pt"
    if rank == 0:
        state = {
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "data_position": batches.state(),
            "best_val": best,
            "torch_rng": torch.get_rng_state(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
    return str(path)


def load_checkpoint(ckpt_dir, raw_model, optimizer, batches):
    """(step, best_val) of the newest checkpoint in ckpt_dir, restored into the model, optimizer
    and data position; None when there is none."""
    ck = _checkpoint_module()
    if ck is not None:
        info = ck.load(ckpt_dir, raw_model, optimizer, missing_ok=True)
        if info is None:
            return None
        step, position, best = info.step, info.data_position, info.extra.get("best_val")
    else:
        path = Path(ckpt_dir) / "last.pt"
        if not path.exists():
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step, position, best = state["step"], state["data_position"], state["best_val"]
    batches.load_state(position)
    return step, (None if best is None or math.isnan(best) else best)


# ----------------------------------------------------------------------------- logging


class Progress:
    """tqdm bar on rank 0 when tqdm is installed and not disabled, else periodic plain lines."""

    def __init__(self, rank, total, initial, plain):
        self.rank, self.bar = rank, None
        if rank == 0 and not plain:
            try:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True
                )
            except ImportError:
                pass

    def update(self, step, loss, tok_s, step_ms, lr):
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", step_ms=f"{step_ms:.0f}", lr=f"{lr:.1e}"
            )
            self.bar.update(1)
        elif step % 10 == 0:
            print(
                f"step {step:5d}  loss {loss:.4f}  {tok_s:,.0f} tok/s  {step_ms:.0f} ms/step  lr {lr:.2e}",
                flush=True,
            )

    def write(self, msg):
        if self.rank != 0:
            return
        (self.bar.write if self.bar is not None else print)(msg)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class JsonLog:
    def __init__(self, path, rank, append):
        self.f = None
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(path, "a" if append else "w")

    def __call__(self, **record):
        if self.f is not None:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()


# ----------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    random.seed(args.seed + rank)  # Python's and numpy's streams too; the checkpoint restores them
    try:
        import numpy as np

        np.random.seed(args.seed + rank)
    except ImportError:
        pass

    data, description = corpus.load_bytes(args.data, int(args.max_data_mb * 1e6))
    train_tokens, val_tokens = corpus.split(data)
    batches = corpus.ShardedBatches(
        train_tokens, args.block_size, args.batch_size, rank, world, args.seed
    )

    cfg = GPTConfig(
        256, args.block_size, args.n_layer, args.n_head, args.n_embd, args.dropout, args.attention
    )
    raw_model = GPT(cfg).to(device)
    optimizer = make_optimizer(raw_model, args)
    out_dir = Path(args.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    step, best_val = 0, None
    resumed = False
    if args.resume != "no":
        loaded = load_checkpoint(ckpt_dir, raw_model, optimizer, batches)
        if loaded is None and args.resume == "yes":
            raise SystemExit(f"--resume: no checkpoint in {ckpt_dir}")
        if loaded is not None:
            step, best_val = loaded
            resumed = True
    model = wrap_ddp(raw_model, args, device) if world > 1 else raw_model

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    log = JsonLog(out_dir / "log.jsonl", rank, append=resumed or attempt > 0)
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * world
    if rank == 0:
        print(
            f"corpus: {description}\n"
            f"model: {raw_model.num_params() / 1e6:.2f}M parameters {cfg.to_dict()}\n"
            f"{world} rank(s) on {device.type}, ddp={args.ddp if world > 1 else 'none'}, "
            f"attention={args.attention}, "
            f"hook={args.hook}, dtype={args.dtype}, {tokens_per_step} tokens/step, "
            f"{batches.batches_per_epoch} batches/epoch/rank"
            + (f", resumed at step {step} (attempt {attempt})" if resumed else ""),
            flush=True,
        )
        log(
            type="config",
            args=vars(args),
            config=cfg.to_dict(),
            world_size=world,
            params=raw_model.num_params(),
            corpus=description,
            resumed_at=step if resumed else None,
            attempt=attempt,
        )

    progress = Progress(rank, args.max_steps, step, args.no_progress)
    if step == 0 or step % args.eval_every == 0:
        val = evaluate(raw_model, val_tokens, args, device, world)
        progress.write(f"step {step:5d}  val loss {val:.4f}")
        log(type="val", step=step, val_loss=val)
    t_run = time.perf_counter()
    stop = min(args.max_steps, args.stop_at or args.max_steps)
    ckpt_file = None
    while step < stop:
        t0 = time.perf_counter()
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(args.grad_accum):
            x, y = batches.next()
            x, y = x.to(device), y.to(device)
            last = micro == args.grad_accum - 1
            sync = model.no_sync() if (world > 1 and not last) else contextlib.nullcontext()
            with sync:
                with autocast(args, device):
                    _, loss = model(x, y)
                (loss / args.grad_accum).backward()
            loss_sum += loss.item() / args.grad_accum
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        progress.update(step, loss_sum, tokens_per_step / dt, dt * 1e3, lr)
        log(
            type="train",
            step=step,
            loss=loss_sum,
            lr=lr,
            step_ms=dt * 1e3,
            tokens_per_s=tokens_per_step / dt,
        )
        if step % args.eval_every == 0 or step == stop:
            val = evaluate(raw_model, val_tokens, args, device, world)
            best_val = val if best_val is None else min(best_val, val)
            progress.write(f"step {step:5d}  val loss {val:.4f}")
            log(type="val", step=step, val_loss=val)
        if (args.ckpt_every and step % args.ckpt_every == 0) or step == stop:
            ckpt_file = save_checkpoint(
                ckpt_dir, raw_model, optimizer, step, batches, best_val, rank
            )
    progress.close()
    elapsed = time.perf_counter() - t_run

    if rank == 0:
        g = torch.Generator(device=device).manual_seed(args.seed)
        prompt = torch.tensor([list(args.prompt.encode())], dtype=torch.long, device=device)
        out = raw_model.generate(prompt, args.sample_tokens, generator=g)
        text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
        print("\n---- sample ----\n" + text + "\n----------------", flush=True)
        log(type="sample", step=step, text=text)
        log(type="summary", step=step, best_val_loss=best_val, train_seconds=elapsed)
        print(
            f"done: {step} steps, best val loss {best_val:.4f}, log {out_dir / 'log.jsonl'}, checkpoint {ckpt_file}"
        )
    log.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
