"""Rank functions for tests/test_lightning.py: the same tiny LightningModule trained by
Lightning's own "ddp" strategy and by "torchlane_ddp" in each spawned rank (tests/dist.py starts
the ranks and the process group; Lightning sees an external launcher through the LOCAL_RANK /
WORLD_SIZE variables, LightningEnvironment, and reuses the initialised group)."""

import importlib
import importlib.util
import os

import torch
from torch.utils.data import DataLoader, TensorDataset

STEPS = 10
BATCH = 2
# Per rank. The resume checkpoint (step 5) falls on an epoch boundary: Lightning resumes a plain
# DataLoader mid-epoch by restarting the epoch, with torch DDP as with torchlane.
BATCHES_PER_EPOCH = 5


def _env(rank, world):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0",
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")


def _module_class(package="lightning.pytorch"):
    pl = importlib.import_module(package)

    class Tiny(pl.LightningModule):
        def __init__(self, manual=False):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
            self.automatic_optimization = not manual
            self.losses = []
            self.wrapper = None

        def on_train_start(self):
            self.wrapper = type(self.trainer.strategy.model).__module__

        def training_step(self, batch, _):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.losses.append(loss.detach().clone())
            if self.automatic_optimization:
                return loss
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return None

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

        def configure_optimizers(self):
            # Momentum: a resume that lost the optimizer state would show in the losses.
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    return Tiny


def _loader(world):
    # Different data on each rank (the distributed sampler splits it), fixed order.
    g = torch.Generator().manual_seed(1)
    n = world * BATCH * BATCHES_PER_EPOCH
    x = torch.randn(n, 4, generator=g)
    y = torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def _trainer(strategy, max_steps, world, package="lightning.pytorch", **kw):
    pl = importlib.import_module(package)

    return pl.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=max_steps,
        logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **{"enable_checkpointing": False, **kw})


def _fit(strategy, world, manual=False, max_steps=STEPS, ckpt_in=None,
         package="lightning.pytorch", validate=False, **kw):
    model = _module_class(package)(manual=manual)
    trainer = _trainer(strategy, max_steps, world, package, **kw)
    trainer.fit(model, _loader(world), ckpt_path=ckpt_in)
    params = [p.detach().clone() for p in model.parameters()]
    # trainer.validate after fit: the model wrapped again, forward under inference_mode.
    val = trainer.validate(model, _loader(world), verbose=False) if validate else None
    return {"val": val, "losses": [float(v) for v in model.losses], "loss_tensors": model.losses,
            "params": params, "wrapper": model.wrapper}


def _checkpointed(strategy, world, tmp, tag):
    """Ten steps with a checkpoint every five (Lightning's ModelCheckpoint, written by rank 0
    into a directory every rank reads), then a new Trainer resumed from the step-5 checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt_dir = os.path.join(tmp, tag)
    cb = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=STEPS // 2, save_top_k=-1,
                         filename="{step}")
    full = _fit(strategy, world, callbacks=[cb], enable_checkpointing=True)
    resumed = _fit(strategy, world, ckpt_in=os.path.join(ckpt_dir, f"step={STEPS // 2}.ckpt"))
    return full, resumed


def compare(rank, world, tmp):
    """Each scenario with "ddp" and "torchlane_ddp": losses, final parameters, wrapper type."""
    _env(rank, world)
    import torchlane.integrations.lightning  # noqa: F401  (registers "torchlane_ddp")

    res = {}
    for strategy in ("ddp", "torchlane_ddp"):
        res[("auto", strategy)] = _fit(strategy, world, validate=True)
        res[("manual", strategy)] = _fit(strategy, world, manual=True)
        res[("accumulate", strategy)] = _fit(strategy, world, accumulate_grad_batches=2)
        res[("checkpointed", strategy)], res[("resume", strategy)] = _checkpointed(
            strategy, world, tmp, strategy)
    # static_graph=True with manual optimisation (Lightning flushes torch's first iteration).
    from lightning.pytorch.strategies import DDPStrategy as LightningDDP
    from torchlane.integrations.lightning import DDPStrategy

    res[("manual_static", "ddp")] = _fit(LightningDDP(static_graph=True), world, manual=True)
    res[("manual_static", "torchlane_ddp")] = _fit(DDPStrategy(static_graph=True), world,
                                                   manual=True)
    # A checkpoint of the torch-DDP job resumed by a torchlane job.
    res[("resume_from_ddp", "torchlane_ddp")] = _fit(
        "torchlane_ddp", world, ckpt_in=os.path.join(tmp, "ddp", f"step={STEPS // 2}.ckpt"))
    res.update(_instance_and_errors(world))
    # The standalone package name: pytorch_lightning's Trainer and registry.
    if importlib.util.find_spec("pytorch_lightning") is not None:
        import torchlane.integrations.pytorch_lightning  # noqa: F401

        for strategy in ("ddp", "torchlane_ddp"):
            res[("pytorch_lightning", strategy)] = _fit(strategy, world, manual=True,
                                                        package="pytorch_lightning")
    return res


def _instance_and_errors(world):
    """A DDPStrategy instance carrying torchlane DDP arguments, the registry, bad arguments."""
    from lightning.pytorch.strategies import StrategyRegistry
    from torchlane.integrations.lightning import DDPStrategy

    res = {}
    ref = _fit("ddp", world, max_steps=3)["losses"]
    out = _fit(DDPStrategy(bucket_cap_mb=1, check_finite=True), world, max_steps=3)
    res["instance"] = out["wrapper"], out["losses"], ref
    # A comm hook handed to the strategy: Lightning's "ddp" registers it on CUDA only (on CPU it
    # drops it); torchlane's strategy registers it on CPU too. The reference is torch DDP with
    # torch's fp16 hook registered the way Lightning does on CUDA.
    import torchlane
    from lightning.pytorch.overrides.distributed import _register_ddp_comm_hook
    from lightning.pytorch.strategies import DDPStrategy as LightningDDP
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    class HookedLightningDDP(LightningDDP):
        def _register_ddp_hooks(self):
            _register_ddp_comm_hook(self.model, None, default_hooks.fp16_compress_hook)

    res["comm_hook"] = (
        _fit(DDPStrategy(ddp_comm_hook=torchlane.hooks.fp16_compress), world, max_steps=3),
        _fit(DDPStrategy(ddp_comm_hook=default_hooks.fp16_compress_hook), world, max_steps=3),
        _fit(HookedLightningDDP(), world, max_steps=3),
        ref)
    res["registry"] = {name: (StrategyRegistry[name]["strategy"] is DDPStrategy,
                              StrategyRegistry[name]["init_params"])
                       for name in StrategyRegistry.available_strategies()
                       if name.startswith("torchlane")}
    for tag, kwargs in {"bucket": {"bucket_cap_mb": -1}, "unknown": {"no_such_arg": 1}}.items():
        try:
            _fit(DDPStrategy(**kwargs), world, max_steps=1)
            res[tag] = None
        except Exception as e:  # noqa: BLE001  (the test checks the type and message)
            res[tag] = (type(e).__name__, str(e))
    return res

