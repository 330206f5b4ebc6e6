r"""The compressor contract kit: ``check_compressor`` tests a compressor against what it declares.

Run it on your own compressor from your test suite::

    from commlmo.testing import check_compressor

    def test_my_compressor_keeps_its_contract():
        check_compressor(MyCompressor(k=0.1))                  # an instance,
        check_compressor({"kind": "mine", "k": 0.1})           # a config of an installed plugin,
        check_compressor("mine", max_examples=50)              # or a registered name

Every value pattern of :mod:`commlmo.testing.strategies` (zeros, signed zeros,
constants, sparse, mixed scales, tiny and huge values...) runs once per dtype
(float32, bfloat16, float16) as an explicit example on odd 1-D, 2-D and 4-D
shapes; then hypothesis explores ``max_examples`` more, with a fixed seed.  A
failure raises ``AssertionError`` naming the compressor, the example (one line
that rebuilds it) and the broken promise.  On every example:

* ``compress`` and ``decompress`` never change their input; the round trip
  keeps shape, dtype and device and decodes finite input to finite values;
* wire tensors live on the input's device, ``payload.nbytes`` never exceeds the
  dense size, and (``fixed_size``) equals ``wire_nbytes(shape, dtype)`` (and the
  shapes/dtypes of ``wire_layout`` where the compressor declares one);
* the same generator state gives the same wire bits; a deterministic
  compressor ignores the generator;
* ``ctx`` carries no data: the wire of one call decodes identically with the
  ``ctx`` of a call on other data (for ``shared_randomness``, with the same
  generator state) -- what a rank does with the others' wire tensors;
* ``decompress_add_`` equals ``target + alpha * decompress``; ``summable``
  payloads decode their elementwise sum to the sum of decodes; ``sign_bits``
  wires are the packed sign bits (bit 1 = negative, eight per byte);
* contractive (deterministic): ``||C(x) - x||^2 <= (1 - alpha)||x||^2 + rtol ||x||^2``;
  contractive or unbiased: ``C(0) = 0``;
* NaN, +Inf and -Inf raise ``ValueError`` (or ``ArithmeticError``) saying so.

Statistical checks (unbiased, and stochastic contractive compressors) run on
``statistical_examples`` nonzero examples with ``N`` seeded draws
``C_1..C_N`` of ``C(x)`` (one generator, advancing as in training):

* mean: for ``u_0 = x/||x||`` and four random unit directions ``u_j``, the sample
  mean of ``<C_i, u_j>`` must lie within ``z* s_j / sqrt(N)`` of ``<x, u_j>``,
  ``s_j`` the sample standard deviation: by the CLT the standardised mean is
  ~N(0, 1) if ``E[C(x)] = x``;
* variance: the sample mean of ``e_i = ||C_i - x||^2 / ||x||^2`` must be at most
  ``omega + z* s_e / sqrt(N)`` (one-sided; ``E[e] <= omega`` is the claim);
* stochastic contraction: the sample mean of ``e_i`` at most
  ``1 - alpha + z* s_e / sqrt(N)`` (EF21's contraction is in expectation).

``z* = Phi^-1(1 - delta / (2 m))`` (Bonferroni over the ``m`` statistics of an
example), so a correct compressor fails an example with probability about
``delta`` (default ``1e-6``) -- the tolerance comes from ``N`` and the data, not
from a hand-picked constant.  The CLT needs events to be seen often: a variance
``omega`` can come from events of probability ``1/(1 + omega)`` (scaled randk),
so ``N >= 30 (1 + omega)``, and likewise ``N >= 30 / alpha``, giving such
events about 30 occurrences (capped at 20 000 draws).  Each side also allows
the rounding of decoded values to the input dtype: ``eps`` times the sample
mean of ``sum_k |C_ik| |u_jk|`` for means, ``eps (1 + 2 omega)`` for the variance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis.errors import Flaky
from torch import Tensor

from commlmo.plugin import Compressor, Payload

from .strategies import DTYPES, PATTERNS, TensorExample, tensor_examples

__all__ = ["check_compressor"]

_DIRECTIONS = 4  # random projections in the mean test, besides x itself
_MAX_DRAWS = 20_000


@dataclass(frozen=True)
class _Options:
    samples: int
    delta: float
    rtol: float | None
    seed: int


def check_compressor(
    compressor: Compressor | type[Compressor] | str | Any,
    *,
    max_examples: int = 25,
    statistical_examples: int = 3,
    samples: int = 400,
    delta: float = 1e-6,
    dtypes: Sequence[torch.dtype] = DTYPES,
    max_numel: int = 1024,
    statistical_max_numel: int = 256,
    rtol: float | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> None:
    """Check that ``compressor`` keeps its declared contract; raise ``AssertionError`` if not.

    ``compressor`` is an instance, a class (built with its default config), a
    config mapping or :class:`~commlmo.plugin.PluginConfig`, or a registered name.
    ``rtol`` is the relative slack of the contraction inequality (default
    ``2 eps(dtype) + 64 eps(float32)``: rounding of decoded values to the input
    dtype, plus float32 arithmetic inside the compressor).  See the module
    docstring for every check and how the statistical tolerances are derived.
    """
    comp = _resolve(compressor)
    opts = _Options(samples=samples, delta=delta, rtol=rtol, seed=seed)
    run = settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))

    def each_example(example: TensorExample) -> None:
        _check_example(comp, example, opts)

    strategy = tensor_examples(dtypes=dtypes, max_numel=max_numel, device=device)
    _run(_with_examples(run(given(example=strategy)(each_example)), _explicit(dtypes, PATTERNS, device)))
    caps = comp.capabilities
    if statistical_examples and (caps.unbiased or (caps.contractive and caps.stochastic)):
        nonzero = [p for p in PATTERNS if p != "zeros"]

        def statistics(example: TensorExample) -> None:
            _check_statistics(comp, example, opts)

        strategy = tensor_examples(dtypes=dtypes, patterns=nonzero, max_numel=statistical_max_numel, device=device)
        test = settings(run, max_examples=statistical_examples)(given(example=strategy)(statistics))
        _run(_with_examples(test, _explicit(dtypes, ("normal", "signed_zeros", "huge"), device)))


def _explicit(dtypes: Sequence[torch.dtype], patterns: Sequence[str], device: str) -> list[TensorExample]:
    """Every (pattern, dtype) once, on odd 1-D, 2-D and 4-D shapes, before hypothesis explores."""
    shapes = [(13,), (6, 7), (3, 2, 3, 3), (1,), (37, 5)]
    cases = [(p, d) for p in patterns for d in dtypes]
    return [TensorExample(shapes[i % len(shapes)], d, p, seed=i, device=device) for i, (p, d) in enumerate(cases)]


def _with_examples(test, examples: list[TensorExample]):
    for ex in reversed(examples):
        test = example(example=ex)(test)
    return test


def _run(test) -> None:
    """Run a hypothesis test; a failure that does not replay (a nondeterministic compressor)
    still surfaces as the ``AssertionError`` that names the broken promise."""
    try:
        test()
    except Flaky as exc:
        failures = [e for e in getattr(exc, "exceptions", ()) if isinstance(e, AssertionError)]
        if not failures:
            raise
        raise AssertionError(f"{failures[0]} (and it did not replay: the compressor's output varies between "
                             "identical calls)") from exc


def _resolve(compressor: Any) -> Compressor:
    if isinstance(compressor, Compressor):
        return compressor
    if isinstance(compressor, type) and issubclass(compressor, Compressor):
        return compressor()
    from commlmo import registry

    built = registry.build_plugin("compressor", compressor)
    if not isinstance(built, Compressor):
        raise TypeError(f"{compressor!r} did not build a Compressor (got {type(built).__name__})")
    return built


# ---------------------------------------------------------------------- helpers


def _expect(ok: Any, comp: Compressor, example: TensorExample, what: str) -> None:
    if not bool(ok):
        raise AssertionError(f"{comp.kind} compressor {comp!r} on {example!r}: {what}")


def _gen(seed: int, device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (tells -0.0 from 0.0, NaN equals itself)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
        a, b = a.contiguous().view(as_int), b.contiguous().view(as_int)
    return torch.equal(a.cpu(), b.cpu())


def _same_wire(p: Payload, q: Payload) -> bool:
    return len(p.wire) == len(q.wire) and all(_same_bits(a, b) for a, b in zip(p.wire, q.wire))


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _rtol(opts: _Options, dtype: torch.dtype) -> float:
    return opts.rtol if opts.rtol is not None else 2 * _eps(dtype) + 64 * _eps(torch.float32)


def _other(x: Tensor, seed: int) -> Tensor:
    """Different data of the same shape, dtype and device."""
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(x.shape, generator=gen, dtype=torch.float64) * 3).to(x.dtype).to(x.device)


# ---------------------------------------------------------------------- per example


def _check_example(comp: Compressor, example: TensorExample, opts: _Options) -> None:
    x = example.make()
    caps = comp.capabilities

    def expect(ok: Any, what: str) -> None:
        _expect(ok, comp, example, what)

    before = x.clone()
    payload = comp.compress(x, generator=_gen(opts.seed, x.device))
    expect(_same_bits(x, before), "compress() changed its input")
    expect(isinstance(payload, Payload), f"compress() returned {type(payload).__name__}, not a Payload")
    _check_wire(comp, payload, x, expect)

    y = comp.decompress(payload)
    expect(isinstance(y, Tensor), f"decompress() returned {type(y).__name__}")
    expect((y.shape, y.dtype, y.device) == (x.shape, x.dtype, x.device),
           f"round trip gave {tuple(y.shape)} {y.dtype} on {y.device}, not {tuple(x.shape)} {x.dtype} on {x.device}")
    expect(_same_bits(x, before), "decompress() changed the input (a wire tensor aliases it?)")
    expect(torch.isfinite(y).all(), "decoded non-finite values from finite input")

    again = comp.compress(x, generator=_gen(opts.seed, x.device))
    expect(_same_wire(payload, again), "the same generator state gave different wire tensors")
    if not caps.stochastic:
        expect(_same_wire(payload, comp.compress(x, generator=None)),
               "declared deterministic (stochastic=False), but generator=None changed the wire")
        expect(_same_wire(payload, comp.compress(x, generator=_gen(opts.seed + 7, x.device))),
               "declared deterministic (stochastic=False), but another generator state changed the wire")

    _check_ctx_and_sum(comp, payload, x, y, opts, expect)
    _check_apply(comp, payload, x, y, expect)
    if caps.sign_bits:
        _check_sign_bits(payload, x, expect)
    _check_contraction(comp, x, y, opts, expect)
    _check_non_finite(comp, x, opts, expect)


def _check_wire(comp: Compressor, payload: Payload, x: Tensor, expect) -> None:
    wire = payload.wire
    expect(isinstance(wire, tuple) and all(isinstance(w, Tensor) for w in wire),
           "payload.wire must be a tuple of tensors")
    expect(all(w.device == x.device for w in wire), "a wire tensor is on another device than the input")
    dense = x.numel() * x.element_size()
    expect(payload.nbytes <= dense, f"wire has {payload.nbytes} bytes, more than the dense {dense}")
    if not comp.capabilities.fixed_size:
        return
    try:
        declared = comp.wire_nbytes(x.shape, x.dtype)
    except NotImplementedError:
        declared = None
    expect(declared is not None, "fixed_size compressors must implement wire_nbytes(shape, dtype)")
    expect(declared == payload.nbytes,
           f"measured {payload.nbytes} wire bytes but wire_nbytes(shape, dtype) declares {declared}")
    layout = getattr(comp, "wire_layout", None)
    if callable(layout):
        got = tuple((tuple(w.shape), w.dtype) for w in wire)
        want = tuple((tuple(s), d) for s, d in layout(x.shape, x.dtype))
        expect(got == want, f"wire tensors {got} differ from the declared wire_layout {want}")


def _check_ctx_and_sum(comp: Compressor, payload: Payload, x: Tensor, y: Tensor, opts: _Options, expect) -> None:
    caps = comp.capabilities
    other_x = _other(x, opts.seed)
    other_seed = opts.seed if caps.shared_randomness else opts.seed + 1
    other = comp.compress(other_x, generator=_gen(other_seed, x.device))
    expect([(w.shape, w.dtype) for w in other.wire] == [(w.shape, w.dtype) for w in payload.wire]
           or not caps.fixed_size, "fixed_size, yet wire shapes changed with the data")
    swapped = comp.decompress(Payload(wire=payload.wire, ctx=other.ctx))
    expect(_same_bits(swapped, y),
           "decoding with the ctx of a call on other data changed the result: ctx must hold only "
           "data-independent metadata (ranks decode each other's wire with their own ctx)")
    if not caps.summable:
        return
    if not caps.shared_randomness:
        other = comp.compress(other_x, generator=_gen(opts.seed, x.device))
    total = tuple(a + b for a, b in zip(payload.wire, other.wire))
    got = comp.decompress(Payload(wire=total, ctx=payload.ctx)).double()
    want = y.double() + comp.decompress(other).double()
    tol = 2 * _eps(x.dtype) * (y.double().abs() + comp.decompress(other).double().abs()) + 1e-30
    expect(((got - want).abs() <= tol).all(), "declared summable, but the sum of wires decodes to "
           f"something else than the sum of decodes (max error {float((got - want).abs().max()):.3g})")


def _check_apply(comp: Compressor, payload: Payload, x: Tensor, y: Tensor, expect) -> None:
    gen = torch.Generator().manual_seed(12345)
    target = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype).to(x.device)
    start, alpha = target.clone(), -0.37
    out = comp.decompress_add_(target, payload, alpha=alpha)
    want = start.double() + alpha * y.double()
    tol = 2 * _eps(x.dtype) * (start.double().abs() + abs(alpha) * y.double().abs()) + 1e-30
    expect(out is target, "decompress_add_ must update target in place and return it")
    expect(((target.double() - want).abs() <= tol).all(),
           "decompress_add_(target, payload, alpha) differs from target + alpha * decompress(payload) "
           f"(max error {float((target.double() - want).abs().max()):.3g})")
    expect(_same_bits(comp.decompress(payload), y), "decompress_add_ changed the payload")


def _check_sign_bits(payload: Payload, x: Tensor, expect) -> None:
    n = x.numel()
    expect(len(payload.wire) == 1 and payload.wire[0].dtype == torch.uint8
           and payload.wire[0].numel() == (n + 7) // 8,
           f"sign_bits promises one uint8 tensor of ceil(d/8) = {(n + 7) // 8} bytes")
    packed = payload.wire[0].reshape(-1).cpu()
    bits = ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:n].bool()
    flat = x.reshape(-1).cpu()
    nonzero = flat != 0
    expect(torch.equal(bits[nonzero], flat[nonzero] < 0),
           "sign_bits: bit j of byte i must be 1 exactly when entry 8i+j is negative")


def _check_contraction(comp: Compressor, x: Tensor, y: Tensor, opts: _Options, expect) -> None:
    caps = comp.capabilities
    if caps.contractive:
        alpha = comp.alpha(x.shape)
        expect(isinstance(alpha, (int, float)) and 0 < alpha <= 1,
               f"contractive, but alpha(shape) = {alpha!r} is not in (0, 1]")
    if caps.unbiased:
        omega = comp.omega(x.shape)
        expect(isinstance(omega, (int, float)) and 0 <= omega < math.inf,
               f"unbiased, but omega(shape) = {omega!r} is not a finite number >= 0")
    x64, y64 = x.double(), y.double()
    if (caps.contractive or caps.unbiased) and not bool((x64 != 0).any()):
        expect(not bool((y64 != 0).any()), "C(0) must be 0 for a contractive or unbiased compressor")
    if caps.contractive and not caps.stochastic:
        norm2, err2 = float((x64**2).sum()), float(((y64 - x64) ** 2).sum())
        bound = (1 - alpha) * norm2 + _rtol(opts, x.dtype) * norm2
        expect(err2 <= bound, f"||C(x) - x||^2 = {err2:.6g} exceeds (1 - alpha)||x||^2 = "
               f"{(1 - alpha) * norm2:.6g} (alpha = {alpha:.6g}, ||x||^2 = {norm2:.6g})")


def _check_non_finite(comp: Compressor, x: Tensor, opts: _Options, expect) -> None:
    if x.numel() == 0:
        return
    for bad in (math.nan, math.inf, -math.inf):
        poisoned = x.clone()
        poisoned.view(-1)[x.numel() // 2] = bad
        try:
            comp.compress(poisoned, generator=_gen(opts.seed, x.device))
        except (ValueError, ArithmeticError) as exc:
            message = str(exc).lower()
            expect(any(w in message for w in ("nan", "inf", "finite")),
                   f"input with {bad} raised {type(exc).__name__}({exc}) without saying NaN/Inf")
        else:
            expect(False, f"input with a {bad} entry was compressed without an error")


# ---------------------------------------------------------------------- statistics


def _check_statistics(comp: Compressor, example: TensorExample, opts: _Options) -> None:
    x = example.make()
    x64 = x.double().reshape(-1)
    norm2 = float((x64**2).sum())
    if norm2 == 0:
        return
    caps = comp.capabilities
    unbiased, contracts = caps.unbiased, caps.contractive and caps.stochastic
    omega = comp.omega(x.shape) if unbiased else None
    alpha = comp.alpha(x.shape) if contracts else None
    draws = opts.samples
    if unbiased:
        draws = max(draws, math.ceil(30 * (1 + omega)))
    if contracts:
        draws = max(draws, math.ceil(30 / alpha))
    draws = min(draws, _MAX_DRAWS)

    gen = _gen(opts.seed, x.device)
    ys = torch.stack([comp.decompress(comp.compress(x, generator=gen)).double().reshape(-1).cpu()
                      for _ in range(draws)])
    x64 = x64.cpu()
    errors = ((ys - x64) ** 2).sum(1) / norm2
    stats = (_DIRECTIONS + 2 if unbiased else 0) + (1 if contracts else 0)
    z = NormalDist().inv_cdf(1 - opts.delta / (2 * stats))
    root_n, eps = math.sqrt(draws), _eps(x.dtype)

    def expect(ok: Any, what: str) -> None:
        _expect(ok, comp, example, f"{what} [N = {draws} draws, z* = {z:.2f}]")

    if unbiased:
        dirs = torch.randn(_DIRECTIONS, x64.numel(), generator=torch.Generator().manual_seed(opts.seed),
                           dtype=torch.float64)
        dirs = torch.cat([x64.unsqueeze(0), dirs])
        dirs = dirs / dirs.norm(dim=1, keepdim=True)
        proj, want = ys @ dirs.T, dirs @ x64
        slack = z * proj.std(0) / root_n + eps * (ys.abs() @ dirs.abs().T).mean(0) + 1e-300
        gap = (proj.mean(0) - want).abs()
        for j in range(len(dirs)):
            expect(gap[j] <= slack[j], f"declared unbiased, but the mean of <C(x), u_{j}> misses <x, u_{j}> by "
                   f"{float(gap[j]):.4g} > tolerance {float(slack[j]):.4g} (u_0 = x/||x||)")
        limit = omega + z * float(errors.std()) / root_n + eps * (1 + 2 * omega)
        expect(float(errors.mean()) <= limit, f"E||C(x) - x||^2 / ||x||^2 estimated {float(errors.mean()):.4g}, "
               f"above the declared omega = {omega:.4g} (tolerance up to {limit:.4g})")
    if contracts:
        limit = 1 - alpha + z * float(errors.std()) / root_n + _rtol(opts, x.dtype)
        expect(float(errors.mean()) <= limit, f"E||C(x) - x||^2 / ||x||^2 estimated {float(errors.mean()):.4g}, "
               f"above 1 - alpha = {1 - alpha:.4g} (tolerance up to {limit:.4g})")
