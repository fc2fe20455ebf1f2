"""torchlane.DistributedDataParallel: a drop-in replacement for torch DDP with a C++ reducer.

The reducer (csrc/reducer/) owns the buckets, the per-parameter autograd hooks and the
all-reduces; this module only does what runs once per forward: argument checks, the buffer
broadcast, marking the start of a synchronised iteration, and the pass-through of the outputs
that unused-parameter detection needs. See Note [Reducer life cycle] in reducer.hpp.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join, Joinable, JoinHook
from torch.nn import Module
from torch.utils._pytree import tree_flatten, tree_unflatten

from torchlane import _C, _agree

_MiB = 1024 * 1024
_DEFAULT_BUCKET_CAP_MB = 25
_FIRST_BUCKET_CAP_BYTES = 1 * _MiB
_BUFFER_BROADCAST_BYTES = 250 * _MiB  # the size torch DDP broadcasts buffers in


def _find_tensors(obj):
    """All tensors in an output: tensors, lists, tuples, dicts and dataclasses, recursively."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _find_tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _find_tensors(item)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in _find_tensors(getattr(obj, f.name))]
    return []


class _OutputSink(torch.autograd.Function):
    """Identity on the forward's outputs (find_unused_parameters only, as torch DDP does).

    Outputs that took no part in the loss get an undefined gradient here, so the graph below them
    still runs and their parameters' hooks fire (with no gradient) instead of leaving their
    buckets waiting (Note [Finding unused parameters]).
    """

    @staticmethod
    def forward(ctx, *tensors):
        ctx.set_materialize_grads(False)
        # Clones, as torch DDP's sink: outputs returned as-is would be views that in-place
        # changes (out.add_(1)) may not touch.
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        return grads


def _pass_through_sink(output):
    leaves, spec = tree_flatten(output)
    positions = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
    if not positions:
        return output
    sunk = _OutputSink.apply(*(leaves[i] for i in positions))
    for i, t in zip(positions, sunk):
        leaves[i] = t
    return tree_unflatten(leaves, spec)


def _dtype_code(dtype: torch.dtype) -> int:
    return list(_DTYPES).index(dtype) if dtype in _DTYPES else -1


_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.complex64,
    torch.complex128,
)


class _JoinHook(JoinHook):
    """Lets a rank that ran out of data shadow the collectives of the others (Note [Join])."""

    def __init__(self, ddp, divide_by_initial_world_size):
        if ddp.verify_layout:
            raise ValueError(
                "Join cannot shadow the layout check of verify_layout=True "
                "(TORCH_DISTRIBUTED_DEBUG=DETAIL): turn one of them off"
            )
        if not divide_by_initial_world_size:
            raise ValueError(
                "torchlane.DistributedDataParallel supports Join only with "
                "divide_by_initial_world_size=True (gradients averaged over the initial world size)"
            )
        self.ddp = ddp

    def main_hook(self):
        ddp = self.ddp
        ddp._reducer.rebuild_buckets()
        if ddp._will_sync_buffers():
            ddp._sync_buffers_from_common_rank(active=False)
        sync = ddp._global_grad_sync_flag(active=False)
        ddp.require_forward_param_sync = sync
        if sync:
            ddp._reducer.run_zero_allreduces()

    def post_hook(self, is_last_joiner: bool):
        ddp = self.ddp
        ddp._broadcast(ddp._module_states(), src=ddp._common_rank(is_last_joiner))


class DistributedDataParallel(Module, Joinable):
    """Data parallelism at the module level, with torch DDP's arguments and behaviour.

    Gradients are packed into size-capped buckets (``bucket_cap_mb``, the first bucket capped at
    1 MiB); each bucket's all-reduce is launched from a C++ autograd hook the moment its last
    gradient is ready, so communication overlaps the rest of the backward pass. See the README
    for the differences from ``torch.nn.parallel.DistributedDataParallel``.

    torchlane-only keywords: ``check_finite=True`` checks the reduced gradients for NaN/Inf while
    writing them back (see ``grads_finite``); ``verify_layout=True`` (default: on when
    ``TORCH_DISTRIBUTED_DEBUG=DETAIL``) checks at every step, before reducing, that all ranks have
    gradients for the same parameters and the same bucket layout, and otherwise raises on every
    rank naming what each rank is missing (it gives up overlapping communication with backward).
    """

    def __init__(
        self,
        module: Module,
        device_ids=None,
        output_device=None,
        dim: int = 0,
        broadcast_buffers: bool = True,
        init_sync: bool = True,
        process_group=None,
        bucket_cap_mb: float | None = None,
        find_unused_parameters: bool = False,
        check_reduction: bool = False,
        gradient_as_bucket_view: bool = False,
        static_graph: bool = False,
        delay_all_reduce_named_params=None,
        param_to_hook_all_reduce=None,
        mixed_precision=None,
        device_mesh=None,
        skip_all_reduce_unused_params: bool = False,
        *,
        check_finite: bool = False,
        verify_layout: bool | None = None,
    ):
        super().__init__()
        Joinable.__init__(self)
        if not isinstance(module, Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        for name, value in (
            ("delay_all_reduce_named_params", delay_all_reduce_named_params),
            ("param_to_hook_all_reduce", param_to_hook_all_reduce),
            ("mixed_precision", mixed_precision),
            ("device_mesh", device_mesh),
        ):
            if value is not None:
                raise ValueError(
                    f"torchlane.DistributedDataParallel does not support {name} (got {value!r}); "
                    "see the README's differences from torch DDP"
                )
        if skip_all_reduce_unused_params:
            raise ValueError(
                "torchlane.DistributedDataParallel does not support skip_all_reduce_unused_params"
            )
        if process_group is None:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError(
                    "Default process group has not been initialized, please make sure to call "
                    "init_process_group (or pass process_group=) before constructing "
                    "torchlane.DistributedDataParallel."
                )
            process_group = dist.distributed_c10d._get_default_group()
        elif not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                "process_group must be a torch.distributed.ProcessGroup or None, got "
                f"{type(process_group).__name__}"
            )
        if bucket_cap_mb is None:
            bucket_cap_mb = _DEFAULT_BUCKET_CAP_MB
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)):
            raise TypeError(f"bucket_cap_mb must be a number, got {bucket_cap_mb!r}")
        if not (bucket_cap_mb > 0 and math.isfinite(bucket_cap_mb)) or bucket_cap_mb >= 2**40:
            raise ValueError(
                f"bucket_cap_mb must be a finite number > 0 and < 2**40 MiB, got {bucket_cap_mb}"
            )

        self.module = module
        self.process_group = process_group
        self.dim = dim
        self.broadcast_buffers = broadcast_buffers
        self.find_unused_parameters = find_unused_parameters
        self.gradient_as_bucket_view = gradient_as_bucket_view
        self.static_graph = static_graph
        self.bucket_bytes_cap = int(bucket_cap_mb * _MiB)
        self.broadcast_bucket_size = _BUFFER_BROADCAST_BYTES
        self.require_backward_grad_sync = True
        self.require_forward_param_sync = True
        self.parameters_to_ignore = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))

        named = [
            (n, p)
            for n, p in module.named_parameters()
            if p.requires_grad and n not in self.parameters_to_ignore
        ]
        if not named:
            raise RuntimeError(
                "DistributedDataParallel is not needed when a module doesn't have any parameter "
                "that requires a gradient."
            )
        if verify_layout is None:
            verify_layout = os.environ.get("TORCH_DISTRIBUTED_DEBUG", "").upper() == "DETAIL"
        self._param_names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._set_devices(device_ids, output_device)
        self._verify_params_across_ranks()
        # See Note [Options that must agree across ranks] (torchlane/_agree.py).
        _agree.check_same_on_all_ranks(
            "torchlane.DistributedDataParallel",
            {
                "bucket_cap_mb": bucket_cap_mb,
                "find_unused_parameters": bool(find_unused_parameters),
                "static_graph": bool(static_graph),
                "check_finite": bool(check_finite),
                "broadcast_buffers": bool(broadcast_buffers),
                "verify_layout": bool(verify_layout),
            },
            process_group,
        )
        if init_sync:
            self._broadcast(self._module_states())
        self._reducer = _C.Reducer(
            self._params,
            self._param_names,
            process_group,
            self.bucket_bytes_cap,
            min(_FIRST_BUCKET_CAP_BYTES, self.bucket_bytes_cap),
            find_unused_parameters,
            gradient_as_bucket_view,
            static_graph,
            check_finite,
            verify_layout,
        )
        self.check_finite = check_finite
        self.verify_layout = verify_layout

    # ---- construction helpers ----

    def _set_devices(self, device_ids, output_device):
        devices = {p.device for p in self._params}
        device_types = {d.type for d in devices}
        if len(devices) > 1 or "cpu" in device_types:
            if device_ids is not None or output_device is not None:
                raise ValueError(
                    "DistributedDataParallel device_ids and output_device arguments only work "
                    "with single-device GPU modules, but got device_ids "
                    f"{device_ids}, output_device {output_device}, and module parameters "
                    f"{devices}."
                )
            self.device_ids = None
            self.output_device = None
        else:
            (device,) = devices
            if device_ids is not None:
                if len(device_ids) != 1:
                    raise ValueError(
                        "device_ids can only be None or contain a single element, got "
                        f"{device_ids}"
                    )
                ids = [torch.device(device.type, i) if isinstance(i, int) else torch.device(i)
                       for i in device_ids]
                if ids[0] != device:
                    raise ValueError(
                        f"device_ids {device_ids} does not match the module's device {device}"
                    )
                self.device_ids = [ids[0].index]
                self.output_device = (
                    torch.device(output_device).index
                    if isinstance(output_device, (str, torch.device))
                    else (output_device if output_device is not None else ids[0].index)
                )
            else:
                self.device_ids = None
                self.output_device = None
        self.device = next(iter(devices)) if len(devices) == 1 else None

    def _module_states(self):
        """Parameters and buffers rank 0 is authoritative for (ignored ones excluded)."""
        params = [
            p.detach()
            for n, p in self.module.named_parameters()
            if n not in self.parameters_to_ignore
        ]
        return params + self._module_buffers()

    def _module_buffers(self):
        return [
            b
            for n, b in self.module.named_buffers()
            if n not in self.parameters_to_ignore
        ]

    def _comm_device(self):
        return self._params[0].device

    def _broadcast(self, tensors, src=0):
        tensors = [t for t in tensors if t.numel() > 0]
        if tensors:
            with torch.no_grad():
                _C.broadcast_coalesced(self.process_group, tensors, self.broadcast_bucket_size, src)

    def _verify_params_across_ranks(self):
        """Every rank must hold the same parameters (names' order, shapes, dtypes). Raises on every
        rank, naming the first parameter that differs, instead of hanging in a collective."""
        records = [[p.dim(), _dtype_code(p.dtype), *p.shape] for p in self._params]
        flat = [len(records)] + [v for r in records for v in r]
        world = dist.get_world_size(self.process_group)
        device = self._comm_device()
        length = torch.tensor([len(flat)], dtype=torch.int64, device=device)
        lengths = [torch.empty_like(length) for _ in range(world)]
        dist.all_gather(lengths, length, group=self.process_group)
        longest = max(int(x) for x in lengths)
        mine = torch.full((longest,), -1, dtype=torch.int64, device=device)
        mine[: len(flat)] = torch.tensor(flat, dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine, group=self.process_group)
        me = dist.get_rank(self.process_group)
        for rank, other in enumerate(gathered):
            theirs = other.tolist()
            if theirs == mine.tolist():
                continue
            if theirs[0] != flat[0]:
                raise RuntimeError(
                    f"DDP expects the same model on every rank: rank {me} has {flat[0]} parameters "
                    f"that require grad, rank {rank} has {theirs[0]}."
                )
            pos = 1
            for name, p, rec in zip(self._param_names, self._params, records):
                n = len(rec)
                if theirs[pos : pos + n] != rec:
                    ndim, dtype = theirs[pos], theirs[pos + 1]
                    shape = theirs[pos + 2 : pos + 2 + ndim]
                    their_dtype = _DTYPES[dtype] if 0 <= dtype < len(_DTYPES) else "other"
                    raise RuntimeError(
                        f"DDP expects the same model on every rank, but parameter '{name}' has "
                        f"shape {list(p.shape)} and dtype {p.dtype} on rank {me} and shape "
                        f"{shape} and dtype {their_dtype} on rank {rank}."
                    )
                pos += n

    # ---- the per-iteration protocol ----

    def _will_sync_buffers(self):
        return self.require_forward_param_sync and self.broadcast_buffers and self._module_buffers()

    def forward(self, *inputs, **kwargs):
        with torch.autograd.profiler.record_function("torchlane.DistributedDataParallel.forward"):
            grad_sync = torch.is_grad_enabled() and self.require_backward_grad_sync
            join_enabled = self._join_config.enable
            if torch.is_grad_enabled():
                # Raises if the previous reduction never finished; with no_sync() too, so the
                # hooks of a non-synchronised backward are never taken for a synchronised one.
                self._reducer.prepare_for_forward()
            if join_enabled:
                Join.notify_join_context(self)
            if torch.is_grad_enabled():
                self._reducer.rebuild_buckets()
            if self._will_sync_buffers():
                if join_enabled:
                    self._sync_buffers_from_common_rank(active=True)
                else:
                    self._broadcast(self._module_buffers())
            if join_enabled:
                self._global_grad_sync_flag(active=True, sync=grad_sync)
            if self.device_ids:
                device = torch.device(self._params[0].device.type, self.device_ids[0])
                inputs, kwargs = _move_to(inputs, device), _move_to(kwargs, device)
            output = self.module(*inputs, **kwargs)
            dynamic_unused = self.find_unused_parameters and not self.static_graph
            if dynamic_unused and grad_sync:
                output = _pass_through_sink(output)
            if grad_sync:
                self.require_forward_param_sync = True
                self._reducer.prepare_for_backward(_find_tensors(output))
            else:
                self.require_forward_param_sync = False
            return output

    # ---- uneven inputs (torch.distributed.algorithms.join) ----

    def join(self, divide_by_initial_world_size=True, enable=True, throw_on_early_termination=False):
        """Context manager for ranks with different numbers of batches, as torch DDP's."""
        return Join(
            [self],
            enable,
            throw_on_early_termination,
            divide_by_initial_world_size=divide_by_initial_world_size,
        )

    def join_hook(self, **kwargs):
        return _JoinHook(self, kwargs.get("divide_by_initial_world_size", True))

    @property
    def join_device(self):
        return self._comm_device()

    @property
    def join_process_group(self):
        return self.process_group

    def _common_rank(self, candidate: bool) -> int:
        """The highest rank for which `candidate` holds (all ranks call this together)."""
        me = dist.get_rank(self.process_group)
        t = torch.tensor([me if candidate else -1], device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        return int(t.item())

    def _sync_buffers_from_common_rank(self, active: bool):
        # Rank 0 may have joined already and hold stale buffers: take them from an active rank.
        src = self._common_rank(active)
        self._broadcast(self._module_buffers(), src=src)

    def _global_grad_sync_flag(self, active: bool, sync: bool = False) -> bool:
        """Whether any active rank synchronises gradients in this iteration."""
        flag = int(active and sync)
        t = torch.tensor([flag], device=self._comm_device())
        dist.all_reduce(t, group=self.process_group)
        return bool(t.item())

    @contextmanager
    def no_sync(self):
        """Skip gradient synchronisation inside the context: gradients accumulate locally in
        `.grad` and are reduced by the first backward after it."""
        old = self.require_backward_grad_sync
        self.require_backward_grad_sync = False
        try:
            yield
        finally:
            self.require_backward_grad_sync = old

    # ---- communication hooks ----

    def register_comm_hook(self, state: Any, hook):
        """Register a communication hook with torch DDP's contract: ``hook(state, bucket)``
        returns a ``torch.futures.Future`` of the bucket's averaged gradient. torchlane's built-in
        hooks (``torchlane.hooks``) run entirely in C++; Python hooks written for torch DDP
        (e.g. ``torch.distributed.algorithms.ddp_comm_hooks.default_hooks.fp16_compress_hook``)
        work unchanged. Only one hook may be registered, before the first backward."""
        make_cpp = getattr(hook, "_torchlane_make_cpp_hook", None)
        if make_cpp is not None:
            cpp_hook = make_cpp(state, self.process_group)
            self._reducer.register_cpp_comm_hook(cpp_hook)
        else:
            if not callable(hook):
                raise TypeError(f"Communication hook must be callable, got {type(hook).__name__}")
            try:
                inspect.signature(hook).bind(state, None)
            except TypeError as e:
                raise ValueError(
                    f"Communication hook must be callable as hook(state, bucket): {e}"
                ) from None
            except ValueError:
                pass  # no signature to inspect (a builtin): let the call decide
            self._reducer.register_python_comm_hook(state, hook)

    @property
    def grads_finite(self) -> bool:
        """With ``check_finite=True``: whether the gradients reduced by the last synchronised
        backward were all finite. Every rank sees the same reduced values, so ``if
        model.grads_finite: optimizer.step()`` skips a step on all ranks alike."""
        if not self.check_finite:
            raise RuntimeError("grads_finite needs torchlane.DistributedDataParallel(..., check_finite=True)")
        return self._reducer.grads_finite

    # ---- observability ----

    def comm_stats(self) -> dict:
        """Buckets (count, sizes, parameter names) and the last synchronised step's volume and
        timing: bytes_reduced (uncompressed), bytes_sent (what this rank handed to the process
        group, after compression), backward_end_ms and comm_end_ms (from the first gradient hook),
        per-bucket ready/launch/return/done times in bucket_events (return_ms: when the bucket's
        launch, i.e. the comm hook call, gave the backward thread back), and, for hooks that
        record them (PowerSGD), every collective in issue order in collectives
        ({bucket, op, launch_ms})."""
        stats = self._reducer.stats()
        buckets = self._reducer.buckets()
        for b in buckets:
            b["params"] = [self._param_names[i] for i in b.pop("param_indices")]
        stats["buckets"] = buckets
        stats["num_buckets"] = len(buckets)
        return stats


def _move_to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_move_to(x, device) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move_to(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _move_to(v, device) for k, v in obj.items()}
    return obj
