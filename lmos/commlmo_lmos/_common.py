"""Helpers shared by the built-in LMOs."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from commlmo.plugin import LMO, host_reads_free

#: a moment coefficient of an element-wise rule
Beta = Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms of 16-bit tensors are accumulated in float32; other dtypes in themselves."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def check_ndim(lmo: LMO, g: Tensor) -> None:
    """Raise a ``ValueError`` naming the shape if ``lmo`` does not accept ``g``'s rank."""
    caps = lmo.capabilities
    if not caps.accepts(g.ndim):
        upper = "" if caps.max_ndim is None else f" and <= {caps.max_ndim}"
        raise ValueError(
            f"{lmo.kind!r} LMO takes tensors with ndim >= {caps.min_ndim}{upper}; got shape "
            f"{tuple(g.shape)}. Route such parameters to another group (for example one with an element-wise rule)."
        )


def divide_or_zero(x: Tensor, norms: Tensor) -> Tensor:
    """``x / norms`` (broadcast), with 0 where the norm is 0 -- no NaN for zero slices."""
    return x * torch.where(norms > 0, norms.reciprocal(), 0.0)


def random_signs_at_zeros(d: Tensor, zeros: Tensor, generator: torch.Generator | None) -> Tensor:
    """``d`` (a sign tensor) with each entry where ``zeros`` holds replaced by a random sign from ``generator``.

    Where counting the zeros is a free host read (the CPU), one coin per zero, written into
    ``d``; elsewhere no host read: a coin for every entry, used where the entry is zero.
    """
    device = generator.device if generator is not None else d.device
    if host_reads_free(d):
        count = int(zeros.sum())
        if count:
            coins = torch.randint(0, 2, (count,), generator=generator, device=device)
            d[zeros] = (2 * coins - 1).to(device=d.device, dtype=d.dtype)
        return d
    coins = torch.randint(0, 2, d.shape, generator=generator, device=device).to(d.device)
    return torch.where(zeros, (2 * coins - 1).to(d.dtype), d)
