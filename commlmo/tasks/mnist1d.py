"""MNIST-1D (Greydanus 2020): ten 1-D digit templates, 40 samples long, generated offline.

The ``mnist1d`` package's ``make_dataset`` builds the standard split (4000
train, 1000 test) from its templates and a fixed seed; nothing is downloaded.
Published test accuracy: logistic regression about 32 %, MLP about 68 %, the
small CNN below about 94 %.

The dataset takes a few seconds to generate, so rank 0 writes it once to a
cache (``$COMMLMO_CACHE_DIR`` or ``~/.cache/commlmo``) and every rank loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .base import SupervisedTask

__all__ = ["Config", "build", "prepare", "MLP", "CNN", "cache_dir"]


class Config(BaseModel):
    """``mnist1d`` task: the model and the generated dataset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["mnist1d"] = "mnist1d"
    model: Literal["mlp", "cnn"] = "cnn"
    hidden: list[int] = Field(default_factory=lambda: [100, 100], min_length=1)  # mlp widths
    channels: int = Field(25, ge=1)  # cnn channels
    samples: int = Field(5000, ge=100)  # train + test, as in make_dataset
    data_seed: int = Field(42, ge=0)  # the package's default: the published split


def cache_dir() -> Path:
    return Path(os.environ.get("COMMLMO_CACHE_DIR", Path.home() / ".cache" / "commlmo"))


def _cache_path(cfg: Config) -> Path:
    key = json.dumps({"samples": cfg.samples, "seed": cfg.data_seed, "v": 1}, sort_keys=True)
    return cache_dir() / "mnist1d" / f"mnist1d-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"


def _generate(cfg: Config) -> dict[str, np.ndarray]:
    os.environ.setdefault("MPLBACKEND", "Agg")  # mnist1d imports pyplot
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = cfg.samples, cfg.data_seed
    d = make_dataset(args)
    return {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}


def prepare(cfg: Config) -> Path | None:
    """Generate the dataset into the cache unless it is there; ``None`` if the cache is not writable."""
    path = _cache_path(cfg)
    if path.exists():
        return path
    data = _generate(cfg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **data)
        tmp.replace(path)  # atomic: a concurrent reader sees all or nothing
    except OSError:
        return None
    return path


def _load(cfg: Config) -> dict[str, np.ndarray]:
    path = _cache_path(cfg)
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    return _generate(cfg)


class MLP(nn.Module):
    """40 -> hidden... -> 10 with ReLU."""

    def __init__(self, hidden: list[int], *, inputs: int = 40, classes: int = 10):
        super().__init__()
        sizes = [inputs, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """The MNIST-1D paper's CNN: three stride-2 convolutions, then a linear layer (about 5k parameters)."""

    def __init__(self, channels: int = 25, *, length: int = 40, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        for kernel in (5, 3, 3):
            length = (length + 2 - kernel) // 2 + 1
        self.linear = nn.Linear(channels * length, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(1)
        h = torch.relu(self.conv1(h))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.linear(h.flatten(1))


def build(cfg: Config, *, rank: int, world_size: int, seed: int, global_batch: int) -> SupervisedTask:
    d = _load(cfg)
    torch.manual_seed(seed)  # same initial model on every rank
    model = CNN(cfg.channels) if cfg.model == "cnn" else MLP(cfg.hidden)
    as_x = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return SupervisedTask(
        model, as_x(d["x"]), as_y(d["y"]), as_x(d["x_test"]), as_y(d["y_test"]),
        global_batch=global_batch, rank=rank, world_size=world_size, seed=seed,
        info={"dataset": f"mnist1d (make_dataset, {cfg.samples} samples, seed {cfg.data_seed})",
              "parameters": sum(p.numel() for p in model.parameters())},
    )
