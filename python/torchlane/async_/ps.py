"""An asynchronous parameter server with bounded staleness (``torchlane.ps``).

    ps = torchlane.ps.ParameterServer(model, num_servers=1, sync_every=10, max_staleness=2)
    if ps.is_server:
        report = ps.serve()                      # returns when every worker has left or died
    else:
        opt = torch.optim.AdamW(model.parameters())
        for x, y in data:
            loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
            ps.step()                            # every sync_every-th call: push, then pull
        ps.close()

The first ``num_servers`` ranks are servers; each holds a contiguous shard of the flattened
parameters and the outer optimizer's state for it (torchlane._C.ShardServer, C++). A worker
pulls the parameters, runs ``sync_every`` steps of its own optimizer, pushes its pseudo-gradient
(pulled minus current parameters, as DiLoCo) to every server and pulls again; it never waits for
the other workers, except that a worker may run at most ``max_staleness`` rounds ahead of the
slowest live worker (Note [Bounded staleness] in csrc/ps/shard_server.hpp): 0 is BSP-like
lockstep, None is fully asynchronous.

Messages are tensors over torch.distributed point-to-point (``isend``/``irecv`` with tags, a
server receiving from any source); liveness is a counter each worker bumps in the c10d store. A
worker that stops bumping it for ``heartbeat_timeout_s`` is dropped: the others go on and every
update already applied stays applied.
"""

import datetime
import hashlib
import queue
import threading
import time

import torch
import torch.distributed as dist

from torchlane import _C
from torchlane._validate import check_int

__all__ = ["ParameterServer"]

_HEADER, _PAYLOAD, _REPLY, _PARAMS = 11, 12, 13, 14  # message tags
_PULL, _PUSH, _LEAVE = 1, 2, 3  # header kinds: [kind, model signature, round, shard numel]
_OK, _WRONG_MODEL, _DROPPED = 0, 1, 2  # reply status: [status, version]


def _signature(params):
    text = ";".join(f"{tuple(p.shape)}:{p.dtype}" for p in params)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def _check_int(name, value, minimum, allow_none=False):
    return check_int(name, value, minimum, allow_none=allow_none)


class ParameterServer:
    """One rank's part of the parameter server: a server shard or a worker (see module doc).

    Arguments:
        model: the module (same architecture on every rank; the servers' copies give the
            initial parameters).
        num_servers: how many of the first ranks are servers (1 <= num_servers < world size,
            and at most the number of parameter elements).
        sync_every: H, inner steps between a worker's pushes.
        max_staleness: rounds a worker may run ahead of the slowest live worker (int >= 0), or
            None for no bound.
        outer_lr, outer_momentum, nesterov: the servers' SGD on pushed pseudo-gradients (the
            default 1, 0, False adds each worker's change to the global parameters).
        heartbeat_timeout_s: a worker silent this long is dropped.
        wait_timeout_s: the longest a worker waits for the servers' answer before it raises.
    """

    def __init__(
        self,
        model,
        num_servers=1,
        sync_every=1,
        max_staleness=None,
        outer_lr=1.0,
        outer_momentum=0.0,
        nesterov=False,
        heartbeat_timeout_s=30.0,
        wait_timeout_s=3600.0,
        _keep_updates=False,
    ):
        if not dist.is_initialized():
            raise RuntimeError(
                "torchlane.ps: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group() first"
            )
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        world = dist.get_world_size()
        self.num_servers = _check_int("num_servers", num_servers, 1)
        if num_servers >= world:
            raise ValueError(
                f"num_servers must be < the world size ({world}) to leave at least one worker, "
                f"got {num_servers}"
            )
        self.sync_every = _check_int("sync_every", sync_every, 1)
        self.max_staleness = _check_int("max_staleness", max_staleness, 0, allow_none=True)
        if not heartbeat_timeout_s > 0:
            raise ValueError(f"heartbeat_timeout_s must be > 0, got {heartbeat_timeout_s}")
        self.heartbeat_timeout_s = float(heartbeat_timeout_s)
        # A worker may wait this long for its pull (the staleness bound may hold it back).
        self._timeout = datetime.timedelta(seconds=float(wait_timeout_s))
        self.params = [p for p in model.parameters() if p.requires_grad]
        total = sum(p.numel() for p in self.params)
        if num_servers > total:
            raise ValueError(
                f"num_servers ({num_servers}) must be <= the model's parameter elements ({total})"
            )
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"all parameters must share one floating dtype, got {dtypes}")
        self.rank = dist.get_rank()
        self.is_server = self.rank < num_servers
        self.workers = list(range(num_servers, world))
        self.bounds = [round(s * total / num_servers) for s in range(num_servers + 1)]
        self.signature = _signature(self.params)
        self._store = dist.distributed_c10d._get_default_store()
        self._flat = lambda: torch.cat([p.detach().reshape(-1) for p in self.params])
        if self.is_server:
            lo, hi = self.bounds[self.rank], self.bounds[self.rank + 1]
            self.server = _C.ShardServer(
                self._flat()[lo:hi].clone(),
                outer_lr=float(outer_lr),
                outer_momentum=float(outer_momentum),
                nesterov=bool(nesterov),
                max_staleness=self.max_staleness,
                workers=self.workers,
            )
            self.updates = [] if _keep_updates else None
        else:
            self.round = 0
            self.inner_step = 0
            self._beat = threading.Event()
            self._beater = threading.Thread(target=self._heartbeat, daemon=True)
            self._beater.start()
            self._exchange(_PULL, None)

    # ---- worker ----

    def _heartbeat(self):
        key = f"torchlane/ps/heartbeat/{self.rank}"
        while not self._beat.wait(0.2):
            try:
                self._store.add(key, 1)
            except Exception:  # the store (on rank 0) is gone: the job is ending
                return

    def _exchange(self, kind, local):
        """Pushes (kind _PUSH) the pseudo-gradient to every server, then pulls the parameters."""
        numel = [self.bounds[s + 1] - self.bounds[s] for s in range(self.num_servers)]
        replies = [torch.empty(2, dtype=torch.int64) for _ in numel]
        shards = [torch.empty(n, dtype=self.params[0].dtype) for n in numel]
        works = []
        for s in range(self.num_servers):
            works.append(dist.irecv(replies[s], src=s, tag=_REPLY))
            header = torch.tensor([kind, self.signature, self.round, numel[s]])
            works.append(dist.isend(header, dst=s, tag=_HEADER))
            if kind == _PUSH:
                update = (
                    self._pulled[self.bounds[s] : self.bounds[s + 1]]
                    - local[self.bounds[s] : self.bounds[s + 1]]
                )
                works.append(dist.isend(update, dst=s, tag=_PAYLOAD))
        for w in works:
            w.wait(self._timeout)
        for s in range(self.num_servers):
            if replies[s][0].item() == _DROPPED:
                self._beat.set()
                raise RuntimeError(
                    f"torchlane.ps: server {s} dropped worker {self.rank}: no heartbeat for "
                    f"{self.heartbeat_timeout_s} s (raise heartbeat_timeout_s on a busy machine)"
                )
            if replies[s][0].item() == _WRONG_MODEL:
                self._beat.set()
                raise ValueError(
                    f"torchlane.ps: server {s} holds a different model than worker {self.rank} "
                    f"(parameter shapes/dtypes differ); every rank must build the same model"
                )
            dist.irecv(shards[s], src=s, tag=_PARAMS).wait(self._timeout)
        self.versions = [int(r[1]) for r in replies]
        self._pulled = torch.cat(shards)
        with torch.no_grad():
            offset = 0
            for p in self.params:
                p.copy_(self._pulled[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def step(self):
        """Call after every inner optimizer step; every sync_every-th call pushes and pulls.
        Returns True when it did."""
        if self.is_server:
            raise RuntimeError("ParameterServer.step: this rank is a server; call serve()")
        self.inner_step += 1
        if self.inner_step % self.sync_every:
            return False
        self._exchange(_PUSH, self._flat())
        self.round += 1
        return True

    def close(self):
        """Worker: tells the servers it is done."""
        if self.is_server:
            return
        for s in range(self.num_servers):
            header = torch.tensor([_LEAVE, self.signature, self.round, 0])
            dist.send(header, dst=s, tag=_HEADER)
        self._beat.set()
        self._beater.join()

    # ---- server ----

    def serve(self):
        """Runs this server until every worker has left or died; returns its report."""
        if not self.is_server:
            raise RuntimeError("ParameterServer.serve: this rank is a worker; call step()")
        # Note [PS receiver thread]: Gloo's point-to-point Works report completion only from
        # wait(), so a server cannot poll an any-source irecv. A receiver thread blocks in it
        # (GIL released) and hands each message to this thread through a queue; it posts the
        # next receive only when told to, so no receive is left posted once every worker is gone.
        server = self.server
        inbox, go = queue.Queue(), queue.Queue()
        receiver = threading.Thread(target=self._receive, args=(inbox, go), daemon=True)
        receiver.start()
        go.put(True)
        waiting = []
        self._sent = {}
        last_beat = {w: (None, time.monotonic()) for w in self.workers}
        next_check = 0.0
        while server.live_workers:
            try:
                header, worker, update = inbox.get(timeout=0.1)
            except queue.Empty:
                header = None
            if header is not None:
                self._handle(header, worker, update, waiting)
                go.put(bool(server.live_workers))
            for w in list(waiting):
                if w not in server.live_workers:
                    waiting.remove(w)
                elif server.may_pull(w):
                    waiting.remove(w)
                    self._send_params(w, _OK)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.2
                for w in server.live_workers:
                    count = self._store.add(f"torchlane/ps/heartbeat/{w}", 0)
                    if count != last_beat[w][0]:
                        last_beat[w] = (count, now)
                    elif now - last_beat[w][1] > self.heartbeat_timeout_s:
                        server.remove(w, left=False)
        go.put(False)
        dead = set(server.dead_workers)
        for worker, works in self._sent.items():
            if worker not in dead:  # a dead worker's last reply may never complete
                for work in works:
                    work.wait()
        return {
            "version": server.version,
            "log": server.log(),
            "dead_workers": server.dead_workers,
            "shard": server.shard.clone(),
            "updates": self.updates,
        }

    def _receive(self, inbox, go):
        forever = datetime.timedelta(days=365)
        while go.get():
            header = torch.empty(4, dtype=torch.int64)
            work = dist.irecv(header, tag=_HEADER)
            work.wait(forever)
            worker = work._source_rank()
            update = None
            if header[0].item() == _PUSH:
                update = torch.empty(int(header[3]), dtype=self.server.shard.dtype)
                dist.irecv(update, src=worker, tag=_PAYLOAD).wait(forever)
            inbox.put((header, worker, update))

    def _send_params(self, worker, status):
        # The worker received our previous reply before it wrote again: those sends are done
        # (Gloo reports a send's completion only through wait()).
        for work in self._sent.pop(worker, []):
            work.wait()
        version = self.server.record_pull(worker) if status == _OK else -1
        works = [dist.isend(torch.tensor([status, version]), dst=worker, tag=_REPLY)]
        if status == _OK:
            works.append(dist.isend(self.server.shard.clone(), dst=worker, tag=_PARAMS))
        self._sent[worker] = works

    def _handle(self, header, worker, update, waiting):
        kind, signature, _round, numel = (int(v) for v in header)
        lo, hi = self.bounds[self.rank], self.bounds[self.rank + 1]
        if kind == _LEAVE:
            if worker in self.server.live_workers:
                self.server.remove(worker, left=True)
            return
        if worker not in self.server.live_workers:  # dropped for silence: tell it, keep going
            self._send_params(worker, _DROPPED)
            return
        if signature != self.signature or numel != hi - lo:
            self.server.remove(worker, left=True)
            self._send_params(worker, _WRONG_MODEL)
            return
        if kind == _PUSH:
            self.server.apply(worker, update)
            if self.updates is not None:
                self.updates.append((worker, update))
        waiting.append(worker)
