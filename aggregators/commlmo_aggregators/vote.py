r"""Bit-sliced majority vote over packed sign words.

Each of the ``M`` rows holds packed sign bits (bit = 1 means negative).  A
ripple-carry counter kept as bit planes counts, for every bit position at
once, how many rows have a 1; a bit-sliced comparison against ``M // 2`` then
gives the majority.  Every operation is a bitwise op on whole 64-bit words, so
the vote never unpacks a single bit (7-10x faster than unpack-count-repack on a
2-core CPU).

The vote is the custom op ``commlmo::vote_words``: on plain contiguous CPU
int64 words a C kernel keeps the planes of 64 words in registers and cache (one
read of the rows, see :mod:`commlmo_compressors._native`); elsewhere (CUDA, no
compiler) the same bitwise ops run in torch, or on CUDA a fused Triton kernel
(:mod:`commlmo_compressors._triton`, opt-in).  All give the same bits.
"""

from __future__ import annotations

import torch
from commlmo_compressors import _native, _triton
from commlmo_compressors._native import CPU as _CPU
from torch import Tensor

__all__ = ["vote_words", "unpack_bits"]


def _counter(rows: Tensor) -> list[Tensor]:
    """Bit planes (least significant first) of the per-bit count of ones over the rows."""
    m = rows.shape[0]
    planes = [torch.zeros_like(rows[0]) for _ in range(m.bit_length())]
    for r in range(m):
        carry = rows[r]
        for k in range(len(planes)):
            planes[k], carry = planes[k] ^ carry, planes[k] & carry
    return planes


def _need_tie_bits(m: int, tie_bits: Tensor | None, want_ties: bool) -> None:
    if m % 2 == 0 and m > 1 and not want_ties and tie_bits is None:
        raise ValueError(f"a vote of {m} ranks can tie; tie_bits are required")


def _vote_torch(rows: Tensor, tie_bits: Tensor | None, want_ties: bool) -> tuple[Tensor, Tensor]:
    """The vote in torch bitwise ops on any device: ``(voted, tie mask or an empty tensor)``."""
    m = rows.shape[0]
    _need_tie_bits(m, tie_bits, want_ties)
    no_ties = rows.new_empty(0)
    if m == 1:
        return rows[0].clone(), no_ties
    half = m // 2
    planes = _counter(rows)
    gt = torch.zeros_like(rows[0])
    eq = torch.full_like(rows[0], -1)  # all ones
    for k in reversed(range(len(planes))):
        c = planes[k]
        if (half >> k) & 1:
            eq = eq & c
        else:
            gt = gt | (eq & c)
            eq = eq & ~c
    if m % 2:
        return gt, no_ties
    if want_ties:
        return gt, eq
    return gt | (eq & tie_bits), no_ties


def _vote_cpu(rows: Tensor, tie_bits: Tensor | None, want_ties: bool) -> tuple[Tensor, Tensor]:
    """``commlmo::vote_words`` on the CPU: the C kernel on plain contiguous int64 words, else torch."""
    tensors = (rows,) if tie_bits is None else (rows, tie_bits)
    lib = _native.available(*tensors) if all(t.dtype == torch.int64 for t in tensors) else None
    if lib is None:
        return _vote_torch(rows, tie_bits, want_ties)
    m, w = rows.shape
    _need_tie_bits(m, tie_bits, want_ties)
    out = torch.empty(w, dtype=torch.int64, device=_CPU)
    ties = torch.empty(w if want_ties and m % 2 == 0 else 0, dtype=torch.int64, device=_CPU)
    lib.vote_words_i64(rows.data_ptr(), m, w, None if tie_bits is None else tie_bits.data_ptr(), out.data_ptr(),
                       ties.data_ptr() if ties.numel() else None, _native.num_threads(rows.numel()))
    return out, ties


def _vote_device(rows: Tensor, tie_bits: Tensor | None, want_ties: bool) -> tuple[Tensor, Tensor]:
    """``commlmo::vote_words`` off the CPU: the fused Triton kernel where enabled, else torch."""
    if rows.dtype == torch.int64 and _triton.enabled(rows):
        _need_tie_bits(rows.shape[0], tie_bits, want_ties)
        return _triton.vote_words(rows, tie_bits, want_ties)
    return _vote_torch(rows, tie_bits, want_ties)


@torch.library.custom_op("commlmo::vote_words", mutates_args=())
def _vote_op(rows: Tensor, tie_bits: Tensor | None, want_ties: bool) -> tuple[Tensor, Tensor]:
    """Per bit of ``M`` rows of words, 1 where more than ``M/2`` rows have a 1.

    Ties (even ``M``): with ``want_ties`` the tied bits are 0 and the second
    output is the tie mask; otherwise they come from ``tie_bits``.  The second
    output is empty unless a tie mask was asked for and ``M`` is even.
    """
    return _vote_device(rows, tie_bits, want_ties)


_vote_op.register_kernel("cpu")(_vote_cpu)


@_vote_op.register_fake
def _(rows: Tensor, tie_bits: Tensor | None, want_ties: bool) -> tuple[Tensor, Tensor]:
    m, w = rows.shape
    return rows.new_empty(w), rows.new_empty(w if want_ties and m % 2 == 0 and m > 1 else 0)


def vote_words(rows: Tensor, *, tie_bits: Tensor | None = None, ties_out: list[Tensor] | None = None) -> Tensor:
    """Per bit: 1 where more than half of the ``M`` rows have a 1.

    ``rows``: ``(M, W)`` integer tensor.  Where exactly half have a 1 (even
    ``M``) the bit is taken from ``tie_bits`` (required then, unless ``ties_out``
    is given: then tied bits are 0 and the tie mask is appended to ``ties_out``).
    """
    if rows.ndim != 2:
        raise ValueError(f"vote_words: rows must be (M, W) words, got shape {tuple(rows.shape)}")
    m = rows.shape[0]
    want_ties = ties_out is not None and m % 2 == 0 and m > 1
    _need_tie_bits(m, tie_bits, want_ties)
    if want_ties:
        tie_bits = None  # the tie mask is returned instead
    voted, ties = _native.call(torch.ops.commlmo.vote_words.default, _vote_cpu, rows, tie_bits, want_ties)
    if want_ties:
        ties_out.append(ties)
    return voted


def unpack_bits(packed: Tensor) -> Tensor:
    """``uint8`` bytes -> ``uint8`` 0/1 per bit, little-endian within each byte."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*packed.shape[:-1], -1)
