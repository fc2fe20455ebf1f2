"""Lightning with torchlane DDP: ``Trainer(strategy="torchlane_ddp")``.

    import torchlane.integrations.lightning  # registers the "torchlane_ddp" strategies
    trainer = lightning.Trainer(strategy="torchlane_ddp", ...)

or pass an instance, ``Trainer(strategy=DDPStrategy(bucket_cap_mb=8))``, to give torchlane DDP
arguments. ``DDPStrategy`` is Lightning's own ``DDPStrategy`` (``lightning.pytorch``) with one
difference: ``_setup_model`` wraps the LightningModule in ``torchlane.DistributedDataParallel``
instead of torch's. Everything else is Lightning's code, which recognises torchlane DDP as torch
DDP (it is a subclass): ``no_sync`` during gradient accumulation, ``model.reducer`` armed by
``manual_backward``, the comm-hook registration, the unwrapping before checkpoints.

Registered names (the launch methods of Lightning's "ddp" family): ``torchlane_ddp`` (popen,
Lightning starts one process per device or uses an external launcher such as ``torchrun``),
``torchlane_ddp_spawn``, ``torchlane_ddp_fork``, ``torchlane_ddp_notebook`` and
``torchlane_ddp_find_unused_parameters_true``. Lightning 2.6 has no entry point for strategies
(its registry is filled from its own classes when ``lightning.pytorch.strategies`` is imported),
so the import above is needed once before the ``Trainer`` is built.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from lightning.pytorch.overrides.distributed import _register_ddp_comm_hook
from lightning.pytorch.strategies import DDPStrategy as _LightningDDPStrategy
from lightning.pytorch.strategies import StrategyRegistry

from torchlane.ddp import DistributedDataParallel

__all__ = ["DDPStrategy"]

_STRATEGIES = (
    ("torchlane_ddp", {"start_method": "popen"}),
    ("torchlane_ddp_spawn", {"start_method": "spawn"}),
    ("torchlane_ddp_fork", {"start_method": "fork"}),
    ("torchlane_ddp_notebook", {"start_method": "fork"}),
    ("torchlane_ddp_find_unused_parameters_true",
     {"start_method": "popen", "find_unused_parameters": True}),
)


class DDPStrategy(_LightningDDPStrategy):
    """Lightning's ``DDPStrategy`` wrapping the model in ``torchlane.DistributedDataParallel``.

    Keyword arguments that Lightning does not consume (``bucket_cap_mb``, ``static_graph``,
    ``check_finite``, ...) go to ``torchlane.DistributedDataParallel``, which checks them.
    """

    strategy_name = "torchlane_ddp"

    def _setup_model(self, model: torch.nn.Module) -> DistributedDataParallel:
        device_ids = self.determine_ddp_device_ids()
        # As Lightning does for torch DDP: build the wrapper (its broadcast) on a side stream.
        ctx = torch.cuda.stream(torch.cuda.Stream()) if device_ids is not None else nullcontext()
        with ctx:
            return DistributedDataParallel(module=model, device_ids=device_ids, **self._ddp_kwargs)

    def _register_ddp_hooks(self) -> None:
        # Lightning registers ddp_comm_hook / ddp_comm_wrapper only when the root device is CUDA
        # (torch's hooks once needed NCCL) and otherwise drops them without a word. torchlane's
        # hooks (torchlane.hooks.*) and torch's Python hooks run on every backend, so the hook is
        # registered on every device. Lightning's post-localSGD model averaging stays CUDA-only.
        if self.root_device.type == "cuda":
            return super()._register_ddp_hooks()
        _register_ddp_comm_hook(
            model=self.model,
            ddp_comm_state=self._ddp_comm_state,
            ddp_comm_hook=self._ddp_comm_hook,
            ddp_comm_wrapper=self._ddp_comm_wrapper,
        )

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        # Lightning's post_backward only flushes torch's first static-graph iteration under manual
        # optimisation (reducer._delay_all_reduce(): torch's reducer defers that iteration's
        # all-reduces to an explicit call). torchlane's reducer has no deferred iteration: with
        # static_graph=True it launches and finishes the first backward's buckets itself, so
        # there is nothing to flush (tests/test_lightning.py, the "manual_static" case).
        if isinstance(self.model, DistributedDataParallel):
            return
        super().post_backward(closure_loss)

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        for name, kwargs in _STRATEGIES:
            strategy_registry.register(
                name,
                cls,
                description=f"torchlane DDP strategy with {kwargs}",
                override=True,
                **kwargs,
            )


DDPStrategy.register_strategies(StrategyRegistry)
