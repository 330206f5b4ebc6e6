"""``topk``: the k largest-magnitude entries and their positions."""

from __future__ import annotations

import ctypes
import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from commlmo.plugin import CompressorCapabilities, Payload, PluginConfig, inputs_known_finite

from . import _native
from ._native import CPU as _CPU
from ._common import (
    KSpec,
    LayoutCompressor,
    NonFiniteInputError,
    WireLayout,
    check_finite,
    dense_nbytes,
    index_dtype,
    resolve_k,
)

__all__ = ["TopK"]

_VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_THRESHOLD_MIN_NUMEL = 1 << 16  # below this torch.topk is as fast as anything
_SAMPLE = 1 << 14
_AUTO_BLOCK = 1 << 15  # blocks: auto -> block-local indices fit in int16
_samples: dict[tuple[int, torch.device], Tensor] = {}


class TopK(LayoutCompressor):
    r"""Top-k sparsification: keep the k entries of largest magnitude, send values and indices.

    ``C(x)_i = x_i`` for the kept set ``S``, 0 elsewhere; with ``|S| = k`` largest,
    ``||C(x) - x||^2 = sum_{i not in S} x_i^2 <= (1 - k/d)||x||^2``: contractive with
    ``alpha = k/d`` (Stich et al. 2018, arXiv 1809.07599).  ``wire = (values, indices)``:
    ``k`` values in ``x``'s dtype (or ``value_dtype``) and ``k`` indices in the
    narrowest of uint8/int16/int32/int64 that holds ``d - 1``; always exactly ``k``
    entries, so payloads all-gather.  When that is not smaller than ``x`` itself
    (tiny tensors, large k) ``x`` is sent as is (exact, so still contractive).

    ``selection`` says how the set is found; all three keep exactly ``k``:

    * ``"threshold"`` (default): estimate a lower bound on the k-th largest
      magnitude from a fixed pseudo-random sample of 16 384 entries (the
      ``r``-th largest sampled value, ``r`` four binomial standard deviations
      above ``16384 k/d``); collect every entry above it in one pass, then keep
      the exact k largest of those candidates (a radix select in the C kernel,
      ``torch.topk`` elsewhere).  If fewer than k pass, the bar is lowered and
      the pass repeated.  The result is **exactly** the top-k set, indices
      ascending, ties to the lowest index -- the same payload from the C kernel,
      its eager twin and the GPU (custom op ``commlmo::topk_abs``; on CUDA one
      ``torch.topk`` finds the k-th magnitude) -- at about 3 reads of ``x`` for
      k = 1 % of 16 M entries on the CPU, where a global ``torch.topk`` costs 100-250.
    * ``"exact"``: one global ``torch.topk``.
    * ``"blocked"``: cut ``x`` into ``blocks`` near-equal contiguous slices, each
      keeping its own top ``floor(k/B)`` or ``ceil(k/B)`` entries (useful when
      each block lives on another rank).  Contractive with
      ``alpha = min_b k_b / d_b`` (``= k/d`` when ``B`` divides both).  Since the
      position of an entry in the payload says which block it is in, indices are
      sent *block-local*, in the narrowest dtype that holds a block's size:
      ``blocks: auto`` picks blocks of at most 32 768 entries, so every index is
      16 bits whatever the tensor's size.

    A coarser ``value_dtype`` rounds the kept values (relative error ``u``), and
    ``alpha`` is then declared as ``(1 - u^2) k/d``.
    """

    class Config(PluginConfig):
        kind: Literal["topk"] = "topk"
        k: KSpec = 0.05
        selection: Literal["threshold", "exact", "blocked"] = "threshold"
        blocks: int | Literal["auto"] = Field(
            64, description="number of slices for selection='blocked' (>= 1), or 'auto': slices of at most "
            "32768 entries, so block-local indices fit in 16 bits")
        value_dtype: Literal["same", "float32", "bfloat16", "float16"] = "same"

    capabilities = CompressorCapabilities(fixed_size=True, contractive=True)

    def __init__(self, config=None, **fields):
        super().__init__(config, **fields)
        if isinstance(self.config.blocks, int) and self.config.blocks < 1:
            raise ValueError(f"topk compressor: blocks must be >= 1 or 'auto', got {self.config.blocks}")

    def _blocks(self, n: int) -> int:
        blocks = self.config.blocks
        return max(1, math.ceil(n / _AUTO_BLOCK)) if blocks == "auto" else blocks

    def _index_dtype(self, n: int, k: int) -> torch.dtype:
        if self.config.selection == "blocked":  # block-local indices
            return index_dtype(max(size for size, _ in _block_plan(n, k, self._blocks(n))))
        return index_dtype(n)

    @property
    def values_decode(self):  # type: ignore[override]
        return "restriction" if self.config.value_dtype == "same" else None

    # ------------------------------------------------------------------ layout

    def _value_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if self.config.value_dtype == "same" else _VALUE_DTYPES[self.config.value_dtype]

    def _dense(self, shape: torch.Size, dtype: torch.dtype) -> bool:
        n = shape.numel()
        k = resolve_k(self.config.k, n)
        per = self._value_dtype(dtype).itemsize + self._index_dtype(n, k).itemsize
        return k * per >= dense_nbytes(shape, dtype)

    def wire_layout(self, shape: torch.Size, dtype: torch.dtype) -> WireLayout:
        shape = torch.Size(shape)
        if self._dense(shape, dtype):
            return ((shape, dtype),)
        n = shape.numel()
        k = torch.Size([resolve_k(self.config.k, n)])
        return ((k, self._value_dtype(dtype)), (k, self._index_dtype(n, k[0])))

    def alpha(self, shape: torch.Size) -> float:
        n = max(torch.Size(shape).numel(), 1)
        k = resolve_k(self.config.k, n)
        alpha = k / n
        if self.config.selection == "blocked":
            alpha = min(kb / size for size, kb in _block_plan(n, k, self._blocks(n)))
        if self.config.value_dtype != "same":
            alpha *= 1 - (torch.finfo(_VALUE_DTYPES[self.config.value_dtype]).eps / 2) ** 2
        return alpha

    # ------------------------------------------------------------------ codec

    def compress(self, x: Tensor, *, generator: torch.Generator | None = None) -> Payload:
        ctx = {"shape": x.shape, "dtype": x.dtype, "device": x.device}
        if self._dense(x.shape, x.dtype):
            check_finite(x, "topk compressor")
            return Payload(wire=(x,), ctx=ctx | {"dense": True})
        flat = x.reshape(-1).contiguous()
        n, k = flat.numel(), resolve_k(self.config.k, flat.numel())
        idx, values = self._select(flat, k)
        values = values.to(self._value_dtype(x.dtype))
        if (self.config.value_dtype != "same" and _native.readable(values)
                and not bool(torch.isfinite(values).all())):
            raise ValueError(
                f"topk compressor: kept values overflow value_dtype={self.config.value_dtype!r} "
                f"(max |x| = {float(flat[idx].abs().max()):.3g}); use 'bfloat16' or 'same'"
            )
        if self.config.selection == "blocked":
            idx = idx - _block_starts(n, k, self._blocks(n), idx.device)
        return Payload(wire=(values, idx.to(self._index_dtype(n, k))), ctx=ctx)

    def indices(self, payload: Payload) -> Tensor:
        """Global int64 positions of the kept entries."""
        idx = payload.wire[1].long()
        if self.config.selection == "blocked":
            n = payload.ctx["shape"].numel()
            idx = idx + _block_starts(n, idx.numel(), self._blocks(n), idx.device)
        return idx

    def _select(self, flat: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Indices (int64) and values of the kept entries."""
        selection = self.config.selection
        if selection == "threshold" and flat.numel() >= _THRESHOLD_MIN_NUMEL:
            return _threshold_topk(flat, k)
        check_finite(flat, "topk compressor")
        if selection == "blocked":
            idx = _blocked_topk(flat, k, self._blocks(flat.numel()))
        else:
            idx = flat.abs().topk(k, sorted=False).indices
        return idx, flat[idx]

    def decompress(self, payload: Payload) -> Tensor:
        ctx = payload.ctx
        if ctx.get("dense"):
            return payload.wire[0]
        values = payload.wire[0]
        out = torch.zeros(ctx["shape"].numel(), dtype=ctx["dtype"], device=values.device)
        out[self.indices(payload)] = values.to(ctx["dtype"])
        return out.view(ctx["shape"])

    def decompress_add_(self, target: Tensor, payload: Payload, *, alpha: float = 1.0) -> Tensor:
        if payload.ctx.get("dense") or not target.is_contiguous():
            return super().decompress_add_(target, payload, alpha=alpha)
        target.view(-1).index_add_(0, self.indices(payload), payload.wire[0].to(target.dtype), alpha=alpha)
        return target


# ---------------------------------------------------------------------- selection


def _sample_indices(n: int, device: torch.device) -> Tensor:
    """A fixed pseudo-random sample of positions (private seed: the caller's generator is untouched)."""
    key = (n, device)
    if key not in _samples:
        if len(_samples) > 256:
            _samples.clear()
        gen = torch.Generator().manual_seed(n)
        _samples[key] = torch.randint(0, n, (_SAMPLE,), generator=gen, device=_CPU).to(device)
    return _samples[key]


def _threshold_topk(flat: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The exact top-k by magnitude (``commlmo::topk_abs``), indices ascending, ties to the lowest index."""
    idx, values, bad = _native.call(torch.ops.commlmo.topk_abs.default, _topk_cpu, flat, k)
    if _native.readable(bad) and not inputs_known_finite() and bad.item():
        raise NonFiniteInputError(f"topk compressor: input has {bad.item()} NaN or Inf entries")
    return idx, values


def _sample_threshold(flat: Tensor, k: int) -> tuple[Tensor, int, float]:
    """``(|sample|, r, t)``: ``t`` the r-th largest of a fixed sample's magnitudes, with ``r`` four
    binomial standard deviations above ``k``'s share of the sample, so >= k entries pass w.h.p."""
    n = flat.numel()
    sample = flat[_sample_indices(n, flat.device)].abs().float()
    rank = _SAMPLE * k / n
    rank = min(_SAMPLE, math.ceil(rank + 4 * math.sqrt(rank) + 8))
    return sample, rank, _kth_largest(sample, rank)


def _kth_largest(sample: Tensor, rank: int) -> float:
    return float(sample.kthvalue(_SAMPLE - rank + 1).values) if rank < _SAMPLE else 0.0


def _topk_cpu(flat: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``commlmo::topk_abs`` on the CPU: the C kernel's threshold pass and radix select, or the eager twin."""
    sample, rank, threshold = _sample_threshold(flat, k)
    lib = _native.available(flat) if flat.dtype == torch.float32 else None
    if lib is not None:
        idx, values = _native_topk(lib, flat, threshold, k, math.ceil(2 * flat.numel() * rank / _SAMPLE))
        return idx, values, torch.tensor(0, device=_CPU)
    check_finite(flat, "topk compressor")
    while True:
        cand = (flat.abs() >= threshold).nonzero().squeeze(1)
        if cand.numel() >= k:
            break
        rank = min(_SAMPLE, 4 * rank)  # the sample was unlucky: lower the bar
        threshold = _kth_largest(sample, rank)
    keep = _first_k_largest(flat[cand].abs(), k)
    idx = cand if keep is None else cand[keep]
    return idx, flat[idx], torch.tensor(0, device=flat.device)


def _first_k_largest(magnitudes: Tensor, k: int) -> Tensor | None:
    """A mask of the k largest entries, ties going to the lowest positions (``None``: all of them)."""
    if magnitudes.numel() == k:
        return None
    kth = magnitudes.topk(k, sorted=False).values.min()
    above = magnitudes > kth
    tied = magnitudes == kth
    return above | (tied & (tied.cumsum(0) <= k - above.sum()))


def _topk_device(flat: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``commlmo::topk_abs`` in torch ops for any device: one ``torch.topk`` for the k-th magnitude,
    then the same set, order and ties as the C kernel, with no host read (``nonzero_static``)."""
    keep = _first_k_largest(flat.abs(), k)
    if keep is None:
        idx = torch.arange(k, device=flat.device)
    else:  # fill 0: with NaN in the input nothing compares, and the caller raises on the count
        idx = torch.nonzero_static(keep, size=k, fill_value=0).squeeze(1)
    return idx, flat[idx], (~torch.isfinite(flat)).sum()


@torch.library.custom_op("commlmo::topk_abs", mutates_args=())
def _topk_op(flat: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k entries of largest ``|x|`` of a 1-D tensor: ``(indices ascending, values, non-finite count)``.

    Exactly ``torch.topk``'s set but for ties, which go to the lowest index.  The
    CPU raises :class:`NonFiniteInputError` on NaN/Inf (its selection needs finite
    keys); other devices return the count and the caller checks it.
    """
    return _topk_device(flat, k)


_topk_op.register_kernel("cpu")(_topk_cpu)


@_topk_op.register_fake
def _(flat: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    return flat.new_empty(k, dtype=torch.int64), flat.new_empty(k), flat.new_empty((), dtype=torch.int64)


def _native_topk(lib, flat: Tensor, threshold: float, k: int, expected: int) -> tuple[Tensor, Tensor]:
    """The C kernel's exact top-k among the entries with ``|x| >= threshold``.

    A thread whose candidates overflow its buffer makes one retry with room for
    them; too few candidates (an unlucky sample) retry with threshold 0 (all).
    """
    threads = _native.num_threads(flat.numel())
    cap = expected // threads + 4096
    while True:
        cidx = torch.empty(threads * cap, dtype=torch.int64, device=_CPU)
        ckey = torch.empty(threads * cap, dtype=torch.int32, device=_CPU)
        counts = torch.zeros(threads, dtype=torch.int64, device=_CPU)
        oidx = torch.empty(k, dtype=torch.int64, device=_CPU)
        oval = torch.empty(k, dtype=torch.float32, device=_CPU)
        bad = ctypes.c_int64(0)
        total = lib.topk_abs_f32(flat.data_ptr(), flat.numel(), threshold, k, cidx.data_ptr(), ckey.data_ptr(),
                                 cap, counts.data_ptr(), oidx.data_ptr(), oval.data_ptr(), ctypes.addressof(bad),
                                 threads)
        if bad.value:
            raise NonFiniteInputError(f"topk compressor: input has {bad.value} NaN or Inf entries")
        if int(counts.max()) > cap:
            cap = int(counts.max())
        elif total < k:
            threshold, cap = 0.0, flat.numel() // threads + 4096
        else:
            return oidx, oval


def _block_plan(n: int, k: int, blocks: int) -> list[tuple[int, int]]:
    """``(size, kept)`` per block: sizes and counts each differ by at most one, larger first."""
    b = max(1, min(blocks, k, n))
    return [(n // b + (i < n % b), k // b + (i < k % b)) for i in range(b)]


def _block_starts(n: int, k: int, blocks: int, device: torch.device) -> Tensor:
    """For each kept entry, in payload order, the offset of the block it came from.

    Arithmetic on positions (no per-block tensors): the first ``k mod b`` blocks
    keep ``q + 1 = k // b + 1`` entries, the rest ``q``; block ``j`` starts at
    ``j (n // b) + min(j, n mod b)``.
    """
    b = max(1, min(blocks, k, n))
    q, r = divmod(k, b)
    position = torch.arange(k, device=device)
    split = r * (q + 1)
    block = torch.where(position < split, position // (q + 1), r + (position - split) // q)
    size, larger = divmod(n, b)
    return block * size + block.clamp(max=larger)


def _blocked_topk(flat: Tensor, k: int, blocks: int) -> Tensor:
    plan = _block_plan(flat.numel(), k, blocks)
    out, start = [], 0
    # blocks of equal size form one (rows x size) view; each group is one batched topk, and since
    # counts differ by one, larger first, a group's kept entries are two static slices of it
    for size in sorted({s for s, _ in plan}, reverse=True):
        counts = [kb for s, kb in plan if s == size]
        more = sum(kb == counts[0] for kb in counts) if counts[0] != counts[-1] else len(counts)
        view = flat[start : start + size * len(counts)].abs().view(len(counts), size)
        top = view.topk(counts[0], dim=1, sorted=True).indices
        top = top + start + size * torch.arange(len(counts), device=flat.device).unsqueeze(1)
        out += [top[:more].reshape(-1), top[more:, : counts[-1]].reshape(-1)]
        start += size * len(counts)
    return torch.cat(out)
