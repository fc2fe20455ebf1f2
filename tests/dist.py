"""Spawn N Gloo ranks on 127.0.0.1 and run a test function on each.

    results = dist.run(fn, world_size=2, args=(...))

`fn(rank, world_size, *args)` must be a module-level function of an importable module; it runs
with the default process group initialised, and its (picklable) return values come back as a
list indexed by rank. An exception on any rank is re-raised here with that rank's traceback.
A rank that does not finish within `timeout` seconds fails the test instead of hanging it.
"""

import datetime
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback

import torch.multiprocessing as mp


def subprocess_env(*paths, **extra):
    """os.environ for a child Python process (a CLI, torchrun) that must import this checkout's
    torchlane: the repo's python/ (and `paths`) first on PYTHONPATH, `extra` variables set."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(root, "python"), *map(str, paths), env.get("PYTHONPATH", "")]
    )
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, pg_timeout, env):
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        try:
            result = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        # Plain pickle: torch's multiprocessing reducers would share tensors through file
        # descriptors that vanish when this process exits.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # report everything, including SystemExit, to the parent
        queue.put((rank, False, traceback.format_exc()))


class RankError(RuntimeError):
    pass


def run(fn, world_size=2, args=(), timeout=180, pg_timeout=60, env=None, may_die=()):
    """may_die: ranks allowed to exit without reporting (their result is None)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, fn, args, queue, pg_timeout, dict(env or {})),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    exited_at = {}
    try:
        while len(results) + len(errors) < world_size and not errors:
            try:
                rank, ok, value = queue.get(timeout=0.2)
                (results if ok else errors)[rank] = pickle.loads(value) if ok else value
                continue
            except queue_mod.Empty:
                pass
            now = time.monotonic()
            for r, p in enumerate(procs):
                if r not in results and r not in errors and p.exitcode is not None:
                    exited_at.setdefault(r, now)
                    if now - exited_at[r] > 3.0 and r in may_die:
                        results[r] = None
                    elif now - exited_at[r] > 3.0:  # its report would have arrived by now
                        errors[r] = f"rank {r} exited with code {p.exitcode} without reporting"
            if now > deadline:
                raise RankError(
                    f"ranks did not finish within {timeout}s (finished: {sorted(results)}, "
                    f"errors: {sorted(errors)})"
                )
        if errors:
            rank = min(errors)
            raise RankError(f"rank {rank} failed:\n{errors[rank]}")
        return [results[r] for r in range(world_size)]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
