r"""Mean aggregation: ``A = (1/M) sum_i decompress(P_i)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

import torch
from torch import Tensor

from commlmo.plugin import Aggregator, AggregatorCapabilities, Compressor, CompressorCapabilities, PluginConfig
from commlmo.transport import cheapest, decoded_mean, mean_steps

__all__ = ["Mean", "MeanConfig", "MeanTransported", "average", "pick_mean_transport", "transport_problem"]

MeanTransport = Literal["auto", "owner", "allreduce", "allgather"]


class MeanConfig(PluginConfig):
    """Config of ``mean``."""

    kind: Literal["mean"] = "mean"
    transport: MeanTransport = Field(
        "auto", description="`owner`: all-to-all, owner sums in rank order, all-gather (bitwise reproducible); "
        "`allreduce`: the backend's all-reduce; `allgather`: every rank decodes every payload; "
        "`auto`: the cheapest the uplink allows (owner for summable payloads).")


def pick_mean_transport(
    transport: str, uplink: CompressorCapabilities, *, uplink_kind: str = "uplink", world_size: int = 2,
    payload_bytes: int = 1,
) -> str:
    """Resolve ``auto`` from the uplink's declared capabilities and the byte-cost model; refuse a
    sum of payloads that do not sum."""
    summable = uplink.summable
    if transport == "auto":
        options = ["owner", "allgather"] if summable else ["allgather"]
        return cheapest(options, payload_bytes=payload_bytes, dense_entries=0, world_size=world_size)  # type: ignore[arg-type]
    if transport in ("owner", "allreduce") and not summable:
        raise ValueError(
            f"transport {transport!r} sums payloads on the wire, but {uplink_kind!r} payloads do not sum; "
            "use transport: allgather (or auto)"
        )
    return transport


def average(messages_per_worker: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Per parameter, the average over workers of their messages (in float64, then each message's dtype)."""
    return [torch.stack([m.double() for m in per]).mean(0).to(per[0].dtype) for per in zip(*messages_per_worker)]


def transport_problem(transport: str, uplink_kind: str, uplink: CompressorCapabilities) -> str | None:
    """``None`` if ``transport`` can carry the uplink's payloads, else why not (for ``check_uplink``)."""
    try:
        pick_mean_transport(transport, uplink, uplink_kind=uplink_kind)
    except ValueError as exc:
        return str(exc)
    return None


class MeanTransported(Aggregator):
    """Base of the aggregators whose payloads travel as a mean (``mean``, ``ef21``, ``error_feedback``):
    a ``transport`` config field checked against the uplink and resolved once by :func:`pick_mean_transport`;
    the mean itself is the :meth:`exchange` (no state), and under the owner server role the owner takes
    it of the parameter's payloads in rank order."""

    #: the label of this aggregator's collectives
    label_suffix = "mean"

    @classmethod
    def check_uplink(cls, config, uplink_kind, uplink) -> str | None:
        return transport_problem(config.transport, uplink_kind, uplink)

    def plan(self, uplink: Compressor, *, world_size: int, payload_bytes: int, dense_entries: int) -> str:
        return pick_mean_transport(self.config.transport, uplink.capabilities, uplink_kind=uplink.kind,
                                   world_size=world_size, payload_bytes=payload_bytes)

    def exchange(self, payloads, *, codecs, comm, generators, transport, label, states=None):
        return mean_steps(payloads, codecs, comm, transport=transport, label=f"{label}/{self.label_suffix}")  # type: ignore[arg-type]

    def reduce_owned(self, rows, codec, *, generator, world_size) -> Tensor:
        return decoded_mean(rows, codec)


class Mean(MeanTransported):
    """Average of the decompressed uplink messages (DDP's all-reduce when the uplink is identity).

    With a summable uplink (identity, shared-seed randk) the wire tensors are
    summed in compressed form; otherwise every rank all-gathers every payload
    and decodes it, and that is the cost reported.
    """

    Config = MeanConfig
    capabilities = AggregatorCapabilities(owner=True)

    @staticmethod
    def reference(messages_per_worker: Sequence[Sequence[Tensor]], config: MeanConfig) -> list[Tensor]:
        """The definition on one process (for the contract kit): the average of the decoded messages."""
        return average(messages_per_worker)
