"""``randk``: k random entries, chosen by a seed every rank shares, so no indices travel."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from commlmo.plugin import CompressorCapabilities, Payload, PluginConfig

from ._common import (
    KSpec,
    LayoutCompressor,
    WireLayout,
    check_finite,
    require_generator,
    resolve_k,
)

__all__ = ["RandK", "sample_indices"]


class RandK(LayoutCompressor):
    r"""Random-k sparsification: k uniformly random entries, indices from a shared generator.

    Every rank passes a generator in the same state, so all draw the same index
    set ``S`` (``|S| = k``, uniform over k-subsets) and only the ``k`` values
    travel: ``wire = (values,)`` in ``x``'s dtype, indices in ``ctx``.  Payloads
    are summable (same ``S`` everywhere, linear decoding).

    ``scaled=True``: ``C(x) = (d/k) x_S``; each entry is kept with probability
    ``k/d``, so ``E[C(x)] = x`` and ``E||C(x) - x||^2 = (d/k - 1)||x||^2``:
    unbiased with ``omega = d/k - 1`` (Stich et al. 2018, arXiv 1809.07599).
    ``scaled=False``: ``C(x) = x_S``, ``E||C(x) - x||^2 = (1 - k/d)||x||^2``:
    contractive *in expectation* with ``alpha = k/d`` (the sense EF21 needs).
    """

    class Config(PluginConfig):
        kind: Literal["randk"] = "randk"
        k: KSpec = 0.05
        scaled: bool = True

    @property
    def capabilities(self) -> CompressorCapabilities:  # type: ignore[override]
        return type(self).capabilities_of(self.config)

    @classmethod
    def capabilities_of(cls, config) -> CompressorCapabilities:
        scaled = config.scaled
        return CompressorCapabilities(
            summable=True, fixed_size=True, unbiased=scaled, contractive=not scaled,
            stochastic=True, shared_randomness=True,
        )

    @property
    def values_decode(self):  # type: ignore[override]
        return "embedding" if self.config.scaled else "restriction"

    def wire_layout(self, shape: torch.Size, dtype: torch.dtype) -> WireLayout:
        return ((torch.Size([resolve_k(self.config.k, torch.Size(shape).numel())]), dtype),)

    def alpha(self, shape: torch.Size) -> float | None:
        n = max(torch.Size(shape).numel(), 1)
        return None if self.config.scaled else resolve_k(self.config.k, n) / n

    def omega(self, shape: torch.Size) -> float | None:
        n = max(torch.Size(shape).numel(), 1)
        return n / resolve_k(self.config.k, n) - 1 if self.config.scaled else None

    def compress(self, x: Tensor, *, generator: torch.Generator | None = None) -> Payload:
        require_generator(generator, "randk compressor",
                          "it draws its k indices from a generator every rank seeds identically")
        check_finite(x, "randk compressor")
        n = x.numel()
        k = resolve_k(self.config.k, n)
        idx = sample_indices(n, k, generator).to(x.device)
        scale = n / k if self.config.scaled else 1.0
        ctx = {"shape": x.shape, "dtype": x.dtype, "device": x.device, "indices": idx, "scale": scale}
        return Payload(wire=(x.reshape(-1)[idx],), ctx=ctx)

    def decompress(self, payload: Payload) -> Tensor:
        ctx, (values,) = payload.ctx, payload.wire
        out = torch.zeros(ctx["shape"].numel(), dtype=ctx["dtype"], device=values.device)
        out[ctx["indices"]] = (values * ctx["scale"]).to(ctx["dtype"])
        return out.view(ctx["shape"])

    def decompress_add_(self, target: Tensor, payload: Payload, *, alpha: float = 1.0) -> Tensor:
        if not target.is_contiguous():
            return super().decompress_add_(target, payload, alpha=alpha)
        ctx, (values,) = payload.ctx, payload.wire
        target.view(-1).index_add_(0, ctx["indices"], values.to(target.dtype), alpha=alpha * ctx["scale"])
        return target


def sample_indices(n: int, k: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct indices in ``[0, n)``, sorted, uniform over k-subsets, from ``generator`` only.

    For ``k << n`` it draws ``m`` integers with replacement (``m`` chosen so about
    ``k + 4 sqrt(k)`` are distinct), keeps the distinct ones and picks a uniform
    k-subset of them: the distinct set is exchangeable, so the result is uniform.
    Denser requests take a prefix of ``randperm(n)``.
    """
    device = generator.device
    wanted = k + 4 * math.sqrt(k) + 8
    if 4 * k >= n or wanted >= n:
        return torch.randperm(n, generator=generator, device=device)[:k].sort().values
    draws = math.ceil(-n * math.log1p(-wanted / n))  # E[#distinct] = n (1 - (1 - 1/n)^m) ~ wanted
    while True:
        distinct = torch.unique(torch.randint(0, n, (draws,), generator=generator, device=device))
        if distinct.numel() >= k:
            break
        draws *= 2
    pick = torch.randperm(distinct.numel(), generator=generator, device=device)[:k]
    return distinct[pick].sort().values
