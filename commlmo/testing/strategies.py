"""Hypothesis strategies for the tensors compressors meet: odd sizes, low precision, edge values.

Each example is drawn as a small recipe -- shape, dtype, value pattern and a
seed -- and built with a seeded ``torch.Generator``, so a failing example prints
as one readable line and rebuilds exactly (``TensorExample(...).make()``).

Patterns: ``normal``; ``zeros``; ``constant``; ``sparse`` (90 % zeros);
``signed_zeros`` (30 % of entries +0.0 or -0.0); ``mixed_scales`` (entries
spread over six decades); ``tiny`` and ``huge`` (Gaussian times ``2**(3/4 emin)``
or ``2**(3/4 emax)`` of the dtype: ~1e-28 and ~4e28 for float32 and bfloat16,
2**-11 and 2**11 for float16 -- far from the ends of the range, yet where
careless float32 arithmetic on squares or sums underflows or overflows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

__all__ = ["DTYPES", "PATTERNS", "TensorExample", "shapes", "tensor_examples", "tensors"]

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
PATTERNS: tuple[str, ...] = (
    "normal", "zeros", "constant", "sparse", "signed_zeros", "mixed_scales", "tiny", "huge",
)


def _scale(dtype: torch.dtype, which: str) -> float:
    info = torch.finfo(dtype)
    exponent = math.log2(info.tiny) if which == "tiny" else math.log2(info.max)
    return 2.0 ** math.trunc(0.75 * exponent)


@dataclass(frozen=True)
class TensorExample:
    """A reproducible tensor: ``make()`` builds it (the same bits every time)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pattern: str
    seed: int
    device: str = "cpu"

    def make(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        n = math.prod(self.shape)
        normal = torch.randn(n, generator=gen, dtype=torch.float64)
        uniform = torch.rand(n, generator=gen, dtype=torch.float64)
        if self.pattern == "normal":
            values = normal
        elif self.pattern == "zeros":
            values = torch.zeros(n, dtype=torch.float64)
        elif self.pattern == "constant":
            values = torch.full((n,), float(normal[0]) if n else 1.0, dtype=torch.float64)
        elif self.pattern == "sparse":
            values = normal * (uniform < 0.1)
        elif self.pattern == "signed_zeros":
            zero = torch.where(normal > 0, 0.0, -0.0).to(torch.float64)
            values = torch.where(uniform < 0.3, zero, normal * 1.3)
        elif self.pattern == "mixed_scales":
            values = normal * 10.0 ** (6 * uniform - 3)
        elif self.pattern in ("tiny", "huge"):
            values = normal * _scale(self.dtype, self.pattern)
        else:
            raise ValueError(f"unknown pattern {self.pattern!r}; known: {', '.join(PATTERNS)}")
        return values.to(self.dtype).reshape(self.shape).to(self.device)

    def __repr__(self) -> str:
        return f"TensorExample(shape={self.shape}, dtype={self.dtype}, pattern={self.pattern!r}, seed={self.seed})"


@st.composite
def shapes(draw, *, ndims: Sequence[int] = (1, 2, 4), max_numel: int = 2048) -> tuple[int, ...]:
    """1-D, 2-D and 4-D shapes (conv kernels) of at most ``max_numel`` entries; sizes rarely divisible by 8."""
    ndim = draw(st.sampled_from(tuple(ndims)))
    limit = max(1, round(max_numel ** (1 / ndim)))
    dims = [draw(st.integers(1, max(limit, 1) if ndim > 1 else max_numel)) for _ in range(ndim)]
    if ndim == 4:  # conv kernels: small spatial dims
        dims[2:] = [min(d, 5) for d in dims[2:]]
    while math.prod(dims) > max_numel:
        dims[dims.index(max(dims))] //= 2
    return tuple(max(d, 1) for d in dims)


@st.composite
def tensor_examples(
    draw,
    *,
    shape_strategy: st.SearchStrategy | None = None,
    dtypes: Sequence[torch.dtype] = DTYPES,
    patterns: Sequence[str] = PATTERNS,
    max_numel: int = 2048,
    device: str = "cpu",
) -> TensorExample:
    """Recipes (:class:`TensorExample`) for the tensors of :func:`tensors`."""
    shape = draw(shape_strategy if shape_strategy is not None else shapes(max_numel=max_numel))
    return TensorExample(
        shape=tuple(shape),
        dtype=draw(st.sampled_from(tuple(dtypes))),
        pattern=draw(st.sampled_from(tuple(patterns))),
        seed=draw(st.integers(0, 2**32 - 1)),
        device=device,
    )


def tensors(**kwargs) -> st.SearchStrategy[torch.Tensor]:
    """Tensors for property tests; the keywords of :func:`tensor_examples` choose shapes, dtypes, patterns.

    >>> from hypothesis import given
    >>> @given(tensors(dtypes=[torch.float32], max_numel=64))
    ... def test_roundtrip(x): ...
    """
    return tensor_examples(**kwargs).map(TensorExample.make)
