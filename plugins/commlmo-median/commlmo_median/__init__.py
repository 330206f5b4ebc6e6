r"""A third-party commlmo aggregator: the coordinate-wise median of the workers' messages.

``A_j = median_i decompress(P_i)_j``.  Unlike the mean, the median ignores up to
half of the workers being arbitrarily wrong (Yin et al. 2018, "Byzantine-robust
distributed learning").  Payloads travel by all-gather, since a median cannot
be computed on summed wires.

Install with ``pip install plugins/commlmo-median`` and use it in a config as
``aggregator: {kind: median}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from commlmo.plugin import Aggregator, PluginConfig
from commlmo.transport import gather_payloads

__all__ = ["Median", "MedianConfig"]


class MedianConfig(PluginConfig):
    kind: Literal["median"] = "median"


class Median(Aggregator):
    """Coordinate-wise median of the workers' messages (Byzantine-robust), by all-gather."""

    Config = MedianConfig

    def aggregate(self, vectors: Sequence[Tensor], states, *, uplink, comm, generators, label) -> list[Tensor]:
        payloads = [uplink.compress(v, generator=generators.for_(uplink)) for v in vectors]
        gathered = gather_payloads(payloads, comm, label=f"{label}/median")
        out = []
        for i in range(len(payloads)):
            stack = torch.stack([uplink.decompress(rank_payloads[i]) for rank_payloads in gathered])
            out.append(stack.median(dim=0).values if stack.shape[0] > 2 else stack.mean(dim=0))
        return out
