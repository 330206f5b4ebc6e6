r"""Spectral-norm LMO: the polar factor ``U V^T`` (Muon's orthogonalised update)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from commlmo.plugin import LMO, LMOCapabilities, PluginConfig, as_matrix

from ._common import accumulation_dtype, check_ndim
from .newton_schulz import SCHEDULES, newton_schulz

__all__ = ["Spectral", "polar_svd", "fast_bfloat16"]


def fast_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices faster than float32 ones.

    Accelerators do; a CPU does with AVX512-BF16 or AMX instructions, and otherwise emulates
    bfloat16 GEMMs at a small fraction of its float32 rate (a 256x256 product: 29 ms in
    bfloat16 against 0.86 ms in float32 on an AVX2 AMD EPYC core, torch 2.13), so
    Newton--Schulz runs in float32 there.
    """
    return device.type != "cpu" or _CPU_FAST_BFLOAT16


def _cpu_fast_bfloat16() -> bool:
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


# Read once at import: the CPU does not change, and torch.compile refuses to trace the
# torch.cpu probes (they sit in dynamo's skip list), so a call inside a compiled LMO
# would break the graph.
_CPU_FAST_BFLOAT16 = _cpu_fast_bfloat16()


def polar_svd(g: Tensor) -> Tensor:
    """Exact polar factor of a matrix by SVD, in float64 for float64 inputs, else float32.

    Singular values at or below ``max(m, n) * eps * s_max`` (numerical rank, as in
    ``numpy.linalg.matrix_rank``) count as zero and contribute nothing, so a
    rank-deficient ``G`` maps to a partial isometry and ``G = 0`` maps to 0.
    """
    x = g.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    tol = max(x.shape) * torch.finfo(x.dtype).eps * s.amax()
    return (u * (s > tol)) @ vh


class Spectral(LMO):
    r"""Spectral-norm ball: D = U V^T, the polar factor of G (Muon).

    For ``G = U S V^T``, ``argmax_{||D||_2 <= 1} <G, D> = U V^T`` and the value is the
    nuclear norm ``sum_i s_i`` (Bernstein & Newhouse 2024, "Old optimizer, new norm",
    arXiv 2409.20325).  ``method`` picks how ``U V^T`` is computed:

    * ``jordan`` -- quintic Newton--Schulz with Keller Jordan's coefficients,
      bitwise equal to ``torch.optim.Muon`` for one matrix; after 5 steps the
      singular values lie in about ``[0.68, 1.2]`` rather than at 1;
    * ``polar_express`` -- per-step minimax coefficients (Amsel et al. 2025,
      arXiv 2505.16932): about ``[0.87, 1.13]`` after 5 steps, at the same cost;
    * ``svd`` -- exact (``torch.linalg.svd``), the test oracle; ignores ``steps``,
      ``dtype`` and ``batch``.

    Conv kernels are viewed as ``out x (in*kh*kw)``.  The result has ``g``'s shape
    and dtype (Newton--Schulz runs in ``dtype`` and is cast back exactly, as
    ``torch.optim.Muon``'s update is when added to the parameter).  ``dtype: auto``
    (the default) takes bfloat16, as torch.optim.Muon does, where the device multiplies
    it fast, and float32 on CPUs that only emulate it (:func:`fast_bfloat16`);
    ``dtype: bfloat16`` reproduces torch.optim.Muon everywhere.

    With ``batch``, :meth:`directions` runs inputs of equal shape and dtype as one
    ``baddbmm`` iteration.  On the CPU backend this is bitwise equal to the
    per-matrix path (tested); on 2 cores it is 2.5-3x faster for 32 matrices of
    128x128 and up to ~15 % slower for 8 of 512x512 (``docs/benchmarks/lmo.md``).  Other
    backends may pick different kernels for batched GEMMs: set ``batch: false``
    where bitwise agreement with ``torch.optim.Muon`` matters there.
    """

    class Config(PluginConfig):
        kind: Literal["spectral"] = "spectral"
        method: Literal["jordan", "polar_express", "svd"] = "jordan"
        steps: int = Field(5, ge=1, le=100, description="Newton-Schulz steps")
        dtype: Literal["auto", "bfloat16", "float32"] = Field(
            "auto", description="Newton-Schulz working dtype; `auto`: bfloat16 where the device multiplies it fast "
            "(accelerators, CPUs with AVX512-BF16 or AMX), float32 elsewhere")
        eps: float = Field(1e-7, gt=0.0, description="floor of ||G||_F in the pre-normalisation")
        batch: bool = Field(True, description="iterate same-shape matrices together in directions()")

    config: Config
    capabilities: ClassVar[LMOCapabilities] = LMOCapabilities(min_ndim=2, step_family="lmo")

    def _polar(self, x: Tensor) -> Tensor:
        """Polar factor of a matrix or a stack of matrices, in the working dtype."""
        cfg = self.config
        if cfg.method == "svd":
            return polar_svd(x)
        return newton_schulz(
            x, schedule=SCHEDULES[cfg.method], steps=cfg.steps, dtype=self.working_dtype(x.device), eps=cfg.eps
        )

    def working_dtype(self, device: torch.device) -> torch.dtype:
        """The Newton--Schulz dtype on ``device``: the configured one, or (``auto``) :func:`fast_bfloat16`'s pick."""
        if self.config.dtype != "auto":
            return getattr(torch, self.config.dtype)
        return torch.bfloat16 if fast_bfloat16(device) else torch.float32

    def direction(self, g: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        check_ndim(self, g)
        return self._polar(as_matrix(g)).reshape(g.shape).to(g.dtype)

    def directions(self, gs: Sequence[Tensor], *, generator: torch.Generator | None = None) -> list[Tensor]:
        if not self.config.batch or self.config.method == "svd":
            return [self.direction(g) for g in gs]
        groups: dict[tuple[torch.Size, torch.dtype, torch.device], list[int]] = {}
        for i, g in enumerate(gs):
            check_ndim(self, g)
            groups.setdefault((as_matrix(g).shape, g.dtype, g.device), []).append(i)
        out: dict[int, Tensor] = {}
        for (shape, dtype, device), idx in groups.items():
            if len(idx) == 1:
                out[idx[0]] = self.direction(gs[idx[0]])
                continue
            work = self.working_dtype(device)
            stack = torch.empty((len(idx), *shape), dtype=work, device=device)
            for row, i in zip(stack, idx):
                row.copy_(as_matrix(gs[i]))  # the cast to the working dtype, fused with the stacking copy
            polar = self._polar(stack)
            for row, i in zip(polar, idx):
                out[i] = row.reshape(gs[i].shape).to(dtype)
        return [out[i] for i in range(len(gs))]

    def norm(self, d: Tensor) -> Tensor:
        """Spectral norm (largest singular value) of the matrix view."""
        check_ndim(self, d)
        return torch.linalg.matrix_norm(as_matrix(d).to(accumulation_dtype(d.dtype)), ord=2)

    def dual_norm(self, g: Tensor) -> Tensor:
        """Nuclear norm (sum of singular values) of the matrix view."""
        check_ndim(self, g)
        return torch.linalg.matrix_norm(as_matrix(g).to(accumulation_dtype(g.dtype)), ord="nuc")
