r"""Lightning (``Trainer`` and ``Fabric``) with a commlmo optimizer.

``Trainer``: add :class:`CommLMOCallback` and return the commlmo optimizer from
``configure_optimizers``::

    class Model(L.LightningModule):
        def configure_optimizers(self):
            return commlmo.build_optimizer(self, "signmuon")

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", callbacks=[CommLMOCallback()])

``Fabric``: set the model up with :func:`setup` instead of ``fabric.setup``::

    fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    model = Model()
    opt = commlmo.build_optimizer(model, "signmuon")
    model, opt = setup(fabric, model, opt)

Lightning's ``ddp`` strategy wraps the model in ``DistributedDataParallel`` (and registers
a ``ddp_comm_hook`` only on CUDA); the callback (``on_fit_start``, after the wrap and
before the first forward) and :func:`setup` turn its reduction off with
:func:`commlmo.integrations.local_gradients`, so each rank keeps its gradient and the
commlmo step sends it once, compressed.  Models with buffers need
``DDPStrategy(broadcast_buffers=False)``, else DDP broadcasts them at every forward.

Checkpoints need nothing more: Lightning and Fabric call the optimizer's
``consolidate_state_dict()`` on every rank before the global rank 0 saves (torch's
convention for an optimizer whose state is spread over ranks), so the checkpoint holds
every rank's state and each rank's ``load_state_dict`` takes its own back.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from ..errors import ConfigError
from . import commlmo_optimizer, find_ddp, turn_off_ddp_reduction

__all__ = ["CommLMOCallback", "setup"]


def _turn_off(model: Any) -> None:
    ddp = find_ddp(model)
    if ddp is None:
        return
    if ddp.will_sync_module_buffers():
        raise ConfigError("the model has buffers, which DistributedDataParallel broadcasts from rank 0 at every "
                          "forward (float32 traffic the commlmo step does not account for); use "
                          "DDPStrategy(broadcast_buffers=False)")
    turn_off_ddp_reduction(ddp)


class CommLMOCallback(pl.Callback):
    """Turns the reduction of the ``DistributedDataParallel`` the strategy made off, before training starts."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not any(commlmo_optimizer(o) is not None for o in trainer.optimizers):
            raise ConfigError("CommLMOCallback needs configure_optimizers to return a commlmo optimizer "
                              "(commlmo.build_optimizer(self, ...))")
        _turn_off(trainer.strategy.model)


def setup(fabric: Any, model: Any, *optimizers: Any, **kwargs: Any) -> Any:
    """``fabric.setup(model, *optimizers, **kwargs)`` with the reduction of the DDP it made turned off."""
    out = fabric.setup(model, *optimizers, **kwargs)
    _turn_off(out[0] if isinstance(out, tuple) else out)
    return out
