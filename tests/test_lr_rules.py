"""Built-in learning-rate rules: values on known shapes, torch.optim.Muon's ``_adjust_lr``, validation."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch.optim._muon import _adjust_lr

from commlmo.registry import build_plugin

SHAPES = [(64, 32), (32, 64), (128, 128), (1, 7), (16, 3, 3, 3), (10, 4, 5)]


def _scale(rule, shape, *, lmo=None, step_family="lmo", **kw):
    return build_plugin("lr_rule", rule).scale(torch.Size(shape), lmo=lmo, step_family=step_family, **kw)


def _lmo(kind):
    return build_plugin("lmo", kind)


@pytest.mark.parametrize("shape", SHAPES)
def test_constant_is_one(shape):
    assert _scale("constant", shape) == 1.0
    assert _scale("constant", (5,), step_family="sign") == 1.0


@pytest.mark.parametrize("rule", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("shape", SHAPES)
def test_muon_rules_equal_torch_adjust_lr(rule, shape):
    assert _scale(rule, shape, lmo=_lmo("spectral")) == _adjust_lr(1.0, rule, torch.Size(shape))


def test_muon_rules_read_the_first_two_dims_like_torch():
    assert _scale("original", (64, 16, 3, 3)) == 2.0  # sqrt(64/16), not sqrt(64/144)
    assert _scale("match_rms_adamw", (64, 16, 3, 3)) == pytest.approx(0.2 * 8)


@pytest.mark.parametrize("rule", ["original", "match_rms_adamw", "unit_gain"])
def test_matrix_rules_reject_vectors_with_the_shape(rule):
    with pytest.raises(ValueError, match=r"ndim >= 2\); got \(7,\)"):
        _scale(rule, (7,))


def test_unit_gain_both_families():
    lmo_family = {"kind": "unit_gain", "family": "lmo"}
    assert _scale(lmo_family, (256, 64)) == 2.0
    assert _scale(lmo_family, (64, 256)) == 1.0
    assert _scale(lmo_family, (64, 4, 2, 2), step_family="sign") == 2.0  # fan-in 16: sqrt(64/16)
    sign_family = {"kind": "unit_gain", "family": "sign"}
    assert _scale(sign_family, (10, 256)) == 1 / 16
    assert _scale(sign_family, (64, 3, 3, 3)) == 1 / math.sqrt(27)
    assert _scale("unit_gain", (10, 256), step_family="sign") == 1 / 16
    assert _scale("unit_gain", (256, 64), step_family="lmo") == 2.0


def test_unit_gain_gives_unit_rms_gain_for_both_families():
    """SignMuon's criterion: gain ||scale * S||_F / sqrt(m) = 1 for U V^T and for +-1 steps."""
    for m, n in [(96, 24), (24, 96), (40, 40)]:
        polar = _lmo({"kind": "spectral", "method": "svd"}).direction(torch.randn(m, n))
        signs = torch.sign(torch.randn(m, n))
        gain_lmo = _scale("unit_gain", (m, n)) * polar.norm() / math.sqrt(m)
        gain_sign = _scale("unit_gain", (m, n), step_family="sign") * signs.norm() / math.sqrt(m)
        assert gain_lmo.item() == pytest.approx(1.0, rel=1e-5)
        assert gain_sign.item() == pytest.approx(1.0)


@pytest.mark.parametrize(("kind", "shape", "radius"), [
    ("spectral", (256, 64), 2.0),
    ("spectral", (64, 256), 0.5),
    ("spectral", (64, 32, 3, 3), math.sqrt(2) / 9),  # Scion's SpectralConv
    ("colnorm", (64, 128), 8.0),
    ("rownorm", (64, 256), 1 / 16),
    ("sign", (10, 256), 1 / 256),
    ("bias_rms", (64,), 1.0),
])
def test_scion_radius_per_lmo(kind, shape, radius):
    assert _scale("scion", shape, lmo=_lmo(kind)) == pytest.approx(radius)
    assert _scale({"kind": "scion", "scale": 50.0}, shape, lmo=_lmo(kind)) == pytest.approx(50 * radius)


def test_scion_radius_without_lmo_uses_the_sign_family_and_rejects_unknown_norms():
    assert _scale("scion", (10, 256), step_family="sign") == 1 / 256
    with pytest.raises(ValueError, match="no radius for lmo 'euclidean'.*head.weight"):
        _scale("scion", (4, 4), lmo=_lmo("euclidean"), name="head.weight")
    with pytest.raises(ValueError, match="no radius for lmo None"):
        _scale("scion", (4, 4))


def test_gluon_radius_formula():
    rule = {"kind": "gluon", "l0": 2.0, "l1": 0.5}
    assert build_plugin("lr_rule", rule).needs_dual_norm
    for dual in [0.1, 1.0, 30.0]:
        assert _scale(rule, (8, 8), dual_norm=dual) == pytest.approx(dual / (2.0 + 0.5 * dual))
    assert _scale({"kind": "gluon", "l0": 0.0, "l1": 4.0}, (8, 8), dual_norm=3.0) == 0.25
    assert _scale({"kind": "gluon", "l0": 0.0, "l1": 4.0}, (8, 8), dual_norm=0.0) == 0.0
    assert _scale("gluon", (8, 8), dual_norm=3.0) == 3.0  # defaults l0=1, l1=0: t = ||G||_*
    with pytest.raises(ValueError, match="needs the dual norm.*w1"):
        _scale("gluon", (8, 8), name="w1")


def test_gluon_radius_matches_a_nuclear_norm_from_the_lmo():
    g = torch.randn(12, 5)
    lmo = _lmo({"kind": "spectral", "method": "svd"})
    dual = lmo.dual_norm(g).item()
    assert dual == pytest.approx(torch.linalg.svdvals(g).sum().item(), rel=1e-5)
    t = _scale({"kind": "gluon", "l0": 1.0, "l1": 1.0}, g.shape, lmo=lmo, dual_norm=dual)
    assert t == pytest.approx(dual / (1 + dual))


@pytest.mark.parametrize("bad", [
    {"kind": "gluon", "l0": 0.0, "l1": 0.0},
    {"kind": "gluon", "l0": -1.0},
    {"kind": "gluon", "l1": -0.5},
    {"kind": "scion", "scale": 0.0},
    {"kind": "unit_gain", "family": "adam"},
    {"kind": "original", "ratio": 2},
    {"kind": "constant", "value": 2.0},
])
def test_bad_configs_raise_validation_error(bad):
    with pytest.raises(ValidationError):
        build_plugin("lr_rule", bad)


def test_gluon_zero_constants_message_names_both_values():
    with pytest.raises(ValidationError, match=r"l0 \+ l1 > 0 \(got l0=0.0, l1=0.0\)"):
        build_plugin("lr_rule", {"kind": "gluon", "l0": 0, "l1": 0})


def test_every_rule_has_a_one_line_summary():
    for kind in ["constant", "original", "match_rms_adamw", "unit_gain", "scion", "gluon"]:
        summary = build_plugin("lr_rule", kind).summary()
        assert summary and "\n" not in summary
