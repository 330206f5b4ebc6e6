"""Deliberately broken plugins, to show that the contract kits catch each defect.

``BrokenLMO`` for :func:`commlmo.testing.check_lmo` and ``BrokenAggregator`` for
:func:`commlmo.testing.check_aggregator`.  Neither is registered anywhere (no
entry point): build them directly, ``BrokenLMO(breaks="duality")``,
``BrokenAggregator(breaks="rank")``.  With ``breaks="nothing"`` each is a correct
plugin (a max-norm (sign) LMO; a mean by all-gather that keeps a running total in
its state); every other value breaks exactly one promise of the contract, named
as :data:`commlmo.testing.lmo_kit.PROPERTIES` and
:data:`commlmo.testing.aggregator_kit.PROPERTIES` name it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from commlmo.plugin import LMO, Aggregator, AggregatorCapabilities, LMOCapabilities, PluginConfig
from commlmo.transport import gather_payloads

__all__ = ["BrokenLMO", "BREAKS", "BrokenAggregator", "AGGREGATOR_BREAKS"]

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


#: what ``BrokenAggregator(breaks=...)`` can break -> the property check_aggregator must report
AGGREGATOR_BREAKS: dict[str, str] = {
    "count": "count",  # drops the last parameter's result
    "shape": "shape",  # returns every result flattened to 1-D
    "dtype": "dtype",  # returns the mean rounded to int32
    "nan": "finite",  # the first entry of the first result is NaN
    "sign": "output-sign",  # declares output_sign, returns the mean
    "mutation": "no-mutation",  # zeroes the first message after reading it (a mean message is the gradient)
    "rank": "agreement",  # adds rank * 1e-3 to the first entry: the ranks disagree
    "reference": "reference",  # the sum of the messages, where its reference() (and its docstring) say mean
    "state": "state",  # adds this rank's own message to the running total before the all-gather
    "robust": "robust",  # claims robustness to 'amplify', but a mean weighs a louder message more
}


class BrokenAggregator(Aggregator):
    """A mean by all-gather that breaks one promise on purpose (for testing check_aggregator).

    Correct (``breaks="nothing"``): ``A = (1/M) sum_i decompress(P_i)``, summed in rank
    order; the state ``broken_total`` accumulates the aggregates (after the collective).
    """

    class Config(PluginConfig):
        kind: Literal["broken_aggregator"] = "broken_aggregator"
        breaks: Literal["nothing", "count", "shape", "dtype", "nan", "sign", "mutation", "rank", "reference",
                        "state", "robust"] = Field("nothing", description="the promise to break")

    config: Config

    @property
    def capabilities(self) -> AggregatorCapabilities:  # type: ignore[override]
        return type(self).capabilities_of(self.config)

    @classmethod
    def capabilities_of(cls, config) -> AggregatorCapabilities:
        return AggregatorCapabilities(stateful=True, output_sign=config.breaks == "sign",
                                      robust=("amplify",) if config.breaks == "robust" else ())

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        return {"broken_total": torch.zeros_like(param)}

    def aggregate(self, payloads, messages, states, *, codecs, comm, generators, transport, label) -> list:
        breaks = self.config.breaks
        if breaks == "state":  # too early: the all-gather below may still fail
            for s, codec, p in zip(states, codecs, payloads):
                codec.decompress_add_(s["broken_total"], p)
        gathered = gather_payloads(payloads, comm, label=f"{label}/broken")
        out = []
        for i, codec in enumerate(codecs):
            acc = codec.decompress(gathered[0][i]).clone()
            for r in range(1, comm.world_size):
                acc += codec.decompress(gathered[r][i])
            out.append(acc if breaks == "reference" else acc.div_(comm.world_size))
        if breaks == "mutation":
            messages[0].zero_()
        for s, a in zip(states, out):  # after the collective succeeded
            if breaks != "state":
                s["broken_total"].add_(a)
        if breaks == "count":
            return out[:-1]
        if breaks == "shape":
            return [a.reshape(-1) if a.ndim > 1 else a.reshape(1, -1) for a in out]
        if breaks == "dtype":
            return [a.round().to(torch.int32) for a in out]
        if breaks == "nan":
            out[0].view(-1)[0] = float("nan")
        if breaks == "rank":
            out[0].view(-1)[0] += 1e-3 * comm.rank
        return out

    @staticmethod
    def reference(messages_per_worker, config) -> list[Tensor]:
        """The mean of the decoded messages, on one process."""
        return [torch.stack([m.double() for m in per]).mean(0).to(per[0].dtype) for per in zip(*messages_per_worker)]
