r"""EF21 error feedback (Richtárik, Sokolov, Fatkhullin 2021).

Worker ``i`` keeps an estimate ``g_i`` of its vector ``v_i`` and sends only
``c_i = C(v_i - g_i)``; everyone keeps ``g = mean_i g_i``::

    c_i = C(v_i - g_i);   g_i <- g_i + c_i;   g <- g + mean_i c_i

``C`` must be contractive (``||C(x) - x||^2 <= (1 - alpha)||x||^2``); an unbiased
compressor with variance ``omega`` is used as ``C / (1 + omega)``, which is
contractive with ``alpha = 1 / (1 + omega)``.  EF21-Muon (Gruntkowska, Gaponov,
Tovmasyan, Richtárik 2025, arXiv 2510.00643) runs the layer-wise LMO on ``g`` at
the server.  The estimates are optimizer state (``ef21_local``, ``ef21_global``),
so they are checkpointed with ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

import torch
from torch import Tensor

from commlmo.plugin import AggregatorCapabilities, Compressor, PluginConfig
from commlmo.transport import mean_of_payloads

from .mean import MeanTransported, average

__all__ = ["EF21", "EF21Config", "damping"]


class EF21Config(PluginConfig):
    """Config of ``ef21``."""

    kind: Literal["ef21"] = "ef21"
    transport: Literal["auto", "owner", "allreduce", "allgather"] = Field(
        "auto", description="How the compressed differences travel, as for `mean`.")


class EF21(MeanTransported):
    """EF21 error feedback: send C(v_i - g_i), keep g_i and g = mean g_i in optimizer state."""

    Config = EF21Config
    capabilities = AggregatorCapabilities(stateful=True)

    @classmethod
    def check_uplink(cls, config, uplink_kind, uplink) -> str | None:
        if not (uplink.contractive or uplink.unbiased):
            return (
                f"aggregator 'ef21' needs a contractive (or unbiased) uplink compressor; {uplink_kind!r} "
                "with this config is neither (e.g. use sign with scale: mean, topk, rankk or natural)"
            )
        return super().check_uplink(config, uplink_kind, uplink)

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        return {"ef21_local": torch.zeros_like(param), "ef21_global": torch.zeros_like(param)}

    def message(self, v: Tensor, state: dict[str, Tensor]) -> Tensor:
        return v - state["ef21_local"]

    def aggregate(self, payloads, messages, states, *, codecs, comm, generators, transport, label) -> list[Tensor]:
        means = mean_of_payloads(payloads, codecs, comm, transport=transport, label=f"{label}/ef21")  # type: ignore[arg-type]
        # State changes only after the collectives succeeded.
        for s, p, codec, mean in zip(states, payloads, codecs, means):
            damp = damping(codec, s["ef21_local"].shape)
            codec.decompress_add_(s["ef21_local"], p, alpha=damp)
            s["ef21_global"].add_(mean, alpha=damp)
        return [s["ef21_global"] for s in states]

    @staticmethod
    def reference(messages_per_worker, config, *, codecs: Sequence[Compressor] | None = None) -> list[Tensor]:
        """The first step on one process (for the contract kit): ``g_i = 0``, so ``g = d * mean_i C(v_i)``
        with ``d`` the damping of each parameter's uplink (1 when ``codecs`` is not given)."""
        means = average(messages_per_worker)
        if codecs is None:
            return means
        return [(m.double() * damping(c, m.shape)).to(m.dtype) for m, c in zip(means, codecs)]


def damping(uplink: Compressor, shape: torch.Size) -> float:
    """1 for contractive compressors; ``1/(1+omega)`` turns an unbiased one into a contractive one."""
    if uplink.capabilities.contractive:
        return 1.0
    omega = uplink.omega(shape)
    return 1.0 / (1.0 + (omega or 0.0))
