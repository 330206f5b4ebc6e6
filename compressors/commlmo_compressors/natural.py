"""``natural``: stochastic rounding to a power of two, 9 bits per entry."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import Tensor

from commlmo.plugin import CompressorCapabilities, Payload, PluginConfig, inputs_known_finite

from . import _native
from ._native import CPU as _CPU
from ._common import (
    LayoutCompressor,
    NonFiniteInputError,
    WireLayout,
    counter_hash,
    draw_key_tensor,
    require_generator,
)
from .bits import _pack_bits_eager, packed_nbytes, unpack_signs

__all__ = ["Natural"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Natural(LayoutCompressor):
    r"""Natural compression: round ``|x|`` to a neighbouring power of two, at random, without bias.

    For ``|x| = 2^e (1 + m)``, ``m`` in ``[0, 1)``, send ``2^(e+1)`` with probability
    ``m`` and ``2^e`` otherwise: ``E[C(x)] = x`` and
    ``E(C(x) - x)^2 = (2^(e+1) - |x|)(|x| - 2^e) <= x^2 / 8``, so it is unbiased with
    ``omega = 1/8`` (Horvath et al. 2019, arXiv 1905.10988).  The coin is
    ``u < m`` on the 23 mantissa bits, with ``u`` from a counter hash keyed by
    64 bits drawn from the generator (exact probability ``m``, one key per call).

    Wire, really packed: ``codes`` (``uint8``, one per entry: the float32 biased
    exponent, 0 meaning zero) and the sign bits (``ceil(d/8)`` bytes, the
    :mod:`commlmo_compressors.bits` layout): ``d + ceil(d/8)`` bytes, 9 bits per entry
    plus at most 7 bits of padding.  float32, bfloat16 and float16 inputs (the
    last two exactly representable in float32 codes) are accepted.

    Two honest exceptions to the contract: float32/bfloat16 subnormals
    (``|x| < 2^-126``) round between 0 and ``2^-126`` (still unbiased, variance
    above ``x^2/8``); entries above the largest finite power of two of the dtype
    (``2^127``, or ``2^15`` for float16) saturate to it (biased there).
    """

    class Config(PluginConfig):
        kind: Literal["natural"] = "natural"

    capabilities: ClassVar[CompressorCapabilities] = CompressorCapabilities(
        fixed_size=True, unbiased=True, stochastic=True
    )

    def wire_layout(self, shape: torch.Size, dtype: torch.dtype) -> WireLayout:
        n = torch.Size(shape).numel()
        return ((torch.Size([n]), torch.uint8), (torch.Size([packed_nbytes(n)]), torch.uint8))

    def omega(self, shape: torch.Size) -> float:
        return 1 / 8

    def compress(self, x: Tensor, *, generator: torch.Generator | None = None) -> Payload:
        require_generator(generator, "natural compressor", "its stochastic rounding needs random bits")
        if x.dtype not in _DTYPES:
            raise ValueError(
                f"natural compressor: codes are float32 exponents; got {x.dtype} "
                "(float32, bfloat16 and float16 are supported: cast first)"
            )
        key = draw_key_tensor(generator).to(x.device)
        flat = x.reshape(-1).to(torch.float32).contiguous()
        max_code = 127 + math.floor(math.log2(torch.finfo(x.dtype).max))
        codes, signs, bad = _native.call(torch.ops.commlmo.natural_encode.default, _encode_cpu, flat, key, max_code)
        if _native.readable(bad) and not inputs_known_finite() and bad.item():
            raise NonFiniteInputError(f"natural compressor: input has {bad.item()} NaN or Inf entries")
        return Payload(wire=(codes, signs), ctx={"shape": x.shape, "dtype": x.dtype, "device": x.device})

    def decompress(self, payload: Payload) -> Tensor:
        codes, signs = payload.wire
        values = _native.call(torch.ops.commlmo.natural_decode.default, _decode_cpu, codes, signs)
        return values.to(payload.ctx["dtype"]).view(payload.ctx["shape"])


_EAGER_CHUNK = 1 << 18  # int64 temporaries of 2 MB stay in cache; the whole tensor at once would not


def _encode_eager(flat: Tensor, key: tuple[int, int] | Tensor, max_code: int, chunk: int = _EAGER_CHUNK) -> Tensor:
    """The C kernel's codes, in torch ops (int64 stands in for uint32), ``chunk`` entries at a time."""
    codes = torch.empty(flat.numel(), dtype=torch.uint8, device=flat.device)
    for lo in range(0, flat.numel(), chunk):
        part = flat[lo : lo + chunk]
        bits = part.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        exponent, mantissa = (bits >> 23) & 0xFF, bits & 0x7FFFFF
        u = counter_hash(torch.arange(lo, lo + part.numel(), device=flat.device), key) >> 9
        codes[lo : lo + part.numel()] = (exponent + (u < mantissa)).clamp_(max=max_code)
    return codes


def _encode_cpu(flat: Tensor, key: Tensor, max_code: int) -> tuple[Tensor, Tensor, Tensor]:
    """``commlmo::natural_encode`` on the CPU: the C kernel, or the eager twin (with a host check)."""
    n = flat.numel()
    lib = _native.available(flat)
    if lib is not None:
        codes = torch.empty(n, dtype=torch.uint8, device=_CPU)
        signs = torch.empty(packed_nbytes(n), dtype=torch.uint8, device=_CPU)
        bad = lib.natural_f32(flat.data_ptr(), n, *key.tolist(), max_code, codes.data_ptr(), signs.data_ptr(),
                              _native.num_threads(n))
        return codes, signs, torch.tensor(bad, device=_CPU)
    finite = n == 0 or bool(torch.isfinite(flat.sum()))
    bad = 0 if finite else int((~torch.isfinite(flat)).sum())
    k1, k2 = key.tolist()
    return _encode_eager(flat, (k1, k2), max_code), _pack_bits_eager(flat), torch.tensor(bad, device=flat.device)


def _encode_device(flat: Tensor, key: Tensor, max_code: int) -> tuple[Tensor, Tensor, Tensor]:
    """``commlmo::natural_encode`` in torch ops for any device: the same codes and signs, no host read."""
    flat = flat.contiguous()
    codes = _encode_eager(flat, key.to(flat.device), max_code, chunk=max(flat.numel(), 1))
    return codes, _pack_bits_eager(flat), (~torch.isfinite(flat)).sum()


@torch.library.custom_op("commlmo::natural_encode", mutates_args=())
def _encode_op(flat: Tensor, key: Tensor, max_code: int) -> tuple[Tensor, Tensor, Tensor]:
    """Natural compression of a 1-D float32 tensor: ``(codes, packed signs, non-finite count)``.

    ``codes[i] = min(e_i + [u_i < m_i], max_code)`` for the biased exponent ``e_i``
    and 23-bit mantissa ``m_i``, ``u_i`` the top 23 bits of the counter hash of
    ``i`` under ``key`` (int64 tensor of two 32-bit words).
    """
    return _encode_device(flat, key, max_code)


_encode_op.register_kernel("cpu")(_encode_cpu)


@_encode_op.register_fake
def _(flat: Tensor, key: Tensor, max_code: int) -> tuple[Tensor, Tensor, Tensor]:
    n = flat.numel()
    return (flat.new_empty(n, dtype=torch.uint8), flat.new_empty(packed_nbytes(n), dtype=torch.uint8),
            flat.new_empty((), dtype=torch.int64))


def _decode_cpu(codes: Tensor, signs: Tensor) -> Tensor:
    """``commlmo::natural_decode`` on the CPU: the C kernel, or the torch version."""
    lib = _native.available(codes, signs)
    if lib is None:
        return _decode_device(codes, signs)
    values = torch.empty(codes.numel(), dtype=torch.float32, device=_CPU)
    lib.natural_decode_f32(codes.data_ptr(), signs.data_ptr(), codes.numel(), values.data_ptr(),
                           _native.num_threads(codes.numel()))
    return values


def _decode_device(codes: Tensor, signs: Tensor) -> Tensor:
    """``+-2^(code - 127)`` as float32 (code 0 is zero), in torch ops for any device."""
    magnitude = (codes.reshape(-1).to(torch.int32) << 23).view(torch.float32)
    return magnitude * unpack_signs(signs, codes.numel(), torch.float32)


@torch.library.custom_op("commlmo::natural_decode", mutates_args=())
def _decode_op(codes: Tensor, signs: Tensor) -> Tensor:
    """Decoded natural compression: float32 ``+-2^(code - 127)``, 1-D."""
    return _decode_device(codes, signs)


_decode_op.register_kernel("cpu")(_decode_cpu)


@_decode_op.register_fake
def _(codes: Tensor, signs: Tensor) -> Tensor:
    return codes.new_empty(codes.numel(), dtype=torch.float32)
