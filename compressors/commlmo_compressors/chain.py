"""``chain``: compose compressors, each compressing the previous one's values."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import (
    BeforeValidator,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from torch import Tensor

from commlmo import registry
from commlmo.errors import CommlmoError
from commlmo.plugin import Compressor, CompressorCapabilities, Payload, PluginConfig

from ._common import LayoutCompressor, NonFiniteInputError, WireLayout

__all__ = ["Chain"]


def _stage(value: Any) -> PluginConfig:
    """Validate one stage against its own plugin's Config (the registry finds it by ``kind``)."""
    try:
        return registry.validate_plugin_config("compressor", value)
    except ValidationError as exc:
        kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", value)
        details = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid {kind!r} stage: {details}") from None
    except CommlmoError as exc:
        raise ValueError(str(exc)) from None


StageConfig = Annotated[SerializeAsAny[PluginConfig], BeforeValidator(_stage)]


class Chain(LayoutCompressor):
    r"""Composition: stage ``i+1`` compresses the values of stage ``i``'s payload.

    Stage 1 compresses ``x``; every later stage compresses the *first
    floating-point wire tensor* of the previous payload (topk's or randk's
    values, rankk's ``P``...), and the other wire tensors (indices...) pass
    through unchanged: ``wire = (last stage's wire..., earlier pass-through
    tensors...)``.  EF21-Muon's "TopK + Natural" is
    ``{"kind": "chain", "stages": [{"kind": "topk", "k": 0.05}, {"kind": "natural"}]}``:
    ``k`` entries at ``9 + index`` bits each.  One generator feeds every stage;
    with a shared-randomness stage it is shared by all ranks, so later stages'
    noise is then correlated across ranks (still unbiased).

    The contract is derived from the stages' contracts (topk + natural is
    EF21-Muon's, Gruntkowska et al. 2025, arXiv 2510.00643), using how each stage decodes its values
    (``values_decode`` of the built-ins; unknown for third-party stages, which
    then only keep the properties that need no such knowledge):

    * unbiased if every stage is, and every stage but the last decodes its values
      linearly into distinct coordinates (``restriction`` or ``embedding``):
      ``1 + omega = prod_i (1 + omega_i)`` (the stages' errors are orthogonal in
      expectation, and an embedding scales values and errors alike);
    * contractive (in expectation) if stage 1 is, every stage but the last is a
      ``restriction`` (keeps entries of ``x`` exactly, zeros elsewhere), and each
      later stage is contractive (``alpha_i``) or unbiased with ``omega_i < 1``
      (``alpha_i = 1 - omega_i``): ``alpha = prod_i alpha_i``.  For topk + natural,
      ``alpha = (7/8) k/d``.
    """

    class Config(PluginConfig):
        kind: Literal["chain"] = "chain"
        stages: tuple[StageConfig, ...]

        @field_validator("stages")
        @classmethod
        def _at_least_two(cls, stages: tuple) -> tuple:
            if len(stages) < 2:
                raise ValueError(f"a chain needs at least 2 stages, got {len(stages)}; use the compressor itself")
            return stages

        @model_validator(mode="after")
        def _stages_pass_values(self):
            # every stage but the last must leave floating-point values for the next one
            Chain(self)._stage_shapes(torch.Size([64, 64]), torch.float32)
            return self

    def __init__(self, config=None, **fields):
        super().__init__(config, **fields)
        self.stages: list[Compressor] = [registry.build_plugin("compressor", c) for c in self.config.stages]

    # ------------------------------------------------------------------ contract

    @property
    def capabilities(self) -> CompressorCapabilities:  # type: ignore[override]
        caps = [s.capabilities for s in self.stages]
        return CompressorCapabilities(
            summable=all(c.summable for c in caps),
            fixed_size=all(c.fixed_size for c in caps),
            unbiased=self._omegas(None) is not None,
            contractive=self._alphas(None) is not None,
            stochastic=any(c.stochastic for c in caps),
            shared_randomness=any(c.shared_randomness for c in caps),
            downlink_only=any(c.downlink_only for c in caps),
        )

    @property
    def values_decode(self):  # type: ignore[override]
        kinds = [getattr(s, "values_decode", None) for s in self.stages]
        if all(k == "restriction" for k in kinds):
            return "restriction"
        return "embedding" if all(k in ("restriction", "embedding") for k in kinds) else None

    def _stage_shapes(self, shape: torch.Size, dtype: torch.dtype) -> list[tuple[torch.Size, torch.dtype]]:
        """The (shape, dtype) each stage compresses (``alpha``/``omega`` assume float32 input)."""
        out = [(torch.Size(shape), dtype)]
        for stage in self.stages[:-1]:
            layout = _layout(stage, *out[-1])
            out.append(layout[_values_slot(layout, stage)])
        return out

    def _omegas(self, shape: torch.Size | None) -> list[float] | None:
        heads_ok = all(getattr(s, "values_decode", None) in ("restriction", "embedding") for s in self.stages[:-1])
        if not heads_ok or not all(s.capabilities.unbiased for s in self.stages):
            return None
        if shape is None:
            return []
        return [s.omega(sh) for s, (sh, _) in zip(self.stages, self._stage_shapes(shape, torch.float32))]

    def _alphas(self, shape: torch.Size | None) -> list[float] | None:
        first, rest = self.stages[0], self.stages[1:]
        if not first.capabilities.contractive:
            return None
        if not all(getattr(s, "values_decode", None) == "restriction" for s in self.stages[:-1]):
            return None
        if not all(s.capabilities.contractive or s.capabilities.unbiased for s in rest):
            return None
        if shape is None:
            return [] if all(s.capabilities.contractive or _omega_below_one(s) for s in rest) else None
        alphas = []
        for s, (sh, _) in zip(self.stages, self._stage_shapes(shape, torch.float32)):
            a = s.alpha(sh) if s.capabilities.contractive else 1 - s.omega(sh)
            if a is None or a <= 0:
                return None
            alphas.append(a)
        return alphas

    def alpha(self, shape: torch.Size) -> float | None:
        alphas = self._alphas(torch.Size(shape))
        return None if alphas is None else float(torch.tensor(alphas, dtype=torch.float64).prod())

    def omega(self, shape: torch.Size) -> float | None:
        omegas = self._omegas(torch.Size(shape))
        return None if omegas is None else float(torch.tensor(omegas, dtype=torch.float64).add(1).prod() - 1)

    def wire_layout(self, shape: torch.Size, dtype: torch.dtype) -> WireLayout:
        passthrough: list = []
        current = (torch.Size(shape), dtype)
        for stage in self.stages[:-1]:
            layout = _layout(stage, *current)
            slot = _values_slot(layout, stage)
            passthrough = list(layout[:slot]) + list(layout[slot + 1 :]) + passthrough
            current = layout[slot]
        return tuple(_layout(self.stages[-1], *current)) + tuple(passthrough)

    # ------------------------------------------------------------------ codec

    def compress(self, x: Tensor, *, generator: torch.Generator | None = None) -> Payload:
        contexts, slots, passthrough = [], [], []
        values = x
        for i, stage in enumerate(self.stages):
            try:
                payload = stage.compress(values, generator=generator)
            except NonFiniteInputError as exc:
                raise NonFiniteInputError(f"chain compressor, stage {i + 1}: {exc}") from None
            contexts.append(payload.ctx)
            if i == len(self.stages) - 1:
                wire = tuple(payload.wire)
                break
            slot = _values_slot(tuple((w.shape, w.dtype) for w in payload.wire), stage)
            slots.append((slot, len(payload.wire)))
            passthrough = list(payload.wire[:slot]) + list(payload.wire[slot + 1 :]) + passthrough
            values = payload.wire[slot]
        ctx = {"stages": contexts, "slots": slots, "n_last": len(wire)}
        return Payload(wire=wire + tuple(passthrough), ctx=ctx)

    def decompress(self, payload: Payload) -> Tensor:
        ctx = payload.ctx
        n_last = ctx["n_last"]
        rest = list(payload.wire[n_last:])
        values = self.stages[-1].decompress(Payload(wire=tuple(payload.wire[:n_last]), ctx=ctx["stages"][-1]))
        for i in range(len(self.stages) - 2, -1, -1):
            slot, count = ctx["slots"][i]
            own, rest = rest[: count - 1], rest[count - 1 :]
            wire = tuple(own[:slot]) + (values,) + tuple(own[slot:])
            values = self.stages[i].decompress(Payload(wire=wire, ctx=ctx["stages"][i]))
        return values


def _omega_below_one(stage: Compressor) -> bool:
    # omega may depend on the shape; the built-in unbiased stages used after a restriction
    # (natural: 1/8) do not, so probe a generic shape
    omega = stage.omega(torch.Size([1024]))
    return omega is not None and omega < 1


def _layout(stage: Compressor, shape: torch.Size, dtype: torch.dtype) -> WireLayout:
    """A stage's wire layout: declared by built-ins, measured on zeros for third-party stages."""
    if isinstance(stage, LayoutCompressor):
        return stage.wire_layout(shape, dtype)
    gen = torch.Generator().manual_seed(0)
    payload = stage.compress(torch.zeros(shape, dtype=dtype), generator=gen)
    return tuple((w.shape, w.dtype) for w in payload.wire)


def _values_slot(layout: WireLayout, stage: Compressor) -> int:
    for i, (_, dtype) in enumerate(layout):
        if dtype.is_floating_point:
            return i
    raise ValueError(
        f"chain compressor: stage {stage.kind!r} sends no floating-point wire tensor for the next "
        f"stage to compress (its wire dtypes: {[str(d) for _, d in layout]}); put it last"
    )
