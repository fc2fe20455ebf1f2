"""torchlane.DistributedDataParallel: a drop-in replacement for torch DDP with a C++ reducer.

The reducer (csrc/reducer/) owns the buckets, the per-parameter autograd hooks and the
all-reduces; this module only does what runs once per forward: argument checks, the buffer
broadcast, marking the start of a synchronised iteration, and the pass-through of the outputs
that unused-parameter detection needs. See Note [Reducer life cycle] in reducer.hpp.
"""

from __future__ import annotations

import inspect
import math
import os
import time
import warnings
import weakref
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join, Joinable, JoinHook
from torch.distributed.utils import _to_kwargs
from torch.nn import Module
from torch.nn.parallel.distributed import _find_tensors as _torch_find_tensors
from torch.utils._pytree import tree_flatten, tree_unflatten

from torchlane import _C, _agree, _sparse
from torchlane.autotune import BucketAutotune, _Autotuner

_MiB = 1024 * 1024
_DEFAULT_BUCKET_CAP_MB = 25
_FIRST_BUCKET_CAP_BYTES = 1 * _MiB
_BUFFER_BROADCAST_BYTES = 250 * _MiB  # the size torch DDP broadcasts buffers in
# As torch DDP reads it at construction.
_USE_SIDE_STREAM_FOR_TENSOR_COPIES = os.environ.get("PYTORCH_DDP_USE_SIDE_STREAM", "1") == "1"


def _find_tensors(obj):
    """All tensors in an output, found exactly as torch DDP finds them (lists, tuples, dicts,
    dataclasses, owned RRefs)."""
    return list(_torch_find_tensors(obj))


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
    for i, t in zip(positions, sunk, strict=True):
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
        if ddp._reducer.rebuild_buckets():
            ddp._buckets_rebuilt = True
        if ddp._will_sync_buffers():
            ddp._sync_buffers_from_common_rank(active=False)
        sync = ddp._global_grad_sync_flag(active=False)
        ddp.require_forward_param_sync = sync
        if sync:
            ddp._reducer.run_zero_allreduces()

    def post_hook(self, is_last_joiner: bool):
        ddp = self.ddp
        ddp._broadcast(ddp._module_states(), src=ddp._common_rank(is_last_joiner))


class _Reducer:
    """``model.reducer``: torch's ``Reducer`` Python contract on torchlane's C++ reducer.

    Libraries drive torch DDP through this object (Lightning's manual optimisation and
    accelerate's ``trigger_sync_in_backward`` call ``prepare_for_backward``). Each call maps onto
    torchlane's reducer; what has no counterpart raises naming the call.
    """

    def __init__(self, ddp):
        self._ddp = weakref.ref(ddp)
        self._sample_rate = 100

    @property
    def _cpp(self):
        return self._ddp()._reducer

    def prepare_for_backward(self, outputs):
        """Arm the reducer for a synchronised backward from ``outputs`` (a tensor or a list)."""
        self._cpp.prepare_for_backward(_find_tensors(outputs))

    def prepare_for_forward(self):
        self._cpp.prepare_for_forward()

    def _rebuild_buckets(self) -> bool:
        rebuilt = self._cpp.rebuild_buckets()
        if rebuilt:
            self._ddp()._buckets_rebuilt = True
        return rebuilt

    def _set_static_graph(self):
        self._ddp()._make_static()

    def _set_ddp_runtime_logging_sample_rate(self, sample_rate):
        self._sample_rate = int(sample_rate)

    def _get_zeros_like_grad_buckets(self):
        raise NotImplementedError(
            "torchlane.DistributedDataParallel: reducer._get_zeros_like_grad_buckets() has no "
            "counterpart (torchlane's GradBuckets live in C++ only); see docs/ddp.md"
        )

    def __getattr__(self, name):
        raise AttributeError(
            f"torchlane.DistributedDataParallel's reducer has no torch Reducer method {name!r}; "
            "see docs/ddp.md for the supported calls"
        )


# As torch's logging data records them ("N/A" when unset).
_LOGGED_ENV = ("MASTER_PORT", "MASTER_ADDR", "TORCH_DISTRIBUTED_DEBUG", "CUDA_VISIBLE_DEVICES")
# torch's logging data names dtypes as c10's TypeMeta does.
_C10_DTYPE_NAMES = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "c10::Half",
    torch.bfloat16: "c10::BFloat16",
    torch.complex64: "c10::complex<float>",
    torch.complex128: "c10::complex<double>",
}


def _c10_dtype_name(dtype: torch.dtype) -> str:
    return _C10_DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


_RUNTIME_RESET_KEYS = (
    "forward_compute_time",
    "backward_compute_time",
    "backward_comm_time",
    "backward_compute_comm_overlap_time",
    "forward_compute_time_start",
    "backward_compute_time_start",
    "backward_comm_time_start",
    "backward_compute_time_end",
    "backward_comm_time_end",
)


class _LoggingData:
    def __init__(self, strs_map, ints_map):
        self.strs_map = strs_map
        self.ints_map = ints_map


class _Logger:
    """``model.logger``: the subset of torch's ``dist.Logger`` that DDP code calls."""

    def __init__(self, ddp):
        self._ddp = weakref.ref(ddp)
        self._comm_hook = ""
        self._join = False
        self._error = None  # set_error_and_log
        self._iterations = 0  # synchronised forwards, as torch Reducer's num_iterations_
        self._recorded = 0  # sampled iterations whose times went into the averages
        self._sample = None  # the sampled iteration in flight: (iteration, forward start ns)
        self._strs = {}  # the string runtime keys (ready order, rebuilt buckets)
        # The runtime keys of the logging data (Note [Runtime logging]).
        self._runtime = {"iteration": 0}

    def _set_static_graph(self):
        pass  # the static graph is visible in the logging data (static_graph)

    def _set_comm_hook_name(self, name):
        self._comm_hook = str(name)

    def _set_uneven_input_join(self):
        self._join = True

    def set_construction_data_and_log(self, *args, **kwargs):
        pass

    def set_error_and_log(self, error):
        """As torch's Logger: the logging data reports the error (has_error, error)."""
        self._error = str(error)

    # Note [Runtime logging]
    # torch DDP samples the step times of iterations 1-10 and then of every sample_rate-th one
    # (_set_ddp_runtime_logging_sample_rate); at the next synchronised forward the logger copies
    # them into the logging data with their running averages (avg_*), all in nanoseconds, and
    # sets "iteration", the gradient ready order and, once, the rebuilt buckets. The same here:
    # the forward's start is stamped with time.monotonic_ns(), the steady clock the C++ reducer
    # stamps its events with (the first gradient hook, the end of the backward, each bucket's
    # launch and completion; Reducer::stats()). One difference: torch stamps the end of the
    # communication after waiting for the buckets, so it never precedes the end of the backward;
    # torchlane takes the last bucket's completion, which can, so the overlap is the part of the
    # communication window before the backward ended, min(compute end, comm end) - comm start
    # (torch's compute end - comm start, the same whenever the communication ends last).

    def _start_iteration(self):
        """A synchronised forward starts (torch: Reducer::prepare_for_forward)."""
        self._iterations += 1
        it = self._iterations
        rate = self._ddp().reducer._sample_rate
        sampled = it <= 10 or it % rate == 0
        self._sample = (it, time.monotonic_ns()) if sampled else None

    def set_runtime_stats_and_log(self):
        """Copy the last sampled iteration's times into the logging data (torch's contract)."""
        sample, self._sample = self._sample, None
        if sample is None:
            return  # not a sampled iteration
        iteration, forward_start = sample
        ddp = self._ddp()
        rt = self._runtime
        self._recorded += 1
        n = self._recorded
        rt["iteration"] = iteration
        rt.update(dict.fromkeys(_RUNTIME_RESET_KEYS, 0))  # as torch: 0 unless measured below
        if "rebuilt_bucket_sizes" not in self._strs and ddp._buckets_rebuilt:
            buckets = ddp._reducer.buckets()
            self._strs["rebuilt_bucket_sizes"] = ", ".join(str(b["bytes"]) for b in buckets)
            self._strs["rebuilt_per_bucket_param_indices"] = ", ".join(
                " ".join(str(i) for i in b["param_indices"]) for b in buckets
            )
        stats = ddp._reducer.stats()
        launches = [e["launch_ms"] for e in stats["bucket_events"]]
        first_hook = stats["first_hook_ns"]
        if first_hook < forward_start or not launches:
            return  # the sampled forward had no backward (yet)
        if stats["ready_order"]:
            self._strs["prev_iteration_grad_ready_order_indices"] = ", ".join(
                str(i) for i in stats["ready_order"]
            )

        def at(ms):
            return first_hook + round(ms * 1_000_000)

        rt["num_buckets_reduced"] = len(launches)
        if not ddp.find_unused_parameters:
            rt["unused_parameter_size"] = 0  # (with find_unused_parameters: not recorded)
        events = {
            "forward_compute_time_start": forward_start,
            "backward_compute_time_start": first_hook,
            "backward_comm_time_start": at(min(launches)),
            "backward_compute_time_end": at(stats["backward_end_ms"]),
            "backward_comm_time_end": at(stats["comm_end_ms"]),
        }
        times = {
            "forward_compute_time": first_hook - forward_start,
            "backward_compute_time": events["backward_compute_time_end"] - first_hook,
            "backward_comm_time": events["backward_comm_time_end"]
            - events["backward_comm_time_start"],
            "backward_compute_comm_overlap_time": max(
                0,
                min(events["backward_compute_time_end"], events["backward_comm_time_end"])
                - events["backward_comm_time_start"],
            ),
        }
        # The stamps as torch's, in ns since the epoch; the durations from the steady clock.
        epoch = time.time_ns() - time.monotonic_ns()
        rt.update({key: stamp + epoch for key, stamp in events.items()})
        for key, value in times.items():
            rt[key] = value
            rt[f"avg_{key}"] = (rt.get(f"avg_{key}", 0) * (n - 1) + value) // n

    def _get_ddp_logging_data(self):
        ddp = self._ddp()
        buckets = ddp._reducer.buckets()
        pg = ddp.process_group
        ints = {
            "world_size": dist.get_world_size(pg),
            "rank": dist.get_rank(pg),
            "bucket_cap_bytes": ddp.bucket_bytes_cap,
            "find_unused_parameters": int(ddp.find_unused_parameters),
            "gradient_as_bucket_view": int(ddp.gradient_as_bucket_view),

            "broadcast_buffers": int(bool(ddp.broadcast_buffers)),
            "num_parameter_tensors": len(ddp._params),
            "total_parameter_size_bytes": sum(p.numel() * p.element_size() for p in ddp._params),
            "has_rebuilt_buckets": int(ddp._buckets_rebuilt),
            "has_sync_bn": int(
                any(isinstance(m, torch.nn.SyncBatchNorm) for m in ddp.module.modules())
            ),
            "output_device": -1 if ddp.output_device is None else ddp.output_device,
            "is_multi_device_module": 0,
            **self._runtime,
        }
        # As torch's, these keys are present only once set.
        if ddp.static_graph:
            ints["static_graph"] = 1
        if self._join:
            ints["join_uneven_inputs"] = 1
        strs = {
            "module_name": type(ddp.module).__name__,
            "backend_name": pg.name(),
            "dtypes": ", ".join(sorted({_c10_dtype_name(p.dtype) for p in ddp._params})),
            "bucket_sizes": ", ".join(str(b["bytes"]) for b in buckets),
            "device_ids": ", ".join(str(i) for i in (ddp.device_ids or [])),
            **{key.lower(): os.environ.get(key, "N/A") for key in _LOGGED_ENV},
            **self._strs,
        }
        if self._comm_hook:
            strs["comm_hook"] = self._comm_hook
        if self._error is not None:
            ints["has_error"] = 1
            strs["error"] = self._error
        if strs["backend_name"] == "gloo":
            for key in ("GLOO_SOCKET_IFNAME", "GLOO_DEVICE_TRANSPORT"):
                strs[key.lower()] = os.environ.get(key, "N/A")
            try:
                ints["gloo_num_threads"] = pg._get_backend(torch.device("cpu")).options._threads
            except (AttributeError, RuntimeError):
                pass  # a process group without a Gloo backend object
        return _LoggingData(strs, ints)


class DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
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

    _buckets_rebuilt = False  # whether the reducer rebuilt its buckets (the logging data)

    # Note [A torch DDP without torch's reducer]
    # accelerate, Lightning, torch.distributed.checkpoint and dynamo recognise DDP with
    # isinstance(model, torch.nn.parallel.DistributedDataParallel): for anything else they wrap
    # the model again (two all-reduces per step), skip the no_sync/prepare_for_backward protocol
    # (silent divergence) or keep the `module.` prefix. So torchlane's class IS a torch DDP, but
    # its __init__ never runs torch's: that would build a torch Reducer whose hooks all-reduce
    # every gradient a second time. Only Module.__init__ and Joinable.__init__ run; every torch
    # DDP method that would reach state only torch's __init__ creates (its Reducer, Logger,
    # modules_buffers, ...) is overridden below, either with torchlane's version or with one
    # that raises naming the method (see _UNSUPPORTED). `reducer` and `logger` are small Python
    # objects with the parts of torch's Reducer/Logger contract that other code calls, mapped
    # onto torchlane's C++ reducer (_Reducer, _Logger above).

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
        row_sparse_params=None,
    ):
        Module.__init__(self)  # not torch DDP's: Note [A torch DDP without torch's reducer]
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
        autotune = None
        if isinstance(bucket_cap_mb, str):
            if bucket_cap_mb != "auto":
                raise ValueError(f'bucket_cap_mb must be a number or "auto", got {bucket_cap_mb!r}')
            autotune = BucketAutotune()
        elif isinstance(bucket_cap_mb, BucketAutotune):
            autotune = bucket_cap_mb
        if autotune is not None:
            # Note [Bucket cap autotuning]: start from the default; the search re-plans later.
            bucket_cap_mb, agreed_cap = _DEFAULT_BUCKET_CAP_MB, ("auto", autotune.agreement_key())
        elif isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)):
            raise TypeError(f"bucket_cap_mb must be a number, got {bucket_cap_mb!r}")
        if not (bucket_cap_mb > 0 and math.isfinite(bucket_cap_mb)) or bucket_cap_mb >= 2**40:
            raise ValueError(
                f"bucket_cap_mb must be a finite number > 0 and < 2**40 MiB, got {bucket_cap_mb}"
            )
        else:
            agreed_cap = bucket_cap_mb

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
        # Note [Sparse gradients] (reducer.cpp): torch DDP's rule for which gradients are sparse.
        self._sparse_params = _sparse.expected_sparse(module, self._params)
        self._row_sparse_params = _sparse.row_sparse_indices(
            row_sparse_params, self._param_names, self._params, self._sparse_params
        )
        self._set_devices(device_ids, output_device)
        self._verify_params_across_ranks()
        # See Note [Options that must agree across ranks] (torchlane/_agree.py).
        _agree.check_same_on_all_ranks(
            "torchlane.DistributedDataParallel",
            {
                "bucket_cap_mb": agreed_cap,
                "find_unused_parameters": bool(find_unused_parameters),
                "static_graph": bool(static_graph),
                "check_finite": bool(check_finite),
                "broadcast_buffers": bool(broadcast_buffers),
                "verify_layout": bool(verify_layout),
                "row_sparse_params": sorted(self._param_names[i] for i in self._row_sparse_params),
            },
            process_group,
        )
        if init_sync:
            self._broadcast(self._module_states())
        self.check_finite = check_finite
        self.verify_layout = verify_layout
        self._autotune_config = autotune
        self._make_reducer()

    def _make_reducer(self):
        self._reducer = _C.Reducer(
            self._params,
            self._param_names,
            self.process_group,
            self.bucket_bytes_cap,
            min(_FIRST_BUCKET_CAP_BYTES, self.bucket_bytes_cap),
            self.find_unused_parameters,
            self.gradient_as_bucket_view,
            self.static_graph,
            self.check_finite,
            self.verify_layout,
            self._sparse_params,
            self._row_sparse_params,
        )
        self._synced_forwards = 0
        self._has_comm_hook = False
        self._autotuner = None
        if self._autotune_config is not None:
            self._autotuner = _Autotuner(
                self._autotune_config,
                self._reducer,
                self.process_group,
                self._comm_device(),
                _FIRST_BUCKET_CAP_BYTES / _MiB,
            )
        self.reducer = _Reducer(self)
        self.logger = _Logger(self)
        if not self.require_backward_grad_sync:
            self._reducer.allow_local_backward()

    # ---- torch DDP's attributes and private API (Note [A torch DDP without torch's reducer]) ----

    @property
    def require_backward_grad_sync(self) -> bool:
        return self.__dict__.get("_require_backward_grad_sync", True)

    @require_backward_grad_sync.setter
    def require_backward_grad_sync(self, value: bool) -> None:
        # Setting it off (no_sync(), accelerate, Lightning) is what allows a backward to
        # accumulate locally; see Note [No silent gradient loss] in reducer.hpp.
        self.__dict__["_require_backward_grad_sync"] = bool(value)
        reducer = self.__dict__.get("_reducer")
        if not value and reducer is not None:
            reducer.allow_local_backward()

    def _make_static(self):
        """static_graph=True after construction: rebuilds the C++ reducer, before the first
        synchronised forward only (torch allows it only then too, in effect)."""
        if self.static_graph:
            warnings.warn(
                "You've set static_graph to be True, no need to set it again.", stacklevel=3
            )
            return
        if self._synced_forwards or self._has_comm_hook:
            self._log_and_throw(
                RuntimeError,
                "torchlane.DistributedDataParallel: _set_static_graph() should be called before "
                "training loop starts (before the first forward) and before register_comm_hook; "
                "pass static_graph=True to the constructor instead",
            )
        self.static_graph = True
        self._make_reducer()

    def _set_static_graph(self):
        """As torch DDP's: turn on static_graph (before the first forward)."""
        self._make_static()

    def _get_ddp_logging_data(self):
        data = self.logger._get_ddp_logging_data()
        return {**data.strs_map, **data.ints_map}

    def _set_ddp_runtime_logging_sample_rate(self, sample_rate):
        if sample_rate < 1:
            raise ValueError(
                "DDP runtime logging sample rate should be equal or greater than 1, got "
                f"{sample_rate}"
            )
        self.reducer._set_ddp_runtime_logging_sample_rate(sample_rate)

    def _register_fused_optim(self, optim, *args, optim_params=None, **kwargs):
        raise NotImplementedError(
            "torchlane.DistributedDataParallel does not support _register_fused_optim (an "
            "optimizer run from the reducer per bucket); call optimizer.step() after backward"
        )

    def _log_and_throw(self, err_type, err_msg):
        """As torch DDP's: record the error in the logging data (has_error, error), then raise."""
        self.logger.set_error_and_log(f"{err_type}: {err_msg}")
        raise err_type(err_msg)

    def will_sync_module_buffers(self):
        return bool(self._will_sync_buffers())

    def _check_reducer_finalized(self):
        # prepare_for_forward raises (naming the unready parameters) if a reduction is pending.
        self._reducer.prepare_for_forward()

    def __getstate__(self):
        if self.process_group is not dist.distributed_c10d._get_default_group():
            raise RuntimeError(
                "DDP Pickling/Unpickling are only supported when using DDP with the default "
                "process group. That is, when you have called init_process_group and have not "
                "passed process_group argument to DDP constructor"
            )
        if self._has_comm_hook:
            raise RuntimeError(
                "torchlane.DistributedDataParallel cannot pickle a model with a communication "
                "hook (its state lives in C++); register the hook again on the copy"
            )
        state = dict(self.__dict__)
        for name in ("process_group", "_reducer", "reducer", "logger", "_autotuner"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        self.process_group = dist.distributed_c10d._get_default_group()
        Module.__setstate__(self, state)
        self._make_reducer()

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
            for name, p, rec in zip(self._param_names, self._params, records, strict=True):
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

    # Note [torch.compile of the wrapped model]: as torch DDP's forward, this frame is skipped
    # by dynamo (its reducer calls are not traceable) while the wrapped module's forward, called
    # inside _inside_ddp_forward(), is compiled whole. _inside_ddp_forward marks this model as
    # the active DDP module, so dynamo's DDPOptimizer splits the compiled graph at
    # bucket_bytes_cap boundaries and each piece's backward runs the C++ gradient hooks as the
    # eager backward does, keeping bucket all-reduces overlapped with the rest of the backward.
    @torch.compiler.disable(recursive=False)
    def forward(self, *inputs, **kwargs):
        with torch.autograd.profiler.record_function("torchlane.DistributedDataParallel.forward"):
            grad_sync = torch.is_grad_enabled() and self.require_backward_grad_sync
            join_enabled = self._join_config.enable
            if torch.is_grad_enabled():
                # Raises if the previous reduction never finished; with no_sync() too, so the
                # hooks of a non-synchronised backward are never taken for a synchronised one.
                self._reducer.prepare_for_forward()
            if grad_sync:
                self.logger.set_runtime_stats_and_log()  # Note [Runtime logging]
                self.logger._start_iteration()
            if join_enabled:
                Join.notify_join_context(self)
            if torch.is_grad_enabled() and self._reducer.rebuild_buckets():
                self._buckets_rebuilt = True
            if self._autotuner is not None and grad_sync:
                self._autotune_step(join_enabled)
            if self._will_sync_buffers():
                if join_enabled:
                    self._sync_buffers_from_common_rank(active=True)
                else:
                    self._broadcast(self._module_buffers())
            if join_enabled:
                self._global_grad_sync_flag(active=True, sync=grad_sync)
            if self.device_ids:
                device = torch.device(self._params[0].device.type, self.device_ids[0])
                # torch DDP's own input mover (namedtuples, PackedSequence, side stream).
                moved_inputs, moved_kwargs = _to_kwargs(
                    inputs, kwargs, device, _USE_SIDE_STREAM_FOR_TENSOR_COPIES
                )
                inputs, kwargs = moved_inputs[0], moved_kwargs[0]
            with self._inside_ddp_forward():
                output = self.module(*inputs, **kwargs)
            dynamic_unused = self.find_unused_parameters and not self.static_graph
            if dynamic_unused and grad_sync:
                output = _pass_through_sink(output)
            if grad_sync:
                self.require_forward_param_sync = True
                self._synced_forwards += 1
                self._reducer.prepare_for_backward(_find_tensors(output))
            else:
                self.require_forward_param_sync = False
            return output

    def _autotune_step(self, join_enabled: bool):
        # Note [Bucket cap autotuning]. From the second synchronised step on (after the first
        # one's bucket rebuild); paused inside join(), where joined ranks run no forward and
        # could not take part in the try's all-reduce.
        tuner = self._autotuner
        if join_enabled or self._synced_forwards == 0:
            tuner.pause()
            return
        tuner.on_synced_forward()
        cap, _ = tuner.current_caps_mb()
        if cap is not None:
            self.bucket_bytes_cap = int(cap * _MiB)

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
        if make_cpp is None:
            _check_comm_hook(hook)
        if make_cpp is not None:
            cpp_hook = make_cpp(state, self.process_group)
            self._reducer.register_cpp_comm_hook(cpp_hook)
            self._has_comm_hook = True
        else:
            try:
                inspect.signature(hook).bind(state, None)
            except TypeError as e:
                raise ValueError(
                    f"Communication hook must be callable as hook(state, bucket): {e}"
                ) from None
            except ValueError:
                pass  # no signature to inspect (a builtin): let the call decide
            self._reducer.register_python_comm_hook(state, hook)
            self._has_comm_hook = True
            self.logger._set_comm_hook_name(getattr(hook, "__qualname__", repr(hook)))

    def _check_comm_hook(self, hook):
        """torch DDP's hook checks (see the module-level _check_comm_hook)."""
        _check_comm_hook(hook)

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
        ({bucket, op, launch_ms}). Sparse buckets (Note [Sparse gradients]) are marked in
        buckets[i]["sparse"] ("coo" or "row"); row_sparse_bytes_saved is what the row_sparse_params
        sent less than their dense gradients would have."""
        stats = self._reducer.stats()
        buckets = self._reducer.buckets()
        for b in buckets:
            b["params"] = [self._param_names[i] for i in b.pop("param_indices")]
        stats["buckets"] = buckets  # each with "sparse": "coo", "row" or None
        stats["num_buckets"] = len(buckets)
        if self._autotuner is not None:
            stats["autotune"] = self._autotuner.state()
        return stats


def _check_comm_hook(hook):
    """torch DDP's checks of a Python comm hook (DistributedDataParallel._check_comm_hook), with
    torch's sentences first and torchlane's detail after them. String annotations (a module with
    ``from __future__ import annotations``) are resolved first; torch compares them unresolved."""
    if not callable(hook):
        raise TypeError(
            f"Communication hook must be callable. torchlane: got {type(hook).__name__}"
        )
    try:
        try:
            sig = inspect.signature(hook, eval_str=True)
        except Exception:  # an annotation that does not evaluate: compare it as written
            sig = inspect.signature(hook)
    except (TypeError, ValueError):
        return  # no signature to inspect (a builtin): let the call decide
    params = list(sig.parameters.values())
    bucket = sig.parameters.get("bucket", params[1] if len(params) > 1 else None)
    if bucket is not None and bucket.annotation not in (inspect.Parameter.empty, dist.GradBucket):
        raise ValueError(
            "Communication hook: bucket annotation should be dist.GradBucket. "
            f"torchlane: parameter {bucket.name!r} of {getattr(hook, '__qualname__', hook)!r} "
            f"is annotated {bucket.annotation!r}"
        )
    if sig.return_annotation not in (inspect.Signature.empty, torch.futures.Future[torch.Tensor]):
        raise ValueError(
            "Communication hook: return annotation should be torch.futures.Future[torch.Tensor]. "
            f"torchlane: {getattr(hook, '__qualname__', hook)!r} returns "
            f"{sig.return_annotation!r}"
        )


# torch DDP methods that would run torch code against state torchlane never builds (torch's
# Reducer, Logger, modules_buffers, ...): Note [A torch DDP without torch's reducer].
_UNSUPPORTED = (
    "_register_accum_grad_hook",
    "_delayed_all_reduce_hook",
    "_register_delay_all_reduce_hook",
    "_setup_in_backward_optimizers",
    "_fire_reducer_autograd_hook",
    "_root_copy_hook",
    "_module_wait_for_copy_hook",
    "_ddp_init_helper",
    "_build_params_for_reducer",
    "_assign_modules_buffers",
    "_build_debug_param_to_name_mapping",
    "_lazy_init",
    "_pre_forward",
    "_post_forward",
    "_run_ddp_forward",
    "_clear_grad_buffer",
    "scatter",
    "to_kwargs",
    "gather",
    "_check_global_requires_backward_grad_sync",
    "_check_and_sync_module_buffers",
    "_sync_final_model",
    "_match_all_reduce_for_bwd_pass",
    "_match_unused_params_allreduce",
    "_register_buffer_comm_hook",
    "_register_builtin_comm_hook",
    "_check_sync_bufs_post_fwd",
    "_check_sync_bufs_pre_fwd",
    "_find_common_rank",
    "_sync_buffers",
    "_sync_module_buffers",
    "_default_broadcast_coalesced",
    "_passing_sync_batchnorm_handle",
    "_set_sparse_metadata",
    "_update_process_group",
    "_set_ddp_sink_clone",
    "_remove_autograd_hooks",
    "_set_mixed_precision_param_dtype",
)


def _unsupported(name):
    def method(self, *args, **kwargs):
        raise NotImplementedError(
            f"torchlane.DistributedDataParallel does not support torch DDP's {name}() (it needs "
            "torch's own Reducer); see docs/ddp.md for the differences from torch DDP"
        )

    method.__name__ = name
    return method


for _name in _UNSUPPORTED:
    if hasattr(torch.nn.parallel.DistributedDataParallel, _name):
        setattr(DistributedDataParallel, _name, _unsupported(_name))
