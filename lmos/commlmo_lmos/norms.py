r"""Column-, row-, RMS- and Frobenius-norm LMOs (the non-spectral norms of Scion).

Scion (Pethick et al. 2025, "Training deep learning
models with norm-constrained LMOs", arXiv 2502.07529; code: LIONS-EPFL/scion,
``scion.py``) assigns one of these norms to each layer and scales its LMO by a
per-layer radius.  Here every LMO returns the direction on the *unit* ball of
its norm; Scion's shape-dependent radii (``sqrt(d_out)``, ``1/sqrt(d_in)``...)
live in the ``scion`` learning-rate rule.  Scion divides by ``norm + 1e-8``;
here zero columns/rows/tensors get a zero direction and others are exact: norms are
taken of the slice divided by its largest entry, so float32 squares neither overflow
nor underflow (found by :func:`commlmo.testing.check_lmo`).

Matrices are ``out x in`` (conv kernels viewed as ``out x (in*kh*kw)``): a
*column* holds the weights leaving one input unit, a *row* those entering one
output unit.  An ``nn.Embedding`` weight is stored ``vocab x dim``, i.e.
transposed, so Scion's ``ColNorm(transpose=True)`` for embeddings is ``rownorm``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import Tensor

from commlmo.plugin import LMO, LMOCapabilities, PluginConfig, as_matrix

from ._common import accumulation_dtype, check_ndim, divide_or_zero

__all__ = ["ColNorm", "RowNorm", "BiasRMS", "Euclidean"]


class _SliceNorm(LMO):
    """Max over slices (columns or rows) of their l2 norms; dual: sum of the l2 norms."""

    capabilities: ClassVar[LMOCapabilities] = LMOCapabilities(min_ndim=2)
    _reduce_dim: ClassVar[int]  # 0: norms of columns, 1: norms of rows

    def _scaled(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x / s, s)`` with ``s`` the largest |entry| of each slice (1 for zero slices), so that
        squares neither overflow (|x| ~ 1e28) nor underflow (|x| ~ 1e-29) in the accumulation."""
        check_ndim(self, x)
        m = as_matrix(x).to(accumulation_dtype(x.dtype))
        s = m.abs().amax(dim=self._reduce_dim, keepdim=True)
        s = torch.where(s > 0, s, torch.ones_like(s))
        return m / s, s

    def _slice_norms(self, x: Tensor) -> Tensor:
        unit, s = self._scaled(x)
        return torch.linalg.vector_norm(unit, dim=self._reduce_dim, keepdim=True) * s

    def direction(self, g: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        unit, _ = self._scaled(g)  # checks the rank first
        norms = torch.linalg.vector_norm(unit, dim=self._reduce_dim, keepdim=True)
        return divide_or_zero(unit, norms).reshape(g.shape).to(g.dtype)

    def norm(self, d: Tensor) -> Tensor:
        return self._slice_norms(d).amax()

    def dual_norm(self, g: Tensor) -> Tensor:
        return self._slice_norms(g).sum()


class ColNorm(_SliceNorm):
    r"""Max-column-l2 ball: each column of G divided by its l2 norm (Scion's ColNorm).

    ``||D|| = max_j ||D[:, j]||_2``; ``direction(G)[:, j] = G[:, j] / ||G[:, j]||_2``;
    dual ``sum_j ||G[:, j]||_2``.  Scion uses it for input layers (one column per
    input feature); Pethick et al. 2025, arXiv 2502.07529.
    """

    class Config(PluginConfig):
        kind: Literal["colnorm"] = "colnorm"

    _reduce_dim: ClassVar[int] = 0


class RowNorm(_SliceNorm):
    r"""Max-row-l2 ball: each row of G divided by its l2 norm (Scion's RowNorm).

    ``||D|| = max_i ||D[i, :]||_2``; ``direction(G)[i, :] = G[i, :] / ||G[i, :]||_2``;
    dual ``sum_i ||G[i, :]||_2``.  Pethick et al. 2025, arXiv 2502.07529.
    """

    class Config(PluginConfig):
        kind: Literal["rownorm"] = "rownorm"

    _reduce_dim: ClassVar[int] = 1


class _ScaledEuclidean(LMO):
    """The ball ``||x||_2 / c <= 1`` over the whole tensor, ``c = _radius(numel)``."""

    def _radius(self, numel: int) -> float:
        raise NotImplementedError

    def _scaled(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x / s, s)``, ``s`` the largest |entry| (1 for zero): no overflow or underflow of squares."""
        check_ndim(self, x)
        m = x.to(accumulation_dtype(x.dtype))
        s = m.abs().amax() if m.numel() else torch.ones((), dtype=m.dtype, device=m.device)
        s = torch.where(s > 0, s, torch.ones_like(s))
        return m / s, s

    def _l2(self, x: Tensor) -> Tensor:
        unit, s = self._scaled(x)
        return torch.linalg.vector_norm(unit) * s

    def direction(self, g: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        unit, _ = self._scaled(g)
        return (self._radius(g.numel()) * divide_or_zero(unit, torch.linalg.vector_norm(unit))).to(g.dtype)

    def norm(self, d: Tensor) -> Tensor:
        return self._l2(d) / self._radius(d.numel())

    def dual_norm(self, g: Tensor) -> Tensor:
        return self._l2(g) * self._radius(g.numel())


class BiasRMS(_ScaledEuclidean):
    r"""RMS ball for vectors: D = G / rms(G) (Scion's BiasRMS for biases and gains).

    ``rms(x) = ||x||_2 / sqrt(d)``; ``direction(G) = sqrt(d) G / ||G||_2``; dual
    ``sqrt(d) ||G||_2``.  Pethick et al. 2025, arXiv 2502.07529.
    """

    class Config(PluginConfig):
        kind: Literal["bias_rms"] = "bias_rms"

    capabilities: ClassVar[LMOCapabilities] = LMOCapabilities(min_ndim=0, max_ndim=1)

    def _radius(self, numel: int) -> float:
        return math.sqrt(numel)


class Euclidean(_ScaledEuclidean):
    r"""Frobenius ball: D = G / ||G||_F (normalized SGD).

    ``argmax_{||D||_F <= 1} <G, D> = G / ||G||_F`` with value ``||G||_F``: the norm
    is self-dual (Hazan, Levy, Shalev-Shwartz 2015, arXiv 1507.02030).
    """

    class Config(PluginConfig):
        kind: Literal["euclidean"] = "euclidean"

    capabilities: ClassVar[LMOCapabilities] = LMOCapabilities(min_ndim=0)

    def _radius(self, numel: int) -> float:
        return 1.0
