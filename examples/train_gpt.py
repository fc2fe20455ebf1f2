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
from gpt import ATTENTION_BACKENDS, GPT, GPTConfig, count_params, pipeline_layers  # noqa: E402

HOOKS = ("none", "fp16", "bf16", "powersgd", "topk")


def _cap_mb(text):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'a number of MiB or "auto", got {text!r}') from None


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
    a(
        "--bucket-cap-mb",
        type=_cap_mb,
        default=25.0,
        help='bucket size in MiB, or "auto" (torchlane: tuned during the first steps)',
    )
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
    a(
        "--slow-rank",
        type=int,
        default=-1,
        help="emulate a straggler: this rank sleeps (--slow-factor - 1) x its step's compute "
        "time after each backward (data parallelism, --diloco, --ps; -1: none)",
    )
    a("--slow-factor", type=float, default=2.0, help="--slow-rank: how much slower that rank is")
    a("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    # ---- tensor / pipeline parallel ----
    a("--tp", type=int, default=1, help="tensor-parallel size (world = dp x tp)")
    a("--dp", type=int, default=None, help="data-parallel size (default: world // (tp * pp))")
    a(
        "--sequence-parallel",
        action="store_true",
        help="with --tp: shard LayerNorm/dropout activations along the sequence",
    )
    a("--pp", type=int, default=1, help="pipeline stages (world = pp x dp x tp)")
    a("--microbatches", type=int, default=4, help="micro-batches per pipeline step (--pp > 1)")
    a("--pipeline-schedule", choices=("gpipe", "1f1b"), default="1f1b")
    a(
        "--pipeline-balance",
        default="even",
        help="even, profile, or comma-separated layer counts per stage (n_layer + 2 layers)",
    )
    # ---- data / monitor ----
    a(
        "--sampler",
        choices=("windows", "tokens"),
        default="windows",
        help="windows: fixed-length windows, DistributedSampler-style; tokens: documents (split "
        "at blank lines) balanced by tokens over ranks (torchlane.data.TokenBalancedSampler)",
    )
    a("--pack", action="store_true", help="--sampler tokens: pack documents into full rows")
    # Not "--monitor": torchrun's parser takes it as an abbreviation of its --monitor-interval.
    a("--monitoring", action="store_true", help="per-rank JSONL under <out-dir>/monitor")
    a("--watchdog-s", type=float, default=None, help="--monitoring: hang report after N s")
    # ---- diloco / ps ----
    a("--diloco", type=int, default=0, metavar="H", help="DiLoCo: sync every H inner steps")
    a("--outer-lr", type=float, default=0.7, help="--diloco/--ps: outer SGD learning rate")
    a("--outer-momentum", type=float, default=0.9, help="--diloco/--ps: outer Nesterov momentum")
    a("--streaming", type=int, default=0, metavar="F", help="--diloco: F staggered fragments")
    a("--ps", type=int, default=0, metavar="N_SERVERS", help="async parameter server")
    a("--max-staleness", type=int, default=None, help="--ps: rounds ahead (default: unbounded)")
    a("--ps-sync-every", type=int, default=10, help="--ps: a worker pushes every N steps")
    a(
        "--ps-checkpoint-every",
        type=int,
        default=0,
        help="--ps: each server checkpoints every N applied updates to OUT_DIR/checkpoints/ps "
        "and resumes from there when restarted (0: no server checkpoints)",
    )
    a("--post-local-sgd", type=int, default=0, metavar="H", help="torch's PostLocalSGDOptimizer")
    # ---- sharded data parallel ----
    a(
        "--zero",
        type=int,
        choices=(0, 1, 2, 3),
        default=0,
        help="ZeRO stage (torchlane.ShardedDataParallel): 1 shards the optimizer state, 2 also "
        "the gradients, 3 also the parameters; 0: off (replicated --ddp)",
    )
    a(
        "--reshard-after-forward",
        action="store_true",
        help="--zero 3: gather each bucket just before the module that needs it (forward and "
        "backward, the next one prefetched) and free it after, instead of the whole model",
    )
    a(
        "--mixed-precision",
        choices=("none", "bf16", "bf16-reduce"),
        default="none",
        help="--zero: forward and backward on bf16 copies of the fp32 master shards "
        "(torchlane.MixedPrecision); bf16: gradients reduced in fp32, bf16-reduce: in bf16",
    )
    args = p.parse_args(argv)
    if args.pack and args.sampler != "tokens":
        p.error("--pack needs --sampler tokens")
    if args.bucket_cap_mb == "auto" and args.ddp != "torchlane":
        p.error('--bucket-cap-mb auto needs --ddp torchlane (torch DDP has no autotuning)')
    if args.sampler == "tokens" and (args.tp > 1 or args.pp > 1):
        p.error("--sampler tokens works with data parallelism only (--tp 1 --pp 1)")
    if args.tp < 1 or (args.dp is not None and args.dp < 1):
        p.error(f"--tp and --dp must be >= 1, got --tp {args.tp} --dp {args.dp}")
    if args.diloco < 0 or args.ps < 0 or (args.diloco and args.ps):
        p.error("--diloco H and --ps N_SERVERS must be >= 0, and not both set")
    if args.slow_rank >= 0 and (args.slow_factor < 1 or args.tp > 1 or args.pp > 1):
        p.error("--slow-rank needs --slow-factor >= 1 and no --tp/--pp")
    if args.ps_checkpoint_every < 0 or (args.ps_checkpoint_every and not args.ps):
        p.error("--ps-checkpoint-every must be >= 0 and needs --ps")
    if (args.diloco or args.ps or args.post_local_sgd) and (args.tp > 1 or args.pp > 1):
        p.error("--diloco, --ps and --post-local-sgd work with data parallelism only (--tp 1 --pp 1)")
    if args.zero and (
        args.ddp != "torchlane"
        or args.tp > 1
        or args.pp > 1
        or args.dp is not None
        or args.diloco
        or args.ps
        or args.post_local_sgd
        or args.hook != "none"
    ):
        p.error(
            "--zero works with plain data parallelism on --ddp torchlane only (no --tp, --pp, "
            "--dp, --diloco, --ps, --post-local-sgd or --hook)"
        )
    if args.reshard_after_forward and args.zero != 3:
        p.error("--reshard-after-forward needs --zero 3")
    if args.mixed_precision != "none" and (not args.zero or args.dtype != "fp32"):
        p.error(
            f"--mixed-precision {args.mixed_precision} needs --zero and --dtype fp32 (for "
            "replicated training use --dtype bf16, autocast)"
        )
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
    if args.pp < 1 or args.microbatches < 1:
        p.error("--pp and --microbatches must be >= 1")
    if args.pp > 1:
        if args.batch_size % args.microbatches:
            p.error(
                f"--microbatches {args.microbatches} must divide --batch-size {args.batch_size}"
            )
        if args.grad_accum != 1 or args.resume == "yes" or args.stop_at:
            p.error("--pp > 1 does not support --grad-accum > 1, --resume or --stop-at yet")
        if args.tp > 1 and args.clip > 0:
            p.error("--pp > 1 with --tp > 1 needs --clip 0 (the pipeline's norm is not tp-aware)")
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


def wrap_ddp(model, args, device, process_group=None):
    kwargs = {"bucket_cap_mb": args.bucket_cap_mb, "process_group": process_group}
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


def param_groups(model, args):
    """Weight decay on matrices (embeddings, linear weights), none on biases and norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model, args):
    return torch.optim.AdamW(param_groups(model, args), lr=args.lr, betas=(0.9, 0.95))


def wrap_zero(raw_model, args):
    """--zero: ShardedDataParallel + AdamW on this rank's shards, with make_optimizer's groups."""
    import torchlane

    model = torchlane.ShardedDataParallel(
        raw_model,
        stage=args.zero,
        bucket_cap_mb=args.bucket_cap_mb,
        reshard_after_forward=args.reshard_after_forward,
        mixed_precision=None
        if args.mixed_precision == "none"
        else torchlane.MixedPrecision(
            param_dtype=torch.bfloat16,
            reduce_dtype=torch.bfloat16 if args.mixed_precision == "bf16-reduce" else torch.float32,
            output_dtype=torch.float32,
        ),
    )
    optimizer = torchlane.ShardedOptimizer(
        model,
        torch.optim.AdamW,
        param_groups=param_groups(raw_model, args),
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    return model, optimizer


def full_params(model, args):
    """--zero 3 frees the full parameters between steps: gather them around an evaluation."""
    return model.summon_full_params() if args.zero else contextlib.nullcontext()


def straggle(args, rank, t0):
    """--slow-rank: that rank sleeps so that its step so far takes --slow-factor times as long."""
    if rank == args.slow_rank:
        time.sleep((args.slow_factor - 1) * (time.perf_counter() - t0))


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
def evaluate(raw_model, val_tokens, args, device, world, data_rank=None):
    """Mean validation loss over the same eval_batches windows on every call, averaged over ranks.

    Runs on the unwrapped module, so no DDP collective is issued by the forward passes (a
    tensor-parallel model's own collectives run on every rank). The windows depend on the
    data-parallel rank only (the tensor-parallel ranks of one replica read the same ones).
    """
    raw_model.eval()
    if data_rank is None:
        data_rank = int(os.environ.get("RANK", "0"))
    g = torch.Generator().manual_seed(args.seed + 7 + data_rank)
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


def make_pipeline(raw_model, mesh, args):
    """This rank's stage of the model (--pp): embedding, blocks, norm + head as n_layer + 2 layers
    (built after tensor parallelism swapped the layers, so a stage holds its tp shards)."""
    from torchlane.parallel import pipeline

    balance = args.pipeline_balance
    if balance not in ("even", "profile"):
        try:
            balance = [int(n) for n in balance.split(",")]
        except ValueError:
            raise SystemExit(
                f"--pipeline-balance: even, profile or counts like 2,4; got {balance}"
            ) from None
    return pipeline(
        pipeline_layers(raw_model),
        mesh,
        n_microbatches=args.microbatches,
        schedule=args.pipeline_schedule,
        balance=balance,
    )


def evaluate_any(raw_model, pipe, mesh, val_tokens, args, device, world, dp_rank):
    """evaluate() without a pipeline; with one, the same windows through the stages (every stage
    of a replica draws the same batches), averaged over the dp replicas."""
    if pipe is None:
        return evaluate(raw_model, val_tokens, args, device, world, dp_rank)
    g = torch.Generator().manual_seed(args.seed + 7 + dp_rank)
    total = torch.zeros((), device=device)
    for _ in range(args.eval_batches):
        x, y = corpus.random_batch(val_tokens, args.block_size, args.batch_size, g)
        total += pipe.evaluate(x.to(device), y.to(device), raw_model.cross_entropy)
    total /= args.eval_batches
    dp = mesh["dp"].get_group()
    dist.all_reduce(total, group=dp)
    return (total / dist.get_world_size(dp)).item()


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint_module():
    try:
        from torchlane import checkpoint
    except ImportError:
        return None
    return checkpoint


def save_checkpoint(ckpt_dir, raw_model, optimizer, step, batches, best_val, rank, group=None):
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
            process_group=group,
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


def load_checkpoint(ckpt_dir, raw_model, optimizer, batches, group=None):
    """(step, best_val) of the newest checkpoint in ckpt_dir, restored into the model, optimizer
    and data position; None when there is none."""
    ck = _checkpoint_module()
    if ck is not None:
        info = ck.load(ckpt_dir, raw_model, optimizer, process_group=group, missing_ok=True)
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


# ----------------------------------------------------------------------------- diloco / ps


def make_diloco(raw_model, optimizer, args):
    import torchlane

    hooks = {
        "none": None,
        "bf16": torchlane.hooks.bf16_compress,
        "fp16": torchlane.hooks.fp16_compress,
    }
    if args.hook not in hooks:
        raise SystemExit(f"--diloco supports --hook none, bf16 or fp16, got {args.hook}")
    fragments = max(1, args.streaming)
    return torchlane.DiLoCo(
        raw_model,
        optimizer,
        outer_lr=args.outer_lr,
        outer_momentum=args.outer_momentum,
        nesterov=args.outer_momentum > 0,
        sync_every=args.diloco,
        hook=hooks[args.hook],
        fragments=fragments,
        overlap_steps=1 if fragments > 1 else 0,
    )


def post_local_sgd(ddp, optimizer, args):
    """torch's local SGD (the baseline of --diloco): DDP's post_localSGD_hook all-reduces
    gradients for --warmup-steps steps, then each rank steps alone (a subgroup of one rank, as
    on separate machines) and PeriodicModelAverager averages the parameters every H steps."""
    from torch.distributed.algorithms.ddp_comm_hooks import post_localSGD_hook as plsgd
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        raise SystemExit("--post-local-sgd needs --ddp torch")
    alone, _ = dist.new_subgroups(group_size=1)
    state = plsgd.PostLocalSGDState(None, alone, start_localSGD_iter=args.warmup_steps)
    ddp.register_comm_hook(state, plsgd.post_localSGD_hook)
    averager = PeriodicModelAverager(period=args.post_local_sgd, warmup_steps=args.warmup_steps)
    return PostLocalSGDOptimizer(optim=optimizer, averager=averager)


def main_ps(args, rank, world, device):
    """--ps N: ranks 0..N-1 serve the parameters; the others train, each pushing its change and
    pulling the global parameters every --ps-sync-every steps; worker 0 (rank N) logs."""
    import torchlane

    if world <= args.ps:
        raise SystemExit(f"--ps {args.ps}: needs more than {args.ps} ranks, got {world}")
    data, description = corpus.load_bytes(args.data, int(args.max_data_mb * 1e6))
    train_tokens, val_tokens = corpus.split(data)
    cfg = GPTConfig(
        256, args.block_size, args.n_layer, args.n_head, args.n_embd, args.dropout, args.attention
    )
    raw_model = GPT(cfg).to(device)
    ps_dir = Path(args.out_dir) / "checkpoints" / "ps"
    ps = torchlane.ps.ParameterServer(
        raw_model,
        num_servers=args.ps,
        sync_every=args.ps_sync_every,
        max_staleness=args.max_staleness,
        outer_lr=args.outer_lr,
        outer_momentum=args.outer_momentum,
        nesterov=args.outer_momentum > 0,
        checkpoint_dir=ps_dir if rank < args.ps and args.ps_checkpoint_every else None,
        checkpoint_every=max(args.ps_checkpoint_every, 1),
    )
    if ps.is_server:
        if ps.resumed_from:
            print(f"server {rank}: resumed from {ps.resumed_from} at version "
                  f"{ps.server.version}", flush=True)
        report = ps.serve()
        stale = [r["staleness"] for r in report["log"]]
        print(
            f"server {rank}: applied {report['version']} updates, max staleness "
            f"{max(stale, default=0)}, dead workers {report['dead_workers']}",
            flush=True,
        )
        dist.barrier()
        dist.destroy_process_group()
        return
    worker, workers = rank - args.ps, world - args.ps
    batches = corpus.ShardedBatches(
        train_tokens, args.block_size, args.batch_size, worker, workers, args.seed
    )
    optimizer = make_optimizer(raw_model, args)
    log = JsonLog(Path(args.out_dir) / "log.jsonl", worker, append=False)
    tokens_per_step = args.batch_size * args.block_size * workers
    if worker == 0:
        print(
            f"corpus: {description}\nmodel: {raw_model.num_params() / 1e6:.2f}M parameters\n"
            f"{args.ps} server(s), {workers} worker(s), push every {args.ps_sync_every} steps, "
            f"max staleness {args.max_staleness}",
            flush=True,
        )
        log(type="config", args=vars(args), config=cfg.to_dict(), world_size=world)
    progress = Progress(worker, args.max_steps, 0, args.no_progress)
    val = evaluate(raw_model, val_tokens, args, device, 1, data_rank=0)
    progress.write(f"step {0:5d}  val loss {val:.4f}")
    log(type="val", step=0, val_loss=val)
    t_run, best_val = time.perf_counter(), val
    for step in range(1, args.max_steps + 1):
        t0 = time.perf_counter()
        lr = lr_at(step - 1, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batches.next()
        with autocast(args, device):
            _, loss = raw_model(x.to(device), y.to(device))
        loss.backward()
        straggle(args, rank, t0)
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ps.step()
        dt = time.perf_counter() - t0
        progress.update(step, loss.item(), tokens_per_step / dt, dt * 1e3, lr)
        log(type="train", step=step, loss=loss.item(), lr=lr, step_ms=dt * 1e3)
        if step % args.eval_every == 0 or step == args.max_steps:
            # This worker's copy (pulled at its last push), on the same windows as rank 0 of DDP.
            val = evaluate(raw_model, val_tokens, args, device, 1, data_rank=0)
            best_val = min(best_val, val)
            progress.write(f"step {step:5d}  val loss {val:.4f}")
            log(type="val", step=step, val_loss=val)
    ps.close()
    progress.close()
    elapsed = time.perf_counter() - t_run
    if worker == 0:
        log(type="summary", step=args.max_steps, best_val_loss=best_val, train_seconds=elapsed)
        print(f"done: {args.max_steps} steps, best val loss {best_val:.4f}")
    log.close()
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- main


def document_loss(model, batch, args, device, world):
    """--sampler tokens: this rank's summed next-token loss times world / global token count, so
    that DDP's average is the per-token mean over the whole global step (exact however the
    documents were split; Note [Global token normalisation] in torchlane/data.py)."""
    from torchlane.data import global_token_count, token_normalized_loss

    x, y, n_local = batch[:3]
    x, y = x.to(device), y.to(device)
    kwargs = {}
    if args.pack:
        kwargs = {"cu_seqlens": batch[3], "pos": batch[4].to(device)}
    with autocast(args, device):
        logits = model(x, **kwargs)
    loss_sum = torch.nn.functional.cross_entropy(
        logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100, reduction="sum"
    )
    n = global_token_count(n_local) if world > 1 else n_local
    return token_normalized_loss(loss_sum, max(n, 1), world), loss_sum.item() / max(n_local, 1)


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
    # The data a step reads depends only on (seed, step, dp rank, dp size).
    mesh, dp_rank, dp_size, dp_group = None, rank, world, None
    if args.tp > 1 or args.dp is not None or args.pp > 1:
        from torchlane.parallel import init_mesh

        if world == 1 and args.tp > 1:
            raise SystemExit(f"--tp {args.tp}: launch tp x dp ranks with torchrun")
        mesh = init_mesh(dp=args.dp, tp=args.tp, pp=args.pp)
        dp_rank, dp_size = mesh["dp"].get_local_rank(), mesh["dp"].size()
        dp_group = mesh["dp"].get_group()
    if args.ps:
        return main_ps(args, rank, world, device)

    data, description = corpus.load_bytes(args.data, int(args.max_data_mb * 1e6))
    train_tokens, val_tokens = corpus.split(data)
    if args.sampler == "tokens":
        batches = corpus.DocumentBatches(
            train_tokens, args.block_size, args.batch_size, dp_rank, dp_size, args.seed, args.pack
        )
    else:
        batches = corpus.ShardedBatches(
            train_tokens, args.block_size, args.batch_size, dp_rank, dp_size, args.seed
        )

    cfg = GPTConfig(
        256, args.block_size, args.n_layer, args.n_head, args.n_embd, args.dropout, args.attention
    )
    raw_model = GPT(cfg).to(device)
    out_dir = Path(args.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if args.tp > 1:
        from gpt_tp import parallelize_gpt

        parallelize_gpt(raw_model, mesh["tp"], sequence_parallel=args.sequence_parallel)
        # Each tp rank checkpoints its shards with its data-parallel replicas.
        ckpt_dir = ckpt_dir / f"tp{mesh['tp'].get_local_rank()}-of-{args.tp}"
    if args.zero:
        if world == 1:
            raise SystemExit("--zero: launch 2 or more ranks with torchrun")
        zero_model, optimizer = wrap_zero(raw_model, args)
    else:
        optimizer = make_optimizer(raw_model, args)
    step, best_val = 0, None
    resumed = False
    if args.resume != "no":
        # --zero: each rank loads its shard, from a checkpoint of any world size
        ckpt_model = zero_model if args.zero else raw_model
        loaded = load_checkpoint(ckpt_dir, ckpt_model, optimizer, batches, dp_group)
        if loaded is None and args.resume == "yes":
            raise SystemExit(f"--resume: no checkpoint in {ckpt_dir}")
        if loaded is not None:
            step, best_val = loaded
            resumed = True
    pipe = None
    if args.pp > 1:  # after the optimizer: its groups read the parameters' shapes
        pipe = make_pipeline(raw_model, mesh, args).attach_optimizer(optimizer)
        model = None
    else:
        wrap = dp_size > 1 and not args.diloco and not args.zero
        model = wrap_ddp(raw_model, args, device, dp_group) if wrap else raw_model
        if args.zero:
            model = zero_model
    diloco = make_diloco(raw_model, optimizer, args) if args.diloco else None
    if args.post_local_sgd and world > 1:
        optimizer = post_local_sgd(model, optimizer, args)

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    log = JsonLog(out_dir / "log.jsonl", rank, append=resumed or attempt > 0)
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * dp_size
    if rank == 0:
        print(
            f"corpus: {description}\n"
            f"model: {count_params(cfg) / 1e6:.2f}M parameters {cfg.to_dict()}\n"
            f"{world} rank(s) on {device.type}, ddp={args.ddp if dp_size > 1 else 'none'}"
            f"{f' (ZeRO stage {args.zero})' if args.zero else ''}"
            f"{f' mixed precision {args.mixed_precision}' if args.mixed_precision != 'none' else ''}, "
            f"dp={dp_size}, tp={args.tp}{' (sequence parallel)' if args.sequence_parallel else ''}, "
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
            dp=dp_size,
            tp=args.tp,
            params=count_params(cfg),
            corpus=description,
            resumed_at=step if resumed else None,
            attempt=attempt,
        )

    mon = None
    if args.monitoring:
        from torchlane.monitor import Monitor

        ddp = model if world > 1 and args.ddp == "torchlane" and not args.zero else None
        mon = Monitor(out_dir / "monitor", ddp, rank=rank, watchdog_timeout=args.watchdog_s)
    progress = Progress(rank, args.max_steps, step, args.no_progress)
    if step == 0 or step % args.eval_every == 0:
        with full_params(model, args):
            val = evaluate_any(raw_model, pipe, mesh, val_tokens, args, device, world, dp_rank)
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
        if mon:
            mon.start_step()
        for micro in range(args.grad_accum if pipe is None else 0):
            last = micro == args.grad_accum - 1
            wrapped = model is not raw_model
            sync = model.no_sync() if (wrapped and not last) else contextlib.nullcontext()
            if args.sampler == "tokens":
                with sync:
                    loss, local_mean = document_loss(model, batches.next(), args, device, dp_size)
                    if mon:
                        mon.mark("forward")
                    (loss / args.grad_accum).backward()
                loss_sum += local_mean / args.grad_accum  # this rank's per-token mean (logs)
                continue
            x, y = batches.next()
            x, y = x.to(device), y.to(device)
            with sync:
                with autocast(args, device):
                    _, loss = model(x, y)
                if mon:
                    mon.mark("forward")
                (loss / args.grad_accum).backward()
            loss_sum += loss.item() / args.grad_accum
        if mon:
            mon.mark("backward")
        straggle(args, rank, t0)
        if pipe is not None:
            x, y = batches.next()
            loss_sum = pipe.step(x.to(device), y.to(device), raw_model.cross_entropy).item()
            if args.clip > 0:
                pipe.clip_grad_norm_(args.clip)
        elif args.clip > 0 and args.tp > 1:
            from torchlane.parallel import clip_grad_norm_

            clip_grad_norm_(raw_model, args.clip)  # the norm of the full, unsharded gradient
        elif args.clip > 0 and args.zero:
            optimizer.clip_grad_norm_(args.clip)  # the global norm over every rank's shard
        elif args.clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if diloco is not None:
            diloco.step()
        step += 1
        dt = time.perf_counter() - t0
        if mon:
            mon.end_step(loss=loss_sum)
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
            if diloco is not None:
                diloco.wait()  # no all-reduce in flight while evaluate's runs
            with full_params(model, args):
                val = evaluate_any(raw_model, pipe, mesh, val_tokens, args, device, world, dp_rank)
            best_val = val if best_val is None else min(best_val, val)
            progress.write(f"step {step:5d}  val loss {val:.4f}")
            log(type="val", step=step, val_loss=val)
        # Replicas differ between synchronisations: no checkpoints in --diloco / --post-local-sgd.
        if (
            pipe is None
            and diloco is None
            and not args.post_local_sgd
            and ((args.ckpt_every and step % args.ckpt_every == 0) or step == stop)
        ):
            ckpt_file = save_checkpoint(
                ckpt_dir,
                model if args.zero else raw_model,  # --zero: every rank writes its shard
                optimizer,
                step,
                batches,
                best_val,
                dp_rank,
                dp_group,
            )
    progress.close()
    if mon:
        mon.close()
    elapsed = time.perf_counter() - t_run

    sampler = raw_model
    if pipe is not None:
        if rank == 0:
            print("(--pp: no checkpoint and no sample; the model is split across the stages)")
            log(type="summary", step=step, best_val_loss=best_val, train_seconds=elapsed)
            if pipe.rebalance_log:
                print(f"pipeline re-balances: {pipe.rebalance_log}")
    elif args.zero:  # sample from an unsharded copy (a collective: every rank gathers)
        full = model.full_state_dict()
        if rank == 0:
            sampler = GPT(cfg).to(device)
            sampler.load_state_dict(full)
    elif args.tp > 1:  # sample from an unsharded copy (a collective: every rank gathers)
        from torchlane.parallel import full_state_dict

        full = full_state_dict(raw_model)
        if rank == 0:
            sampler = GPT(cfg).to(device)
            sampler.load_state_dict(full)
    if rank == 0 and pipe is None:
        g = torch.Generator(device=device).manual_seed(args.seed)
        prompt = torch.tensor([list(args.prompt.encode())], dtype=torch.long, device=device)
        out = sampler.generate(prompt, args.sample_tokens, generator=g)
        text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
        print("\n---- sample ----\n" + text + "\n----------------", flush=True)
        log(type="sample", step=step, text=text)
        tuned = getattr(model, "comm_stats", None) and model.comm_stats().get("autotune")
        if tuned:
            print(
                f"bucket autotune: {tuned['state']}, cap {tuned['bucket_cap_mb']} MiB, first "
                f"bucket {tuned['first_bucket_cap_mb']} MiB, {len(tuned['trials'])} tries"
            )
            log(type="autotune", step=step, **tuned)
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
