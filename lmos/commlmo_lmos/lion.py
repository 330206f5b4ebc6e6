r"""Distributed Lion (Liu et al. 2024, "Communication Efficient Distributed Training with
Distributed Lion", NeurIPS; Lion: Chen et al. 2023, arXiv 2302.06675).

Each worker ``i`` keeps its own momentum ``m_i`` and sends Lion's update, a sign::

    u_i = sign(b1 m_i + (1 - b1) g_i)          (1 bit per entry)
    m_i <- b2 m_i + (1 - b2) g_i

the server role combines the signs -- a majority vote (1 bit back) or their mean --
and every worker applies ``X <- X (1 - lr wd) - lr A``.  At one worker this is Lion.

Lion Cub (Ishikawa et al. 2025, arXiv 2411.16462) found that majority-vote Lion only
speeds training up end to end when the votes travel through a bandwidth-optimal
collective and nothing else stays in full precision: here the vote goes through the
``owner`` transport (all-to-all of packed shards, bit-sliced vote, all-gather: 2(M-1)/M
bits per entry per rank, at any M) and the group is one of a recipe in which every
parameter is compressed.  Exact zeros of ``b1 m + (1 - b1) g`` (e.g. rows of an
embedding never seen yet) get a random sign from this worker's own stream, so every
message is exactly one bit.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from commlmo.plugin import PluginConfig, Rule, RuleCapabilities

from ._common import Beta, random_signs_at_zeros

__all__ = ["Lion"]


class Lion(Rule):
    """Distributed Lion: each worker sends sign(b1 m_i + (1-b1) g_i); vote (or mean) at the server."""

    class Config(PluginConfig):
        kind: Literal["lion"] = "lion"
        betas: tuple[Beta, Beta] = Field((0.9, 0.99), description="(b1: the update's interpolation, "
                                           "b2: the momentum's), each in [0, 1)")
        zero: Literal["random", "positive"] = Field("random", description="sign of an exact zero")

    config: Config
    capabilities: ClassVar[RuleCapabilities] = RuleCapabilities(step_family="sign")

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        return {"lion_momentum": torch.zeros_like(param, memory_format=torch.preserve_format)}

    def worker(self, grad: Tensor, state: dict[str, Tensor], *, step: int,
               generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        b1, b2 = self.config.betas
        m = state["lion_momentum"]
        g = grad.to(m.dtype)
        update = torch.sign(m.lerp(g, 1 - b1))
        zeros = update == 0
        if self.config.zero == "positive":
            update.masked_fill_(zeros, 1)
        else:
            update = random_signs_at_zeros(update, zeros, generator)
        return update, {"lion_momentum": m.lerp(g, 1 - b2)}
