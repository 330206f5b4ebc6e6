r"""torchtitan's optimizer container with commlmo optimizers: :class:`CommLMOOptimizersContainer`.

::

    from torchtitan.components.optimizer import ParamGroupConfig
    from commlmo.integrations.torchtitan import CommLMOOptimizersContainer

    config = CommLMOOptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name="CommLMO", optimizer_kwargs={})],
        optimizer_factory_kwargs_by_name={"CommLMO": {"config": "signmuon"}},
    )
    optimizers = config.build(model_parts=[model])
    dcp.save({"model": ..., "optimizer": optimizers}, checkpoint_id=folder)   # as torchtitan's CheckpointManager

``OptimizersContainer`` builds each optimizer from torch-style param groups (``params``,
``param_names``, its ``fused``/``foreach`` implementation switches and the
``ParamGroupConfig``'s ``optimizer_kwargs``, of which commlmo takes ``group``, ``lr`` and
``weight_decay``); ``"CommLMO"`` builds one :class:`~commlmo.CommOptimizer` from them
(commlmo has one implementation: the switches are dropped).  Its checkpoints go through
``torch.distributed.checkpoint`` with a flat, name-keyed state dict in which every rank
writes the entries it holds once; commlmo's per-rank state (each worker's momentum,
error-feedback memories) would be written by one rank only, so the container keys each
commlmo optimizer's entries by rank (``commlmo.rank<r>.state.<name>.<key>``): every rank
writes and reads back its own, in parallel.  The facts commlmo checks on load (config
fingerprint, shapes, steps) travel with them.

Data parallelism is the commlmo optimizer's: the model parts must not be wrapped by a
data-parallel wrapper (torchtitan applies one when ``dp_replicate`` or ``dp_shard`` > 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.components.optimizer.utils import get_flat_optim_state_dict, init_optim_state, \
    load_flat_optim_state_dict

from ..optimizer import CommOptimizer, build_optimizer

__all__ = ["CommLMOOptimizersContainer", "build_commlmo"]

#: the optimizer name of ``ParamGroupConfig.optimizer_name`` that builds a commlmo optimizer
NAME = "CommLMO"
#: the implementation switches torchtitan adds to every param group
_IMPLEMENTATION_KEYS = ("fused", "foreach")


def build_commlmo(param_groups: list[dict[str, Any]], **kwargs: Any) -> CommOptimizer:
    """``OptimizersContainer``'s factory signature: torch-style param groups, then
    :func:`commlmo.build_optimizer`'s keyword arguments (``config``, ``process_group``)."""
    groups = [{k: v for k, v in g.items() if k not in _IMPLEMENTATION_KEYS} for g in param_groups]
    return build_optimizer(groups, **kwargs)


def _prefix(optim: CommOptimizer) -> str:
    return f"commlmo.rank{optim.comm.rank}."


def _unflatten(optim: CommOptimizer, flat: dict[str, Any]) -> dict[str, Any]:
    """torch's state dict of ``optim`` from the flat ``state.<name>.<key>`` / ``param_groups.<name>.<key>`` entries.

    torchtitan's own unflattening keeps only the keys the live optimizer has, which drops
    what commlmo's ``state_dict`` adds (its random generators, the facts under ``commlmo``).
    """
    state: dict[int, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    index = 0
    for g in optim.param_groups:
        ids = []
        for name in g["param_names"]:
            head = f"state.{name}."
            entry = {k[len(head):]: v for k, v in flat.items() if k.startswith(head)}
            if entry:
                state[index] = entry
            ids.append(index)
            index += 1
        head = f"param_groups.{g['param_names'][0]}."
        group = {k[len(head):]: v for k, v in flat.items() if k.startswith(head)}
        groups.append({**group, "params": ids, "param_names": list(g["param_names"])})
    return {"state": state, "param_groups": groups}


class CommLMOOptimizersContainer(OptimizersContainer):
    """``OptimizersContainer`` that also builds ``"CommLMO"`` optimizers and checkpoints their per-rank state."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        """``OptimizersContainer.Config``, whose ``build(model_parts=...)`` makes this container."""

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Any:
        if name == NAME:
            return build_commlmo
        return OptimizersContainer._resolve_optimizer_factory(name)

    def state_dict(self) -> dict[str, Any]:
        """The flat, name-keyed state dict of every optimizer; a commlmo optimizer's entries keyed by rank."""
        result: dict[str, Any] = {}
        for optim in self.optimizers:
            init_optim_state(optim)
            flat = get_flat_optim_state_dict(optim)
            if isinstance(optim, CommOptimizer):
                flat = {_prefix(optim) + k: v for k, v in flat.items()}
            result.update(flat)
        return result

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved: a commlmo optimizer takes this rank's entries."""
        for optim in self.optimizers:
            init_optim_state(optim)
            if isinstance(optim, CommOptimizer):
                head = _prefix(optim)
                optim.load_state_dict(_unflatten(optim, {k[len(head):]: v for k, v in state_dict.items()
                                                         if k.startswith(head)}))
            else:
                load_flat_optim_state_dict(optim, state_dict)
