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

Note [PS links]: each worker-server pair talks over a two-rank Gloo process group of its own
(torch.distributed.ProcessGroupGloo on a PrefixStore of the job's c10d store), not over the
world group, whose membership is fixed: a link can be dropped and re-formed without the rest of
the job. Messages are tensors (``send``/``recv`` with tags); control is c10d store counters
(liveness heartbeats, incarnation numbers, link requests), nothing pickled. So
* a worker that dies is noticed at once (its link reports the closed connection) or, if it
  hangs, after ``heartbeat_timeout_s`` without a heartbeat; the others go on, and every update
  already applied stays applied;
* a restarted worker (same rank, a new process) asks each server for a new link, pulls the
  current parameters and continues (Note [Rejoining workers] in csrc/ps/shard_server.hpp);
* a server with ``checkpoint_dir`` writes its shard, outer-optimizer state, clocks and log
  atomically every ``checkpoint_every`` applied updates, before acknowledging the update; a
  restarted server resumes from that file, and each worker, finding its link broken, waits for
  the new server, re-links and pulls (its unacknowledged push is dropped).
Restarts need a store that outlives the processes: torchrun's agent store, or a
``torch.distributed.TCPStore`` passed as ``store=`` (then no default process group is needed).
"""

import datetime
import hashlib
import os
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
_KEY = "torchlane/ps"  # store keys (Note [PS links])
_FORMAT = "torchlane.ps.server/1"
_FOREVER = datetime.timedelta(days=365)


def _signature(params):
    text = ";".join(f"{tuple(p.shape)}:{p.dtype}" for p in params)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def _check_int(name, value, minimum, allow_none=False):
    return check_int(name, value, minimum, allow_none=allow_none)


class _Link:
    """One worker-server pair's own two-rank Gloo group (server 0, worker 1; Note [PS links])."""

    def __init__(self, store, server, worker, request, on_server, timeout):
        prefix = f"{_KEY}/pg/{server}/{worker}/{request}"
        # A connection of its own: the rendezvous blocks in store waits, and a store client
        # serialises its calls, so on a shared one it would stall the heartbeats and the
        # server's loop for up to `timeout`.
        group = dist.PrefixStore(prefix, store.clone())
        self.pg = dist.ProcessGroupGloo(group, 0 if on_server else 1, 2, timeout)
        self.peer = 1 if on_server else 0

    def send(self, tensor, tag):
        return self.pg.send([tensor], self.peer, tag)

    def recv(self, tensor, tag):
        return self.pg.recv([tensor], self.peer, tag)


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
        wait_timeout_s: the longest a worker waits for the servers' answer (including waiting
            for a restarted server) before it raises.
        store, rank, world_size: a c10d Store shared by the job and this process's rank and the
            world size, instead of the default process group's (which then need not exist).
        checkpoint_dir: where a server writes its state (one file per server) and, restarted,
            resumes from. None: no checkpoints.
        checkpoint_every: a server checkpoints every this many applied updates.
        rejoin_timeout_s: once no worker is live, how long serve() waits for a dead one to come
            back before it returns.
        link_timeout_s: the longest one attempt to form a worker-server link may take.
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
        *,
        store=None,
        rank=None,
        world_size=None,
        checkpoint_dir=None,
        checkpoint_every=1,
        rejoin_timeout_s=0.0,
        link_timeout_s=30.0,
        _keep_updates=False,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if store is None:
            if rank is not None or world_size is not None:
                raise ValueError("rank and world_size are given together with store=")
            if not dist.is_initialized():
                raise RuntimeError(
                    "torchlane.ps: torch.distributed is not initialised; call "
                    "torch.distributed.init_process_group() first, or pass store=, rank= and "
                    "world_size="
                )
            store = dist.distributed_c10d._get_default_store()
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            if not isinstance(store, dist.Store):
                raise TypeError(f"store must be a torch.distributed.Store, got {type(store).__name__}")
            if rank is None or world_size is None:
                raise ValueError("store= needs rank= and world_size= too")
            world = _check_int("world_size", world_size, 2)
            rank = _check_int("rank", rank, 0)
            if rank >= world:
                raise ValueError(f"rank must be < world_size ({world}), got {rank}")
        self.num_servers = _check_int("num_servers", num_servers, 1)
        if num_servers >= world:
            raise ValueError(
                f"num_servers must be < the world size ({world}) to leave at least one worker, "
                f"got {num_servers}"
            )
        self.sync_every = _check_int("sync_every", sync_every, 1)
        self.max_staleness = _check_int("max_staleness", max_staleness, 0, allow_none=True)
        for name, value in (
            ("heartbeat_timeout_s", heartbeat_timeout_s),
            ("wait_timeout_s", wait_timeout_s),
            ("link_timeout_s", link_timeout_s),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not rejoin_timeout_s >= 0:
            raise ValueError(f"rejoin_timeout_s must be >= 0, got {rejoin_timeout_s}")
        self.checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1)
        self.heartbeat_timeout_s = float(heartbeat_timeout_s)
        self.rejoin_timeout_s = float(rejoin_timeout_s)
        # A worker may wait this long for its pull (the staleness bound may hold it back).
        self._wait_s = float(wait_timeout_s)
        self._link_timeout = datetime.timedelta(seconds=min(float(link_timeout_s), self._wait_s))
        self.params = [p for p in model.parameters() if p.requires_grad]
        total = sum(p.numel() for p in self.params)
        if num_servers > total:
            raise ValueError(
                f"num_servers ({num_servers}) must be <= the model's parameter elements ({total})"
            )
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"all parameters must share one floating dtype, got {dtypes}")
        self.rank = rank
        self.is_server = rank < num_servers
        self.workers = list(range(num_servers, world))
        self.bounds = [round(s * total / num_servers) for s in range(num_servers + 1)]
        self.signature = _signature(self.params)
        self._store = store
        self._flat = lambda: torch.cat([p.detach().reshape(-1) for p in self.params])
        if self.is_server:
            lo, hi = self.bounds[rank], self.bounds[rank + 1]
            self.server = _C.ShardServer(
                self._flat()[lo:hi].clone(),
                outer_lr=float(outer_lr),
                outer_momentum=float(outer_momentum),
                nesterov=bool(nesterov),
                max_staleness=self.max_staleness,
                workers=self.workers,
            )
            self.updates = [] if _keep_updates else None
            self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
            self.resumed_from = self._resume() if self.checkpoint_dir else None
            # Published last: workers link only to a server that is ready.
            self.incarnation = store.add(f"{_KEY}/server/{rank}/incarnation", 1)
        else:
            if checkpoint_dir is not None:
                raise ValueError("checkpoint_dir is for servers; workers hold no state to save")
            self.round = 0
            self.inner_step = 0
            self.incarnation = store.add(f"{_KEY}/worker/{rank}/incarnation", 1)
            self._links = [None] * num_servers
            self.acknowledged = [0] * num_servers  # pushes each server applied and answered
            self._server_incarnation = [0] * num_servers
            self._beat = threading.Event()
            # Its own store connection (see _Link): never held up by this thread's store calls.
            self._beater = threading.Thread(
                target=self._heartbeat, args=(store.clone(),), daemon=True
            )
            self._beater.start()
            self._exchange(_PULL, None)

    # ---- worker ----

    def _heartbeat(self, store):
        key = f"{_KEY}/heartbeat/{self.rank}"
        while not self._beat.wait(0.2):
            try:
                store.add(key, 1)
            except Exception:  # the store is gone: the job is ending
                return

    def _connect(self, s, deadline):
        """Forms a new link to server s (a restarted one if the last link broke)."""
        broken = self._server_incarnation[s]  # 0: never linked
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"torchlane.ps: worker {self.rank} found no live server {s} within "
                    f"wait_timeout_s={self._wait_s} s"
                )
            incarnation = self._store.add(f"{_KEY}/server/{s}/incarnation", 0)
            if incarnation == 0 or incarnation < broken:
                time.sleep(0.05)
                continue
            if self._store.check([f"{_KEY}/server/{s}/done/{incarnation}"]):
                self._beat.set()
                raise RuntimeError(
                    f"torchlane.ps: server {s} has stopped serving (every worker had left or "
                    f"died); worker {self.rank} can rejoin only while it runs (raise the "
                    f"server's rejoin_timeout_s to wait longer for restarted workers)"
                )
            if incarnation == broken:
                # The same server: link again only if it is alive (its own beat moves); a dead
                # one is waited for until its restart publishes a new incarnation.
                beat_key = f"{_KEY}/server/{s}/beat/{incarnation}"
                beat = self._store.add(beat_key, 0)
                time.sleep(1.0)
                if self._store.add(beat_key, 0) == beat:
                    continue
            request = self._store.add(f"{_KEY}/linkreq/{s}/{self.rank}", 1)
            self._store.set(
                f"{_KEY}/want/{s}/{self.rank}/{request}", f"{incarnation} {self.incarnation}"
            )
            try:
                link = _Link(self._store, s, self.rank, request, False, self._link_timeout)
            except RuntimeError:  # the server died, or never answered: try again
                broken = incarnation
                continue
            self._links[s] = link
            self._server_incarnation[s] = incarnation
            return link

    def _exchange(self, kind, local):
        """Pushes (kind _PUSH) the pseudo-gradient to every server, then pulls the parameters.
        A server whose link breaks is re-linked and pulled from (the push to it is dropped)."""
        deadline = time.monotonic() + self._wait_s
        numel = [self.bounds[s + 1] - self.bounds[s] for s in range(self.num_servers)]
        replies = [torch.empty(2, dtype=torch.int64) for _ in numel]
        shards = [torch.empty(n, dtype=self.params[0].dtype) for n in numel]
        todo = {s: kind for s in range(self.num_servers)}
        while todo:
            pending, pending_kind = {}, dict(todo)
            for s, what in todo.items():
                link = self._links[s] or self._connect(s, deadline)
                try:
                    works = [link.recv(replies[s], _REPLY)]
                    header = torch.tensor([what, self.signature, self.round, numel[s]])
                    works.append(link.send(header, _HEADER))
                    if what == _PUSH:
                        lo, hi = self.bounds[s], self.bounds[s + 1]
                        works.append(link.send(self._pulled[lo:hi] - local[lo:hi], _PAYLOAD))
                    pending[s] = works
                except RuntimeError:
                    pending[s] = None
            todo = {}
            for s, works in pending.items():
                try:
                    if works is None:
                        raise RuntimeError("send failed")
                    for w in works:
                        w.wait(datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
                    status = replies[s][0].item()
                    if status == _OK:
                        self._links[s].recv(shards[s], _PARAMS).wait(_FOREVER)
                        self.acknowledged[s] += pending_kind[s] == _PUSH
                except RuntimeError:
                    if time.monotonic() >= deadline:
                        self._beat.set()
                        raise TimeoutError(
                            f"torchlane.ps: worker {self.rank} got no answer from server {s} "
                            f"within wait_timeout_s={self._wait_s} s"
                        ) from None
                    self._links[s] = None  # broken: re-link, then pull
                    todo[s] = _PULL
                    continue
                if status == _DROPPED:
                    self._beat.set()
                    raise RuntimeError(
                        f"torchlane.ps: server {s} dropped worker {self.rank}: no heartbeat for "
                        f"{self.heartbeat_timeout_s} s (raise heartbeat_timeout_s on a busy machine)"
                    )
                if status == _WRONG_MODEL:
                    self._beat.set()
                    raise ValueError(
                        f"torchlane.ps: server {s} holds a different model than worker {self.rank} "
                        f"(parameter shapes/dtypes differ); every rank must build the same model"
                    )
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
        for link in self._links:
            if link is not None:
                try:
                    link.send(torch.tensor([_LEAVE, self.signature, self.round, 0]), _HEADER).wait()
                except RuntimeError:  # that server is gone; it will not wait for us
                    pass
        self._links = [None] * self.num_servers
        self._beat.set()
        self._beater.join()

    # ---- server ----

    def _checkpoint_path(self):
        return os.path.join(
            self.checkpoint_dir, f"ps_server_{self.rank}_of_{self.num_servers}.pt"
        )

    def _resume(self):
        path = self._checkpoint_path()
        if not os.path.exists(path):
            return None
        state = torch.load(path, weights_only=True)
        lo, hi = self.bounds[self.rank], self.bounds[self.rank + 1]
        if state.get("format") != _FORMAT:
            raise ValueError(f"checkpoint_dir: {path} is not a torchlane.ps server checkpoint")
        if state["signature"] != self.signature or state["bounds"] != [lo, hi]:
            raise ValueError(
                f"checkpoint_dir: {path} holds another model or shard (elements {state['bounds']}, "
                f"this server's {[lo, hi]}); every rank must build the same model"
            )
        if state["workers"][:, 0].tolist() != self.workers:
            raise ValueError(
                f"checkpoint_dir: {path} was written for workers {state['workers'][:, 0].tolist()}, "
                f"this job has {self.workers}"
            )
        self.server.restore(
            state["shard"], state["momentum_buffer"], state["version"], state["workers"], state["log"]
        )
        if self.updates is not None:
            self.updates = list(zip(state["update_workers"], state["updates"], strict=True))
        return path

    def _save(self):
        from torchlane.checkpoint import _write_atomically

        state = dict(self.server.state(), format=_FORMAT, signature=self.signature)
        state["bounds"] = [self.bounds[self.rank], self.bounds[self.rank + 1]]
        if self.updates is not None:
            state["update_workers"] = [w for w, _ in self.updates]
            state["updates"] = [u for _, u in self.updates]
        _write_atomically(
            self.checkpoint_dir, self._checkpoint_path(), state, prefix=f".ps-{self.rank}-"
        )

    def serve(self):
        """Runs this server until every worker has left (or died and not come back within
        rejoin_timeout_s); returns its report."""
        if not self.is_server:
            raise RuntimeError("ParameterServer.serve: this rank is a worker; call step()")
        # Note [PS receiver threads]: Gloo's point-to-point Works report completion only from
        # wait(), so a server cannot poll a receive. One receiver thread per link blocks in it
        # (GIL released) and hands each message, or the link's failure, to this thread through
        # one queue; it stops after the worker's leave message or the failure.
        server, store = self.server, self._store
        inbox = queue.Queue()
        self._inbox = inbox
        self._links, self._sent, self._forming = {}, {}, 0
        self.link_log = []
        handled = dict.fromkeys(self.workers, 0)
        waiting = []
        last_beat = {w: (None, time.monotonic()) for w in self.workers}
        next_check, idle_since = 0.0, None
        while True:
            now = time.monotonic()
            if server.live_workers or self._forming:
                idle_since = None
            else:
                idle_since = idle_since or now
                if not server.dead_workers or now - idle_since >= self.rejoin_timeout_s:
                    break
            try:
                event = inbox.get(timeout=0.05)
            except queue.Empty:
                event = None
            if event is not None:
                self._on_event(event, waiting, last_beat)
            for w in list(waiting):
                if w not in server.live_workers:
                    waiting.remove(w)
                elif server.may_pull(w):
                    waiting.remove(w)
                    self._send_params(w, _OK)
            now = time.monotonic()
            if now < next_check:
                continue
            next_check = now + 0.2
            store.add(f"{_KEY}/server/{self.rank}/beat/{self.incarnation}", 1)
            for w in self.workers:
                request = store.add(f"{_KEY}/linkreq/{self.rank}/{w}", 0)
                if request > handled[w]:
                    handled[w] = request
                    want = store.get(f"{_KEY}/want/{self.rank}/{w}/{request}").decode().split()
                    if int(want[0]) == self.incarnation:  # else: asked of a dead incarnation
                        self._forming += 1
                        threading.Thread(
                            target=self._form_link, args=(w, request, int(want[1])), daemon=True
                        ).start()
            for w in server.live_workers:
                count = store.add(f"{_KEY}/heartbeat/{w}", 0)
                if count != last_beat[w][0]:
                    last_beat[w] = (count, now)
                elif now - last_beat[w][1] > self.heartbeat_timeout_s:
                    server.remove(w, left=False)
        if self.checkpoint_dir:
            self._save()
        store.set(f"{_KEY}/server/{self.rank}/done/{self.incarnation}", "1")
        dead = set(server.dead_workers)
        for worker, works in self._sent.items():
            if worker not in dead:  # a dead worker's last reply may never complete
                for work in works:
                    try:
                        work.wait()
                    except RuntimeError:
                        pass
        return {
            "version": server.version,
            "log": server.log(),
            "dead_workers": server.dead_workers,
            "shard": server.shard.clone(),
            "updates": self.updates,
            "links": self.link_log,
            "incarnation": self.incarnation,
            "resumed_from": self.resumed_from,
        }

    def _form_link(self, worker, request, incarnation):
        try:
            link = _Link(self._store, self.rank, worker, request, True, self._link_timeout)
        except RuntimeError:  # the worker went away meanwhile; it asks again if it is alive
            link = None
        self._inbox.put(("linked", worker, link, incarnation, None))

    def _receive(self, worker, link):
        try:
            while True:
                header = torch.empty(4, dtype=torch.int64)
                link.recv(header, _HEADER).wait(_FOREVER)
                update = None
                if header[0].item() == _PUSH:
                    update = torch.empty(int(header[3]), dtype=self.server.shard.dtype)
                    link.recv(update, _PAYLOAD).wait(_FOREVER)
                self._inbox.put(("message", worker, link, header, update))
                if header[0].item() == _LEAVE:
                    return
        except RuntimeError:  # the worker died, or its link broke
            self._inbox.put(("lost", worker, link, None, None))

    def _on_event(self, event, waiting, last_beat):
        kind, worker, link, header, update = event
        if kind == "linked":
            self._forming -= 1
            if link is None:
                return
            incarnation = header
            self._links[worker] = link  # a previous link's messages are ignored from now on
            self._sent.pop(worker, None)
            if worker in waiting:
                waiting.remove(worker)
            self.server.rejoin(worker)
            last_beat[worker] = (None, time.monotonic())
            self.link_log.append(
                {"worker": worker, "incarnation": incarnation, "version": self.server.version}
            )
            threading.Thread(target=self._receive, args=(worker, link), daemon=True).start()
        elif self._links.get(worker) is not link:
            return  # from a link that was replaced
        elif kind == "lost":
            del self._links[worker]
            if worker in self.server.live_workers:
                self.server.remove(worker, left=False)
        else:
            self._handle(header, worker, update, waiting)

    def _send_params(self, worker, status):
        # The worker received our previous reply before it wrote again: those sends are done
        # (Gloo reports a send's completion only through wait()).
        for work in self._sent.pop(worker, []):
            try:
                work.wait()
            except RuntimeError:
                pass
        link = self._links[worker]
        version = self.server.record_pull(worker) if status == _OK else -1
        try:
            works = [link.send(torch.tensor([status, version]), _REPLY)]
            if status == _OK:
                works.append(link.send(self.server.shard.clone(), _PARAMS))
        except RuntimeError:  # the link broke: its receiver thread reports it
            works = []
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
            del self._links[worker]  # its failure once it raises is not a death
            return
        if kind == _PUSH:
            self.server.apply(worker, update)
            if self.updates is not None:
                self.updates.append((worker, update))
            if self.checkpoint_dir and self.server.version % self.checkpoint_every == 0:
                self._save()  # before the reply: an acknowledged update is on disk
        waiting.append(worker)
