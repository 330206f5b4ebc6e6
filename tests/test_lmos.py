"""Built-in LMOs against their references: SVD, torch.optim.Muon, and the LMO identities.

Every LMO is built through ``commlmo.registry`` so the entry points are exercised.
Run with ``-s`` to see the Newton--Schulz accuracy comparison.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

from commlmo.registry import build_plugin
from commlmo_lmos.newton_schulz import JORDAN, POLAR_EXPRESS, newton_schulz

# (config, tensor ranks it is checked on).  Spectral uses the exact SVD: the identities
# below hold exactly only for the true polar factor.
LMO_TABLE = [
    ({"kind": "spectral", "method": "svd"}, (2, 4)),
    ({"kind": "sign", "zero": "random"}, (1, 2, 4)),
    ({"kind": "sign", "zero": "keep"}, (1, 2)),
    ({"kind": "colnorm"}, (2, 4)),
    ({"kind": "rownorm"}, (2, 4)),
    ({"kind": "bias_rms"}, (1,)),
    ({"kind": "euclidean"}, (1, 2, 4)),
]
ALL_LMOS = [cfg for cfg, _ in LMO_TABLE] + [
    {"kind": "spectral", "method": m, "dtype": d} for m in ("jordan", "polar_express") for d in ("bfloat16", "float32")
]
TORCH_NS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
# relative tolerance of <G, D> = ||G||_* and of ||D|| <= 1, by input dtype
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _polar(g: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(g.double().reshape(g.shape[0], -1), full_matrices=False)
    return (u @ vh).reshape(g.shape)


@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (7, 7), (6, 3, 2, 2)])
def test_svd_spectral_is_u_vt(shape):
    g = _randn(*shape, dtype=torch.float64)
    d = build_plugin("lmo", {"kind": "spectral", "method": "svd"}).direction(g)
    torch.testing.assert_close(d, _polar(g), rtol=0, atol=1e-12)


def test_svd_spectral_rank_deficient_has_zero_singular_values():
    g = _randn(9, 2, dtype=torch.float64) @ _randn(2, 6, seed=1, dtype=torch.float64)  # rank 2
    d = build_plugin("lmo", {"kind": "spectral", "method": "svd"}).direction(g)
    s = torch.linalg.svdvals(d)
    torch.testing.assert_close(s, torch.tensor([1.0, 1.0, 0, 0, 0, 0], dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (128, 128), (1, 33), (33, 1), (16, 3, 3, 3)])
def test_jordan_is_bitwise_torch_muon(shape):
    g = _randn(*shape, seed=sum(shape))
    reference = _zeropower_via_newtonschulz(g.reshape(shape[0], -1), TORCH_NS, 5, EPS)
    ours = build_plugin("lmo", {"kind": "spectral", "dtype": "bfloat16"}).direction(g)
    assert ours.dtype == g.dtype and ours.shape == g.shape
    assert torch.equal(ours, reference.float().reshape(shape))
    assert torch.equal(newton_schulz(g.reshape(shape[0], -1)), reference)


def test_jordan_float32_matches_torch_recipe_in_float32():
    g = _randn(48, 80, seed=3)
    x = g / g.norm().clamp(min=EPS)  # torch's recipe with the bf16 cast left out
    for _ in range(5):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=DEFAULT_B, alpha=DEFAULT_C), x, beta=DEFAULT_A)
    assert torch.equal(build_plugin("lmo", {"kind": "spectral", "dtype": "float32"}).direction(g), x)


@st.composite
def _lmo_case(draw):
    cfg, ranks = draw(st.sampled_from(LMO_TABLE))
    ndim = draw(st.sampled_from(ranks))
    dims = st.integers(1, 9)
    shape = tuple(draw(dims) for _ in range(ndim)) if ndim != 4 else (draw(dims), draw(dims), 3, 3)
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    zeros = draw(st.sampled_from(["none", "entries", "first_column", "first_row"]))
    return cfg, shape, dtype, zeros, draw(st.integers(0, 2**31))


@settings(max_examples=150, deadline=None)
@given(_lmo_case())
def test_lmo_direction_attains_dual_norm_inside_unit_ball(case):
    cfg, shape, dtype, zeros, seed = case
    lmo = build_plugin("lmo", cfg)
    g = _randn(*shape, seed=seed, dtype=dtype)
    if zeros == "entries":
        g = g * (_randn(*shape, seed=seed + 1) > 0)
    elif zeros == "first_column" and g.ndim >= 2:
        g[:, 0] = 0
    elif zeros == "first_row":
        g[0] = 0
    before = g.clone()
    d = lmo.direction(g, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(g, before), "direction() mutated its input"
    assert d.shape == g.shape and d.dtype == g.dtype and torch.isfinite(d).all()
    dual = lmo.dual_norm(g).double()
    rtol = RTOL[dtype]
    torch.testing.assert_close((g.double() * d.double()).sum(), dual, rtol=rtol, atol=1e-6)
    assert lmo.norm(d).item() <= 1 + rtol


def test_polar_express_is_closer_to_polar_factor_than_jordan():
    """Frobenius error to U V^T per unit singular value, 5 steps, on Gaussian matrices."""
    for dtype in ("float32", "bfloat16"):
        for shape in [(128, 128), (64, 256), (256, 64)]:
            g = _randn(*shape, seed=7)
            target = _polar(g).float()
            err = {
                method: ((lmo.direction(g) - target).norm() / min(shape) ** 0.5).item()
                for method in ("jordan", "polar_express")
                for lmo in [build_plugin("lmo", {"kind": "spectral", "method": method, "dtype": dtype})]
            }
            print(f"{dtype:9s} {str(shape):11s} jordan {err['jordan']:.4f}  polar_express {err['polar_express']:.4f}")
            assert err["polar_express"] < 0.75 * err["jordan"]


def test_polar_express_schedule_repeats_its_last_polynomial():
    assert POLAR_EXPRESS.take(10)[7:] == [POLAR_EXPRESS.coefficients[-1]] * 3
    assert JORDAN.take(5) == [TORCH_NS] * 5


@pytest.mark.parametrize("method", ["jordan", "polar_express"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_batched_directions_equal_unbatched_bitwise(method, dtype):
    shapes = [(32, 48), (48, 32), (32, 48), (48, 32), (32, 48), (8, 4, 3, 4), (8, 48), (8, 4, 3, 4), (5, 7)]
    gs = [_randn(*s, seed=i) for i, s in enumerate(shapes)] + [_randn(32, 48, seed=99, dtype=torch.bfloat16)]
    batched = build_plugin("lmo", {"kind": "spectral", "method": method, "dtype": dtype, "batch": True})
    single = build_plugin("lmo", {"kind": "spectral", "method": method, "dtype": dtype, "batch": False})
    expected = [single.direction(g) for g in gs]
    assert all(torch.equal(a, b) for a, b in zip(single.directions(gs), expected))
    got = batched.directions(gs)
    for g, a, b in zip(gs, got, expected):
        assert a.shape == g.shape and a.dtype == g.dtype
        assert torch.equal(a, b), f"batched Newton-Schulz differs from per-matrix on this backend ({g.shape})"


@pytest.mark.parametrize("cfg", ALL_LMOS, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_inputs_are_not_mutated(cfg, dtype):
    lmo = build_plugin("lmo", cfg)
    shape = (6,) if cfg["kind"] == "bias_rms" else (6, 4)
    gs = [_randn(*shape, seed=s, dtype=dtype) for s in range(3)]
    gs[0].view(-1)[0] = 0  # a zero for the sign policies
    before = [g.clone() for g in gs]
    lmo.direction(gs[0], generator=torch.Generator())
    lmo.directions(gs, generator=torch.Generator())
    lmo.norm(gs[1])
    lmo.dual_norm(gs[2])
    assert all(torch.equal(a, b) for a, b in zip(gs, before))


@pytest.mark.parametrize("cfg", ALL_LMOS, ids=lambda c: "-".join(map(str, c.values())))
def test_zero_input_gives_zero_direction(cfg):
    lmo = build_plugin("lmo", cfg)
    for shape in [(5,), (5, 3), (4, 2, 3, 3)]:
        if not lmo.capabilities.accepts(len(shape)):
            continue
        g = torch.zeros(shape)
        if cfg["kind"] == "sign" and cfg.get("zero") == "random":
            continue  # zeros become random signs, tested below
        assert torch.equal(lmo.direction(g), g)
        assert lmo.dual_norm(g).item() == 0


def test_sign_random_zeros_come_only_from_the_generator():
    lmo = build_plugin("lmo", {"kind": "sign", "zero": "random"})
    g = _randn(50, 40) * (_randn(50, 40, seed=1) > 0)
    state = torch.get_rng_state()
    a = lmo.direction(g, generator=torch.Generator().manual_seed(3))
    b = lmo.direction(g, generator=torch.Generator().manual_seed(3))
    c = lmo.direction(g, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was used"
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(a[g != 0], torch.sign(g[g != 0]))
    assert 0.4 < (a[g == 0] > 0).float().mean() < 0.6


def test_sign_zero_policies():
    g = torch.tensor([[-2.0, 0.0], [0.0, 3.0]])
    assert torch.equal(build_plugin("lmo", {"kind": "sign", "zero": "positive"}).direction(g),
                       torch.tensor([[-1.0, 1.0], [1.0, 1.0]]))
    assert torch.equal(build_plugin("lmo", {"kind": "sign", "zero": "keep"}).direction(g), torch.sign(g))
    random = build_plugin("lmo", "sign")
    assert torch.equal(random.direction(torch.tensor([1.0, -2.0])), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="2 exact zero.*generator"):
        random.direction(g)


@pytest.mark.parametrize(
    ("cfg", "shape"), [("spectral", (7,)), ("colnorm", (3,)), ("rownorm", ()), ("bias_rms", (3, 4))]
)
def test_unsupported_rank_is_rejected_with_the_shape(cfg, shape):
    with pytest.raises(ValueError, match=re.escape(f"got shape {shape}")):
        build_plugin("lmo", cfg).direction(torch.ones(shape))


@pytest.mark.parametrize("bad", [
    {"kind": "spectral", "steps": 0},
    {"kind": "spectral", "steps": 101},
    {"kind": "spectral", "eps": 0.0},
    {"kind": "spectral", "method": "newton"},
    {"kind": "spectral", "dtype": "float16"},
    {"kind": "sign", "zero": "negative"},
    {"kind": "colnorm", "transpose": True},
])
def test_bad_configs_are_rejected(bad):
    with pytest.raises(ValidationError):
        build_plugin("lmo", bad)


def test_every_lmo_has_a_summary_and_declares_its_family():
    for cfg in ALL_LMOS:
        lmo = build_plugin("lmo", cfg)
        assert lmo.summary() and lmo.capabilities.step_family == ("sign" if cfg["kind"] == "sign" else "lmo")


def test_auto_dtype_is_bfloat16_where_the_device_multiplies_it_fast_and_float32_elsewhere(monkeypatch):
    """CPUs without AVX512-BF16 or AMX emulate bfloat16 GEMMs (34x slower than float32 on an AVX2 EPYC)."""
    import commlmo_lmos.spectral as spectral

    lmo = build_plugin("lmo", "spectral")
    assert lmo.config.dtype == "auto"
    for fast, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda fast=fast: fast)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert spectral._cpu_fast_bfloat16() is fast  # the probe; read once, at import
        monkeypatch.setattr(spectral, "_CPU_FAST_BFLOAT16", fast)
        assert lmo.working_dtype(torch.device("cpu")) == want
        g = _randn(8, 5, seed=3)
        assert torch.equal(lmo.direction(g), newton_schulz(g, dtype=want).float())
    assert spectral.fast_bfloat16(torch.device("cuda"))
