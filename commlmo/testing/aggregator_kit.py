r"""The aggregator contract kit: ``check_aggregator`` runs an aggregator on simulated workers.

Run it on your own aggregator from your test suite::

    from commlmo.testing import check_aggregator

    def test_my_aggregator_keeps_its_contract():
        check_aggregator(MyAggregator())                          # an instance,
        check_aggregator({"kind": "mine", "trim": 1})             # a config of an installed plugin,
        check_aggregator("mine", uplink={"kind": "sign"})         # or a registered name, with an uplink

``M`` workers (every ``M`` in ``world_sizes``) run as threads of one process and
exchange tensors in memory through real collectives (the simulated ranks of
:func:`commlmo.simulate`; a rendezvous that waits more than ``timeout`` seconds
fails instead of hanging).  Each worker holds random vectors for one group of
parameters of ``shapes`` (a value pattern and a dtype of
:mod:`commlmo.testing.strategies` per example), and every step goes through the
calls :meth:`commlmo.pipeline.GroupRuntime.step` makes, in the same order:
``plan`` once (the transport, from the uplink and the byte-cost model), then per
step ``message`` -> uplink ``compress`` (the group's generator stream) ->
``aggregate``.  ``steps`` steps run per example (state carries over).  Checked:

* ``count``: ``aggregate`` returns a list (or tuple) with one result per parameter;
* ``shape``: each result is a tensor or an :class:`~commlmo.plugin.Encoded`
  aggregate that decodes to the parameter's shape;
* ``dtype``: the decoded result has a floating-point dtype;
* ``finite``: finite inputs give a finite aggregate;
* ``output-sign``: an aggregator that declares ``output_sign`` returns entries in
  {-1, 0, +1} (0 only where a vote abstains);
* ``no-mutation``: ``aggregate`` leaves the messages and the payloads' wire tensors
  bit for bit unchanged (a ``mean`` message *is* the gradient when there is no momentum);
* ``agreement``: every rank holds the same aggregate, bit for bit (and the ranks
  make the same collective calls);
* ``reference``: the aggregate of the first step equals the aggregator's own
  single-process definition, ``reference(messages_per_worker, config)``, a
  ``classmethod`` or ``staticmethod`` of the plugin class that gets, for every
  worker, the list of its messages *as the uplink decodes them* and returns one
  tensor per parameter.  A reference that also takes ``codecs=`` gets the uplink
  compressor of each parameter (EF21 damps unbiased uplinks by ``1/(1+omega)``).
  A NaN entry in the reference means "any value is right here" (a tie broken by
  the shared random stream).  The tolerance is the rounding of a sum of ``M``
  terms in the dtype: ``2 eps(dtype) (sum_i |m_i| + |reference|)`` per entry.  An
  aggregator without ``reference`` is not checked for this, and the kit warns
  (:class:`AggregatorKitNote`) and says so in the report it returns;
* ``state``: state changes only after the collectives succeeded: after a first
  successful step, the kit calls ``aggregate`` again with a communicator whose
  ``k``-th collective raises (every ``k`` up to the number of collectives a step
  makes, on every rank at once), and the per-parameter state must be bit for bit
  what it was, and the failure must propagate; ``message`` must not change the
  state either.  Skipped where a step makes no collective (one worker);
* ``robust``: each attack the aggregator declares in ``capabilities.robust`` (or
  ``robust=``), on ``5`` workers of which ranks 0 and 1 attack (their vectors
  replaced by :func:`commlmo.pipeline.corrupt` before ``message``, as the
  pipeline's adversaries do).  ``amplify``: one vote per worker however loud --
  the attackers sending ``-10 v`` give the same aggregate as the attackers sending
  ``-v``.  ``flip``, ``random``, ``zero``: every coordinate of the aggregate lies
  between the smallest and the largest of the three honest workers' decoded
  messages (what a coordinate-wise median or a vote guarantees against a
  minority).

A failure raises :class:`AggregatorContractError` (an ``AssertionError``) whose
``.property`` names the broken promise and whose message names the plugin, the
uplink, the number of workers, the transport, the shapes, dtype, value pattern
and seed (worker ``r``'s vector ``i`` at step ``s`` is ``TensorExample(shape_i,
dtype, pattern, seed=seed * 7919 + 1009 * s + 101 * r + i).make()``).
"""

from __future__ import annotations

import inspect
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from commlmo.comm import Communicator, simulate
from commlmo.errors import DistributedError
from commlmo.pipeline import Generators, corrupt
from commlmo.plugin import Aggregator, Compressor, Encoded

from .contract import _same_bits
from .strategies import TensorExample

__all__ = [
    "AggregatorContractError", "AggregatorKitNote", "AggregatorReport", "check_aggregator", "PROPERTIES",
    "KNOWN_ATTACKS",
]

#: the properties check_aggregator checks, as named in its errors
PROPERTIES: tuple[str, ...] = (
    "count", "shape", "dtype", "finite", "output-sign", "no-mutation", "agreement", "reference", "state", "robust",
)
#: the attacks a ``capabilities.robust`` may name, and what the kit checks for each
KNOWN_ATTACKS: dict[str, str] = {
    "amplify": "2 of 5 workers sending -10 v give the aggregate of those 2 sending -v (one vote however loud)",
    "flip": "2 of 5 workers sending -v: every coordinate stays within the honest workers' range",
    "random": "2 of 5 workers sending same-norm noise: every coordinate stays within the honest workers' range",
    "zero": "2 of 5 workers sending zeros: every coordinate stays within the honest workers' range",
}
ROBUST_WORLD = 5
ATTACKERS = (0, 1)
DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = ((13,), (6, 7), (3, 2, 3, 3), (1,))
#: uplinks tried, in order, when none is given: the first that ``check_uplink`` accepts
DEFAULT_UPLINKS: tuple[Any, ...] = ("identity", {"kind": "sign", "scale": "mean"}, "sign")


class AggregatorContractError(AssertionError):
    """``check_aggregator`` found a broken promise; ``.property`` names it (one of :data:`PROPERTIES`)."""

    def __init__(self, prop: str, message: str):
        super().__init__(message)
        self.property = prop


class AggregatorKitNote(UserWarning):
    """A check ``check_aggregator`` could not run (e.g. the plugin declares no ``reference``)."""


@dataclass
class AggregatorReport:
    """What ``check_aggregator`` checked and what it skipped (property -> why)."""

    aggregator: str
    uplink: str
    checked: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Example:
    """One group of random per-worker vectors: rebuilds bit for bit from the recipe."""

    world_size: int
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    pattern: str
    seed: int

    def vectors(self, rank: int, step: int) -> list[Tensor]:
        return [TensorExample(shape, self.dtype, self.pattern, seed=self.seed * 7919 + 1009 * step + 101 * rank + i)
                .make() for i, shape in enumerate(self.shapes)]

    def __repr__(self) -> str:
        return (f"{self.world_size} simulated worker(s), shapes {list(self.shapes)}, dtype {self.dtype}, "
                f"pattern {self.pattern!r}, seed {self.seed}")


def check_aggregator(
    aggregator_or_config: Aggregator | type[Aggregator] | str | Any,
    *,
    uplink: Compressor | str | Any | None = None,
    world_sizes: Sequence[int] = (1, 2, 3),
    shapes: Sequence[Sequence[int]] = DEFAULT_SHAPES,
    examples: int = 3,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    patterns: Sequence[str] = ("normal", "mixed_scales", "sparse"),
    steps: int = 2,
    robust: Sequence[str] | None = None,
    seed: int = 0,
    timeout: float = 60.0,
) -> AggregatorReport:
    """Check that an aggregator keeps the aggregator contract; raise :class:`AggregatorContractError` if not.

    ``aggregator_or_config``: an instance, a class (built with its default config), a
    config mapping or ``PluginConfig``, or a registered kind.  ``uplink``: the uplink
    compressor (instance, config or kind); default: the first of ``identity``, scaled
    ``sign`` and ``sign`` that the aggregator's ``check_uplink`` accepts (a given
    uplink it refuses is a ``ValueError``).  Every ``M`` in ``world_sizes`` runs
    ``examples`` examples (the ``e``-th with ``dtypes[e % len]`` and ``patterns[e %
    len]``) of ``steps`` steps each, one group of parameters of ``shapes``.
    ``robust`` overrides the attacks checked (default ``capabilities.robust``).
    Returns an :class:`AggregatorReport`; see the module docstring for the properties.
    """
    agg = _resolve_aggregator(aggregator_or_config)
    up = _resolve_uplink(agg, uplink)
    shapes_t = tuple(tuple(int(d) for d in s) for s in shapes)
    if not shapes_t:
        raise ValueError("check_aggregator: shapes is empty")
    if examples < 1 or steps < 1 or not world_sizes:
        raise ValueError("check_aggregator: examples and steps must be >= 1 and world_sizes non-empty")
    caps = type(agg).capabilities_of(agg.config)
    attacks = tuple(caps.robust if robust is None else robust)
    unknown = [a for a in attacks if a not in KNOWN_ATTACKS]
    if unknown:
        raise ValueError(f"check_aggregator: {agg.kind!r} claims robustness to {unknown}, which the kit cannot "
                         f"check; known attacks: {', '.join(KNOWN_ATTACKS)}")
    report = AggregatorReport(aggregator=repr(agg), uplink=repr(up))
    reference = _reference_of(agg)
    if reference is None:
        why = (f"{type(agg).__name__} declares no reference(messages_per_worker, config); the aggregate was not "
               "compared with a single-process definition")
        report.skipped["reference"] = why
        warnings.warn(f"check_aggregator: {why}", AggregatorKitNote, stacklevel=2)
    state_checked = False

    for m in world_sizes:
        for e in range(examples):
            ex = _Example(int(m), shapes_t, dtypes[e % len(dtypes)], patterns[e % len(patterns)], seed + e)
            c = _Check(agg, up, ex, caps, timeout)
            runs = c.run(steps=steps, inject=True)
            for step, per_rank in enumerate(runs):
                for rank, result in enumerate(per_rank):
                    c.check_outputs(result, step, rank)
                c.check_agreement(per_rank, step)
            if reference is not None:
                c.check_reference(reference, runs[0])
            state_checked |= c.check_state(runs)
    if not state_checked:
        report.skipped["state"] = ("no step made a collective call (one worker only?), so no failure could be "
                                   "injected")
    for attack in attacks:
        ex = _Example(ROBUST_WORLD, shapes_t, dtypes[0], patterns[0], seed)
        _Check(agg, up, ex, caps, timeout).check_robust(attack)
    if not attacks:
        report.skipped["robust"] = "the aggregator declares no robustness (capabilities.robust is empty)"
    report.checked = [p for p in PROPERTIES if p not in report.skipped]
    return report


# ---------------------------------------------------------------------- resolving


def _resolve_aggregator(agg: Any) -> Aggregator:
    if isinstance(agg, Aggregator):
        return agg
    if isinstance(agg, type) and issubclass(agg, Aggregator):
        return agg()
    from commlmo import registry

    built = registry.build_plugin("aggregator", agg)
    if not isinstance(built, Aggregator):
        raise TypeError(f"{agg!r} did not build an Aggregator (got {type(built).__name__})")
    return built


def _build_compressor(c: Any) -> Compressor:
    if isinstance(c, Compressor):
        return c
    if isinstance(c, type) and issubclass(c, Compressor):
        return c()
    from commlmo import registry

    built = registry.build_plugin("compressor", c)
    if not isinstance(built, Compressor):
        raise TypeError(f"{c!r} did not build a Compressor (got {type(built).__name__})")
    return built


def _resolve_uplink(agg: Aggregator, uplink: Any) -> Compressor:
    candidates = DEFAULT_UPLINKS if uplink is None else (uplink,)
    reasons = []
    for candidate in candidates:
        up = _build_compressor(candidate)
        why = type(agg).check_uplink(agg.config, up.kind, up.capabilities)
        if why is None and up.capabilities.downlink_only:
            why = f"{up.kind!r} is a downlink-only compressor"
        if why is None:
            return up
        reasons.append(why)
    if uplink is not None:
        raise ValueError(f"check_aggregator: the uplink {uplink!r} does not fit {agg!r}: {reasons[0]}")
    raise ValueError(f"check_aggregator: none of the default uplinks fits {agg!r} ({'; '.join(reasons)}); "
                     "pass uplink=")


def _reference_of(agg: Aggregator) -> Callable[..., Any] | None:
    ref = getattr(type(agg), "reference", None)
    if ref is None:
        return None
    try:
        params = inspect.signature(ref).parameters
    except (TypeError, ValueError):
        params = {}
    takes_codecs = "codecs" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def call(messages: list[list[Tensor]], config: Any, codecs: list[Compressor]) -> Any:
        return ref(messages, config, codecs=codecs) if takes_codecs else ref(messages, config)

    return call


# ---------------------------------------------------------------------- simulated workers


class _InjectedFailure(DistributedError):
    """The failure the kit's faulty communicator raises in place of a collective."""


class _Tapped(Communicator):
    """A rank's communicator that counts the collectives called and can fail the ``fail_at``-th."""

    def __init__(self, inner: Communicator, fail_at: int | None = None):
        super().__init__()
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.rank, self.world_size = inner.rank, inner.world_size
        self.bytes = inner.bytes
        self.failed: str | None = None

    def _enter(self, name: str, label: str) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            self.failed = f"{name} #{self.calls} ({label})"
            raise _InjectedFailure(f"check_aggregator: simulated failure of collective {self.failed}")

    def all_reduce_sum_(self, t: Tensor, *, label: str, async_op: bool = False) -> Any:
        self._enter("all_reduce_sum_", label)
        return self.inner.all_reduce_sum_(t, label=label, async_op=async_op)

    def all_gather(self, t: Tensor, *, label: str, async_op: bool = False) -> Any:
        self._enter("all_gather", label)
        return self.inner.all_gather(t, label=label, async_op=async_op)

    def all_to_all(self, t: Tensor, *, label: str, async_op: bool = False) -> Any:
        self._enter("all_to_all", label)
        return self.inner.all_to_all(t, label=label, async_op=async_op)

    def all_to_all_v(self, t: Tensor, send: list[int], recv: list[int], *, label: str, async_op: bool = False) -> Any:
        self._enter("all_to_all_v", label)
        return self.inner.all_to_all_v(t, send, recv, label=label, async_op=async_op)

    def all_max_(self, t: Tensor, *, label: str, async_op: bool = False) -> Any:
        self._enter("all_max_", label)
        return self.inner.all_max_(t, label=label, async_op=async_op)


class _Timeout(Exception):
    pass


def _simulate(world_size: int, fn: Callable[[int, Communicator], Any], timeout: float) -> list[Any]:
    """:func:`commlmo.simulate` with a rendezvous that gives up after ``timeout`` seconds (:class:`_Timeout`)."""
    try:
        return simulate(world_size, fn, timeout=timeout)
    except threading.BrokenBarrierError:  # every rank's error was the broken rendezvous: a timeout
        raise _Timeout() from None


@dataclass
class _StepResult:
    """What one rank saw in one step (everything cloned)."""

    count: int | None  # how many results aggregate() returned (None: not a list or tuple)
    returned: str  # the type aggregate() returned
    dense: list[Tensor | None]  # decoded results, cloned (None: neither a tensor nor an Encoded)
    kinds: list[str]  # "tensor", "encoded" or the type name of each result
    decoded: list[Tensor]  # this rank's messages as the uplink decodes them
    mutated: list[str]  # inputs aggregate() changed
    message_changed_state: bool
    calls: int  # collectives called
    injections: list[tuple[str | None, bool, bool, str]] = field(default_factory=list)  # (failed, raised, same, err)


def _clone_state(states: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    return [{k: v.clone() for k, v in s.items()} for s in states]


def _same_state(a: Sequence[dict[str, Tensor]], b: Sequence[dict[str, Tensor]]) -> bool:
    return all(x.keys() == y.keys() and all(_same_bits(x[k], y[k]) for k in x) for x, y in zip(a, b))


def _dense(a: Any) -> tuple[Tensor | None, str]:
    if isinstance(a, Encoded):
        return a.decode().clone(), "encoded"
    if isinstance(a, Tensor):
        return a.detach().clone(), "tensor"
    return None, type(a).__name__


class _Check:
    """One example: the aggregator, its uplink, the workers' data and how to report a broken promise."""

    def __init__(self, agg: Aggregator, uplink: Compressor, ex: _Example, caps: Any, timeout: float):
        self.agg, self.uplink, self.ex, self.caps, self.timeout = agg, uplink, ex, caps, timeout
        payload = 0
        for shape in ex.shapes:
            try:
                payload += uplink.wire_nbytes(torch.Size(shape), ex.dtype)
            except (NotImplementedError, ValueError):
                payload += math.prod(shape) * torch.empty((), dtype=ex.dtype).element_size()
        entries = sum(math.prod(s) for s in ex.shapes)
        self.transport = agg.plan(uplink, world_size=ex.world_size, payload_bytes=max(payload, 1),
                                  dense_entries=entries)

    # -- reporting
    def fail(self, prop: str, what: str) -> None:
        raise AggregatorContractError(
            prop, f"check_aggregator: property {prop!r} broken by the {self.agg.kind} aggregator {self.agg!r} "
                  f"with uplink {self.uplink!r}, transport {self.transport!r}, on {self.ex!r}: {what}")

    def expect(self, ok: Any, prop: str, what: str) -> None:
        if not bool(ok):
            self.fail(prop, what)

    # -- running
    def _one_step(self, comm: Communicator, gens: Generators, vectors: list[Tensor],
                  states: list[dict[str, Tensor]], step: int = 0) -> _StepResult:
        """``message -> compress -> aggregate``, as GroupRuntime.step calls them."""
        codecs = [self.uplink] * len(vectors)
        before = _clone_state(states)
        messages = [self.agg.message(v, s) for v, s in zip(vectors, states)]
        message_changed = not _same_state(before, states)
        up = gens.at(step, "uplink", range(len(vectors)))
        payloads = [c.compress(msg, generator=up.for_(c, j)) for j, (c, msg) in enumerate(zip(codecs, messages))]
        decoded = [c.decompress(p).clone() for c, p in zip(codecs, payloads)]
        saved_messages = [msg.clone() for msg in messages]
        saved_wires = [tuple(w.clone() for w in p.wire) for p in payloads]
        tapped = comm if isinstance(comm, _Tapped) else _Tapped(comm)
        out = self.agg.aggregate(payloads, messages, states, codecs=codecs, comm=tapped,
                                 generators=gens.at(step, "aggregate", range(len(vectors))),
                                 transport=self.transport, label="kit")
        mutated = [f"message {i}" for i, (msg, s) in enumerate(zip(messages, saved_messages))
                   if not _same_bits(msg, s)]
        mutated += [f"wire tensor {j} of payload {i}" for i, (p, s) in enumerate(zip(payloads, saved_wires))
                    for j, (w, ws) in enumerate(zip(p.wire, s)) if not _same_bits(w, ws)]
        listed = isinstance(out, (list, tuple))
        dense, kinds = [], []
        for a in (out if listed else ()):
            d, kind = _dense(a)
            dense.append(d)
            kinds.append(kind)
        return _StepResult(len(out) if listed else None, type(out).__name__, dense, kinds, decoded, mutated,
                           message_changed, tapped.calls)

    def _simulate(self, fn: Callable[[int, Communicator], Any]) -> list[Any]:
        try:
            return _simulate(self.ex.world_size, fn, self.timeout)
        except _Timeout:
            self.fail("agreement", f"a simulated rank waited more than {self.timeout:g} s in a collective: the "
                      "ranks did not make the same collective calls")
        except Exception as exc:
            exc.add_note(f"(in check_aggregator: {self.agg!r} with uplink {self.uplink!r}, transport "
                         f"{self.transport!r}, on {self.ex!r})")
            raise
        raise AssertionError("unreachable")

    def _fresh(self, rank: int) -> tuple[Generators, list[dict[str, Tensor]]]:
        gens = Generators(seed=self.ex.seed, group_index=0, rank=rank, device=torch.device("cpu"))
        return gens, [self.agg.init_state(torch.zeros(s, dtype=self.ex.dtype)) for s in self.ex.shapes]

    def run(self, *, steps: int, inject: bool) -> list[list[_StepResult]]:
        """``[step][rank]`` results.  After the first step, failures are injected at every collective
        of a step (recorded with step 1, or with step 0 when only one step runs)."""
        ex = self.ex

        def worker(rank: int, comm: Communicator) -> list[_StepResult]:
            gens, states = self._fresh(rank)
            results: list[_StepResult] = []
            for step in range(steps):
                injections = []
                if step == 1 and inject and results[0].calls:
                    injections = self._inject(comm, gens, ex.vectors(rank, 1), states, results[0].calls)
                results.append(self._one_step(comm, gens, ex.vectors(rank, step), states, step))
                results[-1].injections = injections
            if steps == 1 and inject and results[0].calls:
                results[0].injections = self._inject(comm, gens, ex.vectors(rank, 1), states, results[0].calls)
            return results

        per_rank = self._simulate(worker)
        return [[per_rank[r][s] for r in range(ex.world_size)] for s in range(steps)]

    def _inject(self, comm: Communicator, gens: Generators, vectors: list[Tensor],
                states: list[dict[str, Tensor]], calls: int) -> list[tuple[str | None, bool, bool, str]]:
        found = []
        for k in range(1, calls + 1):
            before = _clone_state(states)
            faulty = _Tapped(comm, fail_at=k)
            raised, err = False, ""
            try:
                self._one_step(faulty, gens, vectors, states)
            except _InjectedFailure:
                raised = True
            except threading.BrokenBarrierError:
                raise
            except Exception as exc:  # noqa: BLE001 - the aggregator may wrap the failure
                raised, err = True, f"{type(exc).__name__}: {exc}"
            found.append((faulty.failed, raised, _same_state(before, states), err))
            if not (raised and found[-1][2]):
                break  # the state is now off: later injections would not say more
        return found

    # -- per-rank checks
    def check_outputs(self, r: _StepResult, step: int, rank: int) -> None:
        where = f"step {step}, rank {rank}: "
        n = len(self.ex.shapes)
        self.expect(r.count is not None, "count",
                    where + f"aggregate() returned a {r.returned}, not a list of {n} results")
        self.expect(r.count == n, "count", where + f"aggregate() returned {r.count} results for {n} parameters")
        for i, (d, kind, shape) in enumerate(zip(r.dense, r.kinds, self.ex.shapes)):
            self.expect(d is not None, "shape",
                        where + f"result {i} is a {kind}, not a tensor or an Encoded aggregate")
            self.expect(tuple(d.shape) == shape, "shape",
                        where + f"result {i} ({kind}) has shape {tuple(d.shape)}, the parameter {shape}")
            self.expect(d.is_floating_point(), "dtype",
                        where + f"result {i} ({kind}) has dtype {d.dtype}, not a floating-point dtype")
            self.expect(torch.isfinite(d).all(), "finite",
                        where + f"result {i} ({kind}) has NaN or Inf entries although every vector was finite")
            if self.caps.output_sign:
                bad = ~((d == 1) | (d == -1) | (d == 0))
                self.expect(not bool(bad.any()), "output-sign",
                            where + f"declares output_sign, but result {i} has entries other than -1, 0, +1 "
                            f"(e.g. {float(d[bad].reshape(-1)[0]) if bool(bad.any()) else 0:.6g})")
        self.expect(not r.mutated, "no-mutation", where + f"aggregate() changed its inputs: {', '.join(r.mutated)}")
        self.expect(not r.message_changed_state, "state", where + "message() changed the state")

    def check_agreement(self, per_rank: Sequence[_StepResult], step: int) -> None:
        calls = [r.calls for r in per_rank]
        self.expect(len(set(calls)) == 1, "agreement",
                    f"step {step}: the ranks made different numbers of collective calls: {calls}")
        first = per_rank[0]
        for rank, r in enumerate(per_rank[1:], start=1):
            for i, (a, b) in enumerate(zip(first.dense, r.dense)):
                if not _same_bits(a, b):
                    gap = float((a.double() - b.double()).abs().max()) if a.shape == b.shape else math.inf
                    self.fail("agreement", f"step {step}: result {i} on rank {rank} differs from rank 0's "
                              f"(max |difference| {gap:.3g}); an aggregate must be identical on every rank")

    def check_reference(self, reference: Callable[..., Any], per_rank: Sequence[_StepResult]) -> None:
        messages = [[m.clone() for m in r.decoded] for r in per_rank]
        try:
            want = reference(messages, self.agg.config, [self.uplink] * len(self.ex.shapes))
        except Exception as exc:
            exc.add_note(f"(in check_aggregator: {type(self.agg).__name__}.reference() on {self.ex!r})")
            raise
        length = f" of length {len(want)}" if hasattr(want, "__len__") else ""
        self.expect(isinstance(want, (list, tuple)) and len(want) == len(self.ex.shapes), "reference",
                    f"reference() returned {type(want).__name__}{length}, not one tensor per parameter")
        eps = torch.finfo(self.ex.dtype).eps
        got = per_rank[0].dense
        for i, (g, w) in enumerate(zip(got, want)):
            self.expect(isinstance(w, Tensor) and tuple(w.shape) == tuple(g.shape), "reference",
                        f"reference() result {i} is not a tensor of shape {tuple(g.shape)}")
            g64, w64 = g.double(), w.double()
            total = torch.stack([m[i].double().abs() for m in messages]).sum(0)
            free = torch.isnan(w64)
            w64 = torch.where(free, g64, w64)
            slack = 2 * eps * (total + w64.abs()) + 1e-300
            diff = (g64 - w64).abs()
            bad = diff > slack
            if bool(bad.any()):
                j = int(bad.reshape(-1).nonzero()[0])
                self.fail("reference", f"the first step's result {i} differs from {type(self.agg).__name__}."
                          f"reference() of the decoded messages: entry {j} is {float(g64.reshape(-1)[j]):.9g}, "
                          f"the reference {float(w64.reshape(-1)[j]):.9g} (max |difference| "
                          f"{float(diff.max()):.3g}, tolerance there {float(slack.reshape(-1)[j]):.3g})")

    def check_state(self, runs: Sequence[Sequence[_StepResult]]) -> bool:
        checked = False
        for step, per_rank in enumerate(runs):
            for rank, r in enumerate(per_rank):
                for failed, raised, same, err in r.injections:
                    checked = True
                    self.expect(raised, "state", f"rank {rank}: collective {failed} failed, yet aggregate() "
                                "returned normally; a failed collective must propagate")
                    self.expect(same, "state", f"rank {rank}: aggregate() changed the state although collective "
                                f"{failed} failed{' (' + err + ')' if err else ''}; state may change only after "
                                "every collective succeeded")
        return checked

    # -- robustness
    def check_robust(self, attack: str) -> None:
        ex = self.ex

        def attacked(mode: str) -> Callable[[int, Communicator], _StepResult]:
            def worker(rank: int, comm: Communicator) -> _StepResult:
                gens, states = self._fresh(rank)
                vectors = ex.vectors(rank, 0)
                if rank in ATTACKERS:
                    noise = gens.at(0, "adversary", range(len(vectors)))
                    vectors = [corrupt(v, mode, generator=noise.param(j, shared=False))  # type: ignore[arg-type]
                               for j, v in enumerate(vectors)]
                return self._one_step(comm, gens, vectors, states)
            return worker

        runs = self._simulate(attacked(attack))
        for rank, r in enumerate(runs):
            self.check_outputs(r, 0, rank)
        self.check_agreement(runs, 0)
        result = runs[0].dense
        eps = torch.finfo(ex.dtype).eps
        if attack == "amplify":
            quiet = self._simulate(attacked("flip"))[0].dense
            for i, (loud, soft) in enumerate(zip(result, quiet)):
                a, b = loud.double(), soft.double()
                scale = max(float(a.abs().max()), float(b.abs().max())) if a.numel() else 0.0
                gap = float((a - b).abs().max()) if a.numel() else 0.0
                self.expect(gap <= 4 * eps * scale, "robust",
                            f"declares robustness to 'amplify', but ranks {list(ATTACKERS)} of {ex.world_size} "
                            f"sending -10 v instead of -v change result {i} (max |difference| {gap:.3g}): a louder "
                            "message must not weigh more")
            return
        honest = [r.decoded for rank, r in enumerate(runs) if rank not in ATTACKERS]
        for i, got in enumerate(result):
            stack = torch.stack([h[i].double() for h in honest])
            lo, hi = stack.amin(0), stack.amax(0)
            slack = 2 * eps * torch.maximum(lo.abs(), hi.abs()) + 1e-300
            g = got.double()
            bad = (g < lo - slack) | (g > hi + slack)
            if bool(bad.any()):
                j = int(bad.reshape(-1).nonzero()[0])
                self.fail("robust", f"declares robustness to {attack!r}, but with ranks {list(ATTACKERS)} of "
                          f"{ex.world_size} attacking, entry {j} of result {i} is {float(g.reshape(-1)[j]):.6g}, "
                          f"outside the honest workers' range [{float(lo.reshape(-1)[j]):.6g}, "
                          f"{float(hi.reshape(-1)[j]):.6g}]")
