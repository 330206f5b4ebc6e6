r"""SignMuon's synthetic problem: F(X) = 1/2 <X, A X B> with everything about it known.

``A`` (m x m) and ``B`` (n x n) are symmetric positive definite with a
prescribed spectrum in a random orthogonal basis (Smirnova, Kravatskiy, Kovalev,
repo intsystems/SignMuon, ``synthetic/``).  The Hessian is ``B (x) A``, so

* ``grad F(X) = A X B`` and the minimum is ``F* = 0`` at ``X = 0``;
* the smoothness constant is exactly ``L = max_i lambda_i(A) * max_j mu_j(B)``
  and the strong-convexity constant ``sigma = min_i lambda_i * min_j mu_j``.

``spectrum: uniform`` draws eigenvalues from U(0, 1) (the paper's default,
``L <= 1``, condition number left to the draw); ``spectrum: logspace`` fixes
``L = 1`` and ``L / sigma = kappa`` exactly.  ``count`` independent matrices
share ``A`` and ``B`` (more coordinates at the same LMO cost per coordinate).

Worker ``i`` sees ``grad F(X) + noise * Z_i`` with ``Z_i`` standard normal,
drawn per step and rank; with ``noise: 0`` (default) every worker sees the
exact gradient, as in the paper.  The logged loss is always the exact ``F(X)``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from .base import Task

__all__ = ["Config", "Quadratic", "MatrixTask", "build"]


class Config(BaseModel):
    """``matrix`` task: the quadratic's size, spectrum and gradient noise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["matrix"] = "matrix"
    m: int = Field(100, ge=1)
    n: int = Field(100, ge=1)
    count: int = Field(1, ge=1)
    spectrum: Literal["uniform", "logspace"] = "uniform"
    kappa: float = Field(1e4, ge=1.0)  # condition number for spectrum: logspace
    basis: Literal["haar", "diagonal"] = "haar"
    problem_seed: int = Field(1337, ge=0)  # draws A and B; the run's seed draws X0 and the noise
    init_scale: float = Field(0.1, gt=0.0)
    noise: float = Field(0.0, ge=0.0)


def _spectrum(dim: int, cfg: Config, gen: torch.Generator) -> Tensor:
    if cfg.spectrum == "uniform":
        return torch.rand(dim, generator=gen, dtype=torch.float64)
    return torch.logspace(math.log10(cfg.kappa ** -0.5), 0.0, dim, dtype=torch.float64)


def _embed(eig: Tensor, cfg: Config, gen: torch.Generator) -> Tensor:
    if cfg.basis == "diagonal":
        return torch.diag(eig)
    q, _ = torch.linalg.qr(torch.randn(len(eig), len(eig), generator=gen, dtype=torch.float64))
    return q @ torch.diag(eig) @ q.T


class Quadratic(nn.Module):
    """``count`` matrices ``X_k`` (parameters ``x.0``, ``x.1``, ...) and ``F = sum_k 1/2 <X_k, A X_k B>``."""

    def __init__(self, cfg: Config, *, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(cfg.problem_seed)
        la = _spectrum(cfg.m, cfg, gen)
        a = _embed(la, cfg, gen)  # A is drawn before B: the order is part of what the seed pins
        lb = _spectrum(cfg.n, cfg, gen)
        b = _embed(lb, cfg, gen)
        self.register_buffer("a", a.float())
        self.register_buffer("b", b.float())
        self.L = float(la.max() * lb.max())
        self.sigma = float(la.min() * lb.min())
        init = torch.Generator().manual_seed(seed)
        self.x = nn.ParameterList(
            nn.Parameter(torch.randn(cfg.m, cfg.n, generator=init) * cfg.init_scale) for _ in range(cfg.count)
        )

    def forward(self) -> Tensor:
        return sum(0.5 * torch.sum(x * (self.a @ x @ self.b)) for x in self.x)  # type: ignore[return-value]


class MatrixTask(Task):
    """The quadratic, with optional per-worker gradient noise."""

    def __init__(self, cfg: Config, *, rank: int, seed: int):
        model = Quadratic(cfg, seed=seed)
        super().__init__(model, info={
            "problem": f"F(X) = 1/2 <X, A X B>, {cfg.count} x ({cfg.m} x {cfg.n}), spectrum {cfg.spectrum}",
            "L": model.L, "sigma": model.sigma, "kappa": model.L / model.sigma if model.sigma > 0 else math.inf,
            "f_star": 0.0, "parameters": cfg.count * cfg.m * cfg.n,
        })
        self.cfg, self.rank, self.seed = cfg, rank, seed

    def train_batch(self, step: int) -> int:
        return step  # the "batch" is only the noise draw

    def loss(self, batch: int) -> tuple[Tensor, dict[str, float]]:
        f = self.model()
        exact = float(f.detach())
        if self.cfg.noise:
            # adds noise * Z_i to the gradient without changing the reported loss
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + batch) * 65_537 + self.rank)
            for x in self.model.x:
                z = torch.randn(x.shape, generator=gen).to(x.device)
                f = f + self.cfg.noise * torch.sum(z * x)
        return f, {"loss": exact}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return {"loss": float(self.model())}


def build(cfg: Config, *, rank: int, world_size: int, seed: int, global_batch: int) -> MatrixTask:
    return MatrixTask(cfg, rank=rank, seed=seed)
