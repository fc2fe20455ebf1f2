"""torch.distributed.checkpoint (DCP) for ShardedDataParallel and ShardedOptimizer.

    import torch.distributed.checkpoint as dcp
    dcp.save({"app": torchlane.ShardedCheckpoint(model, opt)}, checkpoint_id="ckpt/step-100")
    dcp.load({"app": torchlane.ShardedCheckpoint(model, opt)}, checkpoint_id="ckpt/step-100")

Note [DCP layout of the flat shards]
A rank's master shard is a contiguous range of a padded flat bucket, so it holds, of each
parameter, a contiguous range of the parameter's C-order elements (possibly none). The state
written to DCP is keyed and shaped as the plain module's: each trainable parameter is a
ShardedTensor of the parameter's own shape whose local shards are views of this rank's master
shard, one per rectangular block of that range (`_blocks`: at most two per dimension). Every rank
computes every rank's blocks from the bucket layout alone, so the global metadata needs no
communication. DCP reads by overlap of chunks, so a checkpoint written at one world size, stage
or bucket_cap_mb loads at any other, and a plain module loads the "model" part with
`dcp.load({"app": {"model": module.state_dict()}}, ...)`. Optimizer state follows torch's
FQN-keyed layout: `optim.state.<fqn>.<name>` for per-element entries (exp_avg, ...: the same
blocks), the others (step) as they are, and `optim.param_groups` (the options per group and its
parameters' names, as torch's get_state_dict writes them, so torch's set_state_dict loads the
files into FSDP2, DDP or a plain module with its own optimizer). Loads
write into the views, then `load_state_dict` hands the buffers to the optimizer and re-gathers
the full parameters. Zero-dimensional parameters are not shardable into blocks: they are written
whole (a broadcast from the rank that holds them).
"""

import math

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties


def _blocks(shape, lo, hi):
    """Rectangular blocks (offsets, sizes) that exactly cover the C-order flat range [lo, hi) of
    a tensor of `shape` (at least one dimension), in order."""
    shape = list(shape)
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    out = []
    a = lo
    while a < hi:
        # the outermost dimension whose whole sub-blocks start at `a` and fit before `hi`
        k = next(k for k in range(len(shape)) if a % strides[k] == 0 and a + strides[k] <= hi)
        index = (a // strides[k]) % shape[k]
        n = min((hi - a) // strides[k], shape[k] - index)
        offsets = [(a // strides[d]) % shape[d] for d in range(len(shape))]
        out.append((offsets, [1] * k + [n] + shape[k + 1 :]))
        a += n * strides[k]
    return out


class _Layout:
    """Where each trainable parameter's elements lie in every rank's shard."""

    def __init__(self, model):
        self.model = model
        names = model._param_names()
        self.entries = []  # (names, param, bucket, [(rank, param_lo, param_hi, shard_lo)])
        for b, bucket in enumerate(model._buckets):
            offsets, _, _, shard_numel = model._layouts[b]
            for i, off in zip(bucket, offsets, strict=True):
                p = model._params[i]
                pieces = []
                for r in range(model.world_size):
                    lo = max(off, r * shard_numel)
                    hi = min(off + p.numel(), (r + 1) * shard_numel)
                    if lo < hi:
                        pieces.append((r, lo - off, hi - off, lo - r * shard_numel))
                self.entries.append((names[id(p)], p, b, pieces))

    def tensor(self, p, pieces, flat_of_rank_shard, dtype):
        """A ShardedTensor of p's shape over `pieces`, local shards viewing `flat_of_rank_shard`
        (this rank's shard-length tensor); for 0-d parameters, the whole value."""
        m = self.model
        if p.dim() == 0:
            ((owner, _, _, at),) = pieces
            value = torch.empty((), dtype=dtype, device=flat_of_rank_shard.device)
            if m.rank == owner:
                value.copy_(flat_of_rank_shard[at])
            dist.broadcast(value, dist.get_global_rank(m.process_group, owner), m.process_group)
            return value
        device = flat_of_rank_shard.device
        metas, local = [], []
        for r, lo, hi, at in pieces:
            for offsets, sizes in _blocks(p.shape, lo, hi):
                placement = f"rank:{r}/{device}"
                metas.append(ShardMetadata(offsets, sizes, placement))
                if r == m.rank:
                    n = math.prod(sizes)
                    start = at + _flat_index(p.shape, offsets) - lo
                    view = flat_of_rank_shard[start : start + n].view(sizes)
                    local.append(Shard(view, metas[-1]))
        props = TensorProperties(dtype=dtype, requires_grad=False)
        meta = ShardedTensorMetadata(metas, p.shape, props)
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            local, meta, process_group=m.process_group
        )


def _flat_index(shape, offsets):
    i = 0
    for s, o in zip(shape, offsets, strict=True):
        i = i * s + o
    return i


def _shard_states(optimizer):
    """optimizer._agreed_shard_states(); for an optimizer that has not stepped yet, the state its
    first step would start from (so that a load has buffers to read into and a save writes a
    fresh optimizer's state), from a probe of the same class stepped once with zero gradients and
    lr 0 on zero tensors, its step counts set back to 0. The optimizer itself is left as it is."""
    inner = optimizer.optimizer
    if any(inner.state.values()):
        return optimizer._agreed_shard_states()
    params = [p for g in inner.param_groups for p in g["params"]]
    probes = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    groups, i = [], 0
    for g in inner.param_groups:
        n = len(g["params"])
        groups.append({**g, "params": probes[i : i + n], "lr": 0.0})
        i += n
    probe = type(inner)(groups)
    for q in probes:
        q.grad = torch.zeros_like(q)
    with torch.no_grad():
        probe.step()
    fresh = {}
    for p, q in zip(params, probes, strict=True):
        st = {}
        for k, v in probe.state.get(q, {}).items():
            if k == "step":
                v = torch.zeros_like(v) if torch.is_tensor(v) else 0
            st[k] = v
        fresh[p] = st
    saved = inner.state
    inner.state = fresh
    try:
        return optimizer._agreed_shard_states()
    finally:
        inner.state = saved


class ShardedCheckpoint:
    """A `torch.distributed.checkpoint` Stateful for a ShardedDataParallel model and (optionally)
    its ShardedOptimizer: `dcp.save` writes each rank's shards, `dcp.load` reads any
    checkpoint of the same module, whatever world size, stage or bucket plan wrote it (Note [DCP
    layout of the flat shards]). Every rank must take part in both, as in any DCP call."""

    def __init__(self, model, optimizer=None):
        from torchlane.sharding import ShardedDataParallel, ShardedOptimizer

        if not isinstance(model, ShardedDataParallel):
            raise TypeError(
                f"model must be a torchlane.ShardedDataParallel, got {type(model).__name__}"
            )
        if optimizer is not None and (
            not isinstance(optimizer, ShardedOptimizer) or optimizer.model is not model
        ):
            raise TypeError(
                "optimizer must be the torchlane.ShardedOptimizer built on this model (or None), "
                f"got {type(optimizer).__name__}"
            )
        self.model, self.optimizer = model, optimizer
        self._layout = _Layout(model)  # fixed by the model's buckets
        self._states = None

    def state_dict(self):
        """The model's state_dict keys and shapes, trainable parameters as ShardedTensors over
        the master shards; the optimizer's FQN-keyed state. Collective."""
        m = self.model
        layout = self._layout
        model_sd = m.replicated_state_dict()
        for names, p, b, pieces in layout.entries:
            shard = m._shards[b].detach()
            t = layout.tensor(p, pieces, shard, shard.dtype)
            for name in names:
                model_sd[name] = t
        model_sd = {k: model_sd[k] for k in m.module.state_dict()}
        out = {"model": model_sd}
        if self.optimizer is not None:
            self._states = _shard_states(self.optimizer)
            state = {}
            for names, p, b, pieces in layout.entries:
                per_param = {}
                shard_numel = m._layouts[b][3]
                for k, v in self._states[b].items():
                    if torch.is_tensor(v) and v.dim() == 1 and v.numel() == shard_numel:
                        per_param[k] = layout.tensor(p, pieces, v, v.dtype)
                    else:
                        per_param[k] = v.clone() if torch.is_tensor(v) else v
                state[names[0]] = per_param
            # A tuple, not torch's list: one object that DCP's key flattening never walks into.
            # (A rank that holds nothing of a parameter has a ShardedTensor without local
            # shards, which DCP's load drops; it then re-keys the state_dict the pre-2.4 way,
            # which would walk a list of dicts of non-tensors differently from the save.)
            # Each group lists its parameters by name, as torch's get_state_dict does, so that
            # torch's set_state_dict (FSDP2, DDP, a plain module) can place the groups too.
            names = m._param_names()
            groups = tuple(
                {**options, "params": [names[id(m._params[i])][0] for i in members]}
                for options, members in zip(
                    self.optimizer.group_options(), self.optimizer._group_members, strict=True
                )
            )
            out["optim"] = {"state": state, "param_groups": groups}
        return out

    def load_state_dict(self, state_dict):
        """After dcp.load filled the views: the replicated entries, the optimizer's buffers and
        options, then the full parameters re-gathered."""
        m = self.model
        m.load_replicated_state_dict(
            {k: v for k, v in state_dict["model"].items() if not isinstance(v, ShardedTensor)}
        )
        layout = self._layout
        with torch.no_grad():
            for names, p, b, pieces in layout.entries:
                if p.dim() == 0:  # written whole: copy back into the owner's shard
                    ((owner, _, _, at),) = pieces
                    if m.rank == owner:
                        m._shards[b].detach()[at] = state_dict["model"][names[0]]
        if self.optimizer is not None and "optim" in state_dict:
            optim = state_dict["optim"]
            self.optimizer.load_group_options(
                [{k: v for k, v in g.items() if k != "params"} for g in optim["param_groups"]]
            )
            for names, p, b, pieces in layout.entries:
                for k, v in optim["state"][names[0]].items():
                    if isinstance(v, ShardedTensor):
                        continue  # loaded in place into self._states[b][k]
                    if p.dim() == 0 and torch.is_tensor(self._states[b].get(k)):
                        if self._states[b][k].dim() == 1:  # a per-element entry of a 0-d param
                            if m.rank == pieces[0][0]:
                                self._states[b][k][pieces[0][3]] = v
                            continue
                    self._states[b][k] = v
            for b, st in enumerate(self._states):
                self.optimizer.load_shard_state(b, st)
        m._refresh_params()
