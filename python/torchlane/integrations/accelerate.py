"""HF accelerate with torchlane DDP: ``from torchlane.integrations.accelerate import Accelerator``.

accelerate (1.x) wraps every model in ``torch.nn.parallel.DistributedDataParallel`` in
``prepare`` when more than one process runs, even one that is already a DDP model: a torchlane
model would be wrapped a second time and every gradient all-reduced twice. This ``Accelerator``
differs from accelerate's in ``prepare_model`` only: a torchlane DDP model is used as is (its
inner module gets accelerate's device placement and mixed-precision forward), and an unwrapped
model is wrapped in torchlane DDP (with the ``DistributedDataParallelKwargs`` handler's
arguments) instead of torch DDP. Everything after ``prepare`` is accelerate's own code, which
recognises torchlane DDP as torch DDP: ``accumulate()``/``no_sync()`` reach torchlane's
``no_sync``, ``trigger_sync_in_backward`` arms torchlane's reducer, ``unwrap_model`` returns the
inner module and ``save_state`` writes keys without the ``module.`` prefix.
"""

from __future__ import annotations

import accelerate
from accelerate.utils import DistributedType

from torchlane.ddp import DistributedDataParallel

__all__ = ["Accelerator"]


class Accelerator(accelerate.Accelerator):
    def prepare_model(self, model, device_placement=None, evaluation_mode=False):
        distributed = self.num_processes > 1 and self.distributed_type in (
            DistributedType.MULTI_CPU,
            DistributedType.MULTI_GPU,
        )
        if not distributed or evaluation_mode:
            return super().prepare_model(model, device_placement, evaluation_mode)
        if not isinstance(model, DistributedDataParallel):
            if not any(p.requires_grad for p in model.parameters()):
                return super().prepare_model(model, device_placement, evaluation_mode)
            kwargs = self.ddp_handler.to_kwargs() if self.ddp_handler is not None else {}
            if self.device.type != "cpu":
                model = model.to(self.device)
            model = DistributedDataParallel(model, **kwargs)
            if self.ddp_handler is not None:
                self.ddp_handler.register_comm_hook(model)
        # accelerate's single-process preparation of the inner module (device placement, the
        # autocast forward). accelerate tracks the inner module for save_state, as it does for
        # the models it wraps in torch DDP itself.
        state = self.state
        saved = state.distributed_type
        state.distributed_type = DistributedType.NO
        try:
            inner = super().prepare_model(model.module, device_placement, evaluation_mode)
        finally:
            state.distributed_type = saved
        if inner is not model.module:
            model.module = inner
        return model
