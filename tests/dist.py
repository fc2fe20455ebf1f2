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


def _store_worker(rank, world_size, port, fn, args, queue, key):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.TCPStore(
            "127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60)
        )
        result = fn(rank, world_size, store, *args)
        queue.put((key, True, pickle.dumps(result)))
    except BaseException:
        queue.put((key, False, traceback.format_exc()))


class StoreJob:
    """Processes that share a c10d TCPStore hosted here (it outlives them) and no default
    process group, so single ranks can be killed and started again:

        job = StoreJob(world_size=3)
        job.start(rank, fn, args)           # fn(rank, world_size, store, *args)
        job.kill(key); job.start(rank, fn, args)    # a restarted process of the same rank
        results = job.wait({(rank, incarnation), ...})

    Results are keyed by (rank, incarnation), incarnation counting starts of that rank from 0.
    """

    def __init__(self, world_size):
        import torch.distributed as dist

        self.world_size = world_size
        self.store = dist.TCPStore(
            "127.0.0.1", 0, is_master=True, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=60),
        )
        self._ctx = mp.get_context("spawn")
        self._queue = self._ctx.Queue()
        self.procs = {}  # (rank, incarnation) -> process
        self.killed = set()
        self.results, self.errors = {}, {}

    def start(self, rank, fn, args=(), may_die=False):
        key = (rank, sum(1 for r, _ in self.procs if r == rank))
        if may_die:
            self.killed.add(key)
        p = self._ctx.Process(
            target=_store_worker,
            args=(rank, self.world_size, self.store.port, fn, args, self._queue, key),
            daemon=True,
        )
        p.start()
        self.procs[key] = p
        return key

    def kill(self, key):
        self.killed.add(key)
        self.procs[key].kill()
        self.procs[key].join()

    def _drain(self, timeout):
        try:
            key, ok, value = self._queue.get(timeout=timeout)
        except queue_mod.Empty:
            return
        if ok:
            self.results[key] = pickle.loads(value)
        else:
            self.errors[key] = value

    def wait_until(self, predicate, timeout=120, what="a condition"):
        """Polls predicate() (reading results as they come) until it holds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            self._drain(0.05)
            if self.errors:
                key = min(self.errors)
                raise RankError(f"rank {key[0]} (start {key[1]}) failed:\n{self.errors[key]}")
            for key, p in self.procs.items():
                if p.exitcode is not None and key not in self.results and key not in self.killed:
                    self._drain(3.0)  # its report would have arrived by now
                    if key not in self.results and key not in self.errors:
                        raise RankError(f"rank {key[0]} (start {key[1]}) exited with code "
                                        f"{p.exitcode} without reporting")
            if time.monotonic() > deadline:
                raise RankError(f"timed out after {timeout}s waiting for {what}")

    def wait(self, keys, timeout=180):
        self.wait_until(lambda: all(k in self.results for k in keys), timeout, f"{sorted(keys)}")
        return {k: self.results[k] for k in keys}

    def close(self):
        for p in self.procs.values():
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
