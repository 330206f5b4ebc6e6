"""Your own model and data, named ``module:function`` in the run config::

    task:
      kind: custom
      target: my_project.tasks:regression      # imported on every rank
      options: {width: 64}                     # passed as keyword arguments
      loss: mse

The function is called on every rank as ``fn(seed=SEED, **options)`` and
returns either

* ``(model, (x, y))`` or ``(model, (x, y, x_test, y_test))`` -- tensors, or a
  mapping with those keys; commlmo shards the training set over the ranks and
  applies ``loss`` (``cross_entropy`` reports accuracy); or
* a :class:`commlmo.tasks.Task` -- full control over batches and metrics;
  it is then also passed ``rank``, ``world_size`` and ``global_batch`` when
  its signature accepts them.

The model must be built from ``seed`` alone (``torch.manual_seed(seed)``), so
every rank starts from the same weights; the run checks this.  The directory
of the run config and the current directory are importable.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..errors import ConfigError
from .base import SupervisedTask, Task

__all__ = ["Config", "build", "resolve"]


class Config(BaseModel):
    """``custom`` task: a ``module:function`` returning a model and data (or a Task)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["custom"] = "custom"
    target: str = Field(description="module:function")
    options: dict[str, Any] = Field(default_factory=dict)
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    paths: list[str] = Field(default_factory=list)  # extra import paths (the config's directory is added)

    @field_validator("target")
    @classmethod
    def _module_function(cls, v: str) -> str:
        module, _, fn = v.partition(":")
        if not module or not fn or not all(part.isidentifier() for part in [*module.split("."), *fn.split(".")]):
            raise ValueError(f"{v!r} is not of the form 'package.module:function'")
        return v


def resolve(target: str, paths: list[str] | None = None) -> Any:
    """Import ``module:function`` (with ``paths`` prepended to ``sys.path``) and return the function."""
    for p in reversed(paths or []):
        if p not in sys.path:
            sys.path.insert(0, p)
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"task.target = {target!r}: cannot import module {module_name!r} ({exc}); "
            f"searched the config's directory, the current directory and sys.path"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"task.target = {target!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"task.target = {target!r} is a {type(obj).__name__}, not a function")
    return obj


def _data(target: str, data: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(data, Mapping):
        missing = {"x", "y"} - set(data)
        if missing:
            raise ConfigError(f"{target} returned data without {sorted(missing)}; expected keys x, y[, x_test, y_test]")
        data = (data["x"], data["y"], data.get("x_test"), data.get("y_test"))
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 4):
        raise ConfigError(
            f"{target} must return (model, (x, y)) or (model, (x, y, x_test, y_test)); got data {type(data).__name__}"
        )
    return tuple(torch.as_tensor(d) if d is not None else None for d in data)  # type: ignore[return-value]


def build(cfg: Config, *, rank: int, world_size: int, seed: int, global_batch: int) -> Task:
    fn = resolve(cfg.target, cfg.paths)
    kwargs: dict[str, Any] = {"seed": seed, **cfg.options}
    params = inspect.signature(fn).parameters
    accepts_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for k, v in (("rank", rank), ("world_size", world_size), ("global_batch", global_batch)):
        if accepts_all or k in params:
            kwargs[k] = v
    try:
        out = fn(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"calling {cfg.target}(**{kwargs}) failed: {exc}") from None
    if isinstance(out, Task):
        return out
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], nn.Module)):
        raise ConfigError(f"{cfg.target} must return a commlmo Task or (model, data); got {type(out).__name__}")
    model, data = out
    x, y, *test = _data(cfg.target, data)
    x_test, y_test = test if test else (None, None)
    return SupervisedTask(
        model, x, y, x_test, y_test, loss=cfg.loss, global_batch=global_batch,
        rank=rank, world_size=world_size, seed=seed, info={"target": cfg.target},
    )
