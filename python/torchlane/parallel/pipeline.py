"""Pipeline parallelism: a sequential model cut into stages, micro-batches streamed through them.

    pipe = torchlane.parallel.pipeline(layers, mesh["pp"], n_microbatches=8, schedule="1f1b",
                                       balance="profile", dp_group=mesh["dp"])
    opt = torch.optim.AdamW(model.parameters())      # over the whole model, see below
    pipe.attach_optimizer(opt)                        # only needed for dynamic re-balancing
    loss = pipe.step(x, y, loss_fn)                   # forward + backward of all micro-batches
    opt.step(); opt.zero_grad(set_to_none=True)

Every rank of a pipeline builds the same full list of layers (same seed); the pipeline keeps the
layers of its stage and releases the storage of every other parameter (`p.data` becomes an empty
tensor). An optimizer built over all parameters therefore only updates this stage's: parameters
whose `.grad` is None are skipped by torch's optimizers, and their state is never created. That is
what lets a re-balance move layers between stages without touching the optimizer's param groups:
the parameter's data and its optimizer state travel, the parameter object stays.

See docs/pipeline_parallel.md for the schedules, the balancing and what is measured.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

SCHEDULES = ("gpipe", "1f1b")
_META_TAG = 1 << 20
_META_LEN = 10


# ----------------------------------------------------------------------------- pure functions


def schedule_actions(schedule: str, n_stages: int, stage: int, n_microbatches: int):
    """The ordered list of ("F", i) / ("B", i) actions of one stage.

    GPipe runs every forward, then every backward. 1F1B runs `n_stages - stage - 1` warm-up
    forwards, then alternates one forward and one backward, then drains the remaining backwards:
    a stage never holds more than `n_stages - stage` micro-batches' activations (at most pp).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    m = n_microbatches
    if schedule == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warmup = min(n_stages - stage - 1, m)
    acts = [("F", i) for i in range(warmup)]
    f, b = warmup, 0
    while f < m:
        acts += [("F", f), ("B", b)]
        f, b = f + 1, b + 1
    acts += [("B", i) for i in range(b, m)]
    return acts


def max_in_flight(actions) -> int:
    """Most micro-batches whose forward ran and backward did not, over a stage's actions."""
    live = peak = 0
    for kind, _ in actions:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def partition(costs, n_stages: int):
    """Contiguous split of `costs` into n_stages non-empty parts minimising the largest part's sum.

    Returns the list of part sizes. Exact (dynamic programming over prefix sums, O(n^2 p)); ties
    go to the split with the earliest boundaries, so every rank computes the same answer.
    """
    n = len(costs)
    if n_stages > n:
        raise ValueError(f"cannot split {n} layers into {n_stages} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][j]: smallest max-part sum of the first j layers in k parts; cut[k][j]: last boundary.
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        for j in range(k, n - (n_stages - k) + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], prefix[j] - prefix[i])
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    sizes, j = [], n
    for k in range(n_stages, 0, -1):
        i = cut[k][j]
        sizes.append(j - i)
        j = i
    return sizes[::-1]


def even_balance(n_layers: int, n_stages: int):
    if n_stages > n_layers:
        raise ValueError(
            f"more pipeline stages ({n_stages}) than layers ({n_layers}): every stage needs a layer"
        )
    q, r = divmod(n_layers, n_stages)
    return [q + (1 if s < r else 0) for s in range(n_stages)]


def bubble_fraction_formula(n_stages: int, n_microbatches: int) -> float:
    return (n_stages - 1) / (n_microbatches + n_stages - 1)


# ----------------------------------------------------------------------------- test hook


def slow_layer_for_testing(module: nn.Module, seconds: float):
    """Test-only: make `module`'s forward sleep `seconds` first (a rank slowed by other load).
    Returns the hook handle; `handle.remove()` undoes it."""
    return module.register_forward_pre_hook(lambda mod, args: time.sleep(seconds))


# ----------------------------------------------------------------------------- groups


def _resolve_group(g, name):
    if g is None:
        return None
    if isinstance(g, dist.ProcessGroup):
        return g
    get_group = getattr(g, "get_group", None)
    if get_group is not None:  # a DeviceMesh
        names = getattr(g, "mesh_dim_names", None) or ()
        if g.ndim != 1:
            if name in names:
                return g[name].get_group()
            raise ValueError(
                f"{name}: a {g.ndim}-D DeviceMesh needs a dimension named {name!r}, has {names}"
            )
        return get_group()
    raise TypeError(
        f"{name} must be a torch.distributed ProcessGroup or a DeviceMesh, got {type(g).__name__}"
    )


@dataclass
class StepStats:
    """What one step() measured on this stage (times in seconds from the step's start)."""

    events: list = field(default_factory=list)  # (kind, microbatch, start, end), kind F/B/recv/send
    compute_s: float = 0.0
    step_s: float = 0.0
    max_in_flight: int = 0
    peak_activation_bytes: int = 0


class _SavedBytes:
    """saved_tensors_hooks that count the bytes autograd saves during one forward."""

    def __init__(self):
        self.bytes = 0

    def pack(self, t):
        self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


# ----------------------------------------------------------------------------- the pipeline


class Pipeline:
    """One stage of a pipeline over `group` (see `pipeline()`)."""

    def __init__(
        self,
        layers,
        group,
        n_microbatches,
        schedule="1f1b",
        balance="even",
        dp_group=None,
        rebalance_threshold=None,
        rebalance_every=1,
    ):
        layers = list(layers)
        if not layers or not all(isinstance(m, nn.Module) for m in layers):
            raise TypeError("layers must be a non-empty sequence of torch.nn.Module")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not isinstance(n_microbatches, int) or n_microbatches < 1:
            raise ValueError(f"n_microbatches must be a positive int, got {n_microbatches!r}")
        if rebalance_threshold is not None and not rebalance_threshold > 0:
            raise ValueError(f"rebalance_threshold must be > 0 or None, got {rebalance_threshold}")
        mesh = group
        self.group = _resolve_group(mesh, "pp")
        if self.group is None:
            raise ValueError("group: a pipeline needs a process group or DeviceMesh, got None")
        if dp_group is None and getattr(mesh, "ndim", 1) > 1 and "dp" in mesh.mesh_dim_names:
            dp_group = mesh
        self.dp_group = _resolve_group(dp_group, "dp")
        self.layers = layers
        self.n_stages = dist.get_world_size(self.group)
        self.stage = dist.get_rank(self.group)
        self.n_microbatches = n_microbatches
        self.schedule = schedule
        self.rebalance_threshold = rebalance_threshold
        self.rebalance_every = max(1, int(rebalance_every))
        self.optimizer = None
        self.rebalance_log = []
        self.last_stats = StepStats()
        self._steps = 0
        self._layer_fwd_s = [0.0] * len(layers)
        # Parameters in first-seen order over the layers; a tied parameter appears once.
        self._params, seen = [], set()
        self._layer_params = []
        for layer in layers:
            ps = []
            for p in layer.parameters():
                ps.append(p)
                if id(p) not in seen:
                    seen.add(id(p))
                    self._params.append(p)
            self._layer_params.append(ps)
        self._shapes = {id(p): p.shape for p in self._params}
        if self.n_stages > len(layers):
            raise ValueError(
                f"more pipeline stages ({self.n_stages}) than layers ({len(layers)}): every "
                "stage needs at least one layer"
            )
        self.balance = None
        if isinstance(balance, str):
            if balance not in ("even", "profile"):
                raise ValueError(
                    f"balance must be 'even', 'profile' or a list of layer counts, got {balance!r}"
                )
            if balance == "even":
                self._set_balance(even_balance(len(layers), self.n_stages))
        else:
            self._set_balance(self._check_balance(balance))
        self._profile_pending = balance == "profile"

    # ---- layout ----

    def _check_balance(self, balance):
        b = list(balance)
        if len(b) != self.n_stages or not all(isinstance(n, int) and n >= 1 for n in b):
            raise ValueError(
                f"balance must list {self.n_stages} positive layer counts (one per stage), got {b}"
            )
        if sum(b) != len(self.layers):
            raise ValueError(
                f"balance {b} sums to {sum(b)}, but the model has {len(self.layers)} layers"
            )
        return b

    def _owners(self, balance):
        """For each layer its stage; for each parameter the set of stages using it."""
        layer_stage = [s for s, n in enumerate(balance) for _ in range(n)]
        owners = {id(p): set() for p in self._params}
        for li, ps in enumerate(self._layer_params):
            for p in ps:
                owners[id(p)].add(layer_stage[li])
        return layer_stage, owners

    def _set_balance(self, balance):
        """Adopt `balance` at start-up: release the storage of parameters this stage does not own."""
        self.balance = balance
        self._layer_stage, self._param_owners = self._owners(balance)
        for p in self._params:
            if self.stage not in self._param_owners[id(p)]:
                self._release(p)

    def _release(self, p):
        with torch.no_grad():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        p.grad = None
        if self.optimizer is not None:
            self.optimizer.state.pop(p, None)

    @property
    def stage_layers(self):
        """This stage's layers, in model order."""
        if self.balance is None:
            raise RuntimeError("balance='profile' decides the stages at the first step()")
        return [m for m, s in zip(self.layers, self._layer_stage, strict=False) if s == self.stage]

    def parameters(self):
        """This stage's parameters (a tied one on each stage that uses it)."""
        if self.balance is None:
            return list(self._params)
        return [p for p in self._params if self.stage in self._param_owners[id(p)]]

    @property
    def is_first(self):
        return self.stage == 0

    @property
    def is_last(self):
        return self.stage == self.n_stages - 1

    def attach_optimizer(self, optimizer):
        """The optimizer whose state moves with the layers when the pipeline re-balances."""
        self.optimizer = optimizer
        return self

    # ---- communication helpers ----

    def _peer(self, stage):
        return dist.get_global_rank(self.group, stage)

    def _send_meta(self, t, dst_stage):
        meta = torch.zeros(_META_LEN, dtype=torch.long)
        meta[0] = t.dim()
        meta[1] = _DTYPES.index(t.dtype)
        meta[2 : 2 + t.dim()] = torch.tensor(t.shape)
        return dist.isend(meta, self._peer(dst_stage), group=self.group, tag=_META_TAG)

    def _recv_meta(self, src_stage):
        meta = torch.zeros(_META_LEN, dtype=torch.long)
        dist.recv(meta, self._peer(src_stage), group=self.group, tag=_META_TAG)
        nd = int(meta[0])
        return tuple(int(v) for v in meta[2 : 2 + nd]), _DTYPES[int(meta[1])]

    # ---- the step ----

    def _check_batch(self, x, y):
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError("x must be a tensor with a batch dimension")
        if x.size(0) % self.n_microbatches != 0:
            raise ValueError(
                f"n_microbatches ({self.n_microbatches}) must divide the batch size "
                f"({x.size(0)}) of x"
            )
        if y is not None and (not isinstance(y, torch.Tensor) or y.size(0) != x.size(0)):
            raise ValueError("y must be a tensor with the same batch size as x")

    def _run_layers(self, x, timed=False):
        for li, (layer, s) in enumerate(zip(self.layers, self._layer_stage, strict=False)):
            if s != self.stage:
                continue
            if timed:
                t0 = time.perf_counter()
                x = layer(x)
                self._layer_fwd_s[li] += time.perf_counter() - t0
            else:
                x = layer(x)
        return x

    def step(self, x, y, loss_fn):
        """Forward and backward of the n_microbatches micro-batches of (x, y) on this stage.

        Every rank of the pipeline passes the same x and y (the first stage reads x, the last
        y). Gradients of this stage's parameters are accumulated into `.grad` (the mean loss
        over the batch, averaged over the dp group when there is one). Returns the batch's mean
        loss, the same on every stage.
        """
        self._check_batch(x, y)
        if self._profile_pending:
            self._profile_and_balance(x, y, loss_fn)
        elif self.rebalance_threshold is not None and self._steps > 0:
            if self.optimizer is None:
                raise RuntimeError(
                    "rebalance_threshold is set but no optimizer is attached: call "
                    "pipe.attach_optimizer(opt) so that its state moves with the layers"
                )
            if self._steps % self.rebalance_every == 0:
                self._dynamic_rebalance()
        m, p, s = self.n_microbatches, self.n_stages, self.stage
        xs, ys = x.chunk(m), y.chunk(m)
        actions = schedule_actions(self.schedule, p, s, m)
        stats = StepStats(max_in_flight=max_in_flight(actions))
        self._layer_fwd_s = [0.0] * len(self.layers)
        t_start = time.perf_counter()
        inputs, outputs, sends, losses, saved, in_flight = {}, {}, [], [], {}, 0
        in_shape = None
        for kind, i in actions:
            if kind == "F":
                if self.is_first:
                    inp = xs[i]
                else:
                    if in_shape is None:
                        in_shape = self._recv_meta(s - 1)
                    inp = torch.empty(in_shape[0], dtype=in_shape[1])
                    t0 = time.perf_counter()
                    dist.recv(inp, self._peer(s - 1), group=self.group, tag=2 * i)
                    stats.events.append(("recv", i, t0 - t_start, time.perf_counter() - t_start))
                    if inp.is_floating_point():
                        inp.requires_grad_(True)
                t0 = time.perf_counter()
                with _SavedBytes() as sb:
                    out = self._run_layers(inp, timed=True)
                    if self.is_last:
                        out = loss_fn(out, ys[i]) / m
                        losses.append(out.detach())
                t1 = time.perf_counter()
                stats.events.append(("F", i, t0 - t_start, t1 - t_start))
                saved[i] = sb.bytes
                in_flight += sb.bytes
                stats.peak_activation_bytes = max(stats.peak_activation_bytes, in_flight)
                if not self.is_last:
                    if i == 0:
                        sends.append(self._send_meta(out, s + 1))
                    sends.append(dist.isend(out.detach(), self._peer(s + 1), self.group, 2 * i))
                inputs[i], outputs[i] = inp, out
            else:
                out = outputs.pop(i)
                grad = None
                if not self.is_last:
                    grad = torch.empty_like(out)
                    t0 = time.perf_counter()
                    dist.recv(grad, self._peer(s + 1), group=self.group, tag=2 * i + 1)
                    stats.events.append(("recv", i, t0 - t_start, time.perf_counter() - t_start))
                t0 = time.perf_counter()
                torch.autograd.backward(out, grad)
                t1 = time.perf_counter()
                stats.events.append(("B", i, t0 - t_start, t1 - t_start))
                in_flight -= saved.pop(i)
                inp = inputs.pop(i)
                if not self.is_first and inp.grad is not None:
                    sends.append(dist.isend(inp.grad, self._peer(s - 1), self.group, 2 * i + 1))
        for w in sends:
            w.wait()
        stats.step_s = time.perf_counter() - t_start
        stats.compute_s = sum(e[3] - e[2] for e in stats.events if e[0] in ("F", "B"))
        self._sync_tied_grads()
        self._reduce_dp_grads()
        loss = torch.stack(losses).sum() if self.is_last else torch.zeros(())
        dist.broadcast(loss, self._peer(p - 1), group=self.group)
        self.last_stats = stats
        self._steps += 1
        return loss

    @torch.no_grad()
    def evaluate(self, x, y, loss_fn):
        """Mean loss of (x, y) through the pipeline, forward only (every stage calls it)."""
        self._check_batch(x, y)
        if self.balance is None:
            raise RuntimeError("balance='profile' decides the stages at the first step()")
        m, s = self.n_microbatches, self.stage
        total = torch.zeros(())
        for i, (xi, yi) in enumerate(zip(x.chunk(m), y.chunk(m), strict=False)):
            if self.is_first:
                inp = xi
            else:
                shape, dtype = self._recv_meta(s - 1)
                inp = torch.empty(shape, dtype=dtype)
                dist.recv(inp, self._peer(s - 1), group=self.group, tag=2 * i)
            out = self._run_layers(inp)
            if self.is_last:
                total += loss_fn(out, yi).float() / m
            else:
                self._send_meta(out, s + 1).wait()
                dist.send(out.contiguous(), self._peer(s + 1), group=self.group, tag=2 * i)
        dist.broadcast(total, self._peer(self.n_stages - 1), group=self.group)
        return total

    def clip_grad_norm_(self, max_norm):
        """torch.nn.utils.clip_grad_norm_ over the whole pipeline's parameters (a tied parameter
        counted once). Returns the total norm."""
        sq = torch.zeros((), dtype=torch.float64)
        for p in self.parameters():
            if p.grad is not None and min(self._param_owners[id(p)]) == self.stage:
                sq += p.grad.detach().double().pow(2).sum()
        dist.all_reduce(sq, group=self.group)
        norm = sq.sqrt().float()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.detach().mul_(coef)
        return norm

    def _sync_tied_grads(self):
        """Sum the gradient of a parameter used on several stages (the tied embedding) over those
        stages, in stage order, so every copy sees the same bits and stays equal after the step."""
        for p in self._params:
            owners = sorted(self._param_owners[id(p)])
            if len(owners) < 2 or self.stage not in owners:
                continue
            mine = p.grad if p.grad is not None else torch.zeros_like(p)
            parts = {}
            works = [
                dist.isend(mine, self._peer(o), self.group, _META_TAG + 1)
                for o in owners
                if o != self.stage
            ]
            for o in owners:
                if o == self.stage:
                    parts[o] = mine
                else:
                    parts[o] = torch.empty_like(mine)
                    dist.recv(parts[o], self._peer(o), group=self.group, tag=_META_TAG + 1)
            for w in works:
                w.wait()
            total = parts[owners[0]].clone()
            for o in owners[1:]:
                total += parts[o]
            p.grad = total

    def _reduce_dp_grads(self):
        """Average this stage's gradients over the data-parallel replicas: one flat all-reduce
        after the last micro-batch (earlier micro-batches only accumulate)."""
        if self.dp_group is None or dist.get_world_size(self.dp_group) == 1:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.dp_group)
        flat /= dist.get_world_size(self.dp_group)
        off = 0
        for g in grads:
            g.copy_(flat[off : off + g.numel()].view_as(g))
            off += g.numel()

    # ---- balancing ----

    def _agree(self, balance):
        """Stage 0's list on every stage, then dp replica 0's on every replica."""
        t = torch.tensor(balance, dtype=torch.long)
        dist.broadcast(t, self._peer(0), group=self.group)
        if self.dp_group is not None:
            dist.broadcast(t, dist.get_global_rank(self.dp_group, 0), group=self.dp_group)
        return [int(v) for v in t]

    def profile_layers(self, x, y, loss_fn, repeats=3):
        """Forward+backward seconds of each layer on one micro-batch of (x, y): the minimum over
        `repeats` runs after one warm-up run (first-touch allocations would swamp small layers).

        Runs the layers in sequence on this process (which still holds the whole model); the RNG
        state and the parameters' gradients are restored afterwards.
        """
        rng = torch.get_rng_state()
        xb, yb = x.chunk(self.n_microbatches)[0], y.chunk(self.n_microbatches)[0]
        old_grads = {id(p): p.grad for p in self._params}
        times = [float("inf")] * len(self.layers)
        for rep in range(repeats + 1):
            h = xb
            for li, layer in enumerate(self.layers):
                inp = h.detach().requires_grad_(h.is_floating_point())
                t0 = time.perf_counter()
                out = layer(inp)
                last = li == len(self.layers) - 1
                o = loss_fn(out, yb) if last else out
                if o.requires_grad:
                    o.backward(None if last else torch.ones_like(o))
                if rep > 0:
                    times[li] = min(times[li], time.perf_counter() - t0)
                h = out.detach()
        for p in self._params:
            p.grad = old_grads[id(p)]
        torch.set_rng_state(rng)
        return times

    def _profile_and_balance(self, x, y, loss_fn):
        self._profile_pending = False
        decide = self.stage == 0 and (self.dp_group is None or dist.get_rank(self.dp_group) == 0)
        if decide:
            self.layer_times = self.profile_layers(x, y, loss_fn)
            balance = partition(self.layer_times, self.n_stages)
        else:
            balance = [0] * self.n_stages
        balance = self._agree(balance)
        log.info("pipeline balance='profile': stages of %s layers", balance)
        self._set_balance(balance)

    def _layer_costs(self):
        """Each layer's share of the last step's compute, gathered from every stage (and averaged
        over dp replicas): this stage's forward+backward time split in proportion to the layers'
        measured forward times."""
        costs = torch.zeros(len(self.layers), dtype=torch.float64)
        mine = [li for li, s in enumerate(self._layer_stage) if s == self.stage]
        fwd = sum(self._layer_fwd_s[li] for li in mine)
        for li in mine:
            share = self._layer_fwd_s[li] / fwd if fwd > 0 else 1.0 / len(mine)
            costs[li] = self.last_stats.compute_s * share
        dist.all_reduce(costs, group=self.group)
        if self.dp_group is not None:
            dist.all_reduce(costs, group=self.dp_group)
            costs /= dist.get_world_size(self.dp_group)
        return costs.tolist()

    def _dynamic_rebalance(self):
        costs = self._layer_costs()
        stage_cost = [0.0] * self.n_stages
        for li, s in enumerate(self._layer_stage):
            stage_cost[s] += costs[li]
        mean = sum(stage_cost) / self.n_stages
        slowest = max(stage_cost)
        proposal = self.balance
        if mean > 0 and slowest > mean * (1 + self.rebalance_threshold):
            cand = partition(costs, self.n_stages)
            c_stage, k = [], 0
            for n in cand:
                c_stage.append(sum(costs[k : k + n]))
                k += n
            if max(c_stage) < slowest * 0.95:  # worth a move only if it clearly helps
                proposal = cand
        proposal = self._agree(proposal)
        if proposal != self.balance:
            reason = (
                f"slowest stage {stage_cost.index(slowest)} took {slowest * 1e3:.1f} ms, "
                f"{slowest / mean - 1:.0%} above the mean {mean * 1e3:.1f} ms "
                f"(threshold {self.rebalance_threshold:.0%})"
            )
            self.rebalance(proposal, reason=reason)

    def rebalance(self, balance, reason="requested"):
        """Move layers so that stage k holds balance[k] layers (every stage calls it, at a step
        boundary, with the same list). Parameters and their optimizer state travel with the
        layers; returns the number of parameters moved."""
        balance = self._check_balance(balance)
        if balance == self.balance:
            return 0
        old_owners = self._param_owners
        new_layer_stage, new_owners = self._owners(balance)
        moved = 0
        # One fixed order on every rank, each transfer between exactly two ranks: no deadlock.
        for p in self._params:
            src = min(old_owners[id(p)])
            for dst in sorted(new_owners[id(p)] - old_owners[id(p)]):
                moved += 1
                if self.stage == src:
                    self._send_param(p, dst)
                elif self.stage == dst:
                    self._recv_param(p, src)
        self.rebalance_log.append(
            {"step": self._steps, "from": self.balance, "to": balance, "reason": reason}
        )
        log.warning(
            "pipeline re-balance at step %d: %s -> %s: %s",
            self._steps,
            self.balance,
            balance,
            reason,
        )
        self.balance, self._layer_stage, self._param_owners = balance, new_layer_stage, new_owners
        for p in self._params:
            if self.stage in old_owners[id(p)] and self.stage not in new_owners[id(p)]:
                self._release(p)
        return moved

    def _send_param(self, p, dst_stage):
        dst = self._peer(dst_stage)
        dist.send(p.data.contiguous(), dst, group=self.group)
        state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
        dist.send_object_list([dict(state)], dst, group=self.group)

    def _recv_param(self, p, src_stage):
        src = self._peer(src_stage)
        buf = torch.empty(self._shapes[id(p)], dtype=p.dtype, device=p.device)
        dist.recv(buf, src, group=self.group)
        with torch.no_grad():
            p.data = buf
        p.grad = None
        obj = [None]
        dist.recv_object_list(obj, src, group=self.group)
        if self.optimizer is not None and obj[0]:
            self.optimizer.state[p] = obj[0]


_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.bool,
)


def pipeline(
    layers,
    group,
    n_microbatches=8,
    schedule="1f1b",
    balance="even",
    dp_group=None,
    rebalance_threshold=None,
    rebalance_every=1,
):
    """Cut `layers` (a sequential model: layer k's output is layer k+1's input) into one stage per
    rank of `group` and return this rank's `Pipeline`.

    group: a ProcessGroup, a 1-D DeviceMesh (mesh["pp"]), or a mesh with "pp" (and "dp") dims.
    schedule: "1f1b" or "gpipe". balance: "even", "profile" (time each layer at the first step,
    minimise the slowest stage) or a list of per-stage layer counts. dp_group: replicas of this
    pipeline whose gradients are averaged once per step. rebalance_threshold: when set (e.g. 0.2),
    measure the stages every `rebalance_every` steps and move layers when the slowest stage
    exceeds the mean by more than this fraction (needs `attach_optimizer` for the state).
    """
    return Pipeline(
        layers,
        group,
        n_microbatches,
        schedule=schedule,
        balance=balance,
        dp_group=dp_group,
        rebalance_threshold=rebalance_threshold,
        rebalance_every=rebalance_every,
    )
