"""The LMO contract kit over every built-in LMO, and proof that it catches broken ones.

Every built-in LMO (distribution ``commlmo``) is checked with representative
configs, on small shapes and few drawn examples (every value pattern x dtype
still runs once).  ``BrokenLMO`` breaks one promise per setting, and the kit
must name that promise.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import pytest
import torch

from commlmo import registry
from commlmo.plugin import LMO, LMOCapabilities, PluginConfig
from commlmo.testing import (
    PATTERNS,
    LMOContractError,
    LMOTolerance,
    check_lmo,
    declared_tolerance,
)
from commlmo.testing._broken import BREAKS, BrokenLMO
from commlmo.testing.lmo_kit import PROPERTIES

FAST = {"examples": 4, "max_numel": 64}

REPRESENTATIVE: dict[str, list] = {
    "sign": ["sign", {"kind": "sign", "zero": "positive"}, {"kind": "sign", "zero": "keep"}],
    "spectral": [{"kind": "spectral", "method": "svd"}, "spectral", {"kind": "spectral", "method": "polar_express"},
                 {"kind": "spectral", "dtype": "float32", "batch": False}],
}

# Defects the kit found in the built-ins and that are fixed: the norms accumulated squares in
# float32, which overflowed for the `huge` pattern (|G| ~ 4e28: dual_norm = inf, direction = 0)
# and underflowed for `tiny` (|G| ~ 5e-29); Newton-Schulz divided by an overflowing ||G||_F
# (direction = 0, as torch.optim.Muon).  Nothing is known to fail today.
KNOWN_RANGE_DEFECTS: dict[str, tuple[str, ...]] = {}


def _defects(config) -> tuple[str, ...]:
    kind = config if isinstance(config, str) else config["kind"]
    if kind == "spectral" and not isinstance(config, str) and config.get("method") == "svd":
        return ()
    return KNOWN_RANGE_DEFECTS.get(kind, ())


def _builtin_configs():
    for row in registry.listing("lmo"):
        if not row.info.builtin:
            continue
        name = row.info.name
        for i, config in enumerate(REPRESENTATIVE.get(name, [name])):
            yield pytest.param(config, id=f"{name}-{i}")


@pytest.mark.parametrize("config", list(_builtin_configs()))
def test_every_builtin_lmo_keeps_its_contract(config):
    skipped = _defects(config)
    check_lmo(config, patterns=[p for p in PATTERNS if p not in skipped], **FAST)


@pytest.mark.parametrize("config", ["colnorm", "rownorm", "bias_rms", "euclidean", "spectral"])
def test_the_range_defects_the_kit_found_are_fixed(config):
    """float32 squares overflowed for |G| ~ 4e28 and underflowed for ~5e-29 (dual_norm = inf, direction = 0)."""
    check_lmo(config, patterns=["tiny", "huge"], dtypes=[torch.float32], **FAST)


def test_svd_is_held_to_the_exact_contract_and_newton_schulz_is_not_exact():
    svd = registry.build_plugin("lmo", {"kind": "spectral", "method": "svd"})
    assert declared_tolerance(svd).exact
    for config in ("spectral", {"kind": "spectral", "method": "polar_express"}):
        lmo = registry.build_plugin("lmo", config)
        assert not declared_tolerance(lmo).exact
        with pytest.raises(LMOContractError) as info:
            check_lmo(lmo, exact=True, patterns=["normal"], **FAST)
        assert info.value.property in ("duality", "norm-ball")


@pytest.mark.parametrize("breaks", sorted(BREAKS))
def test_the_kit_names_the_broken_promise(breaks):
    with pytest.raises(LMOContractError) as info:
        check_lmo(BrokenLMO(breaks=breaks), **FAST)
    err = info.value
    assert err.property == BREAKS[breaks] and err.property in PROPERTIES
    msg = str(err)
    assert isinstance(err, AssertionError)
    assert f"property {BREAKS[breaks]!r}" in msg and "broken_lmo" in msg and f"breaks={breaks!r}" in msg
    assert "TensorExample(shape=" in msg and "dtype=torch." in msg and "seed=" in msg


def test_a_correct_lmo_passes_and_the_drawn_examples_alone_catch_a_broken_one():
    check_lmo(BrokenLMO(breaks="nothing"), examples=30, max_numel=128)
    with pytest.raises(LMOContractError) as info:
        check_lmo(BrokenLMO(breaks="duality"), explicit=False, examples=20)
    assert info.value.property == "duality" and "TensorExample(shape=" in str(info.value)


class _ShrunkSign(LMO):
    """0.9 * sign(G): an approximate max-norm LMO that declares how approximate it is."""

    class Config(PluginConfig):
        kind: Literal["shrunk_sign"] = "shrunk_sign"

    capabilities: ClassVar[LMOCapabilities] = LMOCapabilities(min_ndim=1)
    contract_tolerance = LMOTolerance(duality=(0.89, 1.0), max_norm=1.0)

    def direction(self, g, *, generator=None):
        return (0.9 * torch.where(g < 0, -1.0, 1.0)).to(g.dtype)

    def norm(self, d):
        return d.double().abs().amax()

    def dual_norm(self, g):
        return g.double().abs().sum()


def test_a_declared_tolerance_is_honoured_and_exact_overrides_it():
    check_lmo(_ShrunkSign(), shapes=[(5,), (4, 3)], examples=3)
    with pytest.raises(LMOContractError, match="property 'duality'"):
        check_lmo(_ShrunkSign(), shapes=[(5,), (4, 3)], examples=3, exact=True)
    with pytest.raises(LMOContractError, match="below the declared 0.95"):
        check_lmo(_ShrunkSign(), shapes=[(5,)], examples=3, tolerance=LMOTolerance(duality=(0.95, 1.0)))


def test_shapes_follow_the_capabilities():
    seen: list[tuple[int, ...]] = []

    class Spy(BrokenLMO):
        capabilities: ClassVar[LMOCapabilities] = LMOCapabilities(min_ndim=2, max_ndim=2)

        def direction(self, g, *, generator=None):
            seen.append(tuple(g.shape))
            return super().direction(g, generator=generator)

    check_lmo(Spy(), examples=10, max_numel=32)
    assert seen and all(len(s) == 2 for s in seen)
