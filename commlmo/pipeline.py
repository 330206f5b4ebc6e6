r"""The per-group step every method is an instance of, as explicit stages.

For each parameter ``X`` of a group and each worker ``i``::

    1 worker      M_i = momentum(M_i, G_i);  V_i = LMO(M_i) if lmo_at == "worker"
                  (or, for an element-wise rule: V_i = rule.worker(G_i))
    2 uplink      P_i = compress_up(aggregator.message(V_i))      the pipeline compresses
    3 aggregate   A   = aggregator.aggregate(P_1..P_M)            collectives (mean | vote | EF21 | EF)
    4 server      D   = LMO(A) if lmo_at == "server"  (or rule.server(A))
    5 downlink    X  <- X (1 - lr wd) - lr scale(X) compress_down(D)   (or EF21-P's model step)

This is the pipeline of the SignMuon paper (Smirnova, Kravatskiy, Kovalev), of
EF21-Muon (Gruntkowska et al. 2025) and of Scion/Gluon, with element-wise rules
(AdamW, Distributed Lion, 1-bit Adam) for the parameters that are not matrices.
"Server" is a role: either the aggregate is already on every rank and the server's
LMO and downlink run redundantly on each (``replicated``), or each parameter has an
owner rank that runs them once and sends the compressed step to the others
(``owner``, :mod:`commlmo.owner`).  The transport and server role of each group are
chosen once, when the optimizer is built (:meth:`GroupRuntime.plan`).

A step of a *bucket* of a group's parameters runs in three calls, so that the
uplink can start from a gradient hook while ``backward()`` is still running:
:meth:`GroupRuntime.prepare` (stages 1 and 2: worker, uplink compression),
:meth:`GroupRuntime.launch` (the first collectives of stage 3, in flight) and
:meth:`GroupRuntime.finish` (the rest of 3, then 4 and 5, and every state change).
Every random draw comes from a stream derived from the seed, the step, the stage and
the parameter (:mod:`commlmo.streams`), so none of this changes a single bit.

A group's ``view`` says how the LMO, the learning-rate rule and scaled
compressors see a tensor: one matrix (conv kernels ``out x in*kh*kw``), a stack
of independent matrices (MoE experts ``[E, m, n]``), or ``blocks`` fused
matrices along dim 0 (a fused QKV weight), each orthogonalised on its own and
given one compressor scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from . import registry
from .comm import Communicator
from .config import GroupConfig, MomentumConfig, ViewConfig
from .errors import AggregatorOutputError
from .plugin import LMO, Aggregator, Compressor, Encoded, LRRule, Payload, Rule
from .sharding import shard_of
from .streams import Generators, Streams
from .transport import Started, mean_steps

__all__ = ["Generators", "GroupRuntime", "BucketStep", "momentum_update", "step_family", "corrupt", "Adversary",
           "block_directions"]

Adversary = Literal["flip", "amplify", "random", "zero"]
#: how much an ``amplify`` adversary scales up its reversed message
AMPLIFY = 10.0


def corrupt(v: Tensor, mode: Adversary, *, generator: torch.Generator) -> Tensor:
    """The message a Byzantine worker sends instead of ``v`` (before uplink compression).

    ``flip``: ``-v`` (every sign inverted); ``amplify``: ``-10 v`` (a reversed message
    ten times too large: two such workers of five reverse a mean, while a vote,
    one bit per worker, cannot be outshouted); ``random``: Gaussian noise of the same
    norm (random signs); ``zero``: nothing (a sign compressor turns it into random
    bits).  Used to test robustness (signSGD-MV tolerates up to half such workers,
    Bernstein et al. 2019); never part of a real run.
    """
    if mode == "flip":
        return -v
    if mode == "amplify":
        return v * -AMPLIFY
    if mode == "zero":
        return torch.zeros_like(v)
    noise = torch.randn(v.shape, generator=generator, device=v.device, dtype=torch.float32)
    return (noise * (v.float().norm() / noise.norm().clamp_min(1e-30))).to(v.dtype)


def momentum_update(buf: Tensor, grad: Tensor, *, beta: float, cfg: MomentumConfig,
                    in_place: bool = False) -> tuple[Tensor, Tensor]:
    """``(new buffer, vector the method uses)``, computed out of place: the state is only
    replaced once the step's collectives have succeeded.  ``in_place``: as torch.optim.Muon,
    into ``buf`` and ``grad`` (where nothing that can fail follows: one process, gradients
    agreed finite), which saves writing two fresh tensors per parameter.

    EMA (torch.optim.Muon, SignMuon): ``M = beta*M + (1-beta)*G``, Nesterov
    ``(1-beta)*G + beta*M``.  Heavy-ball: ``M = beta*M + G``, Nesterov ``G + beta*M``.
    The two are trajectory-identical for scale-free (LMO, sign) steps.  A float32 buffer of a
    low-precision parameter (``state_dtype: float32``) takes the gradient in float32.
    """
    if grad.dtype != buf.dtype:
        grad = grad.to(buf.dtype)
    if in_place:
        if cfg.kind == "ema":
            buf.lerp_(grad, 1 - beta)
            return buf, (grad.lerp_(buf, beta) if cfg.nesterov else buf)
        buf.mul_(beta).add_(grad)
        return buf, (grad.add_(buf, alpha=beta) if cfg.nesterov else buf)
    if cfg.kind == "ema":
        new = buf.lerp(grad, 1 - beta)
        return new, (grad.lerp(new, beta) if cfg.nesterov else new)
    new = buf.mul(beta).add_(grad)
    return new, (grad.add(new, alpha=beta) if cfg.nesterov else new)


def step_family(lmo: LMO | None, lmo_at: str, aggregator: Aggregator, downlink: Compressor,
                rule: Rule | None = None) -> Literal["lmo", "sign"]:
    """Whether the final step ``S`` is a +-1 tensor ("sign") or an LMO direction ("lmo").

    SignMuon's unit-gain learning-rate rule scales the two families differently.
    """
    if rule is not None and not downlink.capabilities.sign_bits:
        return rule.capabilities.step_family
    if downlink.capabilities.sign_bits:
        return "sign"
    if lmo_at == "server" and lmo is not None:
        return lmo.capabilities.step_family
    if aggregator.capabilities.output_sign:
        return "sign"
    if lmo_at == "worker" and lmo is not None:
        return lmo.capabilities.step_family
    return "lmo"


def block_directions(lmo: LMO, vectors: Sequence[Tensor], shapes: Sequence[tuple[int, int, int]],
                     *, views: Sequence[str], generator: torch.Generator | None,
                     shards: Sequence | None = None) -> list[Tensor]:
    """The LMO of each vector seen through the group's view: ``B`` matrices of ``m x n`` each.

    With the ``matrix`` view the LMO gets the tensor itself (it views conv kernels as
    matrices); with ``stack``/``blocks`` every block is its own matrix, and all blocks of
    all tensors go to one :meth:`~commlmo.plugin.LMO.directions` call (batched where the
    LMO batches equal shapes).  ``shards``: the :class:`~commlmo.sharding.ShardSpec` of
    each vector that is a local shard of an FSDP parameter (``None`` for whole tensors);
    an LMO that needs the whole matrix gets it from the shard group
    (:func:`commlmo.sharding.sharded_directions`).
    """
    if shards is not None and any(s is not None for s in shards):
        from .sharding import sharded_directions

        return sharded_directions(lmo, vectors, shapes, views=views, generator=generator, shards=shards,
                                  plain=block_directions)
    if all(v == "matrix" for v in views) or not lmo.capabilities.accepts(2) or lmo.capabilities.elementwise:
        return lmo.directions(list(vectors), generator=generator)
    pieces: list[Tensor] = []
    counts: list[int] = []
    for v, (b, m, n), view in zip(vectors, shapes, views):
        if view == "matrix":
            pieces.append(v)
            counts.append(0)
        else:
            pieces.extend(v.reshape(b, m, n).unbind(0))
            counts.append(b)
    out = iter(lmo.directions(pieces, generator=generator))
    return [next(out) if b == 0 else torch.stack([next(out) for _ in range(b)]).reshape(v.shape)
            for v, b in zip(vectors, counts)]


@dataclass
class BucketStep:
    """A bucket of one param group's parameters on its way through one step.

    ``positions`` are the parameters' places in the group (what their random streams
    and owner ranks are keyed on); ``pending`` holds the worker and server state changes,
    committed by :meth:`GroupRuntime.finish` once the collectives succeeded.
    """

    rt: GroupRuntime
    group: dict
    params: list[Tensor]
    names: list[str]
    positions: list[int]
    states: list[dict]
    pending: list[dict]
    step: int = 0
    rule: Rule | None = None
    vectors: list[Tensor] = field(default_factory=list)
    messages: list[Tensor] = field(default_factory=list)
    payloads: list[Payload] = field(default_factory=list)
    codecs: list[Compressor] = field(default_factory=list)
    compressed: bool = True
    started: Started | None = None
    launched: bool = False
    versions: list = field(default_factory=list)  # (id, _version) of each gradient when it was sent (overlap)

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        return [self.rt.block_shape(p) for p in self.params]

    @property
    def views(self) -> list[str]:
        return [self.rt.view_of(p).kind for p in self.params]


@dataclass
class GroupRuntime:
    """The built plugins of one config group, its plan (transport, block views), and its step."""

    config: GroupConfig
    index: int
    lmo: LMO | None
    rule: Rule | None
    uplink: Compressor
    aggregator: Aggregator
    downlink: Compressor
    lr_rule: LRRule
    family: Literal["lmo", "sign"]
    generators: Generators
    transport: str = "allgather"
    adversary: Adversary | None = None
    server: str = "replicated"  # the server role: replicated, or owner (commlmo.owner)
    server_reason: str = ""
    members: list[Tensor] = field(default_factory=list)  # every parameter of the group, in order of arrival
    owners: list[int] = field(default_factory=list)  # owner rank of each member (owner role)
    views: dict = field(default_factory=dict)  # id(param) -> ViewConfig, for the group view "auto"
    sharding: Any = None  # commlmo.sharding.Sharding when the parameters are DTensors (FSDP2)
    _codecs: dict = field(default_factory=dict)
    _positions: dict = field(default_factory=dict)

    @classmethod
    def build(cls, config: GroupConfig, *, index: int, seed: int, rank: int, device: torch.device) -> GroupRuntime:
        """Build the group's plugins; the caller plans its transport (:meth:`plan`) once its parameters are known."""
        lmo = registry.build_plugin("lmo", config.lmo) if config.lmo is not None else None
        rule = registry.build_plugin("rule", config.rule) if config.rule is not None else None
        uplink = registry.build_plugin("compressor", config.uplink)
        aggregator = registry.build_plugin("aggregator", config.aggregator)
        downlink = registry.build_plugin("compressor", config.downlink)
        lr_rule = registry.build_plugin("lr_rule", config.lr_rule)
        rt = cls(
            config=config, index=index, lmo=lmo, rule=rule, uplink=uplink,  # type: ignore[arg-type]
            aggregator=aggregator, downlink=downlink, lr_rule=lr_rule,  # type: ignore[arg-type]
            family=step_family(lmo, config.lmo_at, aggregator, downlink, rule),  # type: ignore[arg-type]
            generators=Generators(seed=seed, group_index=index, rank=rank, device=device),
        )
        return rt

    @property
    def builtin_aggregator(self) -> bool:
        """Whether the aggregator is one of commlmo's own, whose output its contract kit pins."""
        return type(self.aggregator).__module__.split(".")[0] == "commlmo_aggregators"

    # ------------------------------------------------------------------ plan
    def view_of(self, p: Tensor):
        """The view of ``p``: the group's, or (``auto``) the one the module tree gave it (a local shard's: its spec's)."""
        shard = shard_of(p)
        if shard is not None:
            return shard.view
        view = self.config.view
        if view.kind == "auto":
            return self.views.get(id(p), _MATRIX)
        return view

    def block_shape(self, p: Tensor) -> tuple[int, int, int]:
        """``(B, m, n)`` of ``p`` under its view."""
        return self.view_of(p).block_shape(p.shape)

    def codec(self, p: Tensor, base: Compressor | None = None) -> Compressor:
        """The compressor for ``p``: ``base`` itself, or a copy with one scale per block of the view."""
        base = base or self.uplink
        blocks = self.block_shape(p)[0] if self.view_of(p).kind != "matrix" else 1
        field_name = getattr(type(base), "scale_blocks_field", None)
        if blocks == 1 or field_name is None or getattr(base.config, "scale", "none") == "none" \
                or getattr(base.config, field_name) != 1:
            return base
        key = (id(base), blocks)
        if key not in self._codecs:
            self._codecs[key] = type(base)(base.config.model_copy(update={field_name: blocks}))
        return self._codecs[key]

    def plan(self, params: Sequence[Tensor], *, world_size: int) -> str:
        """The transport of this group's uplink, from the declared wire sizes and the cost model."""
        payload, entries = 0, 0
        for p in params:
            entries += p.numel()
            try:
                payload += self.codec(p).wire_nbytes(p.shape, p.dtype)
            except (NotImplementedError, ValueError):
                payload += p.numel() * p.element_size()
        return self.aggregator.plan(self.uplink, world_size=world_size, payload_bytes=max(payload, 1),
                                    dense_entries=entries)

    def lr_scale(self, p: Tensor, name: str, dual: float | None = None) -> float:
        """The learning-rate multiplier of ``p`` (read on the block shape for stack/blocks views; for a local
        shard, on the whole parameter)."""
        shard = shard_of(p)
        p = shard.param if shard is not None else p
        shape = p.shape if self.view_of(p).kind == "matrix" else torch.Size(self.block_shape(p)[1:])
        return self.lr_rule.scale(shape, lmo=self.lmo, step_family=self.family, dual_norm=dual, name=name)

    def init_state(self, p: Tensor, state: dict, *, owned: bool = True) -> None:
        """Create the state of ``p`` on first use; under the owner role a rank that does not own ``p``
        keeps none of the aggregator's and downlink's owner-only state (EF21's ``g``, EF21-P's model)."""
        if state:  # already initialised (stateless groups re-run this no-op every step)
            return
        if self.config.state_dtype == "float32" and p.dtype in (torch.bfloat16, torch.float16):
            p = p.detach().to(torch.float32)  # the state's template: its values (EF21-P's model) and dtype
        if self.config.momentum is not None:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if self.rule is not None:
            state.update(self.rule.init_state(p))
        agg, down = self.aggregator.init_state(p), self.downlink.init_downlink_state(p)
        if not owned:
            agg = {k: v for k, v in agg.items() if k not in type(self.aggregator).owner_state}
            down = {k: v for k, v in down.items() if k not in type(self.downlink).owner_state}
        state.update(agg)
        state.update(down)

    def position(self, p: Tensor) -> int:
        """``p``'s place among the group's members (its random streams and owner are keyed on it)."""
        if len(self._positions) != len(self.members):
            self._positions = {id(q): i for i, q in enumerate(self.members)}
        return self._positions[id(p)]

    def owns(self, position: int, comm: Communicator) -> bool:
        """Whether this rank keeps the server-side state of the group's parameter at ``position``."""
        return self.server != "owner" or comm.world_size == 1 or self.owners[position] == comm.rank

    # ------------------------------------------------------------------ step
    def prepare(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict], names: Sequence[str],
        positions: Sequence[int], *, group: dict, comm: Communicator, step: int, rule: Rule | None = None,
        in_place: bool = False,
    ) -> BucketStep:
        """Stages 1 and 2 for a bucket: each worker's vector (momentum, worker LMO or rule) and its
        compressed message.  Nothing is committed: state changes wait in ``pending`` -- except, with
        ``in_place`` (one process, gradients agreed finite: no collective can fail), the momentum,
        updated in place as torch.optim.Muon does.  ``rule`` replaces the group's rule for this step
        (a scheduler changed its ``betas``)."""
        cfg = self.config
        rule = rule or self.rule
        # a third-party aggregator's output is checked after the momentum is used: keep it out of place then
        in_place = in_place and self.builtin_aggregator
        if self.sharding is not None:  # FSDP2: the pipeline runs on this rank's rows (commlmo.sharding)
            params, grads, states = self.sharding.localize(params, grads, states)
        for p, s, i in zip(params, states, positions):
            self.init_state(p, s, owned=self.owns(i, comm))
        b = BucketStep(self, group, list(params), list(names), list(positions), list(states),
                       [{} for _ in params], step=step, rule=rule)
        worker = self.generators.at(step, "worker", positions)

        # 1. worker
        if rule is not None:
            vectors = []
            for j, (g, s, upd) in enumerate(zip(grads, states, b.pending)):
                v, changes = rule.worker(g, s, step=step, generator=worker.param(j, shared=False))
                vectors.append(v)
                upd.update(changes)
        elif cfg.momentum is not None:
            beta = group["momentum"]
            vectors = []
            for g, s, upd in zip(grads, states, b.pending):
                new, v = momentum_update(s["momentum_buffer"], g, beta=beta, cfg=cfg.momentum, in_place=in_place)
                vectors.append(v)
                upd["momentum_buffer"] = new
        else:
            vectors = list(grads)
        if cfg.lmo_at == "worker":
            vectors = block_directions(self.lmo, vectors, b.shapes, views=b.views,  # type: ignore[arg-type]
                                       generator=worker.local, shards=self._shards(b.params))
        if self.adversary is not None:
            noise = self.generators.at(step, "adversary", positions)
            vectors = [corrupt(v, self.adversary, generator=noise.param(j, shared=False)) for j, v in enumerate(vectors)]
        b.vectors = vectors

        # 2. uplink (a rule's full-precision phase, 1-bit Adam's warm-up, sends the vectors as they are)
        b.compressed = rule is None or rule.uplink_active(step)
        if b.compressed:
            up = self.generators.at(step, "uplink", positions)
            b.codecs = [self.codec(p) for p in params]
            b.messages = [self.aggregator.message(v, s) for v, s in zip(vectors, states)]
            b.payloads = [c.compress(m, generator=up.for_(c, j)) for j, (c, m) in enumerate(zip(b.codecs, b.messages))]
        return b

    def launch(self, b: BucketStep, comm: Communicator) -> None:
        """Stage 3's first collectives, in flight (``async_op``); :meth:`finish` waits for them.

        An aggregator without :meth:`~commlmo.plugin.Aggregator.exchange` is aggregated in
        :meth:`finish` instead.  No state changes here.
        """
        label = self.config.name
        if not b.compressed:  # a float32 mean over the owner transport
            identity = _identity()
            b.payloads = [identity.compress(v) for v in b.vectors]
            b.started = Started(mean_steps(b.payloads, identity, comm, transport="owner", label=f"{label}/warmup"))
        elif self.server == "owner" and comm.world_size > 1:
            from .owner import uplink_steps

            b.started = Started(uplink_steps(self, b, comm))
        else:
            steps = self.aggregator.exchange(b.payloads, codecs=b.codecs, comm=comm, transport=self.transport,
                                             generators=self.generators.at(b.step, "aggregate", b.positions),
                                             label=label, states=b.states)
            b.started = Started(steps) if steps is not None else None
        b.launched = True

    def finish(self, b: BucketStep, comm: Communicator, *, check_agreement: bool = False) -> None:
        """The rest of stage 3, then 4 (server) and 5 (downlink and update); commits every state change.

        ``check_agreement`` compares the aggregates across ranks (first and verification steps).
        """
        if not b.launched:
            self.launch(b, comm)
        if b.compressed and self.server == "owner" and comm.world_size > 1:
            from .owner import finish_owned

            finish_owned(self, b, b.started.finish(), comm)  # type: ignore[union-attr]
            return
        cfg, params, states, names = self.config, b.params, b.states, b.names
        if not b.compressed:
            aggregates = b.started.finish()  # type: ignore[union-attr]
        else:
            aggregates = self._combine(b, comm)
            # finiteness costs a pass and a host read: every step for third-party aggregators,
            # at the first (and every verify_every) step for the built-ins, which their contract kit pins
            self._check_aggregates(aggregates, params, names, finite=check_agreement or not self.builtin_aggregator)
        if check_agreement and comm.world_size > 1:
            self._check_agreement(aggregates, names, comm)
        directions, duals = self.server_step(b, aggregates)
        for s, upd in zip(states, b.pending):  # the collectives have succeeded: commit worker and server state
            s.update(upd)
        self.apply(b, directions, duals)

    def _combine(self, b: BucketStep, comm: Communicator) -> list:
        """Stage 3 on this rank: the aggregator's result for the bucket (its state committed)."""
        agg = self.aggregator
        if b.started is not None:
            return agg.combine(b.started.finish(), b.payloads, b.messages, b.states, codecs=b.codecs)
        return agg.aggregate(b.payloads, b.messages, b.states, codecs=b.codecs, comm=comm,
                             generators=self.generators.at(b.step, "aggregate", b.positions),
                             transport=self.transport, label=self.config.name)

    def server_step(self, b: BucketStep, aggregates: Sequence, *, only: Sequence[int] | None = None) -> tuple[list, list]:
        """Stage 4: ``(directions, dual norms)`` of the aggregates (of the bucket's positions ``only``)."""
        idx = list(range(len(b.params))) if only is None else list(only)
        dual_norms: list[float | None] = [None] * len(idx)
        if self.config.lmo_at == "server":
            dense = [a.decode() if isinstance(a, Encoded) else a for a in aggregates]
            aggregates = block_directions(self.lmo, dense, [b.shapes[j] for j in idx],  # type: ignore[arg-type]
                                          views=[b.views[j] for j in idx],
                                          generator=self.generators.at(b.step, "server", b.positions).shared,
                                          shards=self._shards([b.params[j] for j in idx]))
            if self.lr_rule.needs_dual_norm:
                # <A, LMO direction of A> is the dual norm (exactly so for exact LMOs), at the cost of
                # one dot product instead of, for spectral, a full SVD for the nuclear norm; read in one go
                dual_norms = torch.stack([torch.sum(a.float() * d.float()) for a, d in zip(dense, aggregates)]
                                         ).tolist() if dense else []
        if b.rule is not None and type(b.rule).server is not Rule.server:
            directions = []
            for j, a in zip(idx, aggregates):
                d, changes = b.rule.server(a.decode() if isinstance(a, Encoded) else a, b.states[j], step=b.step)
                directions.append(d)
                b.pending[j].update(changes)
            aggregates = directions
        return list(aggregates), dual_norms

    def _shards(self, params: Sequence[Tensor]) -> list | None:
        return [shard_of(p) for p in params] if self.sharding is not None else None

    def apply(self, b: BucketStep, directions: Sequence, duals: Sequence[float | None]) -> None:
        """Stage 5 on this rank: each parameter moves by its (downlink-compressed) step."""
        lr, wd = b.group["lr"], b.group["weight_decay"]
        down = self.generators.at(b.step, "downlink", b.positions)
        for j, (p, s, name, d, dual) in enumerate(zip(b.params, b.states, b.names, directions, duals)):
            self.codec(p, self.downlink).apply_downlink_(p, s, d, lr=lr, wd=wd, scale=self.lr_scale(p, name, dual),
                                                         generator=down.param(j))

    def step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[dict],
        names: Sequence[str],
        *,
        group: dict,
        comm: Communicator,
        step: int = 0,
        check_agreement: bool = False,
        positions: Sequence[int] | None = None,
        rule: Rule | None = None,
    ) -> None:
        """One step of the group's parameters as one bucket: :meth:`prepare`, :meth:`launch`, :meth:`finish`."""
        b = self.prepare(params, grads, states, names, range(len(params)) if positions is None else positions,
                         group=group, comm=comm, step=step, rule=rule)
        self.launch(b, comm)
        self.finish(b, comm, check_agreement=check_agreement)

    def _check_aggregates(self, aggregates: Sequence, params: Sequence[Tensor], names: Sequence[str],
                          *, finite: bool = True) -> None:
        """An aggregator's output: one per parameter, right shape and dtype family, and (``finite``) finite."""
        kind = self.aggregator.kind
        if not isinstance(aggregates, (list, tuple)) or len(aggregates) != len(params):
            got = len(aggregates) if isinstance(aggregates, (list, tuple)) else type(aggregates).__name__
            raise AggregatorOutputError(
                f"group {self.config.name!r}: aggregator {kind!r} returned {got} results for {len(params)} "
                "parameters; nothing was applied"
            )
        dense = []
        for a, p, name in zip(aggregates, params, names):
            shape = a.payload.ctx.get("shape", p.shape) if isinstance(a, Encoded) else getattr(a, "shape", None)
            if not isinstance(a, (Tensor, Encoded)) or tuple(shape) != tuple(p.shape):
                raise AggregatorOutputError(
                    f"group {self.config.name!r}: aggregator {kind!r} returned "
                    f"{'shape ' + str(tuple(shape)) if shape is not None else type(a).__name__} for parameter "
                    f"{name!r} of shape {tuple(p.shape)}; nothing was applied"
                )
            if isinstance(a, Tensor):
                if not a.is_floating_point():
                    raise AggregatorOutputError(f"group {self.config.name!r}: aggregator {kind!r} returned dtype "
                                                f"{a.dtype} for parameter {name!r}; nothing was applied")
                dense.append(a)
        if dense and finite:
            finite = torch.stack([torch.isfinite(a).all() for a in dense])
            if not bool(finite.all()):
                bad = names[[i for i, a in enumerate(aggregates) if isinstance(a, Tensor)][int((~finite).nonzero()[0])]]
                raise AggregatorOutputError(
                    f"group {self.config.name!r}: aggregator {kind!r} returned NaN or Inf for parameter {bad!r} "
                    "although every gradient was finite; nothing was applied"
                )


    def _check_agreement(self, aggregates: Sequence, names: Sequence[str], comm: Communicator) -> None:
        """Every rank must hold the same aggregate: an exact checksum of each, all-gathered once."""
        from .consistency import checksums

        wires = [a.payload.wire if isinstance(a, Encoded) else (a,) for a in aggregates]
        device = wires[0][0].device if wires else torch.device("cpu")
        mine = torch.stack([checksums([w.reshape(-1) for w in ws], device).sum() for ws in wires])
        everyone = comm.all_gather(mine, label=f"{self.config.name}/agreement_check")
        differs = (everyone != everyone[comm.rank]).any(dim=0).nonzero().flatten().tolist()
        if differs:
            ranks = sorted({r for r in range(comm.world_size) for i in differs if everyone[r, i] != mine[i]})
            raise AggregatorOutputError(
                f"group {self.config.name!r}: aggregator {self.aggregator.kind!r} returned a different result on "
                f"ranks {ranks} than on rank {comm.rank} for {', '.join(repr(names[i]) for i in differs[:3])}; an "
                "aggregate must be identical on every rank. Nothing was applied."
            )


_IDENTITY: list[Compressor] = []
_MATRIX = ViewConfig(kind="matrix")


def _identity() -> Compressor:
    if not _IDENTITY:
        _IDENTITY.append(registry.build_plugin("compressor", {"kind": "identity"}))  # type: ignore[arg-type]
    return _IDENTITY[0]
