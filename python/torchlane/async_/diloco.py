"""DiLoCo and local SGD: data parallelism that communicates once every H inner steps.

    model = MyModel()
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
    diloco = torchlane.DiLoCo(model, inner, outer_lr=0.7, outer_momentum=0.9, nesterov=True,
                              sync_every=50, hook=torchlane.hooks.bf16_compress)
    for x, y in data:
        loss_fn(model(x), y).backward()
        inner.step()
        inner.zero_grad()
        diloco.step()          # every sync_every-th call: the outer step (one all-reduce)

Each rank trains its own copy of the model with its own (inner) optimizer for ``sync_every``
steps. Then the ranks average the *pseudo-gradient* ``global - local`` (the start-of-round
parameters minus the current ones) and an outer SGD (Nesterov momentum in DiLoCo, Douillard et
al. 2023) moves the global parameters along it; every rank restarts from the new global
parameters. ``torchlane.LocalSGD`` is the special case ``outer_lr=1, outer_momentum=0``: the new
parameters are the average of the ranks' parameters.

The pseudo-gradients are laid out in flat buckets (the reducer's bucket plan,
``compute_bucket_assignment``) and each bucket is all-reduced once, either plainly or through one
of torchlane's C++ compression hooks (``torchlane.hooks.bf16_compress``, ``topk``, ...), which
runs without the reducer through ``_C._run_comm_hook``.

Streaming (``fragments=F > 1``): the parameters are split into F fragments that synchronise at
staggered inner steps (fragment f at steps where ``(step - f * H // F) % H == 0``), and each
fragment's all-reduce runs on a background thread while the next ``overlap_steps`` inner steps
compute (Douillard et al. 2025, "Streaming DiLoCo"). See Note [Streaming fragment merge].
"""

import concurrent.futures
import math

import torch
import torch.distributed as dist

from torchlane import _C
from torchlane._validate import check_int, check_real

__all__ = ["DiLoCo", "LocalSGD"]


def _check_int(name, value, minimum):
    return check_int(name, value, minimum)


def _check_real(name, value, minimum, maximum=math.inf):
    return check_real(name, value, minimum, maximum)


class _Fragment:
    """A group of parameters synchronised together: global copies, buckets, outer optimizer."""

    def __init__(self, index, params, bucket_cap_bytes, outer):
        self.index = index
        self.params = params
        with torch.no_grad():
            self.globals = [p.detach().clone() for p in params]
        self.outer_opt = torch.optim.SGD(self.globals, **outer)
        # Buckets: the reducer's pure plan, walked in parameter order.
        plan = _C.compute_bucket_assignment(
            [p.numel() * p.element_size() for p in params],
            [p.dtype for p in params],
            list(range(len(params))),
            bucket_cap_bytes,
            bucket_cap_bytes,
        )
        self.buckets = []
        for members in plan:
            first = params[members[0]]
            numels = [params[i].numel() for i in members]
            buffer = torch.empty(sum(numels), dtype=first.dtype, device=first.device)
            views = [
                v.view(params[i].shape) for v, i in zip(buffer.split(numels), members, strict=True)
            ]
            self.buckets.append((members, buffer, views))
        self.snapshot = None  # local params when the in-flight all-reduce was launched
        self.pending = None  # its future

    def fill_pseudo_gradient(self):
        """Writes global - local into the bucket buffers; remembers the local params."""
        with torch.no_grad():
            self.snapshot = [p.detach().clone() for p in self.params]
            for members, _, views in self.buckets:
                torch._foreach_copy_(views, [self.globals[i] for i in members])
                torch._foreach_sub_(views, [self.snapshot[i] for i in members])


class DiLoCo:
    """Local inner steps, then an outer optimizer step on the averaged pseudo-gradient.

    Arguments:
        model: the module every rank trains (same architecture on every rank; its parameters
            are broadcast from rank 0 of ``process_group`` at construction).
        inner_optimizer: the optimizer the caller steps every inner step (kept for reference,
            DiLoCo never steps it; its state is not averaged).
        outer_lr, outer_momentum, nesterov: the outer SGD (DiLoCo: 0.7, 0.9, True).
        sync_every: H, the inner steps between two synchronisations of a fragment (>= 1).
        hook: None (plain all-reduce of each bucket) or a torchlane C++ comm hook such as
            ``torchlane.hooks.bf16_compress`` or ``torchlane.hooks.topk``, with ``hook_state``.
        fragments: 1 (DiLoCo) or F > 1 (streaming DiLoCo; F <= number of parameters and
            F <= sync_every).
        overlap_steps: streaming only: the inner steps a fragment's all-reduce overlaps before
            its outer step is applied (0 <= overlap_steps < sync_every // fragments + 1).
        bucket_cap_mb: size of the flat buckets the pseudo-gradients are reduced in.
        process_group: defaults to the default group.
    """

    def __init__(
        self,
        model,
        inner_optimizer,
        outer_lr=0.7,
        outer_momentum=0.9,
        nesterov=True,
        sync_every=50,
        hook=None,
        hook_state=None,
        fragments=1,
        overlap_steps=None,
        bucket_cap_mb=25.0,
        process_group=None,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(inner_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"inner_optimizer must be a torch.optim.Optimizer, got "
                f"{type(inner_optimizer).__name__}"
            )
        self.sync_every = _check_int("sync_every", sync_every, 1)
        self.outer_lr = _check_real("outer_lr", outer_lr, 0.0)
        if self.outer_lr == 0:
            raise ValueError("outer_lr must be > 0, got 0")
        self.outer_momentum = _check_real("outer_momentum", outer_momentum, 0.0, 1.0)
        if not isinstance(nesterov, bool):
            raise ValueError(f"nesterov must be True or False, got {nesterov!r}")
        if nesterov and self.outer_momentum == 0:
            raise ValueError("nesterov=True needs outer_momentum > 0 (as torch.optim.SGD)")
        bucket_cap = _check_real("bucket_cap_mb", bucket_cap_mb, 0.0)
        if bucket_cap <= 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no parameters that require grad")
        self.fragments = _check_int("fragments", fragments, 1)
        if self.fragments > len(params):
            raise ValueError(
                f"fragments must be <= the number of parameters ({len(params)}), got {fragments}"
            )
        if self.fragments > self.sync_every:
            raise ValueError(
                f"fragments must be <= sync_every ({self.sync_every}) so that fragments sync at "
                f"distinct steps, got {fragments}"
            )
        spacing = self.sync_every // self.fragments
        if overlap_steps is None:
            overlap_steps = 1 if self.fragments > 1 else 0
        self.overlap_steps = _check_int("overlap_steps", overlap_steps, 0)
        if self.overlap_steps > spacing:
            raise ValueError(
                f"overlap_steps must be <= sync_every // fragments ({spacing}) so that one "
                f"fragment's all-reduce finishes before the next one starts, got {overlap_steps}"
            )
        if process_group is None:
            if not dist.is_initialized():
                raise RuntimeError(
                    "torchlane.DiLoCo: torch.distributed is not initialised; call "
                    "torch.distributed.init_process_group() first"
                )
            process_group = dist.distributed_c10d._get_default_group()
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.hook = hook
        self._cpp_hooks = {}
        if hook is not None:
            make = getattr(hook, "_torchlane_make_cpp_hook", None)
            if make is None:
                raise ValueError(
                    "hook must be one of torchlane.hooks' C++ hooks (bf16_compress, "
                    f"fp16_compress, powersgd, topk), got {hook!r}"
                )
            self._hook_make = lambda: make(hook_state, process_group)
        # Same start everywhere (as DDP's constructor broadcast).
        with torch.no_grad():
            _C.broadcast_coalesced(process_group, [p.detach() for p in params], 1 << 24, 0)
        outer = dict(lr=self.outer_lr, momentum=self.outer_momentum, nesterov=nesterov)
        cap_bytes = max(1, int(bucket_cap * 1024 * 1024))
        bounds = [round(i * len(params) / self.fragments) for i in range(self.fragments + 1)]
        self._fragments = [
            _Fragment(f, params[bounds[f] : bounds[f + 1]], cap_bytes, outer)
            for f in range(self.fragments)
        ]
        self._offsets = [f * self.sync_every // self.fragments for f in range(self.fragments)]
        self._executor = None
        if self.fragments > 1 and self.overlap_steps > 0:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="torchlane-diloco"
            )
        self.inner_step = 0
        self.outer_steps = 0

    # ---- communication ----

    def _reduce(self, fragment):
        """Averages the fragment's bucket buffers over the ranks (one collective per bucket)."""
        count = len(fragment.buckets)
        for index, (_, buffer, views) in enumerate(fragment.buckets):
            if self.hook is None:
                dist.all_reduce(buffer, group=self.process_group)
                buffer.div_(self.world_size)
                continue
            # One C++ hook object per fragment (top-k keeps per-bucket residuals).
            cpp = self._cpp_hooks.get(fragment.index)
            if cpp is None:
                cpp = self._cpp_hooks[fragment.index] = self._hook_make()
            result = _C._run_comm_hook(cpp, buffer, index, count, views)
            if result.data_ptr() != buffer.data_ptr():
                buffer.copy_(result)

    def _apply(self, fragment):
        """Outer step on the fragment's globals; local params restart from them.

        Note [Streaming fragment merge]
        When the all-reduce overlapped k inner steps, the local parameters moved on by some
        delta d since the pseudo-gradient was taken. The rank restarts from the new global
        parameters plus d, keeping its k steps of progress; with k = 0 this is plain DiLoCo.
        """
        with torch.no_grad():
            for members, _, views in fragment.buckets:
                for i, v in zip(members, views, strict=True):
                    fragment.globals[i].grad = v
            fragment.outer_opt.step()
            for p, g, snap in zip(
                fragment.params, fragment.globals, fragment.snapshot, strict=True
            ):
                p.sub_(snap).add_(g)  # p = global + (p - snapshot)
            for g in fragment.globals:
                g.grad = None
        fragment.snapshot = None

    def _finish(self, fragment):
        if fragment.pending is not None:
            fut, fragment.pending = fragment.pending, None
            fut.result()
            self._apply(fragment)

    # ---- public ----

    def step(self):
        """Call once after every inner optimizer step. Returns the fragments synchronised now."""
        self.inner_step += 1
        done = []
        for fragment in self._fragments:
            if (
                fragment.pending is not None
                and fragment.launched_at + self.overlap_steps <= self.inner_step
            ):
                self._finish(fragment)
        for fragment, offset in zip(self._fragments, self._offsets, strict=True):
            # Fragment f syncs at offset_f + k * H, k >= 1 (its first round is H + offset_f).
            since = self.inner_step - offset
            if since <= 0 or since % self.sync_every != 0:
                continue
            fragment.fill_pseudo_gradient()
            if self._executor is None:
                self._reduce(fragment)
                self._apply(fragment)
            else:
                # Single worker thread: collectives are issued in the same order on every rank.
                fragment.pending = self._executor.submit(self._reduce, fragment)
                fragment.launched_at = self.inner_step
            done.append(fragment.index)
        if 0 in done:
            self.outer_steps += 1
        return done

    def wait(self):
        """Finishes every in-flight all-reduce and applies its outer step (before evaluation,
        checkpointing, or any other collective on the same process group)."""
        for fragment in self._fragments:
            self._finish(fragment)

    def close(self):
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def state_dict(self):
        return {
            "inner_step": self.inner_step,
            "outer_steps": self.outer_steps,
            "globals": [[g.clone() for g in f.globals] for f in self._fragments],
            "outer_optimizers": [f.outer_opt.state_dict() for f in self._fragments],
        }

    def load_state_dict(self, state):
        self.wait()
        if len(state["globals"]) != len(self._fragments):
            raise ValueError(
                f"state_dict has {len(state['globals'])} fragments, this DiLoCo has "
                f"{len(self._fragments)}"
            )
        self.inner_step = int(state["inner_step"])
        self.outer_steps = int(state["outer_steps"])
        with torch.no_grad():
            for f, gs, os_ in zip(
                self._fragments, state["globals"], state["outer_optimizers"], strict=True
            ):
                torch._foreach_copy_(f.globals, gs)
                f.outer_opt.load_state_dict(os_)


class LocalSGD(DiLoCo):
    """Local SGD: every ``sync_every`` inner steps the ranks' parameters are averaged.

    DiLoCo with ``outer_lr=1, outer_momentum=0``: the outer step moves the global parameters by
    the mean pseudo-gradient, which lands exactly on the mean of the ranks' parameters.
    """

    def __init__(self, model, inner_optimizer, sync_every=1, hook=None, hook_state=None, **kw):
        super().__init__(
            model,
            inner_optimizer,
            outer_lr=1.0,
            outer_momentum=0.0,
            nesterov=False,
            sync_every=sync_every,
            hook=hook,
            hook_state=hook_state,
            **kw,
        )
