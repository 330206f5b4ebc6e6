r"""AdamW as an element-wise rule on the aggregate (Loshchilov & Hutter 2019, arXiv 1711.05101).

With an identity uplink and ``mean`` this is exactly what DDP + ``torch.optim.AdamW``
does: every worker sends its gradient, the server role (every rank) runs::

    m <- b1 m + (1 - b1) A;   v <- b2 v + (1 - b2) A^2;   t <- t + 1
    D  = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    X <- X (1 - lr wd) - lr D

(``torch.optim.AdamW``'s arithmetic, so the two agree to rounding).  Any other
uplink gives AdamW on a compressed mean.  The moments and the step count live in
the optimizer state (``exp_avg``, ``exp_avg_sq``, ``adam_step``).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from commlmo.plugin import PluginConfig, Rule, RuleCapabilities

from ._common import Beta

__all__ = ["AdamW"]


class AdamW(Rule):
    """AdamW on the aggregated gradient (the server role): DDP + torch.optim.AdamW with an identity uplink."""

    class Config(PluginConfig):
        kind: Literal["adamw"] = "adamw"
        betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="(b1, b2), each in [0, 1)")
        eps: float = Field(1e-8, gt=0.0, allow_inf_nan=False, description="added to sqrt(v)")

    config: Config
    capabilities: ClassVar[RuleCapabilities] = RuleCapabilities(step_family="lmo")

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        zeros = torch.zeros_like(param, memory_format=torch.preserve_format)
        return {"exp_avg": zeros, "exp_avg_sq": zeros.clone(), "adam_step": torch.zeros((), dtype=torch.float32)}

    def server(self, aggregate: Tensor, state: dict[str, Tensor], *, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        b1, b2 = self.config.betas
        g = aggregate.to(state["exp_avg"].dtype)
        exp_avg = state["exp_avg"].lerp(g, 1 - b1)
        exp_avg_sq = state["exp_avg_sq"].mul(b2).addcmul_(g, g, value=1 - b2)
        t = state["adam_step"] + 1
        n = float(t)
        bias1, bias2 = 1 - b1**n, 1 - b2**n
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(self.config.eps)
        direction = (exp_avg / denom).div_(bias1)
        return direction, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "adam_step": t}
