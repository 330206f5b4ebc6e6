r"""commlmo inside training frameworks: one communication per step, per-rank state in their checkpoints.

Frameworks (HuggingFace ``Trainer``, ``accelerate``, Lightning, Fabric) wrap the model in
``DistributedDataParallel`` after the optimizer exists, and save the optimizer state of one
rank.  Both break a commlmo run: DDP all-reduces every gradient in float32 before commlmo
sends it again, compressed; and commlmo's state differs by rank (each worker's momentum,
EF21's ``g_i``, error-feedback memories), so a resumed rank 1 would continue from rank 0's.

* :func:`local_gradients` is a DDP communication hook that communicates nothing: DDP's
  reduction of each bucket is replaced by the bucket itself, so every rank keeps its own
  gradient and the commlmo step aggregates it, compressed, once.  :func:`turn_off_ddp_reduction`
  registers it on a wrapped model, or tells an optimizer to register it on the DDP that
  first runs its model's forward (for frameworks that wrap inside their training loop).
* The per-rank state travels with torch's convention for optimizers whose state is spread
  over ranks (``ZeroRedundancyOptimizer``): ``opt.consolidate_state_dict(to=0)`` on every
  rank, then ``state_dict()`` on rank 0 holds every rank's, and ``load_state_dict`` on
  each rank takes its own back.  Lightning and Fabric call it themselves.

The framework modules (:mod:`commlmo.integrations.transformers`,
:mod:`~commlmo.integrations.accelerate`, :mod:`~commlmo.integrations.lightning`,
:mod:`~commlmo.integrations.torchtitan`) put these where each framework has a supported
hook; ``docs/integrations.md`` has the recipes.
"""

# no `from __future__ import annotations`: DDP checks a communication hook's annotations as objects
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["local_gradients", "turn_off_ddp_reduction", "reduction_is_off", "commlmo_optimizer", "find_ddp"]


def local_gradients(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: no communication, each rank keeps its own gradient.

    The no-op hook of ``DistributedDataParallel.register_comm_hook``'s documentation: DDP
    copies the returned bucket back into the gradients unchanged (not divided by the
    world size), so ``p.grad`` is this rank's gradient, as without DDP, and the commlmo
    step aggregates it.  Under DDP's compiled/python reducer the hook gets
    ``(grad, param)`` and leaves it as it is.
    """
    if isinstance(bucket, tuple):  # compiled reducer: called per gradient, return value unused
        return None  # type: ignore[return-value]
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def reduction_is_off(ddp: Any) -> bool:
    """Whether ``ddp``'s gradient reduction was replaced by :func:`local_gradients` (and nothing else)."""
    hooks = [h for h, _ in getattr(ddp, "_comm_hooks", ())]
    return bool(hooks) and all(h is local_gradients for h in hooks)


def find_ddp(module: Any) -> torch.nn.parallel.DistributedDataParallel | None:
    """The ``DistributedDataParallel`` in a framework's wrapper chain (``.module``, Fabric's
    ``_forward_module``, ``torch.compile``'s ``_orig_mod``), or ``None``."""
    seen = set()
    while module is not None and id(module) not in seen:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            return module
        seen.add(id(module))
        module = next((getattr(module, a) for a in ("_forward_module", "_orig_mod", "module")
                       if isinstance(getattr(module, a, None), torch.nn.Module)), None)
    return None


def commlmo_optimizer(optimizer: Any) -> Any:
    """The :class:`~commlmo.CommOptimizer` inside a framework's optimizer wrapper (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``, Fabric's ``_FabricOptimizer``), or ``None``."""
    from ..optimizer import CommOptimizer

    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, CommOptimizer):
            return optimizer
        seen.add(id(optimizer))
        optimizer = next((getattr(optimizer, a) for a in ("optimizer", "_optimizer")
                          if getattr(optimizer, a, None) is not None), None)
    return None


def turn_off_ddp_reduction(target: Any) -> Any:
    """Turn DDP's own gradient reduction off; returns ``target``.

    ``target`` is a model a framework wrapped (the DDP itself, or a wrapper holding one): the
    DDP gets :func:`local_gradients` now.  Or it is a commlmo optimizer (or a framework's
    wrapper of one): the DDP that first runs the optimizer's model forward gets it then,
    before its first backward (for frameworks that wrap the model inside their training loop).
    A DDP with another communication hook is refused: it would still send every gradient.
    """
    opt = commlmo_optimizer(target)
    if opt is not None:
        opt._ddp_turn_off = True
        return target
    ddp = find_ddp(target)
    if ddp is None:
        return target  # nothing wraps it: nothing to turn off
    if reduction_is_off(ddp):
        return target
    if getattr(ddp, "_comm_hooks", None):
        names = ", ".join(getattr(h, "__qualname__", repr(h)) for h, _ in ddp._comm_hooks)
        from ..errors import DistributedError

        raise DistributedError(f"this DistributedDataParallel already has a communication hook ({names}), which "
                               "sends every gradient before commlmo does; remove it (build the DDP without it)")
    ddp.register_comm_hook(None, local_gradients)
    return target
