"""The torchlane DDP strategy for Lightning, built on the DDPStrategy of either package name:
``lightning.pytorch`` (torchlane.integrations.lightning) or ``pytorch_lightning``
(torchlane.integrations.pytorch_lightning). Imports neither; see docs/integrations.md."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from torchlane.ddp import DistributedDataParallel

STRATEGIES = (
    ("torchlane_ddp", {"start_method": "popen"}),
    ("torchlane_ddp_spawn", {"start_method": "spawn"}),
    ("torchlane_ddp_fork", {"start_method": "fork"}),
    ("torchlane_ddp_notebook", {"start_method": "fork"}),
    ("torchlane_ddp_find_unused_parameters_true",
     {"start_method": "popen", "find_unused_parameters": True}),
)


def make_ddp_strategy(base, register_ddp_comm_hook, module):
    """A subclass of ``base`` (a Lightning DDPStrategy) that pickles as ``module.DDPStrategy``;
    ``register_ddp_comm_hook``: the package's ``overrides.distributed._register_ddp_comm_hook``."""

    class DDPStrategy(base):
        """Lightning's ``DDPStrategy`` wrapping the model in ``torchlane.DistributedDataParallel``.

        Keyword arguments that Lightning does not consume (``bucket_cap_mb``, ``static_graph``,
        ``check_finite``, ...) go to ``torchlane.DistributedDataParallel``, which checks them.
        """

        strategy_name = "torchlane_ddp"

        def _setup_model(self, model: torch.nn.Module) -> DistributedDataParallel:
            device_ids = self.determine_ddp_device_ids()
            # As Lightning does for torch DDP: build the wrapper (its broadcast) on a side stream.
            side = device_ids is not None
            with torch.cuda.stream(torch.cuda.Stream()) if side else nullcontext():
                return DistributedDataParallel(
                    module=model, device_ids=device_ids, **self._ddp_kwargs)

        def _register_ddp_hooks(self) -> None:
            # Lightning registers ddp_comm_hook / ddp_comm_wrapper only when the root device is
            # CUDA (torch's hooks once needed NCCL) and otherwise drops them without a word.
            # torchlane's hooks (torchlane.hooks.*) and torch's Python hooks run on every
            # backend, so the hook is registered on every device. Lightning's post-localSGD
            # model averaging stays CUDA-only.
            if self.root_device.type == "cuda":
                return super()._register_ddp_hooks()
            register_ddp_comm_hook(
                model=self.model,
                ddp_comm_state=self._ddp_comm_state,
                ddp_comm_hook=self._ddp_comm_hook,
                ddp_comm_wrapper=self._ddp_comm_wrapper,
            )

        def post_backward(self, closure_loss: torch.Tensor) -> None:
            # Lightning's post_backward only flushes torch's first static-graph iteration under
            # manual optimisation (reducer._delay_all_reduce(): torch's reducer defers that
            # iteration's all-reduces to an explicit call). torchlane's reducer has no deferred
            # iteration: with static_graph=True it launches and finishes the first backward's
            # buckets itself, so there is nothing to flush (tests/test_lightning.py,
            # "manual_static").
            if isinstance(self.model, DistributedDataParallel):
                return
            super().post_backward(closure_loss)

        @classmethod
        def register_strategies(cls, strategy_registry) -> None:
            for name, kwargs in STRATEGIES:
                strategy_registry.register(
                    name,
                    cls,
                    description=f"torchlane DDP strategy with {kwargs}",
                    override=True,
                    **kwargs,
                )

    DDPStrategy.__module__ = module
    DDPStrategy.__qualname__ = "DDPStrategy"  # spawn pickles the strategy by reference
    return DDPStrategy
