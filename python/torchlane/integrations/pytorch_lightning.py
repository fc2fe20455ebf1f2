"""The torchlane DDP strategy for the ``pytorch_lightning`` package name (the same strategy as
torchlane.integrations.lightning, built on ``pytorch_lightning.strategies.DDPStrategy`` and
registered in ``pytorch_lightning``'s registry):

    import torchlane.integrations.pytorch_lightning
    trainer = pytorch_lightning.Trainer(strategy="torchlane_ddp", ...)

See docs/integrations.md.
"""

from __future__ import annotations

from pytorch_lightning.overrides.distributed import _register_ddp_comm_hook
from pytorch_lightning.strategies import DDPStrategy as _LightningDDPStrategy
from pytorch_lightning.strategies import StrategyRegistry

from torchlane.integrations._lightning_strategy import make_ddp_strategy

__all__ = ["DDPStrategy"]

DDPStrategy = make_ddp_strategy(_LightningDDPStrategy, _register_ddp_comm_hook, __name__)
DDPStrategy.register_strategies(StrategyRegistry)
