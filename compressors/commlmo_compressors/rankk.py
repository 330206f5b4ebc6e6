"""``rankk``: rank-r factors of the matrix view, by exact SVD or PowerSGD power iteration."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from commlmo.plugin import CompressorCapabilities, Payload, PluginConfig

from . import _native
from ._native import CPU as _CPU
from ._common import (
    LayoutCompressor,
    NonFiniteInputError,
    WireLayout,
    check_finite,
    dense_nbytes,
    require_generator,
)

__all__ = ["RankK"]

# X^T orth(P) is computed as (X^T P) R^-1 (one read of X) while cond(R) <= this: the error it adds
# lies in span(P), orthogonal to X - C(X), and stays ~cond(R) * eps relative; beyond it, a second read
_MAX_COND = 1e3


class RankK(LayoutCompressor):
    r"""Low-rank compression: send ``P`` (m x r) and ``Q`` (n x r) with ``C(X) = P Q^T``.

    Tensors are viewed as matrices (conv kernels as ``out x in*kh*kw``; a 1-D
    tensor as ``1 x n``).  The factors are computed on the orientation whose
    column count ``n`` is ``min(m, n)`` (``ctx`` records it) and sent as float32
    (``factor_dtype="float32"``) or in ``x``'s dtype.  When ``r (m + n)`` factor
    entries would not be smaller than ``x`` (1-D tensors, tiny or near-square
    low-dimensional ones), ``x`` is sent as is, exactly.

    ``method="svd"``: ``P = U_r S_r``, ``Q = V_r`` from a full SVD.  By
    Eckart-Young ``||X - C(X)||^2 = sum_{i>r} s_i^2 <= (1 - r/min(m,n))||X||^2``:
    contractive with ``alpha = r / min(m, n)``, deterministic.

    ``method="power"`` (PowerSGD, Vogels et al. 2019, arXiv 1905.13727): start
    from ``Q ~ N(0, 1)`` drawn from the generator, then ``power_iterations``
    times ``P = orth(X Q)``, ``Q = X^T P``.  ``C(X) = P P^T X`` is the projection
    onto ``span(P)``, so ``||X - C(X)|| <= ||X||`` always, and for one iteration
    ``E||P P^T X||^2 >= E||X Pi_Q||^2 = (r/n)||X||^2`` (``span(P) = span(X Q)``
    and ``Pi_Q`` projects onto the isotropic ``span(Q)``): contractive *in
    expectation* with ``alpha = r / min(m, n)``.  Rank 1 keeps that bound at any
    iteration count (the Rayleigh quotient of power iteration never decreases);
    for ``rank > 1`` and several iterations no bound is claimed (``contractive``
    is then False).  Warm starting (PowerSGD's reuse of last step's ``Q``) is
    ``compress(x, warm_start=previous_payload.wire[1])``: faster convergence, but
    the start then depends on the data and only ``||X - C(X)|| <= ||X||`` holds.

    Cost: on contiguous float32 CPU tensors, C kernels compute ``X Q`` and
    ``X^T P`` together in one read of ``X`` (``X^T orth(P) = (X^T P) R^-1``,
    used while ``cond(R) <= 1e3``), about 2x one read for 16 M entries at rank 4.
    """

    class Config(PluginConfig):
        kind: Literal["rankk"] = "rankk"
        rank: int = Field(4, ge=1)
        method: Literal["power", "svd"] = "power"
        power_iterations: int = Field(1, ge=1)
        factor_dtype: Literal["float32", "same"] = "float32"

    @property
    def capabilities(self) -> CompressorCapabilities:  # type: ignore[override]
        return type(self).capabilities_of(self.config)

    @classmethod
    def capabilities_of(cls, config) -> CompressorCapabilities:
        c = config
        power = c.method == "power"
        return CompressorCapabilities(
            fixed_size=True,
            contractive=not power or c.power_iterations == 1 or c.rank == 1,
            stochastic=power,
        )

    # ------------------------------------------------------------------ layout

    @staticmethod
    def _frame(shape: torch.Size) -> tuple[int, int, bool]:
        """``(rows, cols, transposed)`` of the matrix the factors describe, ``cols <= rows``."""
        m, n = (1, shape.numel()) if len(shape) < 2 else (shape[0], shape.numel() // max(shape[0], 1))
        return (n, m, True) if n > m else (m, n, False)

    def _factor_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if self.config.factor_dtype == "float32" else dtype

    def _dense(self, shape: torch.Size, dtype: torch.dtype) -> bool:
        rows, cols, _ = self._frame(shape)
        r = min(self.config.rank, cols)
        return r * (rows + cols) * self._factor_dtype(dtype).itemsize >= dense_nbytes(shape, dtype)

    def wire_layout(self, shape: torch.Size, dtype: torch.dtype) -> WireLayout:
        shape = torch.Size(shape)
        if self._dense(shape, dtype):
            return ((shape, dtype),)
        rows, cols, _ = self._frame(shape)
        r, fd = min(self.config.rank, cols), self._factor_dtype(dtype)
        return ((torch.Size([rows, r]), fd), (torch.Size([cols, r]), fd))

    def alpha(self, shape: torch.Size) -> float | None:
        if not self.capabilities.contractive:
            return None
        _, cols, _ = self._frame(torch.Size(shape))
        return min(1.0, self.config.rank / max(cols, 1))

    # ------------------------------------------------------------------ codec

    def compress(
        self, x: Tensor, *, generator: torch.Generator | None = None, warm_start: Tensor | None = None
    ) -> Payload:
        ctx = {"shape": x.shape, "dtype": x.dtype, "device": x.device}
        if self._dense(x.shape, x.dtype):
            check_finite(x, "rankk compressor")
            return Payload(wire=(x,), ctx=ctx | {"dense": True})
        _, cols, transposed = self._frame(x.shape)
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        matrix = (x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)).to(work).contiguous()
        r = min(self.config.rank, cols)
        if self.config.method == "svd":
            check_finite(x, "rankk compressor")
            u, s, vh = torch.linalg.svd(matrix.T if transposed else matrix, full_matrices=False)
            p, q = u[:, :r] * s[:r], vh[:r].T
        else:
            p, q = self._power(_Frame(matrix, transposed), r, generator, warm_start)
        fd = self._factor_dtype(x.dtype)
        return Payload(wire=(p.to(fd).contiguous(), q.to(fd).contiguous()), ctx=ctx | {"transposed": transposed})

    def _power(self, frame: _Frame, r: int, generator: torch.Generator | None, warm: Tensor | None):
        cols = frame.shape[1]
        if warm is None:
            require_generator(generator, "rankk compressor (method='power')",
                              "its random start Q is drawn from a generator (or pass warm_start=)")
            q = torch.randn(r, cols, generator=generator, device=generator.device).T
            q = q.to(device=frame.x.device, dtype=frame.x.dtype)
        else:
            if warm.shape != (cols, r):
                raise ValueError(f"rankk compressor: warm_start must have shape {(cols, r)} "
                                 f"(wire[1] of the previous payload), got {tuple(warm.shape)}")
            q = warm.to(device=frame.x.device, dtype=frame.x.dtype)
        for step in range(self.config.power_iterations):
            if step:  # only span(Q) matters here; orthonormal columns keep X Q from overflowing
                q = torch.linalg.qr(q).Q
            p, gram = frame.times_with_gram(q)
            if step == 0:  # NaN/Inf in X reach every row of X Q: a check on m x r entries, not m x n
                p, gram = _finite_or_rescaled(frame, q, p, gram)
            p, upper = torch.linalg.qr(p)
            if gram is not None and float(torch.linalg.cond(upper)) <= _MAX_COND:
                q = torch.linalg.solve_triangular(upper, gram, upper=True, left=False)  # X^T P R^-1
            else:
                q = frame.transpose_times(p)
        return p, q

    def decompress(self, payload: Payload) -> Tensor:
        ctx = payload.ctx
        if ctx.get("dense"):
            return payload.wire[0]
        p, q = payload.wire
        out = p.float() @ q.float().T if p.dtype != torch.float64 else p @ q.T
        return (out.T if ctx["transposed"] else out).to(ctx["dtype"]).reshape(ctx["shape"])


class _Frame:
    """The matrix ``M`` the factors describe: ``X`` or ``X^T`` for the row-major 2-D view ``X``.

    Products with ``M`` and ``M^T`` use the C kernels for skinny float32 operands
    (about one read of ``X`` each; BLAS takes several times longer for 4-16 columns).
    """

    def __init__(self, x: Tensor, transposed: bool):
        self.x, self.transposed = x, transposed
        self.shape = (x.shape[1], x.shape[0]) if transposed else tuple(x.shape)

    def times(self, v: Tensor) -> Tensor:
        return _xtp(self.x, v).T if self.transposed else _xq(self.x, v)

    def transpose_times(self, u: Tensor) -> Tensor:
        return _xq(self.x, u) if self.transposed else _xtp(self.x, u).T

    def times_with_gram(self, v: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(M v, M^T M v)`` in one read of ``X`` where a kernel can, else ``(M v, None)``.

        Under ``torch.compile`` (and for fake tensors) always ``(M v, None)``: the
        one-read path's choice between ``(X^T P) R^-1`` and a second read needs
        ``cond(R)`` on the host.
        """
        if self.transposed or not _native.readable(self.x) or _kernels_for(self.x, v) is None:
            return self.times(v), None
        p, gram_t = _native.call(torch.ops.commlmo.skinny_xq_xtp.default, _xq_xtp_cpu, self.x, v)
        return p, gram_t.T


def _kernels_for(x: Tensor, v: Tensor):
    ok = x.dtype == torch.float32 and v.shape[1] <= 16 and x.numel() >= 1 << 16
    return _native.available(x) if ok else None


def _xq(x: Tensor, v: Tensor) -> Tensor:
    """``x @ v`` (``x``: m x n, ``v``: n x r), through ``commlmo::skinny_xq``."""
    return _native.call(torch.ops.commlmo.skinny_xq.default, _xq_cpu, x, v)


def _xtp(x: Tensor, u: Tensor) -> Tensor:
    """``(x^T @ u)^T`` as an r x n tensor (``x``: m x n, ``u``: m x r), through ``commlmo::skinny_xtp``."""
    return _native.call(torch.ops.commlmo.skinny_xtp.default, _xtp_cpu, x, u)


def _xq_cpu(x: Tensor, v: Tensor) -> Tensor:
    lib = _kernels_for(x, v)
    if lib is None:
        return x @ v
    vt = v.T.contiguous()
    out = torch.empty(x.shape[0], v.shape[1], device=_CPU)
    lib.xq_f32(x.data_ptr(), x.shape[0], x.shape[1], vt.data_ptr(), v.shape[1], out.data_ptr(),
               _native.num_threads(x.numel()))
    return out


def _xtp_cpu(x: Tensor, u: Tensor) -> Tensor:
    lib = _kernels_for(x, u)
    if lib is None:
        return u.T @ x
    u, threads = u.contiguous(), _native.num_threads(x.numel())
    parts = torch.zeros(threads, u.shape[1], x.shape[1], device=_CPU)  # one accumulator per thread, summed here
    lib.xtp_f32(x.data_ptr(), x.shape[0], x.shape[1], u.data_ptr(), u.shape[1], parts.data_ptr(), threads)
    return parts.sum(0)


def _xq_xtp_cpu(x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    lib = _kernels_for(x, v)
    if lib is None:
        p = x @ v
        return p, p.T @ x
    vt, threads = v.T.contiguous(), _native.num_threads(x.numel())
    p = torch.empty(x.shape[0], v.shape[1], device=_CPU)
    parts = torch.zeros(threads, v.shape[1], x.shape[1], device=_CPU)
    lib.xq_xtp_f32(x.data_ptr(), x.shape[0], x.shape[1], vt.data_ptr(), v.shape[1], p.data_ptr(),
                   parts.data_ptr(), threads)
    return p, parts.sum(0)


# PowerSGD's skinny products as custom ops: the C kernels on plain contiguous float32 CPU tensors
# (BLAS elsewhere on the CPU), the device's own matmul on every other device.


@torch.library.custom_op("commlmo::skinny_xq", mutates_args=())
def _xq_op(x: Tensor, v: Tensor) -> Tensor:
    """``X V`` for ``X`` (m x n) and a skinny ``V`` (n x r)."""
    return x @ v


@torch.library.custom_op("commlmo::skinny_xtp", mutates_args=())
def _xtp_op(x: Tensor, u: Tensor) -> Tensor:
    """``(X^T U)^T`` (r x n) for ``X`` (m x n) and a skinny ``U`` (m x r)."""
    return u.T @ x


@torch.library.custom_op("commlmo::skinny_xq_xtp", mutates_args=())
def _xq_xtp_op(x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(P, (X^T P)^T)`` with ``P = X V``: one read of ``X`` in the C kernel."""
    p = x @ v
    return p, p.T @ x


_xq_op.register_kernel("cpu")(_xq_cpu)
_xtp_op.register_kernel("cpu")(_xtp_cpu)
_xq_xtp_op.register_kernel("cpu")(_xq_xtp_cpu)


@_xq_op.register_fake
def _(x: Tensor, v: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], v.shape[1])


@_xtp_op.register_fake
def _(x: Tensor, u: Tensor) -> Tensor:
    return x.new_empty(u.shape[1], x.shape[1])


@_xq_xtp_op.register_fake
def _(x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape[0], v.shape[1]), x.new_empty(v.shape[1], x.shape[1])


def _finite_or_rescaled(frame: _Frame, q: Tensor, p: Tensor, gram: Tensor | None):
    if not _native.readable(p):  # the check needs host reads; a compiled caller checks its inputs
        return p, gram
    if bool(torch.isfinite(p.sum())) and (gram is None or bool(torch.isfinite(gram.sum()))):
        return p, gram
    check_finite(frame.x, "rankk compressor")
    # finite entries whose products overflowed: only span(X Q) matters, so scale X by a power of two
    scale = 2.0 ** -math.ceil(math.log2(float(frame.x.abs().max())))
    p = _Frame(frame.x * scale, frame.transposed).times(q)
    if not bool(torch.isfinite(p).all()):
        raise NonFiniteInputError("rankk compressor: X Q overflowed even after rescaling")
    return p, None
