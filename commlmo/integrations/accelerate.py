r"""``accelerate`` with a commlmo optimizer: :func:`prepare` instead of ``accelerator.prepare``.

::

    from commlmo.integrations.accelerate import prepare

    accelerator = Accelerator()
    opt = commlmo.build_optimizer(model, "signmuon")
    model, opt, loader = prepare(accelerator, model, opt, loader)
    ...
    accelerator.save_state(folder)      # every rank's optimizer state in optimizer.bin
    accelerator.load_state(folder)      # each rank takes its own back

``accelerator.prepare`` wraps the model in ``DistributedDataParallel`` when it runs on
several processes; :func:`prepare` calls it unchanged, then turns the wrapper's reduction
off with :func:`commlmo.integrations.local_gradients` (a DDP communication hook, registered
before the first backward), so each rank keeps its gradient and the commlmo step sends it
once, compressed.  ``accelerator.accumulate``/``no_sync`` keep working (nothing to skip).
It also registers a ``save_state`` pre-hook that calls
``opt.consolidate_state_dict()`` on every rank, because only the main process writes
``optimizer.bin`` (every local main process with ``save_on_each_node``).  Models with buffers: pass
``DistributedDataParallelKwargs(broadcast_buffers=False)`` so that DDP does not broadcast
them at every forward.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from . import commlmo_optimizer, find_ddp, turn_off_ddp_reduction

__all__ = ["prepare"]


def prepare(accelerator: Any, *objects: Any, **kwargs: Any) -> Any:
    """``accelerator.prepare(*objects, **kwargs)``, with DDP's reduction off and the optimizer state gathered
    before ``accelerator.save_state``; returns what ``accelerator.prepare`` returns."""
    prepared = accelerator.prepare(*objects, **kwargs)
    items = prepared if isinstance(prepared, tuple) else (prepared,)
    opts = [o for o in (commlmo_optimizer(x) for x in items) if o is not None]
    if not opts:
        raise ConfigError("commlmo.integrations.accelerate.prepare got no commlmo optimizer; pass the one "
                          "commlmo.build_optimizer made, with the model")
    for x in items:
        ddp = find_ddp(x)
        if ddp is not None:
            if ddp.will_sync_module_buffers():
                raise ConfigError(
                    "the model has buffers, which DistributedDataParallel broadcasts from rank 0 at every forward "
                    "(float32 traffic the commlmo step does not account for); pass "
                    "Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])")
            turn_off_ddp_reduction(ddp)

    def gather(models: Any, weights: Any, output_dir: Any) -> None:
        # the main process writes optimizer.bin; with save_on_each_node every node's local main does
        to = None if accelerator.project_configuration.save_on_each_node else 0
        for opt in opts:
            opt.consolidate_state_dict(to=to)

    if accelerator.num_processes > 1:
        accelerator.register_save_state_pre_hook(gather)
    return prepared
