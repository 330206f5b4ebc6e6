r"""Per-layer learning-rate rules: the multiplier ``scale`` in ``X -= lr * scale * S``.

All but ``gluon`` are deterministic functions of the parameter's shape, so every
rank computes them locally at no communication cost.  Shapes are ``out x in``
(``nn.Linear``); conv kernels are ``out x in x kh x kw``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from commlmo.plugin import LMO, LRRule, PluginConfig

__all__ = ["Constant", "Original", "MatchRMSAdamW", "UnitGain", "ScionRadius", "GluonRadius"]

StepFamily = Literal["lmo", "sign"]


def _leading_dims(rule: LRRule, shape: Sequence[int]) -> tuple[int, int]:
    """``(shape[0], shape[1])``, the dimensions torch.optim.Muon's ``_adjust_lr`` reads."""
    if len(shape) < 2:
        raise ValueError(
            f"lr_rule {rule.kind!r} needs a matrix shape (ndim >= 2); got {tuple(shape)}. "
            "Give vectors lr_rule 'constant', or route them to a group with an element-wise rule."
        )
    return int(shape[0]), int(shape[1])


def _fan_out_in(rule: LRRule, shape: Sequence[int]) -> tuple[int, int]:
    """``(shape[0], prod(shape[1:]))``: the LMO's matrix view of a conv kernel."""
    out, _ = _leading_dims(rule, shape)
    return out, math.prod(int(s) for s in shape[1:])


class Constant(LRRule):
    """One global learning rate: scale 1 for every layer."""

    class Config(PluginConfig):
        kind: Literal["constant"] = "constant"

    def scale(
        self, shape: Sequence[int], *, lmo: LMO | None, step_family: StepFamily,
        dual_norm: float | None = None, name: str = "",
    ) -> float:
        return 1.0


class Original(LRRule):
    r"""Keller Jordan's Muon rule: sqrt(max(1, A/B)) (torch.optim.Muon's default).

    ``A, B = shape[:2]`` exactly as ``torch.optim._muon._adjust_lr`` reads them, so a
    conv kernel ``out x in x kh x kw`` uses ``out/in``, not ``out/(in*kh*kw)`` (use
    ``unit_gain`` for the fan-in view).  Makes the RMS of ``U V^T`` steps comparable
    across aspect ratios.  Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/.
    """

    class Config(PluginConfig):
        kind: Literal["original"] = "original"

    def scale(
        self, shape: Sequence[int], *, lmo: LMO | None, step_family: StepFamily,
        dual_norm: float | None = None, name: str = "",
    ) -> float:
        a, b = _leading_dims(self, shape)
        return math.sqrt(max(1, a / b))


class MatchRMSAdamW(LRRule):
    r"""Moonshot's rule: 0.2 * sqrt(max(A, B)), so Muon reuses AdamW's learning rate.

    ``A, B = shape[:2]`` as in ``torch.optim._muon._adjust_lr``.  An ``m x n`` polar
    factor has RMS ``1/sqrt(max(m, n))``; the factor lifts it to AdamW's typical
    update RMS of 0.2.  Liu et al. 2025, "Muon is scalable for LLM training", arXiv 2502.16982.
    """

    class Config(PluginConfig):
        kind: Literal["match_rms_adamw"] = "match_rms_adamw"

    def scale(
        self, shape: Sequence[int], *, lmo: LMO | None, step_family: StepFamily,
        dual_norm: float | None = None, name: str = "",
    ) -> float:
        a, b = _leading_dims(self, shape)
        return 0.2 * math.sqrt(max(a, b))


class UnitGain(LRRule):
    r"""SignMuon's unit-gain rule: sqrt(max(1, m/n)) for LMO steps, 1/sqrt(n) for sign steps.

    With ``m = shape[0]`` and fan-in ``n = prod(shape[1:])``, the step's RMS gain
    ``||lr * scale * S||_F / sqrt(m)`` equals ``lr`` for every shape: ``||U V^T||_F =
    sqrt(min(m, n))`` and a +-1 matrix has ``||S||_F = sqrt(m n)``.  ``family: auto``
    takes the family from the LMO's step (``sign`` when every entry is +-1).
    Smirnova, Kravatskiy, Kovalev (SignMuon), code intsystems/SignMuon, ``common/lr_scaling.py``.
    """

    class Config(PluginConfig):
        kind: Literal["unit_gain"] = "unit_gain"
        family: Literal["auto", "lmo", "sign"] = Field("auto", description="step family; auto: the LMO's")

    def scale(
        self, shape: Sequence[int], *, lmo: LMO | None, step_family: StepFamily,
        dual_norm: float | None = None, name: str = "",
    ) -> float:
        m, n = _fan_out_in(self, shape)
        family = step_family if self.config.family == "auto" else self.config.family
        return math.sqrt(max(1.0, m / n)) if family == "lmo" else 1.0 / math.sqrt(n)


class ScionRadius(LRRule):
    r"""Scion's per-layer radius for the layer's norm (spectral: sqrt(d_out/d_in), sign: 1/d_in...), times scale.

    Radii of the unit-ball LMOs, following the defaults of LIONS-EPFL/scion ``scion.py``
    (``d_out = shape[0]``, ``d_in = prod(shape[1:])``):

    * ``spectral``: ``sqrt(d_out / d_in)`` (``Spectral(normalized=True)``); conv kernels
      ``c_out x c_in x k...``: ``sqrt(c_out / c_in) / prod(k)`` (``SpectralConv``);
    * ``colnorm``: ``sqrt(d_out)`` (``ColNorm(normalized=False)``, for input layers);
    * ``rownorm``: ``1 / sqrt(d_in)`` (``RowNorm(normalized=True)``);
    * ``sign``: ``1 / d_in`` (``Sign(normalized=True)``, for the output head);
    * ``bias_rms``: 1 (``BiasRMS``).

    Scion's group-wide radius (e.g. 50 for hidden layers, 3000 for the head in its
    NanoGPT example) is ``scale`` here, or folds into ``lr``.  Pethick et al. 2025,
    "Training deep learning models with norm-constrained LMOs", arXiv 2502.07529.
    """

    class Config(PluginConfig):
        kind: Literal["scion"] = "scion"
        scale: float = Field(1.0, gt=0.0, description="Scion's radius for the group")

    def scale(
        self, shape: Sequence[int], *, lmo: LMO | None, step_family: StepFamily,
        dual_norm: float | None = None, name: str = "",
    ) -> float:
        kind = lmo.kind if lmo is not None else ("sign" if step_family == "sign" else None)
        return self.config.scale * self._radius(kind, tuple(int(s) for s in shape), name)

    def _radius(self, kind: str | None, shape: tuple[int, ...], name: str) -> float:
        if kind == "bias_rms":
            return 1.0
        d_out, d_in = _fan_out_in(self, shape)
        if kind == "spectral":
            return math.sqrt(d_out / shape[1]) / math.prod(shape[2:])
        if kind == "colnorm":
            return math.sqrt(d_out)
        if kind == "rownorm":
            return 1.0 / math.sqrt(d_in)
        if kind == "sign":
            return 1.0 / d_in
        raise ValueError(
            f"lr_rule 'scion' has no radius for lmo {kind!r} (parameter {name or '?'} of shape {shape}); "
            "Scion defines spectral, colnorm, rownorm, sign and bias_rms. Use lr_rule 'constant' instead."
        )


class GluonRadius(LRRule):
    r"""Gluon's adaptive radius: t = ||G||_* / (L0 + L1 ||G||_*) from the layer's dual norm.

    Under layer-wise ``(L0, L1)``-smoothness, ``||grad_l f(X) - grad_l f(Y)||_* <=
    (L0 + L1 ||grad_l f(X)||_*) ||X_l - Y_l||``, the step ``X_l -= t_l D_l`` with
    ``D_l`` the unit-ball LMO direction and ``t_l`` above decreases ``f``.
    Use ``lr: 1`` for Gluon's step exactly; ``lr`` multiplies ``t``.  ``||G||_*`` is the
    dual norm of the aggregate the server LMO is applied to (needs ``lmo_at: server``).
    Riabinin, Shulgin, Gruntkowska, Richtárik 2025, "Gluon", arXiv 2505.13416.
    """

    needs_dual_norm = True

    class Config(PluginConfig):
        kind: Literal["gluon"] = "gluon"
        l0: float = Field(1.0, ge=0.0, description="L0 of the layer's (L0, L1)-smoothness")
        l1: float = Field(0.0, ge=0.0, description="L1 of the layer's (L0, L1)-smoothness")

        @model_validator(mode="after")
        def _not_both_zero(self) -> GluonRadius.Config:
            if self.l0 + self.l1 <= 0:
                raise ValueError(f"gluon needs l0 + l1 > 0 (got l0={self.l0}, l1={self.l1})")
            return self

    def scale(
        self, shape: Sequence[int], *, lmo: LMO | None, step_family: StepFamily,
        dual_norm: float | None = None, name: str = "",
    ) -> float:
        if dual_norm is None:
            raise ValueError(
                f"lr_rule 'gluon' needs the dual norm ||G||_* of parameter {name or '?'} "
                f"(shape {tuple(shape)}); the optimizer passes it when the LMO runs on the server"
            )
        if dual_norm == 0:  # the direction is 0 too; avoid 0/0 when l0 == 0
            return 0.0
        return dual_norm / (self.config.l0 + self.config.l1 * dual_norm)
