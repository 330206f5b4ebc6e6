"""``sign``: one bit per entry, optionally scaled per block."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from commlmo.plugin import CompressorCapabilities, Payload, PluginConfig

from . import _native
from ._native import CPU as _CPU
from ._common import LayoutCompressor, WireLayout, dense_nbytes, draw_key
from .bits import add_packed_signs_, pack_signs, packed_nbytes, unpack_signs

__all__ = ["SignCompressor"]


class SignCompressor(LayoutCompressor):
    r"""Sign compression: one packed bit per entry, optionally times ``||x||_1 / d`` per block.

    ``scale="none"``: ``C(x) = sign(x)``; ``wire = (bits,)`` with ``ceil(d/8)`` bytes
    in the :mod:`commlmo_compressors.bits` format, exactly what majority vote needs
    (signSGD, Bernstein et al. 2018, arXiv 1802.04434).  Not contractive.

    ``scale="mean"``: ``C(x)_b = (||x_b||_1 / d_b) sign(x_b)`` for each of ``blocks``
    equal slices ``x_b`` along dim 0 (e.g. ``blocks=4`` for SignMuon's fused QKV
    weight), one float32 scale per block in ``wire[1]``.  Since
    ``<x, sign(x)> = ||x||_1`` (zeros included, whatever sign they get),
    ``||C(x) - x||^2 = ||x||^2 - ||x||_1^2 / d <= (1 - 1/d)||x||^2`` per block: contractive
    with ``alpha = 1 / d_b`` (Karimireddy et al. 2019, arXiv 1901.09847).  If bits plus
    scales would not be smaller than ``x`` (a handful of entries), ``x`` is sent as is.

    Exact zeros follow ``zero`` (see :mod:`commlmo_compressors.bits`).  Decoding
    gives +-1 (times the scale) in ``x``'s dtype; :meth:`decompress_add_` adds
    straight from the packed bits.
    """

    #: the config field a group's block view sets, so a fused weight gets one scale per block
    scale_blocks_field = "blocks"

    class Config(PluginConfig):
        kind: Literal["sign"] = "sign"
        scale: Literal["none", "mean"] = "none"
        blocks: int = Field(1, ge=1, description="equal slices along dim 0, one scale each (scale='mean')")
        zero: Literal["random", "positive"] = "random"

        @model_validator(mode="after")
        def _blocks_need_scales(self):
            if self.blocks > 1 and self.scale == "none":
                raise ValueError(
                    f"sign compressor: blocks={self.blocks} only applies to scale='mean' "
                    "(unscaled signs have no per-block state); drop blocks or set scale='mean'"
                )
            return self

    @property
    def capabilities(self) -> CompressorCapabilities:  # type: ignore[override]
        return type(self).capabilities_of(self.config)

    @classmethod
    def capabilities_of(cls, config) -> CompressorCapabilities:
        scaled = config.scale == "mean"
        return CompressorCapabilities(
            fixed_size=True,
            contractive=scaled,
            sign_bits=not scaled,
            stochastic=config.zero == "random",
        )

    # ------------------------------------------------------------------ layout

    def _blocks(self, shape: torch.Size) -> int:
        blocks = self.config.blocks
        if blocks > 1 and (len(shape) == 0 or shape[0] % blocks):
            raise ValueError(
                f"sign compressor: blocks={blocks} must divide dim 0 of the tensor, got shape "
                f"{tuple(shape)}; blocks cut dim 0 into equal slices (4 for a fused QKV weight)"
            )
        return blocks

    def _dense(self, shape: torch.Size, dtype: torch.dtype) -> bool:
        if self.config.scale == "none":  # ceil(d/8) bytes never exceed d entries of any float
            return False
        return packed_nbytes(shape.numel()) + 4 * self._blocks(shape) >= dense_nbytes(shape, dtype)

    def wire_layout(self, shape: torch.Size, dtype: torch.dtype) -> WireLayout:
        shape = torch.Size(shape)
        if self._dense(shape, dtype):
            return ((shape, dtype),)
        bits = ((torch.Size([packed_nbytes(shape.numel())]), torch.uint8),)
        if self.config.scale == "none":
            return bits
        return bits + ((torch.Size([self._blocks(shape)]), torch.float32),)

    def alpha(self, shape: torch.Size) -> float | None:
        if self.config.scale == "none":
            return None
        n = torch.Size(shape).numel()
        return self._blocks(torch.Size(shape)) / max(n, 1)

    # ------------------------------------------------------------------ codec

    def compress(self, x: Tensor, *, generator: torch.Generator | None = None) -> Payload:
        ctx = {"shape": x.shape, "dtype": x.dtype, "device": x.device}
        dense = self._dense(x.shape, x.dtype)
        bits = pack_signs(x, zero=self.config.zero, generator=generator, name="sign compressor")
        if dense:
            return Payload(wire=(x,), ctx=ctx | {"dense": True})
        if self.config.scale == "none":
            return Payload(wire=(bits,), ctx=ctx)
        return Payload(wire=(bits, _block_means(x.reshape(self._blocks(x.shape), -1))), ctx=ctx)

    def advance_generator(self, generator, shape, dtype) -> bool:
        # pack_signs draws one 64-bit key per call when zero='random', whatever the data
        if self.config.zero == "random" and generator is not None:
            draw_key(generator)
        return True

    def decompress(self, payload: Payload) -> Tensor:
        shape, dtype = payload.ctx["shape"], payload.ctx["dtype"]
        if payload.ctx.get("dense"):
            return payload.wire[0]
        if self.config.scale == "none":
            return unpack_signs(payload.wire[0], shape.numel(), dtype).view(shape)
        scales = payload.wire[1]
        signs = unpack_signs(payload.wire[0], shape.numel(), scales.dtype).view(len(scales), -1)
        return (signs * scales.unsqueeze(1)).to(dtype).view(shape)

    def decompress_add_(self, target: Tensor, payload: Payload, *, alpha: float = 1.0) -> Tensor:
        if payload.ctx.get("dense"):
            return target.add_(payload.wire[0].to(target.dtype), alpha=alpha)
        if not target.is_contiguous():
            return super().decompress_add_(target, payload, alpha=alpha)
        scales = None if self.config.scale == "none" else payload.wire[1]
        return add_packed_signs_(target, payload.wire[0], alpha=alpha, scales=scales)


def _block_means_cpu(blocks: Tensor) -> Tensor:
    """``commlmo::block_abs_means`` on the CPU: C sums in float64 per row, or torch's pairwise sums."""
    lib = _native.available(blocks) if blocks.dtype == torch.float32 else None
    if lib is None:  # torch sums pairwise: float32 is accurate; float64 only if float32 overflows
        sums = torch.linalg.vector_norm(blocks, 1, dim=1, dtype=torch.float32)
        if not bool(torch.isfinite(sums).all()):
            sums = torch.linalg.vector_norm(blocks, 1, dim=1, dtype=torch.float64)
        sums = sums.double()
    else:
        threads = _native.num_threads(blocks.numel())
        sums = torch.tensor([lib.abs_sum_f32(row.data_ptr(), row.numel(), threads) for row in blocks],
                            dtype=torch.float64, device=_CPU)
    return (sums / blocks.shape[1]).to(torch.float32)


def _block_means_device(blocks: Tensor) -> Tensor:
    """``commlmo::block_abs_means`` on any device: float64 sums (one read, no host check), which
    agree with the CPU's to rounding -- sums taken in another order are not bit-identical."""
    sums = torch.linalg.vector_norm(blocks, 1, dim=1, dtype=torch.float64)
    return (sums / blocks.shape[1]).to(torch.float32)


@torch.library.custom_op("commlmo::block_abs_means", mutates_args=())
def _block_means_op(blocks: Tensor) -> Tensor:
    """``||x_b||_1 / d_b`` (float32) for each row ``x_b`` of a 2-D tensor, summed without overflow."""
    return _block_means_device(blocks)


_block_means_op.register_kernel("cpu")(_block_means_cpu)


@_block_means_op.register_fake
def _(blocks: Tensor) -> Tensor:
    return blocks.new_empty(blocks.shape[0], dtype=torch.float32)


def _block_means(blocks: Tensor) -> Tensor:
    """``||x_b||_1 / d_b`` per row, as float32 (see ``commlmo::block_abs_means``)."""
    return _native.call(torch.ops.commlmo.block_abs_means.default, _block_means_cpu, blocks.contiguous())
