r"""The LMO contract kit: ``check_lmo`` tests a linear minimization oracle against its contract.

Run it on your own LMO from your test suite::

    from commlmo.testing import check_lmo

    def test_my_lmo_keeps_its_contract():
        check_lmo(MyLMO())                                    # an instance,
        check_lmo({"kind": "mine", "radius": 2.0})            # a config of an installed plugin,
        check_lmo("mine", examples=50)                        # or a registered name

The contract (:class:`commlmo.plugin.LMO`): ``D = direction(G)`` maximises
``<G, D>`` over the unit ball of ``norm``, so ``<G, D> = dual_norm(G)``.  Every
value pattern of :mod:`commlmo.testing.strategies` runs once per dtype as an
explicit example, on shapes of every rank the LMO accepts
(``lmo.capabilities.accepts(ndim)`` for ranks 0, 1, 2 and 4); then hypothesis
explores ``examples`` more, with a fixed seed.  On every example ``G``:

* ``shape``: ``direction(G)`` is a tensor of ``G``'s shape, dtype and device;
* ``finite``: for finite ``G``, ``direction(G)`` is finite and ``norm(D)``,
  ``dual_norm(G)`` are finite numbers >= 0 (the ``tiny`` and ``huge`` patterns
  find squares that underflow or overflow in float32);
* ``no-mutation``: ``direction``, ``directions``, ``norm`` and ``dual_norm`` leave
  their inputs bit for bit unchanged;
* ``determinism``: the same generator state gives the same bits;
* ``norm-ball``: ``norm(D) <= max_norm`` (1 for an exact LMO), plus the rounding
  of ``D`` to the input dtype: ``eps(dtype) * norm(|D|)``;
* ``duality``: exact LMOs: ``|<G, D> - dual_norm(G)| <= eps(dtype) <|G|, |D|> +
  rtol (dual_norm(G) + <|G|, |D|>)``; approximate ones: ``lo <= <G, D> /
  dual_norm(G) <= hi`` with the declared band (the lower end is waived below
  ``min_norm``, see :class:`LMOTolerance`);
* ``optimality``: no feasible point does better -- for ``R`` in {a random tensor,
  ``sign(G)``, ``G``}, ``<G, R> / norm(R)`` is at most ``<G, D>`` (exact) or
  ``dual_norm(G)`` (approximate), with the same slack; this catches a
  ``dual_norm`` that is too small and a direction that is not the argmax even
  when ``norm``, ``dual_norm`` and ``direction`` agree with each other;
* ``scale-invariance``: ``direction(c G) = direction(G)`` for ``c`` in {1/8, 32}
  (powers of two, so ``c G`` is exact and the check is about the LMO, not the
  input's rounding; skipped where ``c G`` over- or underflows), up to the
  rounding of the output;
* ``directions``: ``directions([G, K, H, G])`` (``K`` another shape, ``H`` other
  data of ``G``'s shape, so a batching LMO groups ``G, H, G``) equals the
  per-tensor ``direction`` calls made with a generator in the same state.

A failure raises :class:`LMOContractError` (an ``AssertionError``) naming the
property, the LMO and the counterexample (shape, dtype, value pattern and seed:
``TensorExample(...).make()`` rebuilds it; the generator is seeded ``seed``).

Tolerances.  An LMO declares how exact it is with a ``contract_tolerance``
attribute (an :class:`LMOTolerance`, or a method returning one); the built-in
``spectral`` LMO with Newton--Schulz (``method: jordan | polar_express``) is
known to the kit (:func:`declared_tolerance`); everything else is taken as
exact.  ``spectral`` with ``method: svd`` is exact and checked tight.  Pass
``tolerance=`` to override, or ``exact=True`` to hold an approximate LMO to
the exact contract (a test of the kit's tightness: Newton--Schulz fails it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from commlmo.plugin import LMO

from .contract import _gen, _run, _same_bits
from .strategies import DTYPES, PATTERNS, TensorExample, tensor_examples
from .strategies import shapes as shape_strategy

__all__ = ["LMOContractError", "LMOTolerance", "check_lmo", "declared_tolerance", "PROPERTIES"]

#: the properties check_lmo checks, as named in its errors
PROPERTIES: tuple[str, ...] = (
    "shape", "finite", "no-mutation", "determinism", "norm-ball", "duality", "optimality", "scale-invariance",
    "directions",
)
_SCALES = (2.0**-3, 2.0**5)
_EXPLICIT_SHAPES: dict[int, tuple[tuple[int, ...], ...]] = {
    0: ((),), 1: ((13,), (1,)), 2: ((6, 7), (37, 5), (1, 9)), 4: ((3, 2, 3, 3),),
}


class LMOContractError(AssertionError):
    """``check_lmo`` found a broken promise; ``.property`` names it (one of :data:`PROPERTIES`)."""

    def __init__(self, prop: str, message: str):
        super().__init__(message)
        self.property = prop


@dataclass(frozen=True)
class LMOTolerance:
    """How exact an LMO promises to be (the default: exact up to floating point).

    * ``duality``: band ``(lo, hi)`` for ``<G, D> / dual_norm(G)``; ``(1, 1)``
      for an exact LMO.  Hoelder gives ``hi <= max_norm``;
    * ``max_norm``: ``norm(D) <= max_norm`` (1 for an exact LMO);
    * ``min_norm``: below this Frobenius norm of ``G`` the LMO does not promise
      the lower end of ``duality`` nor scale invariance (Newton--Schulz floors
      ``||G||_F`` at ``eps`` and works in bfloat16, so tiny inputs give tiny directions);
    * ``rtol``: relative slack for the LMO's own float32 arithmetic (default
      ``64 eps(float32)``, as the compressor kit; fine up to a few thousand entries);
    * ``agree_rtol``: slack, relative to ``max |D|``, between two computations
      of one direction that may take different kernels (``directions`` vs
      ``direction``, ``c G`` vs ``G``); ``None``: ``rtol``.
    """

    duality: tuple[float, float] = (1.0, 1.0)
    max_norm: float = 1.0
    min_norm: float = 0.0
    rtol: float = 64 * torch.finfo(torch.float32).eps
    agree_rtol: float | None = None

    @property
    def exact(self) -> bool:
        """The exact contract: ``<G, D> = dual_norm(G)`` and ``norm(D) <= 1``."""
        return self.duality == (1.0, 1.0) and self.max_norm == 1.0

    @property
    def agreement(self) -> float:
        return self.rtol if self.agree_rtol is None else self.agree_rtol


EXACT = LMOTolerance()

# Newton--Schulz after >= 5 steps (lmos/commlmo_lmos/newton_schulz.py): singular values of
# ||G||_F-normalised inputs above ~1e-3 end up in about [0.68, 1.2] (jordan) and [0.87, 1.13]
# (polar_express); smaller ones contribute at most min(m, n) * 1e-3 of the nuclear norm.
_NEWTON_SCHULZ = {
    "jordan": LMOTolerance(duality=(0.6, 1.21), max_norm=1.21, rtol=1e-3, agree_rtol=0.05),
    "polar_express": LMOTolerance(duality=(0.8, 1.14), max_norm=1.14, rtol=1e-3, agree_rtol=0.05),
}


def declared_tolerance(lmo: LMO) -> LMOTolerance:
    """The tolerance ``lmo`` declares: its ``contract_tolerance``, the kit's table for the
    built-in Newton--Schulz ``spectral``, else :data:`EXACT`."""
    declared = getattr(lmo, "contract_tolerance", None)
    if callable(declared):
        declared = declared()
    if isinstance(declared, LMOTolerance):
        return declared
    if declared is not None:
        raise TypeError(f"{lmo!r}.contract_tolerance must be an LMOTolerance, got {declared!r}")
    cfg = getattr(lmo, "config", None)
    method = getattr(cfg, "method", None)
    if type(lmo).__module__.startswith("commlmo_lmos.spectral") and method in _NEWTON_SCHULZ:
        tol = _NEWTON_SCHULZ[method]
        if getattr(cfg, "steps", 5) < 5:  # fewer steps: no promised lower end
            tol = replace(tol, duality=(0.0, tol.duality[1]))
        return replace(tol, min_norm=1e3 * float(getattr(cfg, "eps", 1e-7)))
    return EXACT


def check_lmo(
    lmo_or_config: LMO | type[LMO] | str | Any,
    *,
    shapes: Sequence[Sequence[int]] | st.SearchStrategy | None = None,
    dtypes: Sequence[torch.dtype] = DTYPES,
    examples: int = 25,
    patterns: Sequence[str] = PATTERNS,
    tolerance: LMOTolerance | None = None,
    exact: bool | None = None,
    max_numel: int = 256,
    seed: int = 0,
    device: str = "cpu",
    explicit: bool = True,
) -> None:
    """Check that an LMO keeps the LMO contract; raise :class:`LMOContractError` if not.

    ``lmo_or_config``: an instance, a class (built with its default config), a
    config mapping or ``PluginConfig``, or a registered kind.  ``shapes``: the
    shapes to try (a list, or a hypothesis strategy of shape tuples); default:
    every rank in (0, 1, 2, 4) that ``lmo.capabilities`` accepts, at most
    ``max_numel`` entries.  ``examples``: how many examples hypothesis draws
    after the explicit ones (every pattern x dtype once).  ``tolerance``
    overrides :func:`declared_tolerance`; ``exact=True`` checks the exact
    contract whatever the LMO declares.  ``explicit=False`` skips the explicit
    examples (hypothesis only).  See the module docstring for the properties.
    """
    lmo = _resolve(lmo_or_config)
    tol = tolerance if tolerance is not None else declared_tolerance(lmo)
    if exact:
        tol = replace(EXACT, rtol=tol.rtol if tolerance is not None else EXACT.rtol)
    explicit_shapes, strategy = _shapes(lmo, shapes, max_numel)
    run = settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))

    def each_example(example: TensorExample) -> None:
        _check_example(lmo, example, tol, seed)

    drawn = tensor_examples(shape_strategy=strategy, dtypes=dtypes, patterns=patterns, device=device)
    cases = [(p, d) for p in patterns for d in dtypes]
    fixed = [TensorExample(tuple(explicit_shapes[i % len(explicit_shapes)]), d, p, seed=i, device=device)
             for i, (p, d) in enumerate(cases)] if explicit else []
    for example in fixed:  # in order, so the first (simplest) broken example is the one reported
        each_example(example)
    if examples > 0:
        _run_keeping_the_property(run(given(example=drawn)(each_example)))


def _run_keeping_the_property(test) -> None:
    """Like the compressor kit's runner, but a failure that does not replay keeps its property name."""
    try:
        _run(test)
    except LMOContractError:
        raise
    except AssertionError as exc:
        cause = exc.__cause__
        found = [e for e in getattr(cause, "exceptions", ()) if isinstance(e, LMOContractError)]
        if not found:
            raise
        raise LMOContractError(found[0].property, f"{found[0]} (and it did not replay: the LMO's output "
                                                  "varies between identical calls)") from exc


def _resolve(lmo: Any) -> LMO:
    if isinstance(lmo, LMO):
        return lmo
    if isinstance(lmo, type) and issubclass(lmo, LMO):
        return lmo()
    from commlmo import registry

    built = registry.build_plugin("lmo", lmo)
    if not isinstance(built, LMO):
        raise TypeError(f"{lmo!r} did not build an LMO (got {type(built).__name__})")
    return built


def _shapes(lmo: LMO, shapes: Any, max_numel: int) -> tuple[list[tuple[int, ...]], st.SearchStrategy]:
    if isinstance(shapes, st.SearchStrategy):
        return [s for n in (2, 1, 0, 4) if lmo.capabilities.accepts(n) for s in _EXPLICIT_SHAPES[n]], shapes
    if shapes is not None:
        listed = [tuple(int(d) for d in s) for s in shapes]
        if not listed:
            raise ValueError("check_lmo: shapes is empty")
        return listed, st.sampled_from(listed)
    ranks = [n for n in (0, 1, 2, 4) if lmo.capabilities.accepts(n)]
    if not ranks:
        raise ValueError(f"check_lmo: {lmo!r} accepts none of the ranks 0, 1, 2, 4; pass shapes=")
    explicit = [s for n in ranks for s in _EXPLICIT_SHAPES[n] if math.prod(s) <= max_numel]
    options = []
    if 0 in ranks:
        options.append(st.just(()))
    if any(n > 0 for n in ranks):
        options.append(shape_strategy(ndims=[n for n in ranks if n > 0], max_numel=max_numel))
    return explicit, st.one_of(options)


# ---------------------------------------------------------------------- helpers


def _other(x: Tensor, seed: int, shape: tuple[int, ...] | None = None) -> Tensor:
    gen = torch.Generator().manual_seed(seed + 101)
    shape = tuple(x.shape) if shape is None else shape
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(x.dtype).to(x.device)


def _another_shape(lmo: LMO, shape: tuple[int, ...]) -> tuple[int, ...]:
    if not shape:
        return shape
    bigger = (shape[0] + 1, *shape[1:])
    return bigger if lmo.capabilities.accepts(len(bigger)) else shape


def _inner(a: Tensor, b: Tensor) -> float:
    return float((a.double() * b.double()).sum())


def _number(x: Any) -> float:
    return float(x.detach().double().cpu()) if isinstance(x, Tensor) else float(x)


def _max_abs(x: Tensor) -> float:
    return float(x.double().abs().max()) if x.numel() else 0.0


class _Check:
    """One example: the LMO, its tolerance and how to report a broken promise."""

    def __init__(self, lmo: LMO, example: TensorExample, tol: LMOTolerance, seed: int):
        self.lmo, self.example, self.tol, self.seed = lmo, example, tol, seed
        self.eps = torch.finfo(example.dtype).eps

    def fail(self, prop: str, what: str) -> None:
        kind = getattr(self.lmo, "kind", type(self.lmo).__name__)
        raise LMOContractError(prop, f"check_lmo: property {prop!r} broken by the {kind} LMO {self.lmo!r} "
                                     f"on {self.example!r} (generator seed {self.seed}): {what}")

    def expect(self, ok: Any, prop: str, what: str) -> None:
        if not bool(ok):
            self.fail(prop, what)

    def direction(self, g: Tensor) -> Tensor:
        return self.lmo.direction(g, generator=_gen(self.seed, g.device))

    def close(self, a: Tensor, b: Tensor) -> tuple[bool, float]:
        """Equal up to ``agreement * max|D|`` plus one rounding of each to the dtype."""
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, math.inf
        a64, b64 = a.double(), b.double()
        if not torch.equal(torch.isfinite(a64), torch.isfinite(b64)):
            return False, math.inf
        finite = torch.isfinite(a64)
        a64, b64 = torch.where(finite, a64, 0.0), torch.where(finite, b64, 0.0)
        diff = (a64 - b64).abs()
        bound = self.tol.agreement * max(_max_abs(a64), _max_abs(b64)) + self.eps * (a64.abs() + b64.abs())
        return bool((diff <= bound + 1e-300).all()), _max_abs(diff)


# ---------------------------------------------------------------------- per example


def _check_example(lmo: LMO, example: TensorExample, tol: LMOTolerance, seed: int) -> None:
    c = _Check(lmo, example, tol, seed)
    g = example.make()
    before = g.clone()

    d = c.direction(g)
    c.expect(isinstance(d, Tensor), "shape", f"direction() returned {type(d).__name__}, not a tensor")
    c.expect(_same_bits(g, before), "no-mutation", "direction() changed its input")
    c.expect((d.shape, d.dtype, d.device) == (g.shape, g.dtype, g.device), "shape",
             f"direction() gave {tuple(d.shape)} {d.dtype} on {d.device}, not {tuple(g.shape)} {g.dtype} on {g.device}")
    c.expect(torch.isfinite(d).all(), "finite", "direction() of a finite tensor has NaN or Inf entries")
    c.expect(_same_bits(d, c.direction(g)), "determinism",
             "two calls with the generator in the same state gave different directions")

    d_before = d.clone()
    norm_d = _number(lmo.norm(d))
    c.expect(_same_bits(d, d_before), "no-mutation", "norm() changed its input")
    dual = _number(lmo.dual_norm(g))
    c.expect(_same_bits(g, before), "no-mutation", "dual_norm() changed its input")
    c.expect(math.isfinite(norm_d) and norm_d >= 0, "finite",
             f"norm(direction(G)) = {norm_d!r}, not a finite number >= 0")
    c.expect(math.isfinite(dual) and dual >= 0, "finite",
             f"dual_norm(G) = {dual!r} for a finite G, not a finite number >= 0 (overflow or underflow inside?)")

    # norm ball, up to the rounding of D to the input dtype
    rounding = c.eps * _number(lmo.norm(d.abs())) if d.numel() else 0.0
    limit = tol.max_norm * (1 + tol.rtol) + rounding
    c.expect(norm_d <= limit, "norm-ball", f"norm(direction(G)) = {norm_d:.6g} > {limit:.6g} "
             f"(declared max_norm {tol.max_norm:g}; {'exact' if tol.exact else 'approximate'} LMO)")

    # duality
    inner = _inner(g, d)
    mass = float((g.double().abs() * d.double().abs()).sum())  # <|G|, |D|>: what rounding D can move
    slack = c.eps * mass + tol.rtol * (dual + mass) + 1e-300
    fro = float(g.double().norm())
    if tol.exact:
        c.expect(abs(inner - dual) <= slack, "duality",
                 f"<G, direction(G)> = {inner:.9g} but dual_norm(G) = {dual:.9g} (|difference| "
                 f"{abs(inner - dual):.3g} > tolerance {slack:.3g}; an exact LMO must attain the dual norm)")
    else:
        lo, hi = tol.duality
        c.expect(inner <= hi * dual + slack, "duality",
                 f"<G, direction(G)> = {inner:.6g} exceeds {hi:g} * dual_norm(G) = {hi * dual:.6g}")
        if fro >= tol.min_norm:
            c.expect(inner >= lo * dual - slack, "duality",
                     f"<G, direction(G)> = {inner:.6g} is below the declared {lo:g} * dual_norm(G) = {lo * dual:.6g}")

    _check_optimality(c, g, inner, dual, slack)
    if tol.exact or fro >= tol.min_norm:
        _check_scale(c, g, d)
    _check_directions(c, g)


def _check_optimality(c: _Check, g: Tensor, inner: float, dual: float, slack: float) -> None:
    best = max(inner, dual) if c.tol.exact else dual
    candidates = {"a random tensor R": _other(g, c.seed),
                  "sign(G)": torch.where(g < 0, -1.0, 1.0).to(g.dtype),
                  "G itself": g}
    for label, r in candidates.items():
        norm_r = _number(c.lmo.norm(r))
        if not math.isfinite(norm_r) or norm_r <= 0:
            continue
        value = _inner(g, r) / norm_r
        allowed = best + slack + c.tol.rtol * abs(value)
        c.expect(value <= allowed, "optimality",
                 f"{label}, scaled into the ball (norm {norm_r:.6g}), reaches <G, R>/norm(R) = {value:.9g} > "
                 f"{allowed:.9g} = {'<G, direction(G)>' if c.tol.exact else 'dual_norm(G)'} + tolerance: "
                 "direction(G) is not the maximiser, or dual_norm/norm are not dual to each other")


def _check_scale(c: _Check, g: Tensor, d: Tensor) -> None:
    for factor in _SCALES:
        scaled = g * factor
        if not bool(torch.isfinite(scaled).all()) or not _same_bits(scaled / factor, g):
            continue  # c G over- or underflows in this dtype: not an exact rescaling
        ok, gap = c.close(c.direction(scaled), d)
        c.expect(ok, "scale-invariance",
                 f"direction({factor:g} * G) differs from direction(G) (max |difference| {gap:.3g})")


def _check_directions(c: _Check, g: Tensor) -> None:
    k = _other(g, c.seed + 1, _another_shape(c.lmo, tuple(g.shape)))
    h = _other(g, c.seed + 2)
    inputs = [g, k, h, g]
    saved = [x.clone() for x in inputs]
    gen = _gen(c.seed, g.device)
    want = [c.lmo.direction(x, generator=gen) for x in inputs]
    got = c.lmo.directions(inputs, generator=_gen(c.seed, g.device))
    c.expect(all(_same_bits(x, s) for x, s in zip(inputs, saved)), "no-mutation", "directions() changed an input")
    c.expect(isinstance(got, list) and len(got) == len(inputs), "directions",
             f"directions() of {len(inputs)} tensors returned {type(got).__name__} of length "
             f"{len(got) if hasattr(got, '__len__') else '?'}")
    for i, (a, b) in enumerate(zip(got, want)):
        ok, gap = c.close(a, b) if isinstance(a, Tensor) else (False, math.inf)
        c.expect(ok, "directions", f"directions([G, K, H, G])[{i}] differs from direction() of that tensor "
                 f"(shape {tuple(inputs[i].shape)}; max |difference| {gap:.3g})")
