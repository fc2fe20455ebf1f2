"""A tiny trainer for test_restart.py, launched with torchrun; resumes from its checkpoints.

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 tests/restart_trainer.py \
        --ckpt-dir DIR --out FINAL.pt [--stall-at STEP --pid-file FILE]

With --stall-at, rank 1 of the first attempt writes its pid to --pid-file when it reaches that
step and waits there to be killed (the test sends it SIGKILL); rank 0 meanwhile blocks in the
gradient all-reduce of the same step, as a real job would.
"""

import argparse
import faulthandler
import gc
import os
import time

import torch
import torch.distributed as dist
import torchlane
from torchlane import checkpoint

DDP = getattr(torchlane, "DistributedDataParallel", torch.nn.parallel.DistributedDataParallel)


def main():
    faulthandler.enable(all_threads=True)  # a fatal signal (abort, segfault) prints every stack
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--stall-at", type=int, default=-1)
    p.add_argument("--pid-file")
    args = p.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    torch.manual_seed(100 + rank)  # per-rank streams (dropout, data): the checkpoint restores them
    model = DDP(
        torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Dropout(0.2), torch.nn.Linear(64, 4)
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    info = checkpoint.load(args.ckpt_dir, model, opt, missing_ok=True)
    start = info.data_position if info else 0
    print(f"rank {rank} attempt {attempt}: starting at step {start}", flush=True)
    for step in range(start, args.steps):
        if step == args.stall_at and rank == 1 and attempt == 0:
            with open(args.pid_file + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(args.pid_file + ".tmp", args.pid_file)
            time.sleep(120)  # the test kills this process here
        x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % args.save_every == 0:
            checkpoint.save(args.ckpt_dir, model, opt, step, data_position=step + 1)
    if rank == 0:
        params = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        torch.save({"params": params, "attempt": attempt, "resumed_from": start}, args.out)
    # Release the DDP model before the process group. With the model outliving
    # destroy_process_group (freed when main returns), a restarted attempt aborted at exit in
    # 5 of 44 runs here ("terminate called without an active exception", after every line
    # of main had run): Gloo's worker thread destroyed a finished all-reduce's Work during
    # interpreter finalization. torchlane now keeps and releases those itself (Note [Releasing
    # collectives' Work objects]; 0 of 40 runs aborted without these two lines, 1 of 40 before
    # that change); the release stays as a safeguard for this test.
    del model, opt
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
