"""Routines run inside spawned ranks (tests/dist.py) for test_monitor.py."""

import os
import signal
import time

import torch
import torch.distributed as dist
import torchlane
from torch import nn
from torchlane.monitor import Monitor


def deep_model():
    torch.manual_seed(0)
    # Four 64x64 layers with bucket_cap_mb tiny: one bucket per layer.
    return nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])


def train_monitored(rank, world, run_dir, steps, slow_rank, delay):
    model = torchlane.DistributedDataParallel(deep_model(), bucket_cap_mb=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = Monitor(run_dir, model)
    for step in range(steps):
        mon.start_step()
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step * world + rank))
        if rank == slow_rank and step >= 2:
            time.sleep(delay)  # extra work in the forward of one rank
        loss = model(x).square().mean()
        mon.mark("forward")
        loss.backward()
        mon.mark("backward")
        opt.step()
        opt.zero_grad()
        mon.end_step(loss=loss, tokens=8)
    mon.close()
    return model.comm_stats()["num_buckets"]


def hang_one_rank(rank, world, run_dir, timeout):
    """Rank 1 stops itself (SIGSTOP) in the middle of backward of step 2, when the gradient of
    module[1]'s output is due (layers 3 and 2 done and their buckets sent); rank 0's watchdog
    must report before the process group times out."""
    pids = [None] * world
    dist.all_gather_object(pids, os.getpid())
    model = torchlane.DistributedDataParallel(deep_model(), bucket_cap_mb=0.01)
    mon = Monitor(run_dir, model, watchdog_timeout=timeout, watchdog_poll=0.1)
    x = torch.randn(8, 64)
    try:
        for step in range(4):
            h = model(x)
            if rank == 1 and step == 2:

                def stop(grad):
                    time.sleep(1.0)  # bucket 0 (the last layer) finishes on both ranks first
                    os.kill(os.getpid(), signal.SIGSTOP)
                    return grad

                model.module[1].register_full_backward_pre_hook(lambda m, g: (stop(g[0]),))
            h.square().mean().backward()
            time.sleep(0.3)  # let the watchdogs publish the finished step
    except RuntimeError as e:
        if rank == 0:
            hang_files = [f for f in os.listdir(run_dir) if f.startswith("hang_rank")]
            os.kill(pids[1], signal.SIGKILL)
            mon.close()
            return {
                "error": str(e),
                "hang_files": hang_files,
                "reports": mon.watchdog.reports,
                "buckets": model.comm_stats()["buckets"],
            }
        raise
    return None
