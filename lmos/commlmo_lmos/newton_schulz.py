r"""Quintic Newton--Schulz iterations for the polar factor ``U V^T`` of ``G = U S V^T``.

Each step maps ``X <- a X + b (X X^T) X + c (X X^T)^2 X``, i.e. applies the odd
polynomial ``p(s) = a s + b s^3 + c s^5`` to every singular value of ``X``.
After Frobenius pre-normalisation (``||X||_2 <= ||X||_F <= 1``) a well-chosen
composition of such polynomials pushes every nonzero singular value towards 1.

Two schedules are built in:

* ``jordan`` -- one polynomial repeated, ``(3.4445, -4.7750, 2.0315)``, chosen to
  maximise the slope at zero (K. Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/).
  It does not converge to 1: after 5 steps, singular values above ~1e-3 of
  ``||G||_F`` end up in about ``[0.68, 1.2]`` (Polar Express: ``[0.87, 1.13]``).
  This path reproduces ``torch.optim._muon._zeropower_via_newtonschulz`` bitwise
  (same casts, transposition, ``addmm`` fusions and operation order).
* ``polar_express`` -- a different minimax-optimal polynomial per step (Amsel,
  Persson, Musco, Gower 2025, "The Polar Express", arXiv 2505.16932).

Inputs of shape ``(m, n)`` use ``addmm``; stacks of same-shape matrices
``(b, m, n)`` use ``baddbmm``.  On the 2-core CPU this project is developed on
(torch 2.13, oneDNN/MKL), the batched path is bitwise equal to looping over the
2-D path, in bfloat16 and float32; ``tests/test_lmos.py`` checks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain, repeat

import torch
from torch import Tensor

from commlmo.plugin import host_reads_free

__all__ = ["QuinticSchedule", "JORDAN", "POLAR_EXPRESS", "SCHEDULES", "newton_schulz"]

Coefficients = tuple[float, float, float]


@dataclass(frozen=True)
class QuinticSchedule:
    """Per-step ``(a, b, c)`` coefficients (the last one repeats) and the pre-scaling rule.

    ``safety == 1``: ``X / max(||X||_F, eps)`` (Jordan, torch.optim.Muon);
    ``safety > 1``: ``X / (safety * ||X||_F + eps)`` (Polar Express code).
    """

    coefficients: tuple[Coefficients, ...]
    safety: float = 1.0

    def take(self, steps: int) -> list[Coefficients]:
        """The coefficients of the first ``steps`` steps."""
        tail = repeat(self.coefficients[-1], max(0, steps - len(self.coefficients)))
        return list(chain(self.coefficients[:steps], tail))


JORDAN = QuinticSchedule(((3.4445, -4.7750, 2.0315),))

# Polar Express, degree 5, fitted for singular values in [1e-3, 1]: the list hard-coded in
# the authors' repository, NoahAmsel/PolarExpress, polar_express/basic.py.  As there, every
# polynomial but the last (steady-state) one is divided by (s, s**3, s**5) with s = 1.01,
# the safety factor that keeps rounding from pushing singular values past the interval
# the polynomials were fitted on, and X is pre-normalised by 1.01 * ||X||_F + eps.
# (modded-nanogpt ships a different 5-step list with safety 1.02; these are the authors'.)
_POLAR_EXPRESS_RAW: tuple[Coefficients, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_SAFETY = 1.01
POLAR_EXPRESS = QuinticSchedule(
    tuple((a / _SAFETY, b / _SAFETY**3, c / _SAFETY**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1])
    + _POLAR_EXPRESS_RAW[-1:],
    safety=_SAFETY,
)

SCHEDULES: dict[str, QuinticSchedule] = {"jordan": JORDAN, "polar_express": POLAR_EXPRESS}


def _rescaled(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(X / max|X|, ||X / max|X| ||_F)`` per matrix: a Frobenius norm that cannot overflow."""
    big = x.abs().amax(dim=(-2, -1), keepdim=True) if x.ndim == 3 else x.abs().amax()
    unit = x / torch.where(big > 0, big, torch.ones_like(big))
    return unit, (unit.norm() if x.ndim == 2 else torch.linalg.vector_norm(unit, dim=(-2, -1), keepdim=True))


def newton_schulz(
    g: Tensor,
    *,
    schedule: QuinticSchedule = JORDAN,
    steps: int = 5,
    dtype: torch.dtype = torch.bfloat16,
    eps: float = 1e-7,
) -> Tensor:
    """Approximate polar factor of a matrix ``(m, n)`` or a stack ``(b, m, n)``, in ``dtype``.

    Tall matrices are transposed so the Gram matrix is the small one.  ``g`` is
    never modified (the cast may alias it, so every later op is out of place).
    """
    if g.ndim not in (2, 3):
        raise ValueError(f"newton_schulz takes a matrix (m, n) or a stack (b, m, n); got shape {tuple(g.shape)}")
    if steps < 1:
        raise ValueError(f"newton_schulz needs steps >= 1; got {steps}")
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    # For a single matrix this is torch.optim.Muon's reduction, so rounding agrees bitwise.
    norm = x.norm() if x.ndim == 2 else torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    # |G| ~ 1e20 overflows ||G||_F (torch.optim.Muon then returns 0): there, normalise G / max|G|
    # first; elsewhere the result is the plain reduction's, bit for bit.  On the CPU the check
    # is a free host read; on an accelerator, and under torch.compile (where a host read is a
    # graph break), it is branch-free, so it never synchronises.
    if host_reads_free(norm) and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(norm).all()):
            x, norm = _rescaled(x)
    else:
        rescaled, norm2 = _rescaled(x)
        finite = torch.isfinite(norm)
        x = torch.where(finite, x, rescaled)
        norm = torch.where(finite, norm, norm2)
    x = x / (norm.clamp(min=eps) if schedule.safety == 1.0 else norm * schedule.safety + eps)
    fused = torch.addmm if x.ndim == 2 else torch.baddbmm
    for a, b, c in schedule.take(steps):
        gram = x @ x.mT
        poly = fused(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = fused(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    return x.mT if tall else x
