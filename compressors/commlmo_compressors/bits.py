"""Packed sign bits: the one-bit-per-entry wire format shared by ``sign`` and ``majority_vote``.

Format: for ``n`` entries, ``ceil(n / 8)`` bytes (``uint8``); bit ``j`` of byte
``i`` (``(byte >> j) & 1``) is entry ``8i + j``, and the bit is 1 exactly when
the entry is negative -- it *is* the float's sign bit.  Padding bits of the
last byte are 0.  Exact zeros (``+0.0`` and ``-0.0``) follow a ``zero`` policy:
``"positive"`` sends +1; ``"random"`` sends +1 or -1 with probability 1/2 each
from the given generator (SignMuon's convention, so every message is exactly
one bit and zeros cast no systematic vote).

Fast paths (measured on a 2-core CPU, ``bench/compressors.py``): packing reads the sign bit of the raw float
bits (never a bool tensor), and :func:`add_packed_signs_` applies
``target += c * (1 - 2 * bit)`` straight from the bytes, never materialising a
+-1 float tensor.  Both run as C kernels on contiguous CPU tensors (see
:mod:`commlmo_compressors._native`) and as bit-identical eager torch code
elsewhere.
"""

from __future__ import annotations

import ctypes
from typing import Literal

import torch
from torch import Tensor

from . import _native
from ._common import NonFiniteInputError, counter_hash, draw_key

__all__ = [
    "ZeroPolicy",
    "add_packed_signs_",
    "pack_signs",
    "packed_nbytes",
    "unpack_signs",
]

ZeroPolicy = Literal["random", "positive"]

_MSB_MASK = 0x8080808080808080 - (1 << 64)  # the same bits as a signed int64
_GATHER = 0x0002040810204081  # moves bit 8i+7 of a word to bit 56+i (no carries: all distinct)
_SHIFTS: dict[torch.device, Tensor] = {}
_CHUNK = 1 << 16  # bytes per chunk of the eager apply: 512 K entries of temporaries at most
_INF_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def packed_nbytes(numel: int) -> int:
    """Bytes of the packed sign format for ``numel`` entries: ``ceil(numel / 8)``."""
    return (numel + 7) // 8


def _shifts(device: torch.device) -> Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def _pack_bits_eager(flat: Tensor) -> Tensor:
    """Sign bits of a contiguous 1-D float tensor, packed, via the high byte of each element."""
    n, size = flat.numel(), flat.element_size()
    nb = packed_nbytes(n)
    high = torch.zeros(nb * 8, dtype=torch.uint8, device=flat.device)
    high[:n] = flat.view(torch.uint8)[size - 1 :: size]  # little-endian: sign lives in the last byte
    words = high.view(torch.int64) & _MSB_MASK
    return ((words * _GATHER) >> 56).bitwise_and_(0xFF).to(torch.uint8)


_MODES = {"positive": 1, "random": 2}


def _pack_native(flat: Tensor, packed: Tensor, zero: ZeroPolicy, key: tuple[int, int]) -> tuple[int, int] | None:
    """Pack with the C kernel: ``(non-finite count, zero count)``, or ``None`` if no kernel applies."""
    lib = _native.available(flat)
    if lib is None or flat.dtype not in (torch.float32, *_INF_BITS):
        return None
    zeros = ctypes.c_int64(0)
    args = (_MODES[zero], *key, ctypes.addressof(zeros), _native.num_threads(flat.numel()))
    if flat.dtype == torch.float32:
        bad = lib.pack_signs_f32(flat.data_ptr(), flat.numel(), packed.data_ptr(), *args)
    else:
        bad = lib.pack_signs_16(flat.data_ptr(), flat.numel(), packed.data_ptr(), _INF_BITS[flat.dtype], *args)
    return bad, zeros.value


def _pack_eager(flat: Tensor, zero: ZeroPolicy, key: tuple[int, int]) -> tuple[Tensor, int]:
    """The C kernel's result in torch ops: ``(packed, zero count)``; the input must be finite."""
    packed = _pack_bits_eager(flat)
    count = flat.numel() - int(torch.count_nonzero(flat))
    if count == 0:
        return packed, 0
    where = (flat == 0).nonzero().squeeze(1)
    byte, bit = where // 8, (where % 8).to(torch.int32)
    clear = torch.zeros(packed.shape, dtype=torch.int32, device=flat.device)
    clear.index_add_(0, byte, 1 << bit)  # distinct bits of one byte: the sum is their OR
    packed &= ~clear.to(torch.uint8)
    if zero == "random":
        random_bits = (counter_hash(where, key) >> 31).to(torch.int32)
        ones = torch.zeros(packed.shape, dtype=torch.int32, device=flat.device)
        ones.index_add_(0, byte, random_bits << bit)
        packed |= ones.to(torch.uint8)
    return packed, count


def pack_signs(
    x: Tensor,
    *,
    zero: ZeroPolicy = "random",
    generator: torch.Generator | None = None,
    name: str = "pack_signs",
) -> Tensor:
    """Pack ``sign(x)`` (flattened) into ``ceil(numel / 8)`` bytes; bit = 1 for a negative entry.

    ``zero`` decides exact zeros (see the module docstring).  With
    ``zero="random"`` and a ``generator``, a 64-bit key is drawn on every call
    (zeros or not, so the generator advances the same way whatever the data) and
    each zero's bit is the top bit of :func:`commlmo_compressors._common.counter_hash`;
    without a generator it is an error only if ``x`` has an exact zero (a
    tensor of +-1 packs fine).  Raises :class:`NonFiniteInputError` (a
    ``ValueError``) naming ``name`` if ``x`` holds NaN or Inf.
    """
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if zero not in _MODES:
        raise ValueError(f"{name}: zero must be 'random' or 'positive', got {zero!r}")
    mode: ZeroPolicy = zero if generator is not None else "positive"
    key = draw_key(generator) if mode == "random" else (0, 0)
    flat = x.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    packed = torch.empty(packed_nbytes(flat.numel()), dtype=torch.uint8, device=x.device)
    counts = _pack_native(flat, packed, mode, key)
    if counts is None:
        bad = 0 if flat.numel() == 0 or bool(torch.isfinite(flat.sum())) else int((~torch.isfinite(flat)).sum())
        zeros = 0
        if not bad:
            packed, zeros = _pack_eager(flat, mode, key)
    else:
        bad, zeros = counts
    if bad:
        raise NonFiniteInputError(f"{name}: input has {bad} NaN or Inf entries; nothing was packed")
    if zeros and zero == "random" and generator is None:
        raise ValueError(
            f"{name}: zero='random' found {zeros} exact zero(s) and needs a torch.Generator to pick their "
            "signs; pass generator=torch.Generator(device=x.device).manual_seed(...) or use zero='positive'"
        )
    return packed


def _signs_eager(packed: Tensor, start_bit: int, count: int, dtype: torch.dtype) -> Tensor:
    """``+-1`` values of bits ``[start_bit, start_bit + count)`` (a small slice or the reference)."""
    first, last = start_bit // 8, packed_nbytes(start_bit + count)
    bits = (packed[first:last].unsqueeze(1) >> _shifts(packed.device)) & 1
    bits = bits.reshape(-1)[start_bit - 8 * first : start_bit - 8 * first + count]
    return 1 - 2 * bits.to(dtype)


def unpack_signs(packed: Tensor, numel: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``+-1`` tensor (1-D, ``numel`` entries) that ``packed`` encodes: the reference decoder."""
    if packed.dtype != torch.uint8 or packed.numel() < packed_nbytes(numel):
        raise ValueError(
            f"unpack_signs: need a uint8 tensor of at least {packed_nbytes(numel)} bytes for {numel} "
            f"entries, got {packed.dtype} with {packed.numel()}"
        )
    return _signs_eager(packed.reshape(-1), 0, numel, dtype)


def add_packed_signs_(target: Tensor, packed: Tensor, *, alpha: float = 1.0, bit_offset: int = 0) -> Tensor:
    """``target += alpha * s`` in place, where ``s`` are the +-1 signs in bits
    ``[bit_offset, bit_offset + target.numel())`` of ``packed``; returns ``target``.

    Fused: the C kernel flips the sign bit of ``alpha`` per entry, so nothing of
    ``target``'s size is allocated.  Elsewhere (GPU, non-float32 or
    non-contiguous targets) it unpacks and adds in chunks of 512 K entries.
    """
    if not target.is_contiguous():
        raise ValueError("add_packed_signs_: target must be contiguous (it is updated in place)")
    flat, n, packed = target.view(-1), target.numel(), packed.reshape(-1)
    if packed_nbytes(bit_offset + n) > packed.numel():
        raise ValueError(
            f"add_packed_signs_: {packed.numel()} bytes cannot hold bits {bit_offset}..{bit_offset + n}"
        )
    alpha = float(alpha)
    head = min((-bit_offset) % 8, n)
    if head:
        flat[:head].add_(_signs_eager(packed, bit_offset, head, flat.dtype), alpha=alpha)
    start, whole = (bit_offset + head) // 8, (n - head) // 8
    body = flat[head : head + 8 * whole]
    lib = _native.available(body, packed) if flat.dtype == torch.float32 else None
    if lib is not None and whole:
        lib.add_signs_f32(body.data_ptr(), packed[start:].data_ptr(), whole, alpha, _native.num_threads(8 * whole))
    else:
        for lo in range(0, whole, _CHUNK):
            hi = min(whole, lo + _CHUNK)
            body[8 * lo : 8 * hi].add_(_signs_eager(packed, 8 * (start + lo), 8 * (hi - lo), flat.dtype),
                                       alpha=alpha)
    tail = n - head - 8 * whole
    if tail:
        flat[n - tail :].add_(_signs_eager(packed, bit_offset + n - tail, tail, flat.dtype), alpha=alpha)
    return target
