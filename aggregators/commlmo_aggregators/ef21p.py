r"""EF21-P downlink: broadcast a compressed *model*, keep the exact one apart.

The server keeps the exact model ``X`` and every worker holds the broadcast
model ``W`` (the parameters gradients are taken at)::

    X <- X (1 - lr*wd) - lr * scale * D
    W <- W + C(X - W)

(Gruntkowska, Tyurin, Richtárik 2023, "EF21-P and Friends"; used as the downlink of
EF21-Muon and of the SignMuon paper's EF21-MuonSign).  Here every rank runs
the server role redundantly (``server: replicated``), so ``X`` lives in each rank's
optimizer state (``ef21p_model``, this stage's own state) and the compressed difference is
applied identically on all; under ``server: owner`` only the parameter's owner keeps ``X``
and sends ``C(X - W)`` to the others.  It is an ordinary downlink stage: it overrides
:meth:`~commlmo.plugin.Compressor.init_downlink_state` and
:meth:`~commlmo.plugin.Compressor.apply_downlink_`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from commlmo import registry
from commlmo.plugin import Compressor, CompressorCapabilities, Encoded, Payload, PluginConfig

__all__ = ["EF21P", "EF21PConfig"]


class EF21PConfig(PluginConfig):
    """Config of ``ef21p``."""

    kind: Literal["ef21p"] = "ef21p"
    compressor: Any = Field({"kind": "sign", "scale": "mean"}, description="The compressor of the model difference X - W.")

    @field_validator("compressor", mode="before")
    @classmethod
    def _inner(cls, v: Any) -> Any:
        cfg = registry.validate_plugin_config("compressor", v)
        if cfg.kind == "ef21p":
            raise ValueError("ef21p cannot wrap another ef21p")
        return cfg


class EF21P(Compressor):
    """EF21-P downlink: workers hold W, W += C(X - W); the exact model X stays in optimizer state."""

    Config = EF21PConfig

    def __init__(self, config=None, **fields):
        super().__init__(config, **fields)
        self.inner: Compressor = registry.build_plugin("compressor", self.config.compressor)  # type: ignore[assignment]

    @property
    def capabilities(self) -> CompressorCapabilities:  # type: ignore[override]
        return type(self).capabilities_of(self.config)

    @classmethod
    def capabilities_of(cls, config) -> CompressorCapabilities:
        inner = config.compressor
        if not isinstance(inner, PluginConfig):
            inner = registry.validate_plugin_config("compressor", inner)
        caps = registry.get("compressor", inner.kind).capabilities_of(inner)
        return CompressorCapabilities(
            summable=False, fixed_size=caps.fixed_size, contractive=caps.contractive, unbiased=caps.unbiased,
            stochastic=caps.stochastic, downlink_only=True,
        )

    def compress(self, x: Tensor, *, generator: torch.Generator | None = None) -> Payload:
        return self.inner.compress(x, generator=generator)

    def decompress(self, payload: Payload) -> Tensor:
        return self.inner.decompress(payload)

    def wire_nbytes(self, shape, dtype) -> int:
        return self.inner.wire_nbytes(shape, dtype)

    def alpha(self, shape):
        return self.inner.alpha(shape)

    def omega(self, shape):
        return self.inner.omega(shape)

    #: under the owner server role only a parameter's owner keeps the exact model
    owner_state = ("ef21p_model",)

    def init_downlink_state(self, param: Tensor) -> dict[str, Tensor]:
        return {"ef21p_model": param.detach().clone()}

    def downlink_payload(self, p: Tensor, state: dict, d: Tensor | Encoded, *, lr: float, wd: float, scale: float,
                         generator: torch.Generator | None) -> Payload:
        """On the owner: advance the exact model by the step, and compress ``X - W``."""
        x = state["ef21p_model"]
        if wd:
            x.mul_(1 - lr * wd)
        if isinstance(d, Encoded):
            d.add_to_(x, alpha=-lr * scale)
        else:
            x.add_(d.to(x.dtype), alpha=-lr * scale)
        return self.inner.compress(x - p, generator=generator)

    def apply_downlink_payload_(self, p: Tensor, state: dict, payload: Payload, *, lr: float, wd: float,
                                scale: float, owner: bool) -> None:
        """On every rank: ``W <- W + C(X - W)``."""
        self.inner.decompress_add_(p, payload, alpha=1.0)

    def apply_downlink_(
        self, p: Tensor, state: dict, d: Tensor | Encoded, *, lr: float, wd: float, scale: float,
        generator: torch.Generator | None,
    ) -> None:
        """Advance the exact model by the step, then move ``p`` (= W) by ``C(X - W)``."""
        payload = self.downlink_payload(p, state, d, lr=lr, wd=wd, scale=scale, generator=generator)
        self.apply_downlink_payload_(p, state, payload, lr=lr, wd=wd, scale=scale, owner=True)
