"""Gradient compression communication hooks that run in C++.

    model = torchlane.DistributedDataParallel(model)
    model.register_comm_hook(None, torchlane.hooks.bf16_compress)
    model.register_comm_hook(torchlane.hooks.PowerSGDState(rank=4), torchlane.hooks.powersgd)
    model.register_comm_hook(torchlane.hooks.TopKState(ratio=0.01), torchlane.hooks.topk)

Registered on torchlane.DistributedDataParallel, each hook becomes a C++ object (a subclass of
``torchlane._C.CommHook``) that the reducer calls once per bucket without entering Python: the
reducer asks the hook for it through the hook's ``_torchlane_make_cpp_hook(state,
process_group)`` attribute.

The same names are also ordinary ``(state, bucket) -> torch.futures.Future`` hooks, so they can be
registered on torch's own DistributedDataParallel; there they run the same C++ code, but the bucket
is reduced synchronously inside the call (torch DDP calls Python hooks one bucket at a time).

Semantics follow torch's ``ddp_comm_hooks`` (``bf16_compress_hook``, ``fp16_compress_hook``,
``powerSGD_hook``); see Note [Cast compression rounding], Note [PowerSGD] and
Note [Top-k with error feedback] in csrc/hooks/.
"""

import torch
import torch.distributed as dist

from torchlane import _C, _agree
from torchlane._validate import check_bool, check_int, check_real

__all__ = [
    "PowerSGDState",
    "TopKState",
    "bf16_compress",
    "fp16_compress",
    "powersgd",
    "topk",
]


# The option types are checked here (TypeError, naming the argument); the ranges in C++, in one
# place shared with the hooks themselves (_C._check_powersgd_options / _check_topk_options).


def _default_group(process_group):
    if process_group is not None:
        return process_group
    if not dist.is_initialized():
        raise RuntimeError(
            "torchlane.hooks: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group() before using a communication hook"
        )
    return dist.distributed_c10d._get_default_group()


def _check_agree(hook_name, options, process_group):
    """Every rank must register the same hook with the same options: they decide the size of
    each collective. See Note [Options that must agree across ranks] (torchlane/_agree.py)."""
    _agree.check_same_on_all_ranks(
        f"torchlane.hooks.{hook_name}",
        {"hook": hook_name, "state": options},
        process_group,
    )


def _run_on_bucket(cpp_hook, bucket):
    """Runs a C++ hook on a torch DDP GradBucket and returns a completed Future."""
    index = bucket.index()
    # Only "is this the last bucket" matters to the hooks (PowerSGD's step counter).
    bucket_count = index + 1 if bucket.is_last() else index + 2
    result = _C._run_comm_hook(cpp_hook, bucket.buffer(), index, bucket_count, bucket.parameters())
    fut = torch.futures.Future()
    fut.set_result(result)
    return fut


def _cpp_hook_maker(make):
    """Attaches `make(state, process_group) -> _C.CommHook` to a hook function."""

    def decorate(fn):
        fn._torchlane_make_cpp_hook = make
        return fn

    return decorate


# ---- bf16 / fp16 --------------------------------------------------------------------------------


def _cast_group(state, process_group, hook_name):
    # torch's bf16/fp16 hooks take the process group as their state; accept that too.
    if state is None:
        return _default_group(process_group)
    if isinstance(state, dist.ProcessGroup):
        return state
    raise TypeError(
        f"torchlane.hooks.{hook_name}: state must be None (or a ProcessGroup), got "
        f"{type(state).__name__}"
    )


def _make_cast(wire_dtype, hook_name):
    def make(state, process_group):
        group = _cast_group(state, process_group, hook_name)
        _check_agree(hook_name, None, group)
        return _C.CastCompressHook(group, wire_dtype)

    return make


@_cpp_hook_maker(_make_cast("bfloat16", "bf16_compress"))
def bf16_compress(state, bucket):
    """Casts the bucket to bfloat16 (divided by world size), all-reduces, casts back."""
    return _run_on_bucket(
        _C.CastCompressHook(_cast_group(state, None, "bf16_compress"), "bfloat16"), bucket
    )


@_cpp_hook_maker(_make_cast("float16", "fp16_compress"))
def fp16_compress(state, bucket):
    """Casts the bucket to float16 (divided by world size), all-reduces, casts back."""
    return _run_on_bucket(
        _C.CastCompressHook(_cast_group(state, None, "fp16_compress"), "float16"), bucket
    )


# ---- PowerSGD -----------------------------------------------------------------------------------


class _CppHookState:
    """A state whose C++ hook object is made at registration (_make sets _cpp_hook)."""

    _cpp_hook = None

    @property
    def iter(self):
        """Steps seen so far by the hook this state was last registered with."""
        return 0 if self._cpp_hook is None else self._cpp_hook.iter


class PowerSGDState(_CppHookState):
    """Settings of the PowerSGD hook (torch's ``PowerSGDState`` without the process group).

    Arguments and defaults are torch's: ``rank`` is torch's ``matrix_approximation_rank``.
    The step counter, the P/Q memories and the error-feedback memory live in the C++ hook
    created when the state is registered; ``iter`` and ``compression_stats()`` read them.
    """

    def __init__(
        self,
        rank=1,
        start_powerSGD_iter=1_000,
        min_compression_rate=2,
        use_error_feedback=True,
        warm_start=True,
        orthogonalization_epsilon=0,
        random_seed=0,
    ):
        self.rank = check_int("rank", rank)
        self.start_powerSGD_iter = check_int("start_powerSGD_iter", start_powerSGD_iter)
        self.min_compression_rate = check_real("min_compression_rate", min_compression_rate)
        self.use_error_feedback = check_bool("use_error_feedback", use_error_feedback)
        self.warm_start = check_bool("warm_start", warm_start)
        self.orthogonalization_epsilon = check_real(
            "orthogonalization_epsilon", orthogonalization_epsilon
        )
        self.random_seed = check_int("random_seed", random_seed)
        if self.random_seed >= 2**63:
            raise ValueError(f"random_seed must be < 2**32, got {random_seed}")
        _C._check_powersgd_options(
            self.rank,
            self.start_powerSGD_iter,
            self.min_compression_rate,
            self.use_error_feedback,
            self.warm_start,
            self.orthogonalization_epsilon,
            self.random_seed,
        )
        self._cpp_hook = None

    def _make(self, process_group):
        process_group = _default_group(process_group)
        _check_agree("powersgd", repr(self), process_group)
        self._cpp_hook = _C.PowerSGDHook(
            process_group,
            rank=self.rank,
            start_powerSGD_iter=self.start_powerSGD_iter,
            min_compression_rate=self.min_compression_rate,
            use_error_feedback=self.use_error_feedback,
            warm_start=self.warm_start,
            orthogonalization_epsilon=self.orthogonalization_epsilon,
            random_seed=self.random_seed,
        )
        return self._cpp_hook

    def compression_stats(self):
        """(compression rate, elements before, elements after), as torch's state reports."""
        return (0, 0, 0) if self._cpp_hook is None else self._cpp_hook.compression_stats()

    def __repr__(self):
        return (
            f"PowerSGDState(rank={self.rank}, start_powerSGD_iter={self.start_powerSGD_iter}, "
            f"min_compression_rate={self.min_compression_rate}, "
            f"use_error_feedback={self.use_error_feedback}, warm_start={self.warm_start}, "
            f"orthogonalization_epsilon={self.orthogonalization_epsilon}, "
            f"random_seed={self.random_seed})"
        )


def _check_state(state, cls, hook_name):
    if not isinstance(state, cls):
        raise TypeError(
            f"torchlane.hooks.{hook_name}: state must be a torchlane.hooks.{cls.__name__}, got "
            f"{type(state).__name__}"
        )
    return state


def _run_stateful(state, cls, hook_name, bucket):
    """A stateful hook called from Python (torch DDP): its C++ hook lives in the state."""
    _check_state(state, cls, hook_name)
    if state._cpp_hook is None:
        state._make(None)
    return _run_on_bucket(state._cpp_hook, bucket)


def _make_powersgd(state, process_group):
    return _check_state(state, PowerSGDState, "powersgd")._make(process_group)


@_cpp_hook_maker(_make_powersgd)
def powersgd(state, bucket):
    """PowerSGD low-rank compression with error feedback (Vogels et al. 2019)."""
    return _run_stateful(state, PowerSGDState, "powersgd", bucket)


# ---- top-k --------------------------------------------------------------------------------------


class TopKState(_CppHookState):
    """Settings of the top-k hook (top-k sparsification with error feedback).

    Each step, the largest-magnitude ``ratio`` of every bucket's compressed tensors (those with
    two or more dimensions worth compressing, see ``min_compression_rate``) is sent as
    (value, int32 index) pairs; what is not sent stays in a per-rank residual that is added to the
    next step's gradient. With the training recipe of Deep Gradient Compression (Lin et al. 2018):

    * ``start_iter``: the first ``start_iter`` steps all-reduce the gradients uncompressed, with
      the semantics of PowerSGD's ``start_powerSGD_iter`` (a step is counted on the last bucket).
    * ``ratio_warmup_iters``: then, over this many steps, the fraction sent decays exponentially
      from about 1 to ``ratio`` (step j sends ``ratio ** ((j + 1) / (ratio_warmup_iters + 1))``;
      while (value, index) pairs would take at least the dense bytes, the bucket is sent dense).
    * ``min_compression_rate``: a tensor is compressed only if it has two or more dimensions and
      its top-k (values and indices) is at least this many times smaller than the tensor; 1-D
      tensors (biases, norm weights) and the other tensors are reduced uncompressed, as PowerSGD
      does.
    * ``layerwise``: one top-k per tensor (each sends ``ceil(ratio * numel)``) instead of one over
      all compressed tensors of the bucket.

    The step counter and the residuals live in the C++ hook created when the state is registered;
    ``iter`` reads the counter.
    """

    def __init__(
        self,
        ratio=0.01,
        start_iter=0,
        ratio_warmup_iters=0,
        min_compression_rate=2,
        layerwise=False,
    ):
        self.ratio = check_real("ratio", ratio)
        self.start_iter = check_int("start_iter", start_iter)
        self.ratio_warmup_iters = check_int("ratio_warmup_iters", ratio_warmup_iters)
        self.min_compression_rate = check_real("min_compression_rate", min_compression_rate)
        self.layerwise = check_bool("layerwise", layerwise)
        _C._check_topk_options(
            self.ratio,
            self.start_iter,
            self.ratio_warmup_iters,
            self.min_compression_rate,
            self.layerwise,
        )
        self._cpp_hook = None

    def _make(self, process_group):
        process_group = _default_group(process_group)
        _check_agree("topk", repr(self), process_group)
        self._cpp_hook = _C.TopKHook(
            process_group,
            ratio=self.ratio,
            start_iter=self.start_iter,
            ratio_warmup_iters=self.ratio_warmup_iters,
            min_compression_rate=self.min_compression_rate,
            layerwise=self.layerwise,
        )
        return self._cpp_hook

    def __repr__(self):
        return (
            f"TopKState(ratio={self.ratio}, start_iter={self.start_iter}, "
            f"ratio_warmup_iters={self.ratio_warmup_iters}, "
            f"min_compression_rate={self.min_compression_rate}, layerwise={self.layerwise})"
        )


def _make_topk(state, process_group):
    return _check_state(state, TopKState, "topk")._make(process_group)


@_cpp_hook_maker(_make_topk)
def topk(state, bucket):
    """Top-k sparsification with error feedback (Stich et al. 2018; Lin et al. 2018)."""
    return _run_stateful(state, TopKState, "topk", bucket)


# ---- fake kernels of the compression ops (torch.compile / opcheck) ------------------------------


@torch.library.register_fake("torchlane::cast_compress")
def _cast_compress_fake(src, wire_dtype, world_size):
    return src.new_empty(src.shape, dtype=wire_dtype)


@torch.library.register_fake("torchlane::cast_decompress")
def _cast_decompress_fake(wire, dtype):
    return wire.new_empty(wire.shape, dtype=dtype)


@torch.library.register_fake("torchlane::topk_compress_")
def _topk_compress_fake(residual, grad, k):
    return residual.new_empty((k,)), residual.new_empty((k,), dtype=torch.int32)


@torch.library.register_fake("torchlane::topk_scatter_add_")
def _topk_scatter_add_fake(out, values, indices, scale):
    return None


@torch.library.register_fake("torchlane::orthogonalize_")
def _orthogonalize_fake(matrix, epsilon):
    return None
