r"""A third-party commlmo aggregator: the coordinate-wise median of the workers' messages.

``A_j = median_i decompress(P_i)_j`` (the mean of the two when there are only two
workers).  Unlike the mean, the median stays within the honest workers' values when
fewer than half of the workers are arbitrarily wrong (Yin et al. 2018,
"Byzantine-robust distributed learning").  Payloads travel by all-gather, since a
median cannot be computed on summed wires.

Install with ``pip install plugins/commlmo-median`` and use it in a config as
``aggregator: {kind: median}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from commlmo.plugin import Aggregator, AggregatorCapabilities, Compressor, Payload, PluginConfig
from commlmo.transport import gather_payloads

__all__ = ["Median", "MedianConfig", "median_of"]


class MedianConfig(PluginConfig):
    kind: Literal["median"] = "median"


def median_of(stack: Tensor) -> Tensor:
    """Coordinate-wise median over dim 0 (the lower one of an even count); the mean of two."""
    return stack.median(dim=0).values if stack.shape[0] > 2 else stack.mean(dim=0)


class Median(Aggregator):
    """Coordinate-wise median of the workers' messages (Byzantine-robust), by all-gather."""

    Config = MedianConfig
    # every rank's payloads must have one wire layout to be all-gathered; a minority of
    # workers sending flipped, random or zero messages cannot move it outside the honest values
    capabilities = AggregatorCapabilities(requires=("fixed_size",), robust=("flip", "random", "zero"))

    def plan(self, uplink: Compressor, *, world_size: int, payload_bytes: int, dense_entries: int) -> str:
        return "allgather"  # the only transport a median can use

    def aggregate(
        self, payloads: Sequence[Payload], messages, states, *, codecs, comm, generators, transport, label,
    ) -> list[Tensor]:
        gathered = gather_payloads(payloads, comm, label=f"{label}/median")  # [rank][param]
        return [median_of(torch.stack([codec.decompress(rank_payloads[i]) for rank_payloads in gathered]))
                for i, codec in enumerate(codecs)]

    @staticmethod
    def reference(messages_per_worker: Sequence[Sequence[Tensor]], config: MedianConfig) -> list[Tensor]:
        """The definition on one process, for ``commlmo.testing.check_aggregator``."""
        return [median_of(torch.stack(list(per))) for per in zip(*messages_per_worker)]
