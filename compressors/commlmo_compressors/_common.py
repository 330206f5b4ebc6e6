"""Pieces every built-in compressor shares: the wire-layout base class, input checks, k."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator
from torch import Tensor

from commlmo.errors import NonFiniteInputError
from commlmo.plugin import Compressor, inputs_known_finite

from . import _native

__all__ = [
    "KSpec",
    "LayoutCompressor",
    "NonFiniteInputError",
    "ValuesDecode",
    "WireLayout",
    "check_finite",
    "counter_hash",
    "dense_nbytes",
    "draw_key",
    "draw_key_tensor",
    "index_dtype",
    "require_generator",
    "resolve_k",
]

#: ``((shape, dtype), ...)`` of the wire tensors, in order
WireLayout = tuple[tuple[torch.Size, torch.dtype], ...]

#: How ``decompress`` uses the payload's first floating-point wire tensor ``v``
#: (what ``chain`` needs to combine contracts):
#: ``"restriction"`` -- the result is ``x`` on a set of coordinates and 0 elsewhere,
#: and ``v`` holds exactly those entries of ``x`` (identity, topk, unscaled randk);
#: ``"embedding"`` -- the result is ``c * E v`` for a constant ``c`` and an embedding
#: ``E`` of ``v`` into distinct coordinates, zeros elsewhere (scaled randk);
#: ``None`` -- anything else.
ValuesDecode = Literal["restriction", "embedding"] | None


class LayoutCompressor(Compressor):
    """A compressor whose wire tensors' shapes and dtypes follow from the input's shape and dtype.

    Subclasses implement :meth:`wire_layout`; :meth:`wire_nbytes` is derived from it,
    so the declared cost and the declared tensors cannot disagree.
    """

    values_decode: ValuesDecode = None

    def wire_layout(self, shape: torch.Size, dtype: torch.dtype) -> WireLayout:
        raise NotImplementedError

    def wire_nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        return sum(math.prod(s) * d.itemsize for s, d in self.wire_layout(torch.Size(shape), dtype))


def dense_nbytes(shape: torch.Size, dtype: torch.dtype) -> int:
    """Bytes of the uncompressed tensor."""
    return math.prod(shape) * dtype.itemsize


def check_finite(x: Tensor, name: str) -> None:
    """Raise :class:`NonFiniteInputError` if ``x`` has NaN or Inf (one read of ``x``).

    A finite sum proves every entry finite; a non-finite sum may also be an
    overflow of finite entries, so only then is each entry checked.  Skipped
    under ``torch.compile``, where raising on data needs a host read (a graph
    break), and for fake tensors: such a caller checks its inputs itself, as the
    optimizer does.
    """
    if not _native.readable(x) or inputs_known_finite():  # the optimizer agreed on finite gradients
        return
    if x.numel() and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise NonFiniteInputError(f"{name}: input has NaN or Inf entries; nothing was compressed")


def require_generator(generator: torch.Generator | None, name: str, why: str) -> torch.Generator:
    if generator is None:
        raise ValueError(
            f"{name}: {why}; pass generator=torch.Generator(device=x.device).manual_seed(seed)"
        )
    return generator


def _check_k(value: int | float) -> int | float:  # noqa: PYI041 -- int (a count) is not float here
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"a count k must be >= 1, got {value} (or give a fraction 0 < k <= 1)")
    elif not 0 < value <= 1:
        raise ValueError(f"a fraction k must be in (0, 1], got {value} (or give an int count >= 1)")
    return value


#: ``k`` as a count (``int >= 1``) or a fraction of the entries (``float`` in ``(0, 1]``);
#: note ``1`` is one entry and ``1.0`` is all of them.
KSpec = Annotated[int | float, AfterValidator(_check_k)]


def resolve_k(k: int | float, numel: int) -> int:  # noqa: PYI041
    """An int ``k >= 1`` is a count, a float in ``(0, 1]`` a fraction (rounded up); at most ``numel``."""
    count = k if isinstance(k, int) else math.ceil(k * numel)
    return max(1, min(int(count), numel))


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest dtype that holds every index ``0 .. numel - 1``."""
    top = max(numel - 1, 0)
    for dtype, limit in ((torch.uint8, 255), (torch.int16, 2**15 - 1), (torch.int32, 2**31 - 1)):
        if top <= limit:
            return dtype
    return torch.int64


_MASK32 = 0xFFFFFFFF


def draw_key_tensor(generator: torch.Generator) -> Tensor:
    """Two 32-bit words from ``generator`` as an int64 tensor on its device (no host read):
    the key of :func:`counter_hash` for one call, as the ``commlmo::`` ops take it."""
    return torch.randint(0, 2**32, (2,), dtype=torch.int64, generator=generator, device=generator.device)


def draw_key(generator: torch.Generator) -> tuple[int, int]:
    """The key of :func:`draw_key_tensor` as two Python ints (the same draw from ``generator``)."""
    k1, k2 = draw_key_tensor(generator).tolist()
    return k1, k2


def _mix32(h: Tensor) -> Tensor:
    # lowbias32 (C. Wellons, hash-prospector); multipliers < 2**31 keep int64 products exact
    h = h ^ (h >> 16)
    h = (h * 0x21F0AAAD) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x735A2D97) & _MASK32
    return h ^ (h >> 15)


def counter_hash(index: Tensor, key: tuple[int, int] | Tensor) -> Tensor:
    """32 pseudo-random bits (as int64) per entry index, bit-identical to the C kernels.

    A counter-based generator: entry ``i`` gets ``mix(mix(i ^ k1) + k2)``, so a
    stochastic compressor draws one 64-bit key from its ``torch.Generator`` per
    call instead of one random number per entry (drawing 16 M floats from a CPU
    generator takes ~75 ms, the hash ~1 ms in C).  ``key`` is two ints or an
    int64 tensor of two (on ``index``'s device: no host read).
    """
    k1, k2 = key[0], key[1]
    h = _mix32((index.to(torch.int64) & _MASK32) ^ k1)
    return _mix32((h + k2) & _MASK32)
