"""The parameter server's fault tolerance, timed: what a server checkpoint costs per round, how
long a restarted worker takes to rejoin, and how long the workers stall when a server is killed
and restarted from its checkpoint.

    python benchmarks/ps_recovery.py [--params 1000000] [--rounds 60]

1 server + 2 workers on loopback, each a separate process sharing a c10d TCPStore hosted here
(the PS needs no default process group), an MLP of about --params parameters, one inner SGD
step per round (sync_every=1), no staleness bound. Prints and writes
benchmarks/results/ps_recovery.json:
* round time (push + pull, median over the workers' rounds) without server checkpoints and
  with checkpoint_every = 1 and 10 (each checkpoint is written before the update is answered);
* worker rejoin: a worker SIGKILLed mid-run is started again: seconds from the new process's
  start to its first pull (interpreter and torch import included) and for forming its link;
* server restart: the server is SIGKILLed and started again on its checkpoint dir: seconds from
  the kill to the first update the restarted server applies (process start included).
"""

import argparse
import datetime
import json
import multiprocessing as mp
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _model(params):
    import torch

    torch.manual_seed(0)
    width = max(8, int((params / 2) ** 0.5))
    return torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, width)
    )


def _rank(rank, port, args, kw, out, die_at=None):
    t_start = time.time()
    import torch
    import torch.distributed as dist
    import torchlane

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=120))
    model = _model(args.params)
    t0 = time.time()
    ps = torchlane.ps.ParameterServer(
        model, num_servers=1, store=store, rank=rank, world_size=3, heartbeat_timeout_s=60, **kw
    )
    if ps.is_server:
        report = ps.serve()
        out.put((rank, dict(version=report["version"], resumed=ps.resumed_from is not None,
                            first_apply=store.get("bench/first_apply").decode()
                            if ps.resumed_from else None)))
        return
    joined = time.time()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    width = model[0].in_features
    times = []
    for step in range(args.rounds):
        if step == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        x = torch.randn(16, width)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        t = time.perf_counter()
        ps.step()
        times.append(time.perf_counter() - t)
        store.add("bench/rounds", 1)
    ps.close()
    out.put((rank, dict(times=times, start_to_pull=joined - t_start, link=joined - t0)))


def _job(args, server_kw, plan):
    """plan(procs, start, store) drives kills/restarts; returns per-rank results."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()

    def start(rank, kw, die_at=None):
        p = ctx.Process(target=_rank, args=(rank, store.port, args, kw, out, die_at), daemon=True)
        p.start()
        return p

    procs = {0: start(0, server_kw), 1: start(1, {}), 2: start(2, {})}
    extra = plan(procs, start, store) or {}
    results = {}
    while len(results) < 3:
        rank, value = out.get(timeout=600)
        results[rank] = value
    for p in procs.values():
        p.join()
    results.update(extra)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=60)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "python"))
    report = {"params": args.params, "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in (
            ("no_checkpoint", {}),
            ("checkpoint_every_10", dict(checkpoint_dir=f"{tmp}/c10", checkpoint_every=10)),
            ("checkpoint_every_1", dict(checkpoint_dir=f"{tmp}/c1", checkpoint_every=1)),
        ):
            res = _job(args, kw, lambda procs, start, store: None)
            times = res[1]["times"][5:] + res[2]["times"][5:]
            report[f"round_ms_{name}"] = 1e3 * statistics.median(times)
            print(f"round (push + pull), {name}: {report[f'round_ms_{name}']:.1f} ms", flush=True)

        def rejoin(procs, start, store):
            procs[2].kill()  # mid-run, then a new process of rank 2
            procs[2].join()
            procs[2] = start(2, {})
            return {}

        def wait_rounds(store, n):
            while store.add("bench/rounds", 0) < n:
                time.sleep(0.01)

        def rejoin_plan(procs, start, store):
            wait_rounds(store, 20)
            return rejoin(procs, start, store)

        res = _job(args, dict(rejoin_timeout_s=60.0), rejoin_plan)
        report["rejoin_start_to_first_pull_s"] = res[2]["start_to_pull"]
        report["rejoin_link_and_pull_s"] = res[2]["link"]
        print(f"worker rejoin: {res[2]['start_to_pull']:.2f} s from process start to its first "
              f"pull, {res[2]['link']:.3f} s of it forming the link and pulling", flush=True)

        def server_plan(procs, start, store):
            wait_rounds(store, 20)
            procs[0].kill()
            t_kill = time.time()
            procs[0].join()
            procs[0] = start(0, dict(checkpoint_dir=f"{tmp}/srv", checkpoint_every=1))
            before = store.add("bench/rounds", 0)
            while store.add("bench/rounds", 0) == before:
                time.sleep(0.005)
            store.set("bench/first_apply", "1")
            return {"stall_s": time.time() - t_kill}

        res = _job(args, dict(checkpoint_dir=f"{tmp}/srv", checkpoint_every=1), server_plan)
        report["server_restart_stall_s"] = res["stall_s"]
        print(f"server restart: the workers' next round completed {res['stall_s']:.2f} s after "
              f"the kill (restart and checkpoint load included)", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ps_recovery.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
