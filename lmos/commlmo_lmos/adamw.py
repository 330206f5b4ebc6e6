r"""AdamW as an element-wise rule on the aggregate (Loshchilov & Hutter 2019, arXiv 1711.05101).

With an identity uplink and ``mean`` this is exactly what DDP + ``torch.optim.AdamW``
does: every worker sends its gradient, the server role (every rank) runs::

    m <- b1 m + (1 - b1) A;   v <- b2 v + (1 - b2) A^2;   t <- t + 1
    D  = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    X <- X (1 - lr wd) - lr D

(``torch.optim.AdamW``'s arithmetic and operation order, so the two agree bit for bit:
the direction is handed on unevaluated and applied as torch applies it,
``X.addcdiv_(m, denom, value=-lr / (1 - b1^t))``).  Any other
uplink gives AdamW on a compressed mean.  The moments and the step count live in
the optimizer state (``exp_avg``, ``exp_avg_sq``, ``adam_step``).
"""

from __future__ import annotations

import weakref
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from commlmo.plugin import Encoded, Payload, PluginConfig, Rule, RuleCapabilities

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
        n = _count(state["adam_step"]) + 1
        _remember(t, n)
        bias1, bias2 = 1 - b1**n, 1 - b2**n
        denom = (exp_avg_sq.sqrt() / bias2**0.5).add_(self.config.eps)
        direction = Encoded(Payload((exp_avg, denom), {"bias1": bias1}), _QUOTIENT)
        return direction, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "adam_step": t}


#: the value of each live ``adam_step`` tensor this process made, by id: the bias corrections need the count
#: as a Python number, and reading it back from the tensor would be a host read per parameter and step
_COUNTS: dict[int, tuple[weakref.ref, float]] = {}


def _count(t: Tensor) -> float:
    hit = _COUNTS.get(id(t))
    if hit is not None and hit[0]() is t:
        return hit[1]
    return float(t)  # a tensor this process did not make (a loaded state): read it once


def _remember(t: Tensor, n: float) -> None:
    _COUNTS[id(t)] = (weakref.ref(t), n)
    weakref.finalize(t, _COUNTS.pop, id(t), None)


class _Quotient:
    """The step ``m / denom / bias1``, applied the way ``torch.optim.AdamW`` applies it.

    torch computes ``X + (-lr / bias1) * m / denom`` in one ``addcdiv_``; dividing
    first and scaling after rounds differently, and one ulp in a bias is enough for
    bf16 Newton--Schulz on the other layers to amplify it within a few steps.
    """

    kind = "adamw_direction"

    @staticmethod
    def decompress(payload: Payload) -> Tensor:
        m, denom = payload.wire
        return (m / denom).div_(payload.ctx["bias1"])

    @staticmethod
    def decompress_add_(target: Tensor, payload: Payload, *, alpha: float = 1.0) -> Tensor:
        m, denom = payload.wire
        if m.dtype != target.dtype:
            return target.add_(_Quotient.decompress(payload).to(target.dtype), alpha=alpha)
        return target.addcdiv_(m, denom, value=alpha / payload.ctx["bias1"])


_QUOTIENT = _Quotient()
