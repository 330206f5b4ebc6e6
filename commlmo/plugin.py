r"""Plugin contracts: the typed interfaces every LMO, compressor, aggregator and
learning-rate rule implements.

A plugin is a small class with

* ``Config`` -- a frozen pydantic model with a ``kind`` literal and
  ``extra="forbid"``; the plugin is built as ``cls(config)``;
* ``capabilities`` -- what it promises, as data, so that incompatible
  combinations are rejected when a config loads (never mid-step);
* the family's methods below, with tensors in and tensors out.

Plugin state (momentum, error-feedback buffers...) is never kept on the plugin
object: it lives in tensors that the optimizer stores in ``optimizer.state`` so
``state_dict()`` saves and restores it.

Sign convention, stated once: :meth:`LMO.direction` returns
``D = argmax_{||D|| <= 1} <G, D>`` (so ``<G, D> = ||G||_*``, the dual norm), and
the parameter update *subtracts* ``lr * scale * D``.  In the usual notation of
the LMO papers (Pethick et al. 2025, "Training Deep Learning Models with Norm-Constrained
LMOs"), ``lmo(G) = argmin_{||D|| <= 1} <G, D> = -direction(G)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

__all__ = [
    "PluginConfig",
    "Plugin",
    "LMOCapabilities",
    "LMO",
    "LRRule",
    "Payload",
    "Encoded",
    "CompressorCapabilities",
    "Compressor",
    "AggregatorCapabilities",
    "Aggregator",
    "RuleCapabilities",
    "Rule",
    "FAMILIES",
    "as_matrix",
    "finite_inputs",
    "inputs_known_finite",
    "host_reads_free",
    "as_if_on_accelerator",
]

#: plugin family -> entry-point group
FAMILIES: dict[str, str] = {
    "lmo": "commlmo.lmos",
    "compressor": "commlmo.compressors",
    "aggregator": "commlmo.aggregators",
    "lr_rule": "commlmo.lr_rules",
    "rule": "commlmo.rules",
}


class PluginConfig(BaseModel):
    """Base of every plugin's config: frozen, unknown fields rejected, tagged by ``kind``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str


class Plugin:
    """Common base: holds the validated config.

    Subclasses set ``Config`` (a :class:`PluginConfig` subclass whose ``kind`` is a
    ``Literal`` of the registered name) and ``family``.
    """

    family: ClassVar[str]
    Config: ClassVar[type[PluginConfig]]

    def __init__(self, config: PluginConfig | None = None, **fields: Any):
        if config is None:
            kind = self.Config.model_fields["kind"].default
            config = self.Config(**({"kind": kind} | fields))
        elif fields:
            raise TypeError(f"{type(self).__name__}: pass either a config or keyword fields, not both")
        elif not isinstance(config, self.Config):
            config = self.Config.model_validate(config)
        self.config = config

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring, shown by ``commlmo plugins``."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @property
    def kind(self) -> str:
        """The registered name (``config.kind``)."""
        return self.config.kind

    @classmethod
    def capabilities_of(cls, config: PluginConfig) -> Any:
        """The capabilities a plugin with this (validated) config declares, without building it.

        Plugins whose contract depends on their config override this classmethod (and
        expose ``capabilities`` as a property that calls it); the default reads the
        class attribute, or builds the plugin only if ``capabilities`` is a property.
        """
        caps = inspect.getattr_static(cls, "capabilities", None)  # the class attribute, or the property itself
        if isinstance(caps, property):
            return cls(config).capabilities
        return caps

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump().items() if k != "kind")
        return f"{type(self).__name__}({fields})"


_FINITE_INPUTS: contextvars.ContextVar[bool] = contextvars.ContextVar("commlmo_finite_inputs", default=False)


@contextlib.contextmanager
def finite_inputs() -> Iterator[None]:
    """Declare that the tensors handed to plugins inside this block are known to be finite.

    The optimizer has already agreed across ranks that every gradient is finite, so
    compressors may skip their own NaN/Inf check (one read and one host read per tensor);
    called directly, outside the optimizer, they still check.
    """
    token = _FINITE_INPUTS.set(True)
    try:
        yield
    finally:
        _FINITE_INPUTS.reset(token)


def inputs_known_finite() -> bool:
    """Whether the caller declared its inputs finite (:func:`finite_inputs`); ``False`` under
    ``torch.compile`` (which cannot trace a context variable; checks are skipped there anyway)."""
    if torch.compiler.is_compiling():
        return False
    return _FINITE_INPUTS.get()


_AS_IF_ACCELERATOR = False


def host_reads_free(t: Tensor) -> bool:
    """Whether reading a value of ``t`` on the host costs no device synchronisation (a CPU tensor).

    Code with a cheaper path that branches on a value (a finiteness check, a count) takes it
    only then, and a branch-free one elsewhere; :func:`as_if_on_accelerator` makes every tensor
    take the branch-free path, so a CPU test can count what an accelerator would synchronise on.
    """
    return t.device.type == "cpu" and not _AS_IF_ACCELERATOR and not torch.compiler.is_compiling()


@contextlib.contextmanager
def as_if_on_accelerator() -> Iterator[None]:
    """Inside the block, :func:`host_reads_free` is false for every tensor (all threads; for tests)."""
    global _AS_IF_ACCELERATOR
    saved, _AS_IF_ACCELERATOR = _AS_IF_ACCELERATOR, True
    try:
        yield
    finally:
        _AS_IF_ACCELERATOR = saved


def as_matrix(x: Tensor) -> Tensor:
    """View a tensor with ``ndim >= 2`` as ``out x (in*kh*kw...)`` (conv kernels as matrices)."""
    return x if x.ndim == 2 else x.reshape(x.shape[0], -1)


# --------------------------------------------------------------------------- LMOs


@dataclass(frozen=True)
class LMOCapabilities:
    """What an LMO accepts and what its step looks like.

    ``min_ndim``/``max_ndim``: tensor ranks it accepts (``spectral`` needs a matrix,
    conv kernels are viewed as ``out x in*kh*kw``).  ``elementwise``: the
    direction of a coordinate depends only on that coordinate (``sign``), so it
    may run on a shard.  ``step_family``: ``"sign"`` when every entry of the
    direction is +-1 (SignMuon's learning-rate family), else ``"lmo"``.
    """

    min_ndim: int = 1
    max_ndim: int | None = None
    elementwise: bool = False
    step_family: Literal["lmo", "sign"] = "lmo"

    def accepts(self, ndim: int) -> bool:
        """Whether a tensor of rank ``ndim`` is accepted."""
        return ndim >= self.min_ndim and (self.max_ndim is None or ndim <= self.max_ndim)


class LMO(Plugin):
    r"""Linear minimization oracle over the unit ball of a norm ``||.||``.

    ``direction(G) = argmax_{||D|| <= 1} <G, D>``; ``<G, direction(G)> = dual_norm(G)``.
    """

    family: ClassVar[str] = "lmo"
    capabilities: ClassVar[LMOCapabilities] = LMOCapabilities()

    def direction(self, g: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """The unit-norm direction maximising ``<g, D>``; same shape as ``g``, never mutates ``g``."""
        raise NotImplementedError

    def directions(
        self, gs: Sequence[Tensor], *, generator: torch.Generator | None = None
    ) -> list[Tensor]:
        """Directions of many tensors; LMOs that can batch same-shape inputs override this."""
        return [self.direction(g, generator=generator) for g in gs]

    def norm(self, d: Tensor) -> Tensor:
        """The norm whose unit ball the LMO minimises over."""
        raise NotImplementedError

    def dual_norm(self, g: Tensor) -> Tensor:
        """``||g||_* = max_{||D|| <= 1} <g, D>``."""
        raise NotImplementedError


class LRRule(Plugin):
    r"""Per-layer learning-rate multiplier: the update is ``X -= lr * scale * S``.

    Rules that only read the shape cost no communication.  Rules with
    ``needs_dual_norm`` (Gluon) also receive ``||G||_*`` of the tensor the server
    LMO was applied to.
    """

    family: ClassVar[str] = "lr_rule"
    needs_dual_norm: ClassVar[bool] = False

    def scale(
        self,
        shape: torch.Size,
        *,
        lmo: LMO | None,
        step_family: Literal["lmo", "sign"],
        dual_norm: float | None = None,
        name: str = "",
    ) -> float:
        """Multiplier for a parameter of ``shape`` (``name`` is its qualified name)."""
        raise NotImplementedError


# --------------------------------------------------------------------------- compressors


@dataclass
class Payload:
    """A compressed message.

    ``wire`` are the tensors that cross the network (their dtype and size *are*
    the cost); ``ctx`` is local metadata that never travels (shape, dtype,
    device, indices derived from a shared seed...).  For the same parameter the
    ``ctx`` must be identical on every rank, so a rank can decode another rank's
    wire tensors with its own ``ctx``.
    """

    wire: tuple[Tensor, ...]
    ctx: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the wire tensors: what this message costs on the network."""
        return sum(t.numel() * t.element_size() for t in self.wire)


@dataclass
class Encoded:
    """An aggregate that is still in a compressed format (e.g. the packed majority vote).

    The optimizer applies it with ``codec.decompress_add_`` so that, for signs,
    no +-1 float tensor is ever materialised.
    """

    payload: Payload
    codec: "Compressor"

    def decode(self) -> Tensor:
        """The dense aggregate."""
        return self.codec.decompress(self.payload)

    def add_to_(self, target: Tensor, *, alpha: float) -> Tensor:
        """``target += alpha * aggregate`` without materialising the dense aggregate where possible."""
        return self.codec.decompress_add_(target, self.payload, alpha=alpha)


@dataclass(frozen=True)
class CompressorCapabilities:
    """Declared contract of a compressor (checked by :mod:`commlmo.testing`).

    * ``summable``: the elementwise sum of wire tensors decodes to the sum of
      decoded messages (identity, shared-seed randk), so a dense all-reduce can
      carry them;
    * ``fixed_size``: wire sizes depend only on shape and dtype;
    * ``unbiased``: ``E[C(x)] = x`` with variance ``omega`` (see ``Compressor.omega``);
    * ``contractive``: ``||C(x) - x||^2 <= (1 - alpha)||x||^2`` (see ``Compressor.alpha``),
      in expectation for stochastic compressors (EF21's definition);
    * ``sign_bits``: the wire is exactly one packed bit per entry, ``sign(x)``
      (what majority vote needs);
    * ``stochastic``: draws from the generator it is given;
    * ``shared_randomness``: every rank must pass a generator in the same state
      (randk's indices), otherwise each rank uses its own stream;
    * ``downlink_only``: only meaningful as a downlink (``ef21p`` compresses the model).

    A compressor whose contract depends on its config (``sign`` is contractive
    only when scaled) exposes ``capabilities`` as a property.
    """

    summable: bool = False
    fixed_size: bool = True
    unbiased: bool = False
    contractive: bool = False
    sign_bits: bool = False
    stochastic: bool = False
    shared_randomness: bool = False
    downlink_only: bool = False


class Compressor(Plugin):
    """Turns a tensor into a :class:`Payload` and back."""

    family: ClassVar[str] = "compressor"
    capabilities: ClassVar[CompressorCapabilities] = CompressorCapabilities()

    def compress(self, x: Tensor, *, generator: torch.Generator | None = None) -> Payload:
        """Encode ``x`` (never mutated); stochastic compressors draw only from ``generator``."""
        raise NotImplementedError

    def decompress(self, payload: Payload) -> Tensor:
        """Decode a payload (this rank's or another's) to a tensor of the original shape, dtype and device."""
        raise NotImplementedError

    def decompress_add_(self, target: Tensor, payload: Payload, *, alpha: float = 1.0) -> Tensor:
        """``target += alpha * decompress(payload)`` in place; fused where the format allows."""
        return target.add_(self.decompress(payload).to(target.dtype), alpha=alpha)

    def wire_nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        """Declared wire size in bytes for a tensor of this shape/dtype (fixed-size compressors)."""
        raise NotImplementedError

    def bits_per_entry(self, shape: torch.Size, dtype: torch.dtype) -> float:
        """Declared cost in bits per entry: ``8 * wire_nbytes / numel``."""
        n = math.prod(shape)
        return 8.0 * self.wire_nbytes(shape, dtype) / max(n, 1)

    def alpha(self, shape: torch.Size) -> float | None:
        """Contraction parameter for this shape, or ``None`` if not contractive."""
        return None

    def omega(self, shape: torch.Size) -> float | None:
        """Variance parameter ``E||C(x)-x||^2 <= omega ||x||^2`` if unbiased, else ``None``."""
        return None

    def advance_generator(self, generator: torch.Generator, shape: torch.Size, dtype: torch.dtype) -> bool:
        """Advance ``generator`` exactly as :meth:`compress` of such a tensor would, without compressing;
        ``False`` if that depends on the data (then callers cannot replay the stream).  Deterministic
        compressors draw nothing and return ``True``."""
        return not self.capabilities.stochastic

    # -- the downlink stage -------------------------------------------------
    # As a downlink, a compressor is a pipeline stage with its own state: it receives
    # the server's step D and moves the parameter.  The default sends C(D) and every
    # worker applies X <- X(1 - lr*wd) - lr*scale*C(D); EF21-P (``ef21p``) overrides
    # both methods to compress the model instead.

    def init_downlink_state(self, param: Tensor) -> dict[str, Tensor]:
        """Per-parameter state of this compressor used as a downlink (in ``optimizer.state``)."""
        return {}

    def apply_downlink_(
        self, param: Tensor, state: dict[str, Tensor], step: "Tensor | Encoded", *, lr: float, wd: float,
        scale: float, generator: torch.Generator | None,
    ) -> None:
        r"""``X <- X (1 - lr*wd) - lr*scale*C(D)``, identically on every worker."""
        if wd:
            param.mul_(1 - lr * wd)
        if self.kind != "identity":
            dense = step.decode() if isinstance(step, Encoded) else step
            step = Encoded(self.compress(dense, generator=generator), self)
        if isinstance(step, Encoded):
            step.add_to_(param, alpha=-lr * scale)
        else:
            param.add_(step.to(param.dtype), alpha=-lr * scale)

    # Under the owner server role (commlmo.owner) the stage is cut in two: the owner of the
    # parameter makes the message, every rank applies it; together they do what
    # apply_downlink_ does, bit for bit.

    #: downlink state keys only a parameter's owner keeps (EF21-P's exact model)
    owner_state: ClassVar[tuple[str, ...]] = ()

    def downlink_payload(
        self, param: Tensor, state: dict[str, Tensor], step: "Tensor | Encoded", *, lr: float, wd: float,
        scale: float, generator: torch.Generator | None,
    ) -> Payload:
        """On the owner: the message every rank applies with :meth:`apply_downlink_payload_` (``C(D)``)."""
        dense = step.decode() if isinstance(step, Encoded) else step
        if self.kind == "identity":
            dense = dense.to(param.dtype)
        return self.compress(dense, generator=generator)

    def apply_downlink_payload_(
        self, param: Tensor, state: dict[str, Tensor], payload: Payload, *, lr: float, wd: float, scale: float,
        owner: bool,
    ) -> None:
        """On every rank: ``X <- X (1 - lr*wd) - lr*scale*decompress(payload)`` (``owner``: this rank made it)."""
        if wd:
            param.mul_(1 - lr * wd)
        self.decompress_add_(param, payload, alpha=-lr * scale)


# --------------------------------------------------------------------------- aggregators


@dataclass(frozen=True)
class AggregatorCapabilities:
    """What an aggregator needs from the uplink compressor and the process group.

    ``requires``: compressor capabilities (names of ``CompressorCapabilities``
    fields) that must be true; ``stateful``: keeps per-parameter tensors in the
    optimizer state; ``output_sign``: its result is +-1 per entry;
    ``robust``: the attacks it claims to resist (checked by the aggregator kit),
    e.g. ``("amplify",)`` for a vote, where one worker has one vote however loud;
    ``owner``: it implements the owner server role (:meth:`Aggregator.reduce_owned`),
    so one rank per parameter can combine that parameter's payloads (:mod:`commlmo.owner`).
    """

    requires: tuple[str, ...] = ()
    stateful: bool = False
    output_sign: bool = False
    robust: tuple[str, ...] = ()
    owner: bool = False


class Aggregator(Plugin):
    """Combines the workers' compressed uplink messages into one aggregate, identical on every rank.

    The pipeline owns the uplink compression; an aggregator takes part in three places:

    1. :meth:`message` -- what a worker compresses for a vector ``v`` (``v`` itself for
       ``mean`` and ``majority_vote``; ``v - g_i`` for EF21; ``v + e_i`` for error feedback);
    2. :meth:`plan` -- once, when the optimizer is built: the transport that carries the
       payloads (``owner``, ``allreduce``, ``allgather``, ``int8``...), from the uplink's
       capabilities and the byte-cost model;
    3. :meth:`aggregate` -- the payloads (already compressed by the pipeline) travel and
       are combined; per parameter a dense tensor or an :class:`Encoded` aggregate,
       identical on every rank and read-only for the caller.  State changes only after
       the collectives succeeded.

    ``codecs`` holds the uplink compressor of each parameter (the same object for a whole
    group, except where a block view gives a tensor one scale per block).
    ``generators`` has ``.shared`` (same state on every rank: tie-breaks, shared-seed
    compressors) and ``.local`` (this rank's own stream).  ``label`` prefixes the
    byte-accounting entries of the collectives it calls.
    """

    family: ClassVar[str] = "aggregator"
    capabilities: ClassVar[AggregatorCapabilities] = AggregatorCapabilities()

    @classmethod
    def check_uplink(cls, config: PluginConfig, uplink_kind: str, uplink: CompressorCapabilities) -> str | None:
        """``None`` if an uplink with these capabilities fits this config, else a sentence saying why not.

        A classmethod over declared capabilities: configs are validated without building plugins.
        """
        missing = [c for c in cls.capabilities_of(config).requires if not getattr(uplink, c)]
        if missing:
            return (
                f"aggregator {config.kind!r} needs an uplink compressor that is {', '.join(missing)}; "
                f"{uplink_kind!r} is not"
            )
        return None

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        """Per-parameter state tensors (stored in ``optimizer.state[param]``, so checkpointed)."""
        return {}

    def message(self, v: Tensor, state: dict[str, Tensor]) -> Tensor:
        """The tensor this worker compresses for vector ``v`` (never mutates the state)."""
        return v

    def plan(self, uplink: Compressor, *, world_size: int, payload_bytes: int, dense_entries: int) -> str:
        """The transport for this group, decided once when the optimizer is built."""
        return "allgather"

    def aggregate(
        self,
        payloads: Sequence[Payload],
        messages: Sequence[Tensor],
        states: Sequence[dict[str, Tensor]],
        *,
        codecs: Sequence[Compressor],
        comm: Any,
        generators: Any,
        transport: str,
        label: str,
    ) -> list[Tensor | Encoded]:
        """Communicate and combine this worker's ``payloads`` (of ``messages``); see the class docstring.

        The default runs :meth:`exchange` to its end, then :meth:`combine`.
        """
        from .transport import run

        steps = self.exchange(payloads, codecs=codecs, comm=comm, generators=generators, transport=transport,
                              label=label, states=states)
        if steps is None:
            raise NotImplementedError(f"aggregator {self.kind!r} implements neither aggregate nor exchange")
        return self.combine(run(steps), payloads, messages, states, codecs=codecs)

    # -- split form: what lets the optimizer start the uplink inside backward() ----------
    def exchange(self, payloads: Sequence[Payload], *, codecs: Sequence[Compressor], comm: Any, generators: Any,
                 transport: str, label: str, states: Sequence[dict[str, Tensor]] | None = None) -> Any:
        """Optional: every collective of :meth:`aggregate`, as a generator that changes no state (it may read
        ``states``).

        It issues its first collectives with ``async_op=True``, yields once, then waits
        and finishes (see :mod:`commlmo.transport`); its return value goes to
        :meth:`combine`.  An aggregator that implements it can have its uplink started
        from a gradient hook while ``backward()`` runs (``overlap``); one that does not
        (``None``) is aggregated in ``step()``.
        """
        return None

    def combine(self, exchanged: Any, payloads: Sequence[Payload], messages: Sequence[Tensor],
                states: Sequence[dict[str, Tensor]], *, codecs: Sequence[Compressor]) -> list[Tensor | Encoded]:
        """With :meth:`exchange`: the aggregates from what it returned, committing this step's state."""
        return list(exchanged)

    # -- the owner server role (capabilities.owner) ----------------------------------------
    #: state keys only the owner of a parameter needs (EF21's ``g``); other ranks do not keep them
    owner_state: ClassVar[tuple[str, ...]] = ()

    def reduce_owned(self, rows: Sequence[Payload], codec: Compressor, *, generator: torch.Generator,
                     world_size: int) -> Tensor | Encoded:
        """Owner role: combine the payloads ``rows`` of one parameter, one per rank in rank order,
        exactly as :meth:`aggregate` combines them (no state); ``generator`` is the parameter's
        shared stream of the ``aggregate`` stage."""
        raise NotImplementedError

    def commit_owned(self, reduced: Tensor | Encoded, state: dict[str, Tensor], codec: Compressor) -> Tensor | Encoded:
        """Owner role, on the owner: commit the parameter's server-side state; returns the aggregate."""
        return reduced

    def commit_local(self, payload: Payload, message: Tensor, state: dict[str, Tensor], codec: Compressor) -> None:
        """Owner role, on every rank: commit this worker's own state for a parameter it sent."""


# --------------------------------------------------------------------------- element-wise rules


@dataclass(frozen=True)
class RuleCapabilities:
    """What an element-wise update rule's step looks like.

    ``step_family``: ``"sign"`` when every entry of the step is +-1 (Lion), else
    ``"lmo"`` (what per-layer learning-rate rules read).
    """

    step_family: Literal["lmo", "sign"] = "lmo"


class Rule(Plugin):
    r"""A stateful element-wise update rule (AdamW, Distributed Lion, 1-bit Adam...).

    A group with a ``rule`` runs, for each parameter ``X`` and worker ``i``::

        V_i, worker_state' = rule.worker(G_i, state)          # the message each worker sends
        A                  = aggregate(compress_up(V_1..V_M))  # or a float32 mean while not uplink_active
        D, server_state'   = rule.server(A, state)            # every rank, identically
        X <- X (1 - lr*wd) - lr * scale * compress_down(D)

    Both methods work out of place and return the state entries to replace, which the
    pipeline commits only once the step's collectives succeeded.  ``step`` counts the
    optimizer steps taken before this one (0 at the first step).  Rules keep every
    counter they need as tensors in the state, so ``state_dict`` round-trips them.
    """

    family: ClassVar[str] = "rule"
    capabilities: ClassVar[RuleCapabilities] = RuleCapabilities()

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        """Per-parameter state tensors."""
        return {}

    def worker(
        self, grad: Tensor, state: dict[str, Tensor], *, step: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(message, state updates)`` of this worker for its gradient ``grad``."""
        return grad, {}

    def uplink_active(self, step: int) -> bool:
        """Whether this step's message travels through the group's uplink compressor and
        aggregator (``False``: a float32 mean, e.g. 1-bit Adam's warm-up)."""
        return True

    def server(
        self, aggregate: Tensor, state: dict[str, Tensor], *, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(step direction D, state updates)`` from the aggregate, the same on every rank."""
        return aggregate, {}
