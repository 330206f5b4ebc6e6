"""Built-in training tasks; none downloads anything.

=========  ==============================================================
kind       what
=========  ==============================================================
mnist1d    MNIST-1D generated offline (``mnist1d.make_dataset``), MLP or CNN
matrix     SignMuon's quadratic F(X) = 1/2 <X, A X B>, known L and optimum
chargpt    a small character-level transformer on a text corpus
gpt        nanoGPT / GPT-2 on a BPE-tokenized corpus (tokenizer trained offline)
custom     your own ``module:function`` returning a model and data
=========  ==============================================================

Each kind is a module with a pydantic ``Config`` (``kind`` literal,
``extra="forbid"``) and ``build(cfg, *, rank, world_size, seed, global_batch)``
returning a :class:`Task`.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field

from . import chargpt, custom, gpt, matrix, mnist1d
from .base import SupervisedTask, Task, shard_size

__all__ = ["Task", "SupervisedTask", "TaskConfig", "KINDS", "build_task", "prepare_task", "shard_size"]

KINDS = {"mnist1d": mnist1d, "matrix": matrix, "chargpt": chargpt, "custom": custom, "gpt": gpt}

TaskConfig = Annotated[
    Union[mnist1d.Config, matrix.Config, chargpt.Config, custom.Config, gpt.Config],
    Field(discriminator="kind"),
]


def prepare_task(cfg: Any) -> None:
    """One-time work before the ranks build the task (rank 0 only): e.g. generate and cache a dataset."""
    prepare = getattr(KINDS[cfg.kind], "prepare", None)
    if prepare is not None:
        prepare(cfg)


def build_task(cfg: Any, *, rank: int = 0, world_size: int = 1, seed: int = 0, global_batch: int = 32) -> Task:
    """The :class:`Task` of ``rank`` for a validated task config."""
    return KINDS[cfg.kind].build(cfg, rank=rank, world_size=world_size, seed=seed, global_batch=global_batch)
