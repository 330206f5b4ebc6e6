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

from commlmo.plugin import AggregatorCapabilities, Compressor, Payload, PluginConfig

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
    capabilities = AggregatorCapabilities(stateful=True, owner=True)
    label_suffix = "ef21"
    #: under the owner server role only a parameter's owner keeps the shared estimate g
    owner_state = ("ef21_global",)

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

    def combine(self, exchanged, payloads, messages, states, *, codecs) -> list[Tensor]:
        out = []
        for s, p, codec, mean in zip(states, payloads, codecs, exchanged):  # after the collectives succeeded
            self.commit_local(p, None, s, codec)
            out.append(self.commit_owned(mean, s, codec))
        return out

    def commit_local(self, payload: Payload, message, state: dict[str, Tensor], codec: Compressor) -> None:
        """``g_i <- g_i + c_i`` (damped for an unbiased uplink)."""
        codec.decompress_add_(state["ef21_local"], payload, alpha=damping(codec, state["ef21_local"].shape))

    def commit_owned(self, reduced: Tensor, state: dict[str, Tensor], codec: Compressor) -> Tensor:
        """``g <- g + mean_i c_i`` (damped); ``g`` is the aggregate."""
        state["ef21_global"].add_(reduced, alpha=damping(codec, state["ef21_global"].shape))
        return state["ef21_global"]

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
