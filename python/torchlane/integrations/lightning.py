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

from lightning.pytorch.overrides.distributed import _register_ddp_comm_hook
from lightning.pytorch.strategies import DDPStrategy as _LightningDDPStrategy
from lightning.pytorch.strategies import StrategyRegistry

from torchlane.integrations._lightning_strategy import make_ddp_strategy

__all__ = ["DDPStrategy"]

DDPStrategy = make_ddp_strategy(_LightningDDPStrategy, _register_ddp_comm_hook, __name__)
DDPStrategy.register_strategies(StrategyRegistry)
