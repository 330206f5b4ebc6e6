"""A third-party commlmo compressor: send bfloat16 instead of float32 (16 bits per entry).

Each entry is rounded to the nearest bfloat16 (8 significant bits), so in
bfloat16's normal range the relative error per entry is at most 2**-8.  That
is not a contract for *every* input: a tensor of float32 subnormals can round
to all zeros, so ``||C(x) - x|| = ||x||`` and no alpha > 0 holds.  The
compressor therefore declares only what is always true: a fixed wire size.

Register it in your distribution's pyproject.toml::

    [project.entry-points."commlmo.compressors"]
    bf16 = "my_package.bf16:BFloat16"

and use it as ``uplink: {kind: bf16}`` (with the ``mean`` aggregator, which
all-gathers payloads that do not declare ``summable``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from commlmo.plugin import Compressor, CompressorCapabilities, Payload, PluginConfig


class BFloat16(Compressor):
    """Round to bfloat16 on the wire: 16 bits per entry, half of float32."""

    class Config(PluginConfig):
        kind: Literal["bf16"] = "bf16"

    capabilities = CompressorCapabilities(fixed_size=True)

    def compress(self, x: Tensor, *, generator: torch.Generator | None = None) -> Payload:
        if not torch.isfinite(x).all():
            raise ValueError(f"bf16 compressor got NaN or Inf in a tensor of shape {tuple(x.shape)}; "
                             "nothing is sent for a non-finite gradient")
        # copy=True: the wire must never alias the caller's tensor (a bfloat16 x would be returned as is)
        wire = x.detach().to(torch.bfloat16, copy=True)
        return Payload((wire,), {"dtype": x.dtype})

    def decompress(self, payload: Payload) -> Tensor:
        return payload.wire[0].to(payload.ctx["dtype"])

    def wire_nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        return 2 * math.prod(shape)
