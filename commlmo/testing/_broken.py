"""A deliberately broken LMO, to show that :func:`commlmo.testing.check_lmo` catches each defect.

Not registered anywhere (no entry point): build it directly,
``BrokenLMO(breaks="duality")``.  With ``breaks="nothing"`` it is a correct
max-norm (sign) LMO; every other value breaks exactly one promise of the
contract, named as :data:`commlmo.testing.lmo_kit.PROPERTIES` names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from commlmo.plugin import LMO, LMOCapabilities, PluginConfig

__all__ = ["BrokenLMO", "BREAKS"]

#: what ``BrokenLMO(breaks=...)`` can break -> the property check_lmo must report
BREAKS: dict[str, str] = {
    "shape": "shape",  # returns float32 whatever the input dtype
    "mutation": "no-mutation",  # writes the sign into its input
    "determinism": "determinism",  # exact zeros get signs from the global RNG, not the generator
    "norm_ball": "norm-ball",  # 2 * sign(G)
    "duality": "duality",  # dual_norm is the l2 norm, not the l1 norm
    "optimality": "optimality",  # G / max|G|, with a dual_norm that agrees with it: not the argmax
    "scale": "scale-invariance",  # exact zeros get +1 or -1 depending on ||G||_1 (optimal, but not scale-free)
    "directions": "directions",  # directions() returns the list in reverse order
}


class BrokenLMO(LMO):
    """A max-norm (sign) LMO that breaks one promise on purpose (for testing check_lmo)."""

    class Config(PluginConfig):
        kind: Literal["broken_lmo"] = "broken_lmo"
        breaks: Literal["nothing", "shape", "mutation", "determinism", "norm_ball", "duality", "optimality",
                        "scale", "directions"] = Field("nothing", description="the promise to break")

    config: Config
    capabilities: ClassVar[LMOCapabilities] = LMOCapabilities(min_ndim=0, elementwise=True, step_family="sign")

    def direction(self, g: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        breaks = self.config.breaks
        if breaks == "mutation":
            return g.sign_().masked_fill_(g == 0, 1)
        if breaks == "optimality":
            top = g.double().abs().amax() if g.numel() else torch.zeros((), dtype=torch.float64)
            return (g.double() / top if top > 0 else torch.ones_like(g, dtype=torch.float64)).to(g.dtype)
        d = torch.where(g < 0, -1.0, 1.0).to(g.dtype)
        if breaks == "determinism":
            zeros = g == 0
            coins = torch.randint(0, 2, (int(zeros.sum()),)).to(g.dtype) * 2 - 1  # global RNG
            d = d.clone()
            d[zeros] = coins  # optimal whatever the coins: only reproducibility is broken
        elif breaks == "norm_ball":
            d = 2 * d
        elif breaks == "scale":
            tie = 1.0 if float(g.double().abs().sum()) > 1 else -1.0
            d = torch.where(g == 0, tie, d).to(g.dtype)
        elif breaks == "shape":
            d = d.float()
        return d

    def directions(self, gs: Sequence[Tensor], *, generator: torch.Generator | None = None) -> list[Tensor]:
        out = [self.direction(g, generator=generator) for g in gs]
        return out[::-1] if self.config.breaks == "directions" else out

    def norm(self, d: Tensor) -> Tensor:
        return d.double().abs().amax() if d.numel() else torch.zeros((), dtype=torch.float64)

    def dual_norm(self, g: Tensor) -> Tensor:
        if self.config.breaks == "duality":
            return torch.linalg.vector_norm(g.double())
        if self.config.breaks == "optimality":  # <G, G / max|G|>: consistent with its direction, and too small
            top = g.double().abs().amax() if g.numel() else torch.zeros((), dtype=torch.float64)
            return (g.double() ** 2).sum() / top if top > 0 else top
        return g.double().abs().sum()
