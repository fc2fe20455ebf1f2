"""tensor_parallel(model, tp, plan): shard a model's layers across a tensor-parallel group in
place, and the helpers a tensor-parallel training loop needs (full state dicts, grad-norm clip).

    plan = {
        "blocks.*.attn.qkv": ColwiseParallel(parts=(E, E, E)),   # q, k, v: heads split
        "blocks.*.attn.proj": RowwiseParallel(),
        "blocks.*.attn": ShardAttribute("n_head"),                # the module's local head count
        "blocks.*.mlp.0": ColwiseParallel(),
        "blocks.*.mlp.2": RowwiseParallel(),
    }
    tensor_parallel(model, mesh["tp"], plan)

Keys are fnmatch patterns over module names (`model.named_modules()`); every key must match at
least one module. A style is one of the classes below, or a list of them.

Note [Replicated parameters under tensor parallelism]
Parameters outside the sharded layers (LayerNorm weights, row-parallel biases, position
embeddings) are replicated on every tp rank. Without sequence parallelism every tp rank computes
the same gradient for them (their inputs and output gradients are the all-reduced, identical
tensors), so they stay identical. With sequence parallelism each rank sees only its chunk of the
sequence, so their gradients are partial sums: SequenceParallel (LayerNorm) and RowwiseParallel
(sequence_parallel=True, its bias) register a gradient hook that all-reduces the gradient over the
tp group before it is accumulated (so a DDP reducer over the dp group, which reads the
accumulated gradient, sees the full one).
"""

import fnmatch
import math

import torch
from torch import nn

from torchlane.parallel import comm
from torchlane.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    _TPModule,
    shard_of,
    unshard,
)
from torchlane.parallel.mesh import resolve_group


def _allreduce_grad_hook(param, group):
    # Note [Replicated parameters under tensor parallelism]
    param.register_hook(lambda g: comm.all_reduce(g, group))


class ColwiseParallel:
    """nn.Linear -> ColumnParallelLinear (output features split)."""

    def __init__(self, parts=None, gather_output=False, sequence_parallel=False, seq_dim=1):
        self.kw = dict(
            parts=parts,
            gather_output=gather_output,
            sequence_parallel=sequence_parallel,
            seq_dim=seq_dim,
        )

    def apply(self, module, group, name):
        return ColumnParallelLinear(module, group, **self.kw)


class RowwiseParallel:
    """nn.Linear -> RowParallelLinear (input features split; bias replicated)."""

    def __init__(self, input_is_parallel=True, sequence_parallel=False, seq_dim=1):
        self.kw = dict(
            input_is_parallel=input_is_parallel,
            sequence_parallel=sequence_parallel,
            seq_dim=seq_dim,
        )

    def apply(self, module, group, name):
        new = RowParallelLinear(module, group, **self.kw)
        if self.kw["sequence_parallel"] and new.bias is not None:
            _allreduce_grad_hook(new.bias, group)
        return new


class VocabParallel:
    """nn.Embedding -> VocabParallelEmbedding (vocabulary rows split)."""

    def __init__(self, sequence_parallel=False, seq_dim=1):
        self.kw = dict(sequence_parallel=sequence_parallel, seq_dim=seq_dim)

    def apply(self, module, group, name):
        return VocabParallelEmbedding(module, group, **self.kw)


class SequenceParallel:
    """A module with replicated parameters that runs on sequence chunks (LayerNorm, dropout):
    kept as is; its parameters' gradients are all-reduced over the tp group
    (Note [Replicated parameters under tensor parallelism])."""

    def apply(self, module, group, name):
        for p in module.parameters(recurse=True):
            if p.requires_grad:
                _allreduce_grad_hook(p, group)
        module.tp_sequence_parallel = True
        return module


class SplitSequence:
    """Enter the sequence-parallel part of the model at this module: its (replicated) first input
    is cut to this rank's chunk along seq_dim (backward: all-gather)."""

    def __init__(self, seq_dim=1):
        self.seq_dim = seq_dim

    def apply(self, module, group, name):
        seq_dim = self.seq_dim

        def pre_hook(mod, args):
            return (comm.scatter_to_region(args[0], group, seq_dim), *args[1:])

        module.register_forward_pre_hook(pre_hook)
        return module


class ShardAttribute:
    """Divide an int attribute of the module by the tp size (a head count: each rank runs
    n_head / tp heads)."""

    def __init__(self, attr):
        self.attr = attr

    def apply(self, module, group, name):
        value = getattr(module, self.attr, None)
        if not isinstance(value, int):
            raise TypeError(
                f"tensor_parallel: ShardAttribute({self.attr!r}): module {name!r} has no int "
                f"attribute {self.attr!r}"
            )
        n = group.size()
        if value % n != 0:
            raise ValueError(
                f"tensor_parallel: {name}.{self.attr} ({value}) must be divisible by the "
                f"tensor-parallel size ({n})"
            )
        setattr(module, self.attr, value // n)
        return module


_STYLES = (
    ColwiseParallel,
    RowwiseParallel,
    VocabParallel,
    SequenceParallel,
    SplitSequence,
    ShardAttribute,
)


def _styles(pattern, value):
    styles = list(value) if isinstance(value, (list, tuple)) else [value]
    for s in styles:
        if not isinstance(s, _STYLES):
            raise TypeError(
                f"tensor_parallel: plan[{pattern!r}] must be a style ("
                + ", ".join(c.__name__ for c in _STYLES)
                + f") or a list of them, got {type(s).__name__}"
            )
    return styles


def tensor_parallel(model, tp_mesh_or_group, plan):
    """Shard `model`'s modules named by `plan` across the tp group, in place; returns `model`.

    Each new layer keeps its rank's slice of the replaced layer's tensors, so every rank must
    hold the same unsharded weights before the call (build the model after the same
    torch.manual_seed on every rank). Parameters tied between two sharded layers with the same
    layout (a GPT's embedding and output head) stay tied.
    """
    group = resolve_group(tp_mesh_or_group, "tensor_parallel")
    if not isinstance(model, nn.Module):
        raise TypeError(f"tensor_parallel: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, dict):
        raise TypeError(f"tensor_parallel: plan must be a dict, got {type(plan).__name__}")
    modules = list(model.named_modules())
    todo = []
    for pattern, value in plan.items():
        styles = _styles(pattern, value)
        hits = [(n, m) for n, m in modules if n and fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"tensor_parallel: plan key {pattern!r} matches no module of {type(model).__name__}"
            )
        todo.extend((n, m, s) for n, m in hits for s in styles)
    shared = {}  # (id of the unsharded tensor, dim, parts) -> its shard; keeps ties
    for name, module, style in todo:
        old = dict(module.named_parameters(recurse=False))
        new = style.apply(module, group, name)
        if new is not module:
            for pname, (dim, parts) in new.tp_shards.items():
                key = (id(old[pname]), dim, parts)
                if key in shared:
                    setattr(new, pname, shared[key])
                else:
                    shared[key] = getattr(new, pname)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
    model.tp_group = group
    return model


def _unwrap(model):
    return (
        getattr(model, "module", model) if hasattr(model, "require_backward_grad_sync") else model
    )


def _sharded(model):
    """(state_dict key, module, param name, dim, parts) of every sharded tensor."""
    out = []
    for mname, mod in _unwrap(model).named_modules(remove_duplicate=False):
        if isinstance(mod, _TPModule):
            for pname, (dim, parts) in mod.tp_shards.items():
                out.append((f"{mname}.{pname}" if mname else pname, mod, pname, dim, parts))
    return out


def full_state_dict(model):
    """The unsharded state_dict (keys and shapes of the single-process model), on every rank.
    A collective over each sharded layer's group: every rank calls it."""
    model = _unwrap(model)
    sd = model.state_dict()
    for key, mod, pname, dim, parts in _sharded(model):
        if key in sd:
            sd[key] = unshard(getattr(mod, pname), dim, parts, mod.process_group)
    return sd


def load_full_state_dict(model, state_dict, strict=True):
    """Load an unsharded state_dict (from full_state_dict at any tp size, or from the
    single-process model) into this rank's shards."""
    model = _unwrap(model)
    local = dict(state_dict)
    for key, mod, _pname, dim, parts in _sharded(model):
        if key in local:
            full = local[key]
            expect = list(getattr(mod, _pname).shape)
            expect[dim] *= mod.tp_size
            if list(full.shape) != expect:
                raise ValueError(
                    f"load_full_state_dict: state_dict[{key!r}] has shape {tuple(full.shape)}, "
                    f"expected the unsharded shape {tuple(expect)}"
                )
            local[key] = shard_of(full, dim, parts, mod.tp_rank, mod.tp_size)
    return model.load_state_dict(local, strict=strict)


@torch.no_grad()
def clip_grad_norm_(model, max_norm, eps=1e-6):
    """torch.nn.utils.clip_grad_norm_ (2-norm) over the full, unsharded gradient: the squares of
    the sharded gradients are summed over the tp group, the replicated ones counted once.
    Returns the total norm (the same on every rank)."""
    model = _unwrap(model)
    sharded_ids = {id(getattr(m, p)) for _, m, p, _, _ in _sharded(model)}
    groups = {id(m.process_group): m.process_group for _, m, _, _, _ in _sharded(model)}
    if len(groups) > 1:
        raise ValueError("clip_grad_norm_: the sharded layers use more than one process group")
    params = [p for p in model.parameters() if p.grad is not None]
    # Sums in fp32, or fp64 when any gradient is fp64.
    acc = torch.float64 if any(p.grad.dtype == torch.float64 for p in params) else torch.float32
    zero = torch.zeros((), dtype=acc, device=params[0].device if params else "cpu")

    def sq(p):
        return p.grad.to(acc).square().sum()

    sq_sharded = sum((sq(p) for p in params if id(p) in sharded_ids), zero)
    sq_repl = sum((sq(p) for p in params if id(p) not in sharded_ids), zero)
    if groups:
        sq_sharded = comm.all_reduce(sq_sharded.reshape(1), next(iter(groups.values()))).reshape(())
    total = (sq_sharded + sq_repl).sqrt()
    if not math.isfinite(float(max_norm)):
        return total
    coef = (max_norm / (total + eps)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return total
