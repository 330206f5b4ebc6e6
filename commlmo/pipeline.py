r"""The per-group step every method is an instance of (REFERENCE.md section 1).

For each parameter ``X`` of a group and each worker ``i``::

    M_i = momentum(M_i, G_i)                      worker
    V_i = LMO(M_i)  if lmo_at == "worker" else M_i
    A   = aggregate(compress_up(V_1..V_M))        collectives (mean | vote | EF21)
    D   = LMO(A)    if lmo_at == "server" else A  every rank, identically
    S   = compress_down(D)                        every rank, identically (or EF21-P)
    X  <- X * (1 - lr * wd) - lr * scale(X) * S

"Server" is a role: the aggregate is already on every rank, so the server's
LMO and downlink run redundantly on each rank and cost no traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from . import registry
from .comm import Communicator
from .config import GroupConfig, MomentumConfig
from .plugin import LMO, Aggregator, Compressor, Encoded, LRRule

__all__ = ["Generators", "GroupRuntime", "momentum_update", "step_family", "corrupt", "Adversary"]

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


def step_family(lmo: LMO | None, lmo_at: str, aggregator: Aggregator, downlink: Compressor) -> Literal["lmo", "sign"]:
    """Whether the final step ``S`` is a +-1 tensor ("sign") or an LMO direction ("lmo").

    SignMuon's unit-gain learning-rate rule scales the two families differently.
    """
    if downlink.capabilities.sign_bits:
        return "sign"
    if lmo_at == "server" and lmo is not None:
        return lmo.capabilities.step_family
    if aggregator.capabilities.output_sign:
        return "sign"
    if lmo_at == "worker" and lmo is not None:
        return lmo.capabilities.step_family
    return "lmo"


@dataclass
class GroupRuntime:
    """The built plugins of one config group, and the step that runs them."""

    config: GroupConfig
    index: int
    lmo: LMO | None
    uplink: Compressor
    aggregator: Aggregator
    downlink: Compressor
    lr_rule: LRRule
    family: Literal["lmo", "sign"]
    generators: Generators
    adversary: Adversary | None = None

    @classmethod
    def build(cls, config: GroupConfig, *, index: int, seed: int, rank: int, device: torch.device) -> GroupRuntime:
        lmo = registry.build_plugin("lmo", config.lmo) if config.lmo is not None else None
        uplink = registry.build_plugin("compressor", config.uplink)
        aggregator = registry.build_plugin("aggregator", config.aggregator)
        downlink = registry.build_plugin("compressor", config.downlink)
        lr_rule = registry.build_plugin("lr_rule", config.lr_rule)
        return cls(
            config=config, index=index, lmo=lmo, uplink=uplink,  # type: ignore[arg-type]
            aggregator=aggregator, downlink=downlink, lr_rule=lr_rule,  # type: ignore[arg-type]
            family=step_family(lmo, config.lmo_at, aggregator, downlink),  # type: ignore[arg-type]
            generators=Generators(seed=seed, group_index=index, rank=rank, device=device),
        )

    def init_state(self, p: Tensor, state: dict) -> None:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state.update(self.aggregator.init_state(p))
            if self.downlink.capabilities.downlink_only:
                state.update(self.downlink.init_state(p))  # type: ignore[attr-defined]

    def step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[dict],
        names: Sequence[str],
        *,
        group: dict,
        comm: Communicator,
    ) -> None:
        cfg = self.config
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        for p, s in zip(params, states):
            self.init_state(p, s)
        updated = [momentum_update(s["momentum_buffer"], g, beta=beta, cfg=cfg.momentum) for g, s in zip(grads, states)]
        vectors = [v for _, v in updated]
        if cfg.lmo_at == "worker":
            vectors = self.lmo.directions(vectors, generator=self.generators.local)  # type: ignore[union-attr]
        if self.adversary is not None:
            vectors = [corrupt(v, self.adversary, generator=self.generators.local) for v in vectors]
        aggregates = self.aggregator.aggregate(
            vectors, states, uplink=self.uplink, comm=comm, generators=self.generators, label=cfg.name
        )
        dual_norms: list[float | None] = [None] * len(params)
        if cfg.lmo_at == "server":
            dense = [a.decode() if isinstance(a, Encoded) else a for a in aggregates]
            aggregates = self.lmo.directions(dense, generator=self.generators.shared)  # type: ignore[union-attr]
            if self.lr_rule.needs_dual_norm:
                # <A, LMO direction of A> is the dual norm (exactly so for exact LMOs), at the cost of
                # one dot product instead of, for spectral, a full SVD for the nuclear norm
                dual_norms = [float(torch.sum(a.float() * d.float())) for a, d in zip(dense, aggregates)]
        for s, (new, _) in zip(states, updated):
            s["momentum_buffer"] = new
        for p, s, name, d, dual in zip(params, states, names, aggregates, dual_norms):
            scale = self.lr_rule.scale(p.shape, lmo=self.lmo, step_family=self.family, dual_norm=dual, name=name)
            self._apply(p, s, d, lr=lr, wd=wd, scale=scale)

    def _apply(self, p: Tensor, state: dict, d: Tensor | Encoded, *, lr: float, wd: float, scale: float) -> None:
        """``X <- X(1 - lr*wd) - lr*scale*compress_down(D)``; EF21-P keeps the exact X apart."""
        downlink = self.downlink
        if downlink.capabilities.downlink_only:  # EF21-P: p holds W, the state holds X
            downlink.step_model_(p, state, d, lr=lr, wd=wd, scale=scale, generator=self.generators.shared)  # type: ignore[attr-defined]
            return
        if wd:
            p.mul_(1 - lr * wd)
        if downlink.kind != "identity":
            dense = d.decode() if isinstance(d, Encoded) else d
            d = Encoded(downlink.compress(dense, generator=self.generators.shared), downlink)
        if isinstance(d, Encoded):
            d.add_to_(p, alpha=-lr * scale)
        else:
            p.add_(d.to(p.dtype), alpha=-lr * scale)
