"""``identity``: the uncompressed baseline."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from commlmo.plugin import CompressorCapabilities, Payload, PluginConfig

from ._common import LayoutCompressor, WireLayout, check_finite

__all__ = ["Identity"]


class Identity(LayoutCompressor):
    """No compression: the tensor itself is the wire (its dtype is the cost).

    ``C(x) = x``: contractive with alpha = 1, unbiased with omega = 0, and summable,
    so a dense all-reduce carries it -- this is plain data-parallel training.

    ``wire[0]`` *is* ``x`` (no copy) and ``decompress`` returns ``wire[0]`` itself:
    a collective that reduces in place must copy first, or it overwrites the
    caller's tensor.
    """

    class Config(PluginConfig):
        kind: Literal["identity"] = "identity"

    capabilities: ClassVar[CompressorCapabilities] = CompressorCapabilities(
        summable=True, fixed_size=True, unbiased=True, contractive=True
    )
    values_decode = "restriction"

    def compress(self, x: Tensor, *, generator: torch.Generator | None = None) -> Payload:
        check_finite(x, "identity compressor")
        return Payload(wire=(x,), ctx={})

    def decompress(self, payload: Payload) -> Tensor:
        return payload.wire[0]

    def decompress_add_(self, target: Tensor, payload: Payload, *, alpha: float = 1.0) -> Tensor:
        return target.add_(payload.wire[0].to(target.dtype), alpha=alpha)

    def wire_layout(self, shape: torch.Size, dtype: torch.dtype) -> WireLayout:
        return ((torch.Size(shape), dtype),)

    def alpha(self, shape: torch.Size) -> float:
        return 1.0

    def omega(self, shape: torch.Size) -> float:
        return 0.0
