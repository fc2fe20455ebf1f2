"""Sharded data parallel (ZeRO stages 1, 2 and 3) on torchlane's C++ gradient hooks.

    model = torchlane.ShardedDataParallel(model, stage=2)
    opt = torchlane.ShardedOptimizer(model, torch.optim.AdamW, lr=3e-4, weight_decay=0.1)
    loss_fn(model(x), y).backward(); opt.clip_grad_norm_(1.0); opt.step(); opt.zero_grad()

The trainable parameters are grouped into the reducer's buckets (one dtype each) and every bucket
becomes one flat tensor padded to a multiple of the world size (Note [Sharded flat bucket] in
csrc/sharding/shard_layout.hpp). Rank r owns slice r of every bucket: its *master shard*, an
`nn.Parameter` the optimizer updates. Gradients are reduced by the C++ `ShardedReducer`
(Note [Sharded gradient flow]); parameters are all-gathered from the shards by
`_C.zero_all_gather_flat`.

    stage 1: grads all-reduced (flat bucket kept), optimizer state sharded, params all-gathered
             after step
    stage 2: grads reduce-scattered per bucket from the C++ hook, only the shard kept
    stage 3: as 2, and the full parameters exist only between forward and the optimizer step:
             all-gathered when forward starts, their storage freed after step

See docs/sharding.md for what each stage keeps in memory and what is not implemented.
"""

import contextlib
import dataclasses
import math
import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from torchlane import _C
from torchlane._sharding_prefetch import BucketGatherer, _all_gather

__all__ = ["MixedPrecision", "ShardedDataParallel", "ShardedOptimizer"]

_FLOATING = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclasses.dataclass(frozen=True)
class MixedPrecision:
    """What torch FSDP2's MixedPrecisionPolicy says, for ShardedDataParallel(mixed_precision=).

    param_dtype: dtype of the full parameters that forward and backward use (all-gathered from
        the master shards, which keep the module's dtype, e.g. float32); None: the module's.
    reduce_dtype: dtype of the gradient reduce-scatter (all-reduce at stage 1); None: param_dtype.
    output_dtype: floating outputs of forward are cast to it; None: left as they are.
    cast_forward_inputs: floating tensors among forward's arguments are cast to param_dtype.
    torch.distributed.fsdp.MixedPrecisionPolicy objects are accepted as they are.
    """

    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    output_dtype: torch.dtype | None = None
    cast_forward_inputs: bool = True


def _check_mixed_precision(mp):
    if mp is None:
        return None
    if not all(hasattr(mp, a) for a in ("param_dtype", "reduce_dtype")):
        raise TypeError(
            "mixed_precision must be a torchlane.MixedPrecision (or torch's MixedPrecisionPolicy) "
            f"or None, got {type(mp).__name__}"
        )
    for name in ("param_dtype", "reduce_dtype", "output_dtype"):
        v = getattr(mp, name, None)
        if v is not None and v not in _FLOATING:
            raise ValueError(f"mixed_precision.{name} must be a floating dtype or None, got {v}")
    return MixedPrecision(
        mp.param_dtype,
        mp.reduce_dtype,
        getattr(mp, "output_dtype", None),
        bool(getattr(mp, "cast_forward_inputs", True)),
    )


def _cast_floating(obj, dtype):
    """obj with its floating tensors (in tuples, lists and dicts) cast to dtype."""
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_cast_floating(x, dtype) for x in obj)
    if isinstance(obj, list):
        return [_cast_floating(x, dtype) for x in obj]
    if isinstance(obj, dict):
        return {k: _cast_floating(v, dtype) for k, v in obj.items()}
    return obj


# Full (unsharded) parameters of every ShardedDataParallel: an optimizer stepping them directly is
# a user error (it must be built on the shards), caught by a global optimizer pre-step hook.
_FULL_PARAMS = {}  # id(param) -> weakref(param) (tensors compare elementwise, so no WeakSet)
_HOOK_INSTALLED = False


def _check_optimizer_params(optimizer, args, kwargs):
    if isinstance(optimizer, _ShardOptim):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            ref = _FULL_PARAMS.get(id(p))
            if ref is not None and ref() is p:
                raise ValueError(
                    f"{type(optimizer).__name__} was built on the full parameters of a "
                    "torchlane.ShardedDataParallel model; build it on the rank's shard with "
                    "torchlane.ShardedOptimizer(model, optim_cls, **kwargs) instead"
                )


def _install_step_check():
    global _HOOK_INSTALLED
    if not _HOOK_INSTALLED:
        register_optimizer_step_pre_hook(_check_optimizer_params)
        _HOOK_INSTALLED = True


class _ShardOptim:
    """Marker base: optimizers built by ShardedOptimizer are exempt from the full-params check."""


class ShardedDataParallel(nn.Module):
    """Wraps `module` for ZeRO-sharded data-parallel training (see the module docstring).

    Arguments follow torchlane.DistributedDataParallel where they exist. `reduce_dtype` (e.g.
    torch.bfloat16) reduces gradients in that dtype (compression of the reduce-scatter or
    all-reduce); the optimizer's master shard keeps the parameters' dtype.
    """

    def __init__(
        self,
        module,
        stage=2,
        process_group=None,
        bucket_cap_mb=25.0,
        find_unused_parameters=False,
        broadcast_buffers=True,
        reduce_dtype=None,
        mixed_precision=None,
        reshard_after_forward=False,
    ):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ShardedDataParallel needs an initialised default process group "
                "(torch.distributed.init_process_group)"
            )
        if not (isinstance(bucket_cap_mb, (int, float)) and bucket_cap_mb > 0):
            raise ValueError(f"bucket_cap_mb must be a positive number, got {bucket_cap_mb!r}")
        if reduce_dtype is not None and reduce_dtype not in (
            torch.float32,
            torch.bfloat16,
            torch.float16,
            torch.float64,
        ):
            raise ValueError(f"reduce_dtype must be a floating dtype or None, got {reduce_dtype}")
        if not isinstance(reshard_after_forward, bool):
            raise TypeError(
                f"reshard_after_forward must be True or False, got {reshard_after_forward!r}"
            )
        if reshard_after_forward and stage != 3:
            raise ValueError(
                f"reshard_after_forward=True applies to stage 3 only (got stage={stage}): stages "
                "1 and 2 keep the full parameters"
            )
        mp = _check_mixed_precision(mixed_precision)
        if mp is not None and reduce_dtype is not None:
            raise ValueError(
                "pass reduce_dtype either directly or in mixed_precision, not both "
                f"(reduce_dtype={reduce_dtype}, mixed_precision={mixed_precision})"
            )
        if mp is not None:
            reduce_dtype = mp.reduce_dtype
        self.mixed_precision = mp
        self.module = module
        self.stage = stage
        self.process_group = process_group or dist.group.WORLD
        self.find_unused_parameters = find_unused_parameters
        self.broadcast_buffers = broadcast_buffers
        self.require_backward_grad_sync = True
        pg = self.process_group
        self.rank = dist.get_rank(pg)
        self.world_size = dist.get_world_size(pg)
        self._check_stage_agrees()

        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("module has no parameter that requires grad")
        for p in params:
            if p.layout != torch.strided or p.is_sparse:
                raise ValueError("ShardedDataParallel supports dense parameters only")
        with torch.no_grad():
            _C.broadcast_coalesced(pg, list(module.state_dict().values()), 1 << 24, 0)

        cap = int(bucket_cap_mb * 1024 * 1024)
        order = list(range(len(params) - 1, -1, -1))
        buckets = _C.compute_bucket_assignment(
            [p.numel() * p.element_size() for p in params],
            [p.dtype for p in params],
            order,
            cap,
            cap,
        )
        self._params = params
        self._buckets = [list(b) for b in buckets]
        self._flats, self._shards, self._layouts = [], [], []
        with torch.no_grad():
            for b in self._buckets:
                offsets, numel, padded, shard_numel = _C.shard_layout(
                    [params[i].numel() for i in b], self.world_size
                )
                ref = params[b[0]]
                flat = torch.zeros(padded, dtype=ref.dtype, device=ref.device)
                for i, off in zip(b, offsets, strict=False):
                    p = params[i]
                    flat[off : off + p.numel()].copy_(p.reshape(-1))
                start = self.rank * shard_numel
                # The master shard keeps the module's dtype; with mixed_precision the full
                # parameters that forward and backward see are param_dtype copies.
                shard = nn.Parameter(flat[start : start + shard_numel].clone())
                if mp is not None and mp.param_dtype is not None and flat.is_floating_point():
                    flat = flat.to(mp.param_dtype)
                for i, off in zip(b, offsets, strict=False):
                    p = params[i]
                    p.data = flat[off : off + p.numel()].view(p.shape)
                self._flats.append(flat)
                self._shards.append(shard)
                self._layouts.append((offsets, numel, padded, shard_numel))
        # Frozen floating parameters are replicated, not sharded: with mixed_precision they are
        # cast to param_dtype too (forward mixes them with the others), their original values
        # kept for state_dict export and checkpoints.
        self._frozen_masters = {}  # id(param) -> (param, copy in the module's dtype)
        if mp is not None and mp.param_dtype is not None:
            trainable = {id(p) for p in params}
            with torch.no_grad():
                for p in module.parameters():
                    if id(p) in trainable or not p.is_floating_point():
                        continue
                    if p.dtype != mp.param_dtype:
                        self._frozen_masters[id(p)] = (p, p.detach().clone())
                        p.data = p.data.to(mp.param_dtype)
        for p in params:
            _FULL_PARAMS[id(p)] = weakref.ref(p)
        _install_step_check()
        self.reducer = _C.ShardedReducer(
            params, self._buckets, self._shards, pg, stage, reduce_dtype
        )
        self._gathered = True
        # See Note [Per-bucket gathering in stage 3].
        self._gatherer = BucketGatherer(self) if reshard_after_forward else None
        if stage == 3:
            self._free_params()

    # ---- collectives of setup ----
    def _check_stage_agrees(self):
        # Every rank runs the same all-reduce, so a mismatch raises everywhere instead of leaving
        # ranks in different collectives.
        t = torch.tensor([self.stage, -self.stage], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        if int(t[0]) != self.stage or -int(t[1]) != self.stage:
            raise ValueError(
                f"stage differs across ranks: this rank has stage={self.stage}, the ranks' "
                f"stages range from {-int(t[1])} to {int(t[0])}; pass the same stage everywhere"
            )

    # ---- parameters ----
    def _gather_params(self):
        if self._gathered:
            return
        if self._gatherer is not None:
            self._gatherer.gather_all()
            self._gathered = True
            return
        with torch.no_grad():
            for flat in self._flats:
                flat.untyped_storage().resize_(flat.numel() * flat.element_size())
            shards = [
                s.detach().to(f.dtype) for s, f in zip(self._shards, self._flats, strict=False)
            ]
            _C.zero_all_gather_flat(self.process_group, self._flats, shards)
        self._gathered = True

    def _free_params(self):
        if self._gatherer is not None:
            self._gatherer.free_all()
        for flat in self._flats:
            flat.untyped_storage().resize_(0)
        self._gathered = False

    def _after_step(self):
        """Called by ShardedOptimizer.step: refresh (stages 1, 2) or free (stage 3) params."""
        self._refresh_params()

    def _refresh_params(self):
        """The master shards changed: re-gather the full parameters (stages 1, 2) or free them
        (stage 3: the next forward gathers)."""
        if self.stage == 3:
            self._free_params()
        else:
            self._gathered = False
            self._gather_params()

    @contextlib.contextmanager
    def summon_full_params(self):
        """Inside, the wrapped module holds its full parameters (gathered from the shards if
        stage 3 freed them), e.g. to evaluate or sample with it; freed again on exit. Collective:
        every rank enters it."""
        was_gathered = self._gathered
        self._gather_params()
        if self._gatherer is not None:
            self._gatherer.pinned = True
        try:
            yield self.module
        finally:
            if self._gatherer is not None:
                self._gatherer.pinned = False
            if not was_gathered and self.stage == 3:
                self._free_params()

    def forward(self, *args, **kwargs):
        if self._gatherer is None:
            self._gather_params()
        else:  # the modules' hooks gather bucket by bucket
            self._gatherer.begin_forward()
        if self.broadcast_buffers and self.world_size > 1:
            buffers = list(self.module.buffers())
            if buffers:
                with torch.no_grad():
                    _C.broadcast_coalesced(self.process_group, buffers, 1 << 24, 0)
        mp = self.mixed_precision
        if mp is not None and mp.cast_forward_inputs and mp.param_dtype is not None:
            args, kwargs = _cast_floating((args, kwargs), mp.param_dtype)
        out = self.module(*args, **kwargs)
        if self._gatherer is not None:
            self._gatherer.end_forward()
        if mp is not None and mp.output_dtype is not None:
            out = _cast_floating(out, mp.output_dtype)
        return out

    @contextlib.contextmanager
    def no_sync(self):
        """Gradients of backward passes inside accumulate locally; the next synced one reduces."""
        old = self.require_backward_grad_sync
        self.require_backward_grad_sync = False
        self.reducer.set_sync(False)
        try:
            yield
        finally:
            self.require_backward_grad_sync = old
            self.reducer.set_sync(old)

    # ---- gradients ----
    def clip_grad_norm_(self, max_norm, norm_type=2.0):
        """Clips the master shards' gradients by the global norm over all ranks; returns it."""
        if not (isinstance(max_norm, (int, float)) and max_norm > 0):
            raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
        norm_type = float(norm_type)
        grads = [s.grad for s in self._shards if s.grad is not None]
        dev = self._shards[0].device
        if norm_type == math.inf:
            local = max((g.detach().abs().max().float() for g in grads), default=None)
            total = local if local is not None else torch.zeros((), device=dev)
            total = total.reshape(1).clone()
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=self.process_group)
            total = total[0]
        else:
            acc = torch.zeros((), dtype=torch.float64, device=dev)
            for g in grads:
                acc += g.detach().double().abs().pow(norm_type).sum()
            acc = acc.reshape(1)
            dist.all_reduce(acc, group=self.process_group)
            total = acc[0] ** (1.0 / norm_type)
        coef = max_norm / (float(total) + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return total.to(torch.float32)

    # ---- state ----
    def full_state_dict(self):
        """The unsharded module state_dict (CPU copies), loadable by the plain nn.Module. With
        mixed_precision the parameters are the master values (the module's own dtype)."""
        if self.mixed_precision is not None:
            return self._master_state_dict()
        was_gathered = self._gathered
        self._gather_params()
        out = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        if not was_gathered:
            self._free_params()
        return out

    def _param_names(self):
        names = {}
        for name, p in self.module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        return names

    def replicated_state_dict(self):
        """The module state_dict without the sharded (trainable) parameters: buffers and frozen
        parameters, the latter in the module's own dtype under mixed_precision (CPU copies)."""
        names = self._param_names()
        sharded = {n for p in self._params for n in names[id(p)]}
        out = {
            k: v.detach().cpu().clone()
            for k, v in self.module.state_dict().items()
            if k not in sharded
        }
        for pid, (_, master) in self._frozen_masters.items():
            for name in names[pid]:
                out[name] = master.detach().cpu().clone()
        return out

    def load_replicated_state_dict(self, state_dict):
        """Inverse of replicated_state_dict (keys it lacks are left as they are)."""
        with torch.no_grad():
            self.module.load_state_dict(state_dict, strict=False)
            names = self._param_names()
            for pid, (_, master) in self._frozen_masters.items():
                for name in names[pid]:
                    if name in state_dict:
                        master.copy_(state_dict[name])

    def _master_state_dict(self):
        names = self._param_names()
        out = self.replicated_state_dict()  # never reads the (stage 3: freed) full parameters
        for b, shard in enumerate(self._shards):
            offsets, numel, _, _ = self._layouts[b]
            flat = _full_flat(self, shard.detach()).cpu()
            for i, off in zip(self._buckets[b], offsets, strict=True):
                p = self._params[i]
                value = flat[off : off + p.numel()].view(p.shape).clone()
                for name in names[id(p)]:
                    out[name] = value
        return {k: out[k] for k in self.module.state_dict()}

    def sharded_state(self):
        """This rank's master shards and the layout they came from (for resharding)."""
        return {
            "world_size": self.world_size,
            "stage": self.stage,
            "shards": [s.detach().cpu().clone() for s in self._shards],
            "numels": [[self._params[i].numel() for i in b] for b in self._buckets],
        }

    def per_rank_bytes(self, optimizer=None):
        """Counted bytes held between steps: full params, gradient buffers, shards, optim state."""
        params = sum(f.numel() * f.element_size() for f in self._flats) if self._gathered else 0
        shards = sum(s.numel() * s.element_size() for s in self._shards)
        grads = self.reducer.persistent_grad_bytes()
        grads += sum(
            s.grad.numel() * s.grad.element_size() for s in self._shards if s.grad is not None
        )
        state = 0
        if optimizer is not None:
            for st in optimizer.state.values():
                for v in st.values():
                    if torch.is_tensor(v) and v.dim() > 0:
                        state += v.numel() * v.element_size()
        return {"params": params + shards, "grads": grads, "optim": state}


def _full_flat(model, shard):
    """All-gathers a shard-shaped tensor into its full padded bucket (float32, CPU)."""
    out = torch.empty(shard.numel() * model.world_size, dtype=shard.dtype, device=shard.device)
    _all_gather(out, shard.contiguous(), group=model.process_group)
    return out


def _local_slice(t, model, bucket, like):
    """This rank's shard of an unpadded full bucket tensor `t` (padding zero)."""
    _, numel, padded, shard_numel = model._layouts[bucket]
    flat = torch.zeros(padded, dtype=t.dtype)
    flat[:numel] = t
    start = model.rank * shard_numel
    return flat[start : start + shard_numel].to(like.device)


def _group_specs(model, param_groups):
    """`param_groups` (torch.optim's list of dicts, a list of parameters, or a function of the
    wrapped module returning either) as [(options, [index into model._params])]."""
    if callable(param_groups):
        param_groups = param_groups(model.module)
    if isinstance(param_groups, (torch.Tensor, dict)):
        param_groups = [param_groups]
    try:
        groups = list(param_groups)
    except TypeError:
        raise TypeError(
            "param_groups must be a list of dicts with a 'params' entry (as torch.optim takes), "
            f"a list of parameters, or a function of the module; got {type(param_groups).__name__}"
        ) from None
    if groups and all(isinstance(g, torch.Tensor) for g in groups):
        groups = [{"params": groups}]
    index = {id(p): i for i, p in enumerate(model._params)}
    known = {id(p) for p in model.module.parameters()}
    seen, specs = {}, []
    for gi, g in enumerate(groups):
        if not isinstance(g, dict) or "params" not in g:
            raise TypeError(
                f"param_groups[{gi}] must be a dict with a 'params' entry, got {type(g).__name__}"
            )
        params = g["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        ids = []
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"param_groups[{gi}]['params'] holds a {type(p).__name__}; it must hold the "
                    "wrapped module's parameters"
                )
            if id(p) not in known:
                raise ValueError(
                    f"param_groups[{gi}]['params'] holds a tensor of shape {list(p.shape)} that is "
                    "not a parameter of the wrapped module"
                )
            if id(p) in seen:
                raise ValueError(
                    f"a parameter of shape {list(p.shape)} is in param_groups[{seen[id(p)]}] and "
                    f"param_groups[{gi}]; a parameter may be in one group only"
                )
            seen[id(p)] = gi
            if id(p) in index:  # frozen parameters (no gradient) are skipped, as torch.optim does
                ids.append(index[id(p)])
        specs.append(({k: v for k, v in g.items() if k != "params"}, ids))
    return specs


def _group_runs(model, specs):
    """Note [Parameter groups on shards]: per group, the (bucket, lo, hi) element ranges of this
    rank's master shards that belong to it, adjacent ranges of one group merged."""
    group_of = {i: gi for gi, (_, ids) in enumerate(specs) for i in ids}
    runs = [[] for _ in specs]
    for b, bucket in enumerate(model._buckets):
        offsets, _, _, shard_numel = model._layouts[b]
        start, stop = model.rank * shard_numel, (model.rank + 1) * shard_numel
        last = None
        for i, off in zip(bucket, offsets, strict=True):
            lo, hi = max(off, start), min(off + model._params[i].numel(), stop)
            gi = group_of.get(i)
            if gi is None or lo >= hi:
                last = None
                continue
            lo, hi = lo - start, hi - start
            if last == gi and runs[gi][-1][2] == lo:
                runs[gi][-1] = (b, runs[gi][-1][1], hi)
            else:
                runs[gi].append((b, lo, hi))
            last = gi
    return runs


class ShardedOptimizer:
    """Builds `optim_cls` on this rank's master shards of `model`.

    param_groups: None (every trainable parameter, one group, options from `kwargs`), or what
    torch.optim takes: a list of dicts {"params": [module parameters], option: value, ...}
    (a function of the wrapped module returning it also works). Each group's options apply to
    exactly the elements of its parameters in this rank's shards; see Note [Parameter groups on
    shards]. Parameters in no group are not updated, as with torch.optim.
    """

    def __init__(self, model, optim_cls, param_groups=None, **kwargs):
        if not isinstance(model, ShardedDataParallel):
            raise TypeError(
                f"model must be a torchlane.ShardedDataParallel, got {type(model).__name__}"
            )
        if isinstance(optim_cls, torch.optim.Optimizer):
            raise TypeError(
                "optim_cls must be an optimizer class (e.g. torch.optim.AdamW), got an optimizer "
                "instance; an optimizer built on the full model cannot be sharded"
            )
        if not (isinstance(optim_cls, type) and issubclass(optim_cls, torch.optim.Optimizer)):
            raise TypeError(
                f"optim_cls must be a torch.optim.Optimizer subclass, got {optim_cls!r}"
            )
        self.model = model
        cls = type(f"Sharded{optim_cls.__name__}", (_ShardOptim, optim_cls), {})
        # Note [Parameter groups on shards]
        # A master shard is a slice of a flat bucket, so one shard holds elements of several
        # parameters, and those may belong to different groups (weights decayed, biases not).
        # Each group gets, per bucket, the element ranges of this rank's shard that belong to
        # its parameters (adjacent ranges merged), and each range becomes an nn.Parameter that
        # aliases the master shard's storage: the optimizer updates the shard in place, and
        # before each step every range's .grad is set to the same range of the shard's
        # gradient (a view, no copy). Elementwise optimizers (Adam, AdamW, SGD, Adagrad) then
        # compute exactly what they compute on the full parameters. Padding and parameters in
        # no group are in no range: they are never updated.
        self._views = None  # None: the optimizer works on the whole shards
        if param_groups is None:
            self.optimizer = cls(model._shards, **kwargs)
            self._group_members = [list(range(len(model._params)))]
            return
        specs = _group_specs(model, param_groups)
        if not specs:
            raise ValueError("param_groups is empty; pass None to optimize every parameter")
        self._group_members = [ids for _, ids in specs]  # indices into model._params
        self._views = []
        groups = []
        for (options, _), runs in zip(specs, _group_runs(model, specs), strict=True):
            params = []
            for b, lo, hi in runs:
                view = nn.Parameter(model._shards[b].detach()[lo:hi])  # aliases the shard
                params.append(view)
                self._views.append((b, lo, hi, view))
            groups.append({**options, "params": params})
        self.optimizer = cls(groups, **kwargs)

    def _link_grads(self):
        """Points every range parameter's .grad at its slice of the master shard's gradient."""
        if self._views is None:
            return
        shards = self.model._shards
        for b, lo, hi, view in self._views:
            g = shards[b].grad
            view.grad = None if g is None else g[lo:hi]

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self, closure=None):
        self._link_grads()
        loss = self.optimizer.step(closure)
        self.model._after_step()
        return loss

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)
        if set_to_none:
            for s in self.model._shards:
                s.grad = None
        elif self._views is not None:
            for s in self.model._shards:
                if s.grad is not None:
                    s.grad.zero_()
        for p in self.model._params:
            p.grad = None

    def clip_grad_norm_(self, max_norm, norm_type=2.0):
        return self.model.clip_grad_norm_(max_norm, norm_type)

    def state_dict(self):
        """This rank's optimizer state on its shards (torch.optim layout)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    # ---- optimizer state per bucket shard (what checkpoints and resharding exchange) ----
    def _ranges(self, b):
        """(lo, hi, optimizer parameter) covering bucket b's shard on this rank."""
        if self._views is None:
            shard = self.model._shards[b]
            return [(0, shard.numel(), shard)]
        return [(lo, hi, v) for bb, lo, hi, v in self._views if bb == b]

    def shard_state(self, b):
        """This rank's optimizer state of bucket `b`: per-element entries (exp_avg, ...) as
        tensors of the shard's length (zero where no group covers the element), the others
        (step) as they are. Independent of how the shard is split into parameter groups."""
        shard_numel = self.model._layouts[b][3]
        out = {}
        for lo, hi, p in self._ranges(b):
            for k, v in self.optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.dim() == 1 and v.numel() == hi - lo:
                    if k not in out:
                        out[k] = torch.zeros(shard_numel, dtype=v.dtype, device=v.device)
                    out[k][lo:hi] = v.detach()
                else:
                    out.setdefault(k, v.detach().clone() if torch.is_tensor(v) else v)
        return out

    def load_shard_state(self, b, state):
        """Inverse of shard_state(b): hands each optimizer parameter its slice."""
        shard_numel = self.model._layouts[b][3]
        for lo, hi, p in self._ranges(b):
            st = {}
            for k, v in state.items():
                if _elementwise(v, shard_numel):
                    st[k] = v[lo:hi].to(device=p.device).clone()
                else:
                    st[k] = v.clone() if torch.is_tensor(v) else v
            self.optimizer.state[p] = st

    def group_options(self):
        """Every parameter group's options (lr, weight_decay, ...) without its parameters."""
        return [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    def load_group_options(self, options):
        if len(options) != len(self.optimizer.param_groups):
            raise ValueError(
                f"the saved optimizer has {len(options)} parameter groups, this one "
                f"{len(self.optimizer.param_groups)}; build it with the same param_groups"
            )
        for g, saved in zip(self.optimizer.param_groups, options, strict=True):
            g.update(saved)

    def _agreed_shard_states(self):
        """shard_state(b) of every bucket, completed with the entries other ranks hold (a rank
        whose shard no group covers has none), so that every rank runs the same collectives."""
        m = self.model
        local = [self.shard_state(b) for b in range(len(m._shards))]
        meta = [
            {
                k: ("t", v.dtype) if _elementwise(v, m._layouts[b][3]) else ("s", v)
                for k, v in st.items()
            }
            for b, st in enumerate(local)
        ]
        every = [None] * m.world_size
        dist.all_gather_object(every, meta, group=m.process_group)
        for b, st in enumerate(local):
            for rank_meta in every:
                for k, (kind, v) in rank_meta[b].items():
                    if k in st:
                        continue
                    if kind == "t":
                        st[k] = torch.zeros(m._layouts[b][3], dtype=v, device=m._shards[b].device)
                    else:
                        st[k] = v
            local[b] = {k: st[k] for k in sorted(st)}
        return local

    # ---- resharding ----
    def full_state(self):
        """Every bucket's parameters and optimizer state, unpadded and unsharded (CPU).

        Collective: every rank must call it. The result is the same on every rank and can be
        loaded into a model of the same architecture at any world size (`load_full_state`).
        """
        m = self.model
        out = {"params": [], "state": [], "numels": []}
        for b, st in enumerate(self._agreed_shard_states()):
            shard = m._shards[b]
            numel = m._layouts[b][1]
            out["params"].append(_full_flat(m, shard.detach())[:numel].cpu())
            full = {}
            for k, v in st.items():
                if _elementwise(v, m._layouts[b][3]):
                    full[k] = _full_flat(m, v)[:numel].cpu()
                else:
                    full[k] = v
            out["state"].append(full)
            out["numels"].append([m._params[i].numel() for i in m._buckets[b]])
        out["param_groups"] = self.group_options()
        return out

    def load_full_state(self, full):
        """Loads `full_state()` output (from any world size) into this rank's shards."""
        m = self.model
        numels = [[m._params[i].numel() for i in b] for b in m._buckets]
        if full["numels"] != numels:
            raise ValueError(
                "the saved state's buckets do not match this model's "
                f"(saved parameter numels per bucket {full['numels']}, model has {numels}); "
                "build the model with the same architecture and bucket_cap_mb"
            )
        self.load_group_options(full["param_groups"])
        with torch.no_grad():
            for b, shard in enumerate(m._shards):
                numel = m._layouts[b][1]
                shard.copy_(_local_slice(full["params"][b], m, b, shard))
                st = {}
                for k, v in full["state"][b].items():
                    if torch.is_tensor(v) and v.dim() == 1 and v.numel() == numel:
                        st[k] = _local_slice(v, m, b, shard).to(
                            shard.dtype if v.is_floating_point() else v.dtype
                        )
                    else:
                        st[k] = v.clone() if torch.is_tensor(v) else v
                self.load_shard_state(b, st)
        m._refresh_params()


def _elementwise(v, shard_numel):
    """Whether an optimizer state entry holds one value per shard element."""
    return torch.is_tensor(v) and v.dim() == 1 and v.numel() == shard_numel
