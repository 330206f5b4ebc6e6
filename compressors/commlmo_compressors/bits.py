"""Packed sign bits: the one-bit-per-entry wire format shared by ``sign`` and ``majority_vote``.

Format: for ``n`` entries, ``ceil(n / 8)`` bytes (``uint8``); bit ``j`` of byte
``i`` (``(byte >> j) & 1``) is entry ``8i + j``, and the bit is 1 exactly when
the entry is negative -- it *is* the float's sign bit.  Padding bits of the
last byte are 0.  Exact zeros (``+0.0`` and ``-0.0``) follow a ``zero`` policy:
``"positive"`` sends +1; ``"random"`` sends +1 or -1 with probability 1/2 each
from the given generator (SignMuon's convention, so every message is exactly
one bit and zeros cast no systematic vote).

Two custom ops carry the hot paths, so dispatch, FakeTensor and
``torch.compile`` see them as operators (``torch.ops.commlmo.*``):

* ``commlmo::pack_signs(x, key, mode) -> (packed, counts)``: packs by reading the
  sign bit of the raw float bits (never a bool tensor) and counts non-finite
  entries and exact zeros in the same pass;
* ``commlmo::add_packed_signs(target!, packed, scales?, alpha, bit_offset)``:
  ``target += alpha * scale_b * s`` straight from the bytes, never materialising a
  +-1 float tensor on the CPU.

Each has implementations giving the same bits: the C kernel (plain contiguous
CPU tensors, :mod:`commlmo_compressors._native`), the eager CPU twin (no
compiler, or tensors the kernel refuses), a branch-free torch version for every
other device (CUDA...), which never reads a value back to the host, and on CUDA
the fused Triton kernels of :mod:`commlmo_compressors._triton` when enabled.
Measured on a 2-core CPU by ``bench/compressors.py``.
"""

from __future__ import annotations

import ctypes
from typing import Literal

import torch
from torch import Tensor

from commlmo.plugin import inputs_known_finite

from . import _native, _triton
from ._native import CPU as _CPU
from ._common import NonFiniteInputError, counter_hash, draw_key_tensor

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
_CHUNK = 1 << 16  # bytes per chunk of the eager apply: 512 K entries of temporaries at most
_INF_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
_MODES = {"positive": 1, "random": 2}  # the kernels' zero modes
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def packed_nbytes(numel: int) -> int:
    """Bytes of the packed sign format for ``numel`` entries: ``ceil(numel / 8)``."""
    return (numel + 7) // 8


def _gather_msbs(high: Tensor) -> Tensor:
    """Pack bit 7 of each of ``8 * nb`` bytes into ``nb`` bytes (eight per int64 word, one multiply)."""
    words = high.view(torch.int64) & _MSB_MASK
    return ((words * _GATHER) >> 56).bitwise_and_(0xFF).to(torch.uint8)


def _pack_bits_eager(flat: Tensor) -> Tensor:
    """Sign bits of a contiguous 1-D float tensor, packed, via the high byte of each element."""
    n, size = flat.numel(), flat.element_size()
    high = torch.zeros(packed_nbytes(n) * 8, dtype=torch.uint8, device=flat.device)
    high[:n] = flat.view(torch.uint8)[size - 1 :: size]  # little-endian: sign lives in the last byte
    return _gather_msbs(high)


def _pack_bools(mask: Tensor) -> Tensor:
    """A 1-D bool tensor packed in the same layout (bit 1 where True)."""
    high = torch.zeros(packed_nbytes(mask.numel()) * 8, dtype=torch.uint8, device=mask.device)
    high[: mask.numel()] = mask.to(torch.uint8) << 7
    return _gather_msbs(high)


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


def _pack_cpu(x: Tensor, key: Tensor, mode: int) -> tuple[Tensor, Tensor]:
    """``commlmo::pack_signs`` on the CPU: the C kernel, or the eager twin where it does not apply."""
    flat = x.reshape(-1).contiguous()
    lib = _native.available(flat) if flat.dtype in (torch.float32, *_INF_BITS) else None
    if lib is not None:
        packed = torch.empty(packed_nbytes(flat.numel()), dtype=torch.uint8, device=_CPU)
        zeros = ctypes.c_int64(0)
        args = (mode, *key.tolist(), ctypes.addressof(zeros), _native.num_threads(flat.numel()))
        if flat.dtype == torch.float32:
            bad = lib.pack_signs_f32(flat.data_ptr(), flat.numel(), packed.data_ptr(), *args)
        else:
            bad = lib.pack_signs_16(flat.data_ptr(), flat.numel(), packed.data_ptr(), _INF_BITS[flat.dtype], *args)
        return packed, torch.tensor([bad, zeros.value], device=_CPU)
    return _pack_twin(flat, key, mode)


def _pack_twin(flat: Tensor, key: Tensor, mode: int) -> tuple[Tensor, Tensor]:
    """The eager twin of the C kernel (any tensor, host reads allowed): ``(packed, [bad, zeros])``."""
    bad = 0 if flat.numel() == 0 or bool(torch.isfinite(flat.sum())) else int((~torch.isfinite(flat)).sum())
    if bad:  # nothing is packed; the caller raises
        packed, zeros = torch.zeros(packed_nbytes(flat.numel()), dtype=torch.uint8, device=flat.device), 0
    else:
        policy: ZeroPolicy = "random" if mode == _MODES["random"] else "positive"
        k1, k2 = key.tolist()
        packed, zeros = _pack_eager(flat, policy, (k1, k2))
    return packed, torch.tensor([bad, zeros], device=flat.device)


def _pack_device(x: Tensor, key: Tensor, mode: int) -> tuple[Tensor, Tensor]:
    """``commlmo::pack_signs`` in branch-free torch ops for any device (CUDA...): no host read.

    The same bits as the C kernel: the sign bit of every entry, cleared where the
    entry is an exact zero and, for ``mode`` 2 (random), replaced there by the top
    bit of the counter hash of the entry's index.
    """
    if _triton.enabled(x) and x.dtype in _TRITON_DTYPES:
        return _triton.pack_signs(x, key, mode)
    flat = x.reshape(-1).contiguous()
    zero = flat == 0
    zeros = _pack_bools(zero)
    packed = _pack_bits_eager(flat) & ~zeros
    if mode == _MODES["random"]:
        index = torch.arange(flat.numel(), device=flat.device)
        coins = (counter_hash(index, key.to(flat.device)) >> 31).bool()
        packed |= _pack_bools(coins) & zeros
    counts = torch.stack([(~torch.isfinite(flat)).sum(), zero.sum()])
    return packed, counts


@torch.library.custom_op("commlmo::pack_signs", mutates_args=())
def _pack_op(x: Tensor, key: Tensor, mode: int) -> tuple[Tensor, Tensor]:
    """Packed sign bits of ``x`` (flattened) and ``[non-finite count, zero count]`` (int64).

    ``key``: int64 tensor of two 32-bit words (the counter-hash key); ``mode``:
    1 sends +1 for exact zeros, 2 a coin from the hash.  Where the input has
    non-finite entries the packed bits are unspecified (the caller raises).
    """
    return _pack_device(x, key, mode)


_pack_op.register_kernel("cpu")(_pack_cpu)


@_pack_op.register_fake
def _(x: Tensor, key: Tensor, mode: int) -> tuple[Tensor, Tensor]:
    return x.new_empty(packed_nbytes(x.numel()), dtype=torch.uint8), x.new_empty(2, dtype=torch.int64)


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

    The checks read two counts back to the host; they are skipped where they
    cannot fail (finite inputs declared by the optimizer, no zero policy to
    enforce), under ``torch.compile`` and for fake tensors (where zeros then pack
    as +1 without a generator, and the caller owns the finiteness check).
    """
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if zero not in _MODES:
        raise ValueError(f"{name}: zero must be 'random' or 'positive', got {zero!r}")
    mode: ZeroPolicy = zero if generator is not None else "positive"
    if mode == "random":
        key = draw_key_tensor(generator).to(x.device)
    else:
        key = torch.zeros(2, dtype=torch.int64, device=x.device)
    packed, counts = _native.call(torch.ops.commlmo.pack_signs.default, _pack_cpu, x, key, _MODES[mode])
    if not _native.readable(counts):
        return packed
    check_zeros = zero == "random" and generator is None
    if not check_zeros and inputs_known_finite():
        return packed
    bad, zeros = counts.tolist()
    if bad:
        raise NonFiniteInputError(f"{name}: input has {bad} NaN or Inf entries; nothing was packed")
    if zeros and check_zeros:
        raise ValueError(
            f"{name}: zero='random' found {zeros} exact zero(s) and needs a torch.Generator to pick their "
            "signs; pass generator=torch.Generator(device=x.device).manual_seed(...) or use zero='positive'"
        )
    return packed


def _signs_eager(packed: Tensor, start_bit: int, count: int, dtype: torch.dtype) -> Tensor:
    """``+-1`` values of bits ``[start_bit, start_bit + count)`` (a small slice or the reference)."""
    first, last = start_bit // 8, packed_nbytes(start_bit + count)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[first:last].unsqueeze(1) >> shifts) & 1
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


def _add_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the +-1 signs added to a ``dtype`` target: float32 (float64 for float64), so that
    ``t + c * s`` is rounded once on every device -- a bfloat16 ``other`` would round ``c`` first on
    the CPU and not on CUDA."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _add_row(flat: Tensor, packed: Tensor, alpha: float, bit_offset: int) -> None:
    """``flat += alpha * s`` for bits ``[bit_offset, ...)``: the C kernel on whole bytes, eager elsewhere."""
    n, dtype = flat.numel(), _add_dtype(flat.dtype)
    head = min((-bit_offset) % 8, n)
    if head:
        flat[:head].add_(_signs_eager(packed, bit_offset, head, dtype), alpha=alpha)
    start, whole = (bit_offset + head) // 8, (n - head) // 8
    body = flat[head : head + 8 * whole]
    lib = _native.available(body, packed) if flat.dtype == torch.float32 else None
    if lib is not None and whole:
        lib.add_signs_f32(body.data_ptr(), packed[start:].data_ptr(), whole, alpha, _native.num_threads(8 * whole))
    else:
        for lo in range(0, whole, _CHUNK):
            hi = min(whole, lo + _CHUNK)
            body[8 * lo : 8 * hi].add_(_signs_eager(packed, 8 * (start + lo), 8 * (hi - lo), dtype), alpha=alpha)
    tail = n - head - 8 * whole
    if tail:
        flat[n - tail :].add_(_signs_eager(packed, bit_offset + n - tail, tail, dtype), alpha=alpha)


def _add_cpu(target: Tensor, packed: Tensor, scales: Tensor | None, alpha: float, bit_offset: int) -> None:
    """``commlmo::add_packed_signs`` on the CPU (and the eager twin for any tensor): row by row."""
    flat, packed = target.view(-1), packed.reshape(-1)
    coefficients = [alpha] if scales is None else [alpha * s for s in scales.tolist()]
    per = flat.numel() // len(coefficients)
    for b, c in enumerate(coefficients):
        _add_row(flat[b * per : (b + 1) * per], packed, c, bit_offset + b * per)


def _add_device(target: Tensor, packed: Tensor, scales: Tensor | None, alpha: float, bit_offset: int) -> None:
    """``commlmo::add_packed_signs`` in torch ops for any device, with the C kernel's rounding.

    The kernel adds ``c = float32(alpha * scale)`` (or ``-c``) to each entry: one
    rounding.  Here ``s * c`` is exact for ``s = +-1`` and the in-place add
    rounds once, in float32 for 16-bit targets (see :func:`_add_dtype`).
    """
    if _triton.enabled(target, packed) and target.dtype in _TRITON_DTYPES:
        if scales is None:
            coefficients = torch.full((1,), alpha, dtype=torch.float32, device=target.device)
        else:
            coefficients = (scales.to(torch.float64) * alpha).to(torch.float32)
        _triton.add_packed_signs(target, packed, coefficients, bit_offset)
        return
    n = target.numel()
    signs = _signs_eager(packed.reshape(-1), bit_offset, n, _add_dtype(target.dtype))
    if scales is None:
        target.view(-1).add_(signs, alpha=alpha)
        return
    coefficients = (scales.to(torch.float64) * alpha).to(signs.dtype)
    target.view(scales.numel(), -1).add_(signs.view(scales.numel(), -1) * coefficients.unsqueeze(1))


@torch.library.custom_op("commlmo::add_packed_signs", mutates_args=("target",))
def _add_op(target: Tensor, packed: Tensor, scales: Tensor | None, alpha: float, bit_offset: int) -> None:
    """``target += alpha * scales[b] * s`` in place, ``s`` the +-1 signs in bits
    ``[bit_offset, bit_offset + numel)`` of ``packed``, ``b`` the row of ``target``
    viewed as ``len(scales)`` equal rows (one row, scale 1, without ``scales``)."""
    _add_device(target, packed, scales, alpha, bit_offset)


_add_op.register_kernel("cpu")(_add_cpu)


@_add_op.register_fake
def _(target: Tensor, packed: Tensor, scales: Tensor | None, alpha: float, bit_offset: int) -> None:
    return None


def add_packed_signs_(
    target: Tensor, packed: Tensor, *, alpha: float = 1.0, bit_offset: int = 0, scales: Tensor | None = None
) -> Tensor:
    """``target += alpha * s`` in place, where ``s`` are the +-1 signs in bits
    ``[bit_offset, bit_offset + target.numel())`` of ``packed``; returns ``target``.

    With ``scales`` (a 1-D tensor of ``B`` entries), ``target`` is viewed as ``B``
    equal rows and row ``b`` gets ``alpha * scales[b] * s`` (scaled sign's
    blocks) -- the scales stay on the device, nothing is read back.  Fused: the
    C kernel flips the sign bit of the coefficient per entry, so nothing of
    ``target``'s size is allocated on the CPU; other devices unpack and add.
    """
    if not target.is_contiguous():
        raise ValueError("add_packed_signs_: target must be contiguous (it is updated in place)")
    n, packed = target.numel(), packed.reshape(-1)
    if packed_nbytes(bit_offset + n) > packed.numel():
        raise ValueError(
            f"add_packed_signs_: {packed.numel()} bytes cannot hold bits {bit_offset}..{bit_offset + n}"
        )
    if scales is not None and (scales.ndim != 1 or scales.numel() == 0 or n % scales.numel()):
        raise ValueError(
            f"add_packed_signs_: scales must be 1-D with a count that divides the target's {n} entries "
            f"(one per equal row), got shape {tuple(scales.shape)}"
        )
    _native.call(torch.ops.commlmo.add_packed_signs.default, _add_cpu, target, packed, scales, float(alpha),
                 bit_offset)
    return target
