r"""1-bit Adam (Tang et al. 2021, arXiv 2102.02888; DeepSpeed's ``OnebitAdam``).

Adam's variance becomes stable early in training, so 1-bit Adam runs plain Adam for
``warmup`` steps (the float32 mean of the gradients, no compression), then *freezes*
the variance ``v`` and communicates only the momentum, compressed to one bit per entry
with error compensation::

    warm-up (t < warmup):  A = mean_i g_i                      (float32)
                           m <- b1 m + (1 - b1) A;  v <- b2 v + (1 - b2) A^2
    compression:           each worker sends m_i = b1 m + (1 - b1) g_i through the group's
                           uplink (scaled sign) and aggregator (``error_feedback``), and
                           m <- A, the mean of what they sent (the same on every rank)
    step:                  D = m / (sqrt(v) + eps);   X <- X (1 - lr wd) - lr D

As in DeepSpeed, there is no bias correction (the warm-up makes it unnecessary) and
weight decay is decoupled.  0/1 Adam (Lu et al. 2022, arXiv 2202.06009) would
replace the fixed warm-up by adaptive freezing; not implemented here.  State:
``exp_avg``, ``exp_avg_sq``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from commlmo.plugin import PluginConfig, Rule, RuleCapabilities

from ._common import Beta

__all__ = ["OneBitAdam"]


class OneBitAdam(Rule):
    """1-bit Adam: float32 Adam for `warmup` steps, then frozen variance and an error-compensated 1-bit momentum."""

    class Config(PluginConfig):
        kind: Literal["onebit_adam"] = "onebit_adam"
        betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="(b1, b2), each in [0, 1)")
        eps: float = Field(1e-8, gt=0.0, allow_inf_nan=False, description="added to sqrt(v)")
        warmup: int = Field(100, ge=0, description="steps of uncompressed Adam before the variance freezes")

    config: Config
    capabilities: ClassVar[RuleCapabilities] = RuleCapabilities(step_family="lmo")

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        zeros = torch.zeros_like(param, memory_format=torch.preserve_format)
        return {"exp_avg": zeros, "exp_avg_sq": zeros.clone()}

    def uplink_active(self, step: int) -> bool:
        return step >= self.config.warmup

    def worker(self, grad: Tensor, state: dict[str, Tensor], *, step: int,
               generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.uplink_active(step):
            return grad, {}
        return state["exp_avg"].lerp(grad.to(state["exp_avg"].dtype), 1 - self.config.betas[0]), {}

    def server(self, aggregate: Tensor, state: dict[str, Tensor], *, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        b1, b2 = self.config.betas
        a = aggregate.to(state["exp_avg"].dtype)
        if self.uplink_active(step):
            exp_avg, updates = a.clone(), {}
        else:
            exp_avg = state["exp_avg"].lerp(a, 1 - b1)
            updates = {"exp_avg_sq": state["exp_avg_sq"].mul(b2).addcmul_(a, a, value=1 - b2)}
        updates["exp_avg"] = exp_avg
        v = updates.get("exp_avg_sq", state["exp_avg_sq"])
        return exp_avg / (v.sqrt() + self.config.eps), updates
