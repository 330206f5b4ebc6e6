"""What a training run needs from a task, and the sharded supervised task most tasks are.

A :class:`Task` owns the model and the data of one rank.  The run loop calls::

    batch = task.train_batch(step)            # this rank's shard of the global batch
    loss, metrics = task.loss(batch)          # metrics: e.g. {"acc": 0.93}; may override "loss"
    results = task.evaluate()                 # held-out {"loss": ..., "acc": ...}, on rank 0

``train_batch(step)`` is a function of the step (and the seed) alone, which is
what lets a run resume exactly from a checkpoint; a task with other state (a
stream over files, say) saves it in :meth:`Task.state_dict`.

Every rank builds its task with the same seed, so the models start identical
(the run loop checks this) and the data order is one global order: at step
``s`` the global batch is positions ``[s*B, (s+1)*B)`` of a seeded permutation
of the training set, and rank ``r`` takes the ``r``-th slice of ``B / M``
examples.  ``M`` ranks therefore see exactly the batch one process would see
with global batch ``B``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["Task", "SupervisedTask", "NextTokenTask", "shard_size"]


def shard_size(global_batch: int, world_size: int) -> int:
    """Examples per rank; the global batch must split evenly so every rank's gradient weighs the same."""
    if global_batch % world_size:
        lo = global_batch - global_batch % world_size
        raise ConfigError(
            f"train.global_batch = {global_batch} does not split over {world_size} workers; "
            f"use a multiple of {world_size} (e.g. {lo or world_size} or {lo + world_size})"
        )
    return global_batch // world_size


class Task:
    """Model and data of one rank.  Subclasses implement :meth:`train_batch`, :meth:`loss`, :meth:`evaluate`.

    ``has_accuracy`` says whether ``acc`` appears in the metrics; ``info`` holds
    facts about the problem (sizes, known optimum, smoothness) for the summary.
    """

    has_accuracy: bool = False

    def __init__(self, model: nn.Module, *, info: Mapping[str, Any] | None = None):
        self.model = model
        self.info: dict[str, Any] = dict(info or {})

    def to(self, device: torch.device) -> Task:
        self.model.to(device)
        return self

    def train_batch(self, step: int) -> Any:
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must save besides the model to resume the data exactly (default: nothing).

        The built-in tasks draw batch ``s`` from a generator seeded by the seed and
        ``s``, so they have nothing to save.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        if state:
            raise ValueError(f"{type(self).__name__} saves no state, but the checkpoint holds {sorted(state)}")


class SupervisedTask(Task):
    """Tensors ``x, y`` (train) and ``x_test, y_test`` (held out), a model, and a loss.

    ``loss="cross_entropy"`` expects integer class labels and reports accuracy;
    ``loss="mse"`` regresses ``y``.  ``x_test`` may be omitted (evaluation then
    uses the training set, and says so in ``info``).
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        x_test: Tensor | None = None,
        y_test: Tensor | None = None,
        *,
        loss: Literal["cross_entropy", "mse"] = "cross_entropy",
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        eval_batch: int = 1000,
        info: Mapping[str, Any] | None = None,
    ):
        if len(x) != len(y):
            raise ConfigError(f"x has {len(x)} examples but y has {len(y)}")
        if global_batch > len(x):
            raise ConfigError(f"train.global_batch = {global_batch} exceeds the {len(x)} training examples")
        if (x_test is None) != (y_test is None):
            raise ConfigError("give both x_test and y_test, or neither")
        if loss == "cross_entropy" and y.is_floating_point():
            raise ConfigError(f"loss 'cross_entropy' needs integer class labels; y has dtype {y.dtype} (use loss: mse)")
        super().__init__(model, info=info)
        self.x, self.y = x, y
        self.x_test, self.y_test = (x_test, y_test) if x_test is not None else (x, y)
        self.loss_kind = loss
        self.has_accuracy = loss == "cross_entropy"
        self.global_batch, self.rank, self.seed = global_batch, rank, seed
        self.local_batch = shard_size(global_batch, world_size)
        self.eval_batch = eval_batch
        self.steps_per_epoch = len(x) // global_batch
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)
        self.info.setdefault("train_examples", len(x))
        self.info.setdefault("test_examples", len(self.x_test))
        if x_test is None:
            self.info["evaluated_on"] = "train set (no test set given)"

    def to(self, device: torch.device) -> SupervisedTask:
        super().to(device)
        self.x, self.y = self.x.to(device), self.y.to(device)
        self.x_test, self.y_test = self.x_test.to(device), self.y_test.to(device)
        return self

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:  # one seeded permutation per epoch, identical on every rank
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.x), generator=g)
        start = within * self.global_batch + self.rank * self.local_batch
        idx = self._order[start : start + self.local_batch].to(self.x.device)
        return self.x[idx], self.y[idx]

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.loss_kind == "cross_entropy":
            return F.cross_entropy(out, y)
        return F.mse_loss(out, y.to(out.dtype))

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x, y = batch
        out = self.model(x)
        loss = self._loss(out, y)
        metrics = {"acc": float((out.argmax(-1) == y).float().mean())} if self.has_accuracy else {}
        return loss, metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        total, correct, n = 0.0, 0, len(self.x_test)
        for i in range(0, n, self.eval_batch):
            x, y = self.x_test[i : i + self.eval_batch], self.y_test[i : i + self.eval_batch]
            out = self.model(x)
            total += float(self._loss(out, y)) * len(x)
            if self.has_accuracy:
                correct += int((out.argmax(-1) == y).sum())
        self.model.train(was_training)
        result = {"loss": total / n}
        if self.has_accuracy:
            result["acc"] = correct / n
        if not math.isfinite(result["loss"]):
            result["loss"] = float("inf")
        return result


class NextTokenTask(Task):
    """Next-token prediction on random windows of a 1-D token stream (``chargpt``, ``gpt``).

    Subclasses set ``cfg`` (with ``block`` and ``eval_batches``), ``train_data`` and
    ``test_data`` (1-D long tensors), ``rank``, ``seed``, ``global_batch`` and
    ``local_batch``.  Each step draws ``global_batch`` windows from a generator seeded
    by the run seed and the step, identical on every rank, and rank ``r`` takes its slice.
    """

    has_accuracy = True
    device = torch.device("cpu")

    def to(self, device: torch.device) -> NextTokenTask:
        super().to(device)
        self.device = device
        return self

    def _windows(self, data: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        offsets = torch.arange(self.cfg.block + 1)
        w = data[starts[:, None] + offsets]
        return w[:, :-1].to(self.device), w[:, 1:].to(self.device)

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(len(self.train_data) - self.cfg.block - 1, (self.global_batch,), generator=g)
        mine = starts[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
        return self._windows(self.train_data, mine)

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        return loss, {"acc": float((logits.argmax(-1) == y).float().mean())}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss and next-token accuracy over ``eval_batches`` fixed batches."""
        was_training = self.model.training
        self.model.eval()
        batch = max(self.global_batch, 32)
        g = torch.Generator().manual_seed(12345)  # the same held-out windows at every evaluation
        starts = torch.randint(len(self.test_data) - self.cfg.block - 1, (self.cfg.eval_batches * batch,), generator=g)
        total, correct, count = 0.0, 0, 0
        for chunk in starts.split(batch):
            x, y = self._windows(self.test_data, chunk)
            logits = self.model(x)
            total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            count += y.numel()
        self.model.train(was_training)
        return {"loss": total / count, "acc": correct / count}
