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
"Server" is a role: the aggregate is already on every rank, so the server's LMO
and downlink run redundantly on each rank and cost no traffic.  The transport of
each group is chosen once, when the optimizer is built (:meth:`GroupRuntime.plan`).

A group's ``view`` says how the LMO, the learning-rate rule and scaled
compressors see a tensor: one matrix (conv kernels ``out x in*kh*kw``), a stack
of independent matrices (MoE experts ``[E, m, n]``), or ``blocks`` fused
matrices along dim 0 (a fused QKV weight), each orthogonalised on its own and
given one compressor scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from . import registry
from .comm import Communicator
from .transport import mean_of_payloads
from .config import GroupConfig, MomentumConfig, ViewConfig
from .errors import AggregatorOutputError
from .plugin import LMO, Aggregator, Compressor, Encoded, LRRule, Rule

__all__ = ["Generators", "GroupRuntime", "momentum_update", "step_family", "corrupt", "Adversary", "block_directions"]

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


class Generators:
    """The random streams of one group: ``shared`` (same on every rank) and ``local`` (per rank)."""

    def __init__(self, *, seed: int, group_index: int, rank: int, device: torch.device):
        self.seed_base = seed * 1_000_003 + group_index  # for streams derived per step and parameter
        self.shared = torch.Generator(device=device)
        self.shared.manual_seed(seed * 1_000_003 + group_index)
        self.local = torch.Generator(device=device)
        self.local.manual_seed((seed * 1_000_003 + group_index) * 65_537 + rank + 1)

    def for_(self, compressor: Compressor) -> torch.Generator:
        return self.shared if compressor.capabilities.shared_randomness else self.local

    def state(self) -> dict[str, Tensor]:
        return {"shared": self.shared.get_state(), "local": self.local.get_state()}

    def load(self, state: dict[str, Tensor]) -> None:
        self.shared.set_state(state["shared"])
        self.local.set_state(state["local"])


def momentum_update(buf: Tensor, grad: Tensor, *, beta: float, cfg: MomentumConfig) -> tuple[Tensor, Tensor]:
    """``(new buffer, vector the method uses)``, computed out of place: the state is only
    replaced once the step's collectives have succeeded.

    EMA (torch.optim.Muon, SignMuon): ``M = beta*M + (1-beta)*G``, Nesterov
    ``(1-beta)*G + beta*M``.  Heavy-ball: ``M = beta*M + G``, Nesterov ``G + beta*M``.
    The two are trajectory-identical for scale-free (LMO, sign) steps.
    """
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
                     *, views: Sequence[str], generator: torch.Generator | None) -> list[Tensor]:
    """The LMO of each vector seen through the group's view: ``B`` matrices of ``m x n`` each.

    With the ``matrix`` view the LMO gets the tensor itself (it views conv kernels as
    matrices); with ``stack``/``blocks`` every block is its own matrix, and all blocks of
    all tensors go to one :meth:`~commlmo.plugin.LMO.directions` call (batched where the
    LMO batches equal shapes).
    """
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
    views: dict = field(default_factory=dict)  # id(param) -> ViewConfig, for the group view "auto"
    _codecs: dict = field(default_factory=dict)

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

    # ------------------------------------------------------------------ plan
    def view_of(self, p: Tensor):
        """The view of ``p``: the group's, or (``auto``) the one the module tree gave it."""
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
        """The learning-rate multiplier of ``p`` (read on the block shape for stack/blocks views)."""
        shape = p.shape if self.view_of(p).kind == "matrix" else torch.Size(self.block_shape(p)[1:])
        return self.lr_rule.scale(shape, lmo=self.lmo, step_family=self.family, dual_norm=dual, name=name)

    def init_state(self, p: Tensor, state: dict) -> None:
        if state:  # already initialised (stateless groups re-run this no-op every step)
            return
        if self.config.momentum is not None:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if self.rule is not None:
            state.update(self.rule.init_state(p))
        state.update(self.aggregator.init_state(p))
        state.update(self.downlink.init_downlink_state(p))

    # ------------------------------------------------------------------ step
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
    ) -> None:
        """One step of the group; ``check_agreement`` compares the aggregates across ranks (first step)."""
        cfg = self.config
        lr, wd = group["lr"], group["weight_decay"]
        for p, s in zip(params, states):
            self.init_state(p, s)
        shapes = [self.block_shape(p) for p in params]
        views = [self.view_of(p).kind for p in params]
        pending: list[dict[str, Tensor]] = [{} for _ in params]

        # 1. worker
        if self.rule is not None:
            vectors = []
            for g, s, upd in zip(grads, states, pending):
                v, changes = self.rule.worker(g, s, step=step, generator=self.generators.local)
                vectors.append(v)
                upd.update(changes)
        elif cfg.momentum is not None:
            beta = group["momentum"]
            vectors = []
            for g, s, upd in zip(grads, states, pending):
                new, v = momentum_update(s["momentum_buffer"], g, beta=beta, cfg=cfg.momentum)
                vectors.append(v)
                upd["momentum_buffer"] = new
        else:
            vectors = list(grads)
        if cfg.lmo_at == "worker":
            vectors = block_directions(self.lmo, vectors, shapes, views=views,  # type: ignore[arg-type]
                                       generator=self.generators.local)
        if self.adversary is not None:
            vectors = [corrupt(v, self.adversary, generator=self.generators.local) for v in vectors]

        # 2. uplink and 3. aggregate
        if self.rule is None or self.rule.uplink_active(step):
            codecs = [self.codec(p) for p in params]
            messages = [self.aggregator.message(v, s) for v, s in zip(vectors, states)]
            payloads = [c.compress(m, generator=self.generators.for_(c)) for c, m in zip(codecs, messages)]
            if self.server == "owner" and comm.world_size > 1:
                from .owner import owner_step

                owner_step(self, params, states, names, payloads, codecs, comm, lr=lr, wd=wd, step=step)
                for s, upd in zip(states, pending):  # the collectives have succeeded
                    s.update(upd)
                return
            aggregates = self.aggregator.aggregate(
                payloads, messages, states, codecs=codecs, comm=comm, generators=self.generators,
                transport=self.transport, label=cfg.name,
            )
            # finiteness costs a pass and a host read: every step for third-party aggregators,
            # at the first (and every verify_every) step for the built-ins, which their contract kit pins
            builtin = type(self.aggregator).__module__.split(".")[0] == "commlmo_aggregators"
            self._check_aggregates(aggregates, params, names, finite=check_agreement or not builtin)
            if check_agreement and comm.world_size > 1:
                self._check_agreement(aggregates, names, comm)
        else:  # a rule's full-precision phase (1-bit Adam's warm-up): a float32 mean
            identity = _identity()
            aggregates = mean_of_payloads([identity.compress(v) for v in vectors], identity, comm,
                                          transport="owner", label=f"{cfg.name}/warmup")
            if check_agreement and comm.world_size > 1:
                self._check_agreement(aggregates, names, comm)

        # 4. server
        dual_norms: list[float | None] = [None] * len(params)
        if cfg.lmo_at == "server":
            dense = [a.decode() if isinstance(a, Encoded) else a for a in aggregates]
            aggregates = block_directions(self.lmo, dense, shapes, views=views,  # type: ignore[arg-type]
                                          generator=self.generators.shared)
            if self.lr_rule.needs_dual_norm:
                # <A, LMO direction of A> is the dual norm (exactly so for exact LMOs), at the cost of
                # one dot product instead of, for spectral, a full SVD for the nuclear norm
                dual_norms = [float(torch.sum(a.float() * d.float())) for a, d in zip(dense, aggregates)]
        if self.rule is not None and type(self.rule).server is not Rule.server:
            directions = []
            for a, s, upd in zip(aggregates, states, pending):
                d, changes = self.rule.server(a.decode() if isinstance(a, Encoded) else a, s, step=step)
                directions.append(d)
                upd.update(changes)
            aggregates = directions

        # commit the worker and server state: the collectives have succeeded
        for s, upd in zip(states, pending):
            s.update(upd)

        # 5. downlink and update
        for p, s, name, d, dual in zip(params, states, names, aggregates, dual_norms):
            down = self.codec(p, self.downlink)
            down.apply_downlink_(p, s, d, lr=lr, wd=wd, scale=self.lr_scale(p, name, dual),
                                 generator=self.generators.shared)

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
        from .consistency import _checksum

        sums = []
        for a in aggregates:
            wires = a.payload.wire if isinstance(a, Encoded) else (a,)
            sums.append(sum(_checksum(w.reshape(-1)) for w in wires))
        mine = torch.tensor(sums, dtype=torch.int64)
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
