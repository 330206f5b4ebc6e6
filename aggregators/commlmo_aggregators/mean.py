r"""Mean aggregation: ``A = (1/M) sum_i decompress(P_i)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from torch import Tensor

from commlmo.plugin import Aggregator, Compressor, PluginConfig
from commlmo.transport import cheapest, mean_of_payloads

__all__ = ["Mean", "MeanConfig", "pick_mean_transport", "transport_problem"]

MeanTransport = Literal["auto", "owner", "allreduce", "allgather"]


class MeanConfig(PluginConfig):
    """Config of ``mean``."""

    kind: Literal["mean"] = "mean"
    transport: MeanTransport = Field(
        "auto", description="`owner`: all-to-all, owner sums in rank order, all-gather (bitwise reproducible); "
        "`allreduce`: the backend's all-reduce; `allgather`: every rank decodes every payload; "
        "`auto`: the cheapest the uplink allows (owner for summable payloads).")


def pick_mean_transport(transport: str, uplink: Compressor, *, world_size: int = 2, payload_bytes: int = 1) -> str:
    """Resolve ``auto`` from the uplink's capabilities and the byte-cost model; refuse a
    sum of payloads that do not sum."""
    summable = uplink.capabilities.summable
    if transport == "auto":
        options = ["owner", "allgather"] if summable else ["allgather"]
        return cheapest(options, payload_bytes=payload_bytes, dense_entries=0, world_size=world_size)  # type: ignore[arg-type]
    if transport in ("owner", "allreduce") and not summable:
        raise ValueError(
            f"transport {transport!r} sums payloads on the wire, but {uplink.kind!r} payloads do not sum; "
            "use transport: allgather (or auto)"
        )
    return transport


def transport_problem(transport: str, uplink: Compressor) -> str | None:
    """``None`` if ``transport`` can carry ``uplink``'s payloads, else why not (for ``check_uplink``)."""
    try:
        pick_mean_transport(transport, uplink)
    except ValueError as exc:
        return str(exc)
    return None


class Mean(Aggregator):
    """Average of the decompressed uplink messages (DDP's all-reduce when the uplink is identity).

    With a summable uplink (identity, shared-seed randk) the wire tensors are
    summed in compressed form; otherwise every rank all-gathers every payload
    and decodes it, and that is the cost reported.
    """

    Config = MeanConfig

    def check_uplink(self, uplink: Compressor) -> str | None:
        return transport_problem(self.config.transport, uplink)

    def aggregate(self, vectors: Sequence[Tensor], states, *, uplink, comm, generators, label) -> list[Tensor]:
        gen = generators.for_(uplink)
        payloads = [uplink.compress(v, generator=gen) for v in vectors]
        transport = pick_mean_transport(
            self.config.transport, uplink, world_size=comm.world_size, payload_bytes=sum(p.nbytes for p in payloads)
        )
        return mean_of_payloads(payloads, uplink, comm, transport=transport, label=f"{label}/mean")  # type: ignore[arg-type]
