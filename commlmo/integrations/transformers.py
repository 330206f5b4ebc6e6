r"""HuggingFace ``Trainer`` with a commlmo optimizer: add :class:`CommLMOCallback` to its callbacks.

::

    from commlmo.integrations.transformers import CommLMOCallback, CommLMOFactory

    trainer = Trainer(model, args, train_dataset=data, callbacks=[CommLMOCallback()],
                      optimizer_cls_and_kwargs=(CommLMOFactory, {"config": "signmuon"}))
    # or: optimizers=(commlmo.build_optimizer(model, "signmuon"), None)

Under ``torchrun`` the ``Trainer`` wraps the model in ``DistributedDataParallel`` (through
accelerate) inside ``train()``, and only the process that saves calls the optimizer's
``state_dict()`` (``optimizer.pt`` of each ``checkpoint-N``, read back by every rank).  The
callback makes both right:

* at ``on_train_begin`` it asks the optimizer to turn off the reduction of the DDP that
  runs its model (:func:`commlmo.integrations.local_gradients`, registered before DDP's
  first backward): each rank keeps its gradient and the commlmo step sends it once,
  compressed.  The model's buffers must not be broadcast at every forward either:
  ``TrainingArguments(ddp_broadcast_buffers=False)`` when the model has buffers;
* when the ``Trainer`` is about to save (``control.should_save`` after a step or an
  epoch, and at every evaluation under ``save_strategy="best"``), it calls
  the optimizer's ``consolidate_state_dict`` on every rank, so ``optimizer.pt`` holds
  every rank's state and each rank resumes with its own.

An optimizer built before ``TrainingArguments`` (which initialises ``torch.distributed``)
binds to the world group at its first step.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..errors import ConfigError
from . import commlmo_optimizer, turn_off_ddp_reduction

__all__ = ["CommLMOCallback", "CommLMOFactory"]


class CommLMOFactory:
    """An optimizer factory for ``Trainer(optimizer_cls_and_kwargs=(CommLMOFactory, {"config": ...}))``.

    The ``Trainer`` calls ``CommLMOFactory()(model, **kwargs)``: the optimizer is built from
    the model itself (roles read from its module tree), once the process group exists.
    ``kwargs`` are :func:`commlmo.build_optimizer`'s (``config``, ``process_group``).
    """

    def __call__(self, model: Any, **kwargs: Any) -> Any:
        from .. import build_optimizer

        return build_optimizer(model, **kwargs)


class CommLMOCallback(TrainerCallback):
    """Turns DDP's gradient reduction off and gathers every rank's optimizer state before a save."""

    def on_train_begin(self, args: Any, state: Any, control: Any, *, optimizer: Any = None, model: Any = None,
                       **kwargs: Any) -> None:
        opt = commlmo_optimizer(optimizer)
        if opt is None:
            raise ConfigError(f"CommLMOCallback needs the Trainer's optimizer to be a commlmo optimizer, got "
                              f"{type(optimizer).__name__}; pass optimizers=(commlmo.build_optimizer(model, ...), "
                              "None) or optimizer_cls_and_kwargs=(CommLMOFactory, {'config': ...})")
        if args.world_size > 1 and args.ddp_broadcast_buffers is not False and model is not None \
                and any(True for _ in model.buffers()):
            raise ConfigError("the model has buffers, which DistributedDataParallel broadcasts from rank 0 at every "
                              "forward (float32 traffic the commlmo step does not account for); set "
                              "TrainingArguments(ddp_broadcast_buffers=False)")
        turn_off_ddp_reduction(opt)

    def on_step_end(self, args: Any, state: Any, control: Any, *, optimizer: Any = None, **kwargs: Any) -> None:
        # the Trainer saves right after on_step_end / on_epoch_end when control.should_save (DefaultFlowCallback,
        # which runs first, set it); under save_strategy="best" the evaluation that follows decides
        best = args.save_strategy == "best" and control.should_evaluate
        if args.world_size > 1 and (control.should_save or best):
            # process 0 writes optimizer.pt; with save_on_each_node every node's local process 0 does
            commlmo_optimizer(optimizer).consolidate_state_dict(to=None if args.save_on_each_node else 0)

    on_epoch_end = on_step_end
