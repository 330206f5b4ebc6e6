"""Optional Triton kernels for the CUDA paths of the ``commlmo::`` ops: one pass each, nothing unpacked.

The torch implementations that CUDA runs otherwise (``_pack_device`` in
:mod:`.bits`, ``_vote_torch`` in ``commlmo_aggregators.vote``) launch one
kernel per elementwise op and write a full-size temporary each time.  These
kernels fuse each op into one read of the input and one write of the result,
with the same bits:

* :func:`pack_signs` -- sign bit, zero and non-finite masks and the counter-hash
  coin of 8 entries per byte, the counts by atomic adds;
* :func:`add_packed_signs` -- ``t += bit ? -c_row : c_row``, rounded once;
* :func:`vote_words` -- per bit position, the count of ones over the rows
  compared with ``M // 2`` (the majority the bit-sliced counter computes).

Opt-in while unmeasured: ``COMMLMO_TRITON=1`` turns them on when ``triton``
imports and the tensor is on CUDA.  ``bench/gpu.sh`` checks them bit for bit
against the CPU kernels and times them against the torch paths.  The kernels
also run under ``TRITON_INTERPRET=1`` on CPU tensors, which is how the tests
exercise them without a GPU.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch paths serve every device without it
    triton = None

__all__ = ["add_packed_signs", "enabled", "pack_signs", "vote_words"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_PACK_BYTES = 512  # bytes per program: 4096 entries
_ADD_BLOCK = 2048
_VOTE_WORDS = 32


def enabled(*tensors: Tensor) -> bool:
    """Whether the Triton kernels should serve these tensors (``COMMLMO_TRITON=1``, triton, CUDA)."""
    if triton is None or os.environ.get("COMMLMO_TRITON", "0") != "1":
        return False
    return all(t.is_cuda or (_INTERPRET and t.device.type == "cpu") for t in tensors)


if triton is not None:

    @triton.jit
    def _mix32(h):
        # lowbias32, as in the C kernels and _common.counter_hash (uint32 arithmetic wraps)
        h = h ^ (h >> 16)
        h = h * 0x21F0AAAD
        h = h ^ (h >> 15)
        h = h * 0x735A2D97
        return h ^ (h >> 15)

    @triton.jit
    def _pack_kernel(x_ptr, n, key_ptr, out_ptr, counts_ptr, nbytes,
                     BITS: tl.constexpr, INF: tl.constexpr, RANDOM: tl.constexpr, BYTES: tl.constexpr):
        byte = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
        lane = tl.arange(0, 8)
        index = byte[:, None] * 8 + lane[None, :]
        valid = index < n
        w = tl.load(x_ptr + index, mask=valid, other=0).to(tl.int32)  # sign-extends 16-bit patterns
        magnitude = w & ((1 << (BITS - 1)) - 1)
        sign = (w < 0).to(tl.int32)
        zero = (magnitude == 0) & valid
        bad = (magnitude >= INF) & valid
        bit = tl.where(zero, 0, sign)
        if RANDOM:
            k1 = tl.load(key_ptr).to(tl.uint32)
            k2 = tl.load(key_ptr + 1).to(tl.uint32)
            coin = (_mix32(_mix32(index.to(tl.uint32) ^ k1) + k2) >> 31).to(tl.int32)
            bit = tl.where(zero, coin, bit)
        bit = tl.where(valid, bit, 0)
        packed = tl.sum(bit << lane[None, :], axis=1)
        tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte < nbytes)
        tl.atomic_add(counts_ptr, tl.sum(tl.sum(bad.to(tl.int64), axis=1), axis=0))
        tl.atomic_add(counts_ptr + 1, tl.sum(tl.sum(zero.to(tl.int64), axis=1), axis=0))

    @triton.jit
    def _add_kernel(t_ptr, packed_ptr, coeff_ptr, n, per, bit_offset, BLOCK: tl.constexpr, BF16: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = i < n
        b = bit_offset + i
        byte = tl.load(packed_ptr + b // 8, mask=valid, other=0).to(tl.int32)
        negative = ((byte >> (b % 8)) & 1) == 1
        c = tl.load(coeff_ptr + i // per, mask=valid, other=0.0)
        if BF16:  # bfloat16 travels as int16 bits, rounded to nearest even by hand: one rule everywhere
            t = (tl.load(t_ptr + i, mask=valid, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
            u = (t + tl.where(negative, -c, c)).to(tl.uint32, bitcast=True)
            tl.store(t_ptr + i, ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.int16), mask=valid)
        else:
            t = tl.load(t_ptr + i, mask=valid, other=0.0)
            out = t.to(tl.float32) + tl.where(negative, -c, c)
            tl.store(t_ptr + i, out.to(t_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _vote_kernel(rows_ptr, m, w, tie_ptr, out_ptr, ties_ptr,
                     HAS_TIE: tl.constexpr, WANT_TIES: tl.constexpr, WORDS: tl.constexpr):
        word = tl.program_id(0).to(tl.int64) * WORDS + tl.arange(0, WORDS)
        lane = tl.arange(0, 64).to(tl.int64)
        valid = word < w
        count = tl.zeros((WORDS, 64), dtype=tl.int32)
        for r in range(0, m):
            v = tl.load(rows_ptr + r * w + word, mask=valid, other=0)
            count += ((v[:, None] >> lane[None, :]) & 1).to(tl.int32)
        half = m // 2
        gt = tl.sum((count > half).to(tl.int64) << lane[None, :], axis=1)
        if m % 2 == 0:
            eq = tl.sum((count == half).to(tl.int64) << lane[None, :], axis=1)
            if WANT_TIES:
                tl.store(ties_ptr + word, eq, mask=valid)
            elif HAS_TIE:
                gt = gt | (eq & tl.load(tie_ptr + word, mask=valid, other=0))
        tl.store(out_ptr + word, gt, mask=valid)


_BITS = {torch.float32: (torch.int32, 32, 0x7F800000), torch.bfloat16: (torch.int16, 16, 0x7F80),
         torch.float16: (torch.int16, 16, 0x7C00)}


def pack_signs(x: Tensor, key: Tensor, mode: int) -> tuple[Tensor, Tensor]:
    """``commlmo::pack_signs`` for a float32/bfloat16/float16 tensor (see :mod:`.bits`)."""
    flat = x.reshape(-1).contiguous()
    view, bits, inf = _BITS[flat.dtype]
    n = flat.numel()
    nbytes = (n + 7) // 8
    out = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    counts = torch.zeros(2, dtype=torch.int64, device=x.device)
    grid = (triton.cdiv(max(nbytes, 1), _PACK_BYTES),)
    _pack_kernel[grid](flat.view(view), n, key.to(x.device), out, counts, nbytes,
                       BITS=bits, INF=inf, RANDOM=mode == 2, BYTES=_PACK_BYTES)
    return out, counts


def add_packed_signs(target: Tensor, packed: Tensor, coefficients: Tensor, bit_offset: int) -> None:
    """``target[row] += coefficients[row] * s`` in place (float32 coefficients, float32/16-bit target)."""
    n = target.numel()
    per = n // coefficients.numel()
    grid = (triton.cdiv(max(n, 1), _ADD_BLOCK),)
    bf16 = target.dtype == torch.bfloat16
    _add_kernel[grid](target.view(torch.int16) if bf16 else target, packed.reshape(-1), coefficients, n, per,
                      bit_offset, BLOCK=_ADD_BLOCK, BF16=bf16)


def vote_words(rows: Tensor, tie_bits: Tensor | None, want_ties: bool) -> tuple[Tensor, Tensor]:
    """``commlmo::vote_words`` on int64 words (see ``commlmo_aggregators.vote``)."""
    rows = rows.contiguous()
    m, w = rows.shape
    out = torch.empty(w, dtype=torch.int64, device=rows.device)
    ties = torch.empty(w if want_ties and m % 2 == 0 and m > 1 else 0, dtype=torch.int64, device=rows.device)
    tie = tie_bits.contiguous() if tie_bits is not None else out  # a placeholder pointer when unused
    grid = (triton.cdiv(max(w, 1), _VOTE_WORDS),)
    _vote_kernel[grid](rows, m, w, tie, out, ties if ties.numel() else out,
                       HAS_TIE=tie_bits is not None, WANT_TIES=ties.numel() > 0, WORDS=_VOTE_WORDS)
    return out, ties
