"""Built-in compressors: wire formats and byte counts, selection exactness, randomness, errors.

Every compressor is built through ``commlmo.registry`` so the entry points are
exercised.  The generic contract (contraction, unbiasedness, determinism...)
is checked for all of them by ``tests/test_contract_kit.py``; this file pins
the behaviours specific to each one.
"""

from __future__ import annotations

import math

import pytest
import torch
from commlmo_compressors import _native, bits
from commlmo_compressors._common import (
    NonFiniteInputError,
    counter_hash,
    draw_key,
    index_dtype,
)
from commlmo_compressors.randk import sample_indices
from pydantic import ValidationError

from commlmo.registry import build_plugin
from commlmo.testing import check_compressor

NATIVE = _native.kernels() is not None
needs_native = pytest.mark.skipif(not NATIVE, reason="no C compiler: only the eager kernels exist here")


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _build(config):
    return build_plugin("compressor", config)


@pytest.fixture
def eager(monkeypatch):
    """Run with the C kernels switched off (what GPUs and compiler-less machines get)."""
    monkeypatch.setattr(_native, "available", lambda *tensors: None)


# ---------------------------------------------------------------------- bits


def test_packed_sign_layout_is_little_endian_with_one_for_negative():
    x = torch.tensor([-1.0, 2, 3, -4, 5, 6, 7, -8, -9, 10, 11, 12, 13])  # 13 entries -> 2 bytes
    packed = bits.pack_signs(x, zero="positive")
    assert packed.dtype == torch.uint8 and packed.tolist() == [0b10001001, 0b00000001]
    assert bits.packed_nbytes(13) == 2
    torch.testing.assert_close(bits.unpack_signs(packed, 13), torch.where(x < 0, -1.0, 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 8, 13, 1001])
@pytest.mark.parametrize("zero", ["positive", "random"])
def test_sign_packing_kernels_agree_bit_for_bit(dtype, n, zero):
    x = _randn(n, seed=n, dtype=dtype)
    x[torch.rand(n, generator=_gen(1)) < 0.3] = 0.0
    x[:: 5] *= -0.0 if n > 4 else 1  # signed zeros among them
    native = bits.pack_signs(x, zero=zero, generator=_gen(7))
    eager, zeros = bits._pack_eager(x, zero, draw_key(_gen(7)) if zero == "random" else (0, 0))
    assert torch.equal(native, eager) and zeros == int((x == 0).sum())
    signs = bits.unpack_signs(native, n)
    nonzero = x != 0
    assert torch.equal(signs[nonzero], torch.where(x[nonzero] < 0, -1.0, 1.0))
    if zero == "positive":
        assert (signs[~nonzero] == 1).all()  # -0.0 included


def test_random_zero_signs_are_fair_and_reproducible():
    x = torch.zeros(40_000)
    a = bits.unpack_signs(bits.pack_signs(x, zero="random", generator=_gen(3)), x.numel())
    b = bits.unpack_signs(bits.pack_signs(x, zero="random", generator=_gen(3)), x.numel())
    assert torch.equal(a, b)
    assert abs(float(a.mean())) < 5 / math.sqrt(x.numel())  # 5 standard deviations of a fair coin


def test_random_zero_policy_needs_a_generator_only_when_there_are_zeros():
    assert bits.pack_signs(torch.tensor([1.0, -1.0]), zero="random").tolist() == [0b10]
    with pytest.raises(ValueError, match="exact zero.*generator"):
        bits.pack_signs(torch.tensor([1.0, 0.0]), zero="random")


@pytest.mark.parametrize("n,offset", [(5, 0), (13, 3), (1000, 0), (1003, 11), (70_001, 5)])
def test_fused_sign_apply_equals_unfused(n, offset):
    x = _randn(n + offset + 9, seed=n)
    packed = bits.pack_signs(x, zero="positive")
    target = _randn(n, seed=1)
    want = target + 0.25 * torch.where(x[offset : offset + n] < 0, -1.0, 1.0)
    assert torch.equal(bits.add_packed_signs_(target, packed, alpha=0.25, bit_offset=offset), want)


def test_fused_sign_apply_without_kernels_matches(eager):
    x, target = _randn(1003), _randn(1003, seed=1)
    want = target + 0.5 * torch.where(x < 0, -1.0, 1.0)
    assert torch.equal(bits.add_packed_signs_(target, bits.pack_signs(x, zero="positive"), alpha=0.5), want)


# ---------------------------------------------------------------------- identity, sign


def test_identity_sends_the_tensor_itself():
    c = _build("identity")
    x = _randn(3, 5, dtype=torch.bfloat16)
    p = c.compress(x)
    assert p.wire[0] is x and p.nbytes == 30 == c.wire_nbytes(x.shape, x.dtype)
    assert c.capabilities.summable and c.alpha(x.shape) == 1.0 and c.omega(x.shape) == 0.0


def test_sign_wire_is_packed_bits_and_majority_vote_ready():
    c = _build({"kind": "sign", "zero": "positive"})
    x = _randn(13)
    p = c.compress(x)
    assert len(p.wire) == 1 and p.wire[0].dtype == torch.uint8 and p.nbytes == 2 == c.wire_nbytes(x.shape, x.dtype)
    assert c.capabilities.sign_bits and not c.capabilities.contractive and c.alpha(x.shape) is None
    assert torch.equal(c.decompress(p), torch.where(x < 0, -1.0, 1.0))


def test_scaled_sign_blocks_and_exact_contraction():
    c = _build({"kind": "sign", "scale": "mean", "blocks": 4, "zero": "positive"})  # fused QKV: 4 slices
    x = _randn(8, 6)
    p = c.compress(x)
    assert [w.dtype for w in p.wire] == [torch.uint8, torch.float32] and p.nbytes == 6 + 16
    blocks = x.view(4, -1)
    torch.testing.assert_close(p.wire[1], blocks.abs().mean(1))
    y = c.decompress(p).view(4, -1)
    # ||C(x) - x||^2 = ||x||^2 - ||x||_1^2 / d, block by block (Karimireddy et al. 2019, arXiv 1901.09847)
    want = (blocks**2).sum(1) - blocks.abs().sum(1) ** 2 / blocks.shape[1]
    torch.testing.assert_close(((y - blocks) ** 2).sum(1), want)
    assert c.alpha(x.shape) == 1 / 12 and c.capabilities.contractive and not c.capabilities.sign_bits
    target = _randn(8, 6, seed=2)
    want = target + 0.3 * c.decompress(p)
    torch.testing.assert_close(c.decompress_add_(target, p, alpha=0.3), want)


def test_scaled_sign_sends_tiny_tensors_dense():
    c = _build({"kind": "sign", "scale": "mean", "zero": "positive"})
    x = _randn(1)
    assert c.compress(x).wire[0] is x and c.wire_nbytes(x.shape, x.dtype) == 4


def test_sign_config_errors_say_what_to_do():
    with pytest.raises(ValueError, match="blocks=4 must divide dim 0"):
        _build({"kind": "sign", "scale": "mean", "blocks": 4, "zero": "positive"}).compress(_randn(10, 3))
    with pytest.raises(ValueError, match="only applies to scale='mean'"):
        _build({"kind": "sign", "blocks": 4})
    with pytest.raises(ValidationError, match="zero"):
        _build({"kind": "sign", "zero": "keep"})


# ---------------------------------------------------------------------- topk


@pytest.mark.parametrize("numel,dtype", [(256, torch.uint8), (257, torch.int16), (32_768, torch.int16),
                                         (32_769, torch.int32), (2**31, torch.int32), (2**31 + 1, torch.int64)])
def test_topk_index_width_is_the_narrowest_that_fits(numel, dtype):
    assert index_dtype(numel) == dtype


def test_topk_wire_and_k_as_count_or_fraction():
    x = _randn(1000)
    for k, kept in [(10, 10), (0.05, 50), (1.0, 1000)]:
        c = _build({"kind": "topk", "k": k})
        p = c.compress(x)
        if kept == 1000:  # k = d costs more than x: sent dense
            assert p.wire[0] is x
            continue
        values, idx = p.wire
        assert values.shape == (kept,) and idx.dtype == torch.int16 and p.nbytes == kept * 6
        assert p.nbytes == c.wire_nbytes(x.shape, x.dtype)
        assert set(idx.tolist()) == set(x.abs().topk(kept).indices.tolist())


@needs_native
@pytest.mark.parametrize("k", [1, 0.001, 0.05, 0.3])
def test_threshold_selection_is_the_exact_top_k(k):
    x = _randn(300_007, seed=4) * torch.linspace(0.1, 3, 300_007)  # not identically distributed
    c = _build({"kind": "topk", "k": k})
    idx = c.compress(x).wire[1].long()
    want = x.abs().topk(idx.numel()).indices
    assert torch.equal(idx.sort().values, want.sort().values)


def test_threshold_selection_without_kernels_is_exact_too(eager):
    x = _randn(100_003, seed=5)
    idx = _build({"kind": "topk", "k": 0.01}).compress(x).wire[1].long()
    assert torch.equal(idx.sort().values, x.abs().topk(idx.numel()).indices.sort().values)


@needs_native
def test_threshold_kernel_retries_when_the_sample_misleads():
    from commlmo_compressors import topk

    x, lib, k = _randn(100_000, seed=7), _native.kernels(), 500
    want = set(x.abs().topk(k).indices.tolist())
    for threshold, expected in [(10.0, 1000), (0.0, 0)]:  # no candidates at all; a flood of them
        idx, values = topk._native_topk(lib, x, threshold, k, expected)
        assert set(idx.tolist()) == want and torch.equal(values, x[idx])


def test_threshold_selection_survives_an_unlucky_sample(eager, monkeypatch):
    from commlmo_compressors import topk

    x = _randn(100_000, seed=8)
    top = x.abs().topk(topk._SAMPLE).indices  # the sample sees only the largest entries: threshold too high
    monkeypatch.setattr(topk, "_sample_indices", lambda n, device: top)
    idx = _build({"kind": "topk", "k": 20_000}).compress(x).wire[1].long()
    assert set(idx.tolist()) == set(x.abs().topk(20_000).indices.tolist())


def test_threshold_selection_with_ties_keeps_exactly_k():
    idx = _build({"kind": "topk", "k": 777}).compress(torch.ones(100_000)).wire[1].long()
    assert idx.numel() == 777 == idx.unique().numel()


def test_blocked_topk_keeps_the_top_of_every_block():
    x = _randn(4, 250, seed=6)
    c = _build({"kind": "topk", "k": 40, "selection": "blocked", "blocks": 4})
    idx = c.indices(c.compress(x))
    assert c.compress(x).wire[1].max() < 250  # block-local on the wire
    for b in range(4):
        mine = idx[(idx >= 250 * b) & (idx < 250 * (b + 1))] - 250 * b
        assert set(mine.tolist()) == set(x[b].abs().topk(10).indices.tolist())
    assert c.alpha(x.shape) == 40 / 1000
    uneven = _build({"kind": "topk", "k": 7, "selection": "blocked", "blocks": 3})
    assert uneven.alpha(torch.Size([10])) == min(3 / 4, 2 / 3, 2 / 3)  # blocks 4,3,3 keep 3,2,2


def test_topk_value_dtype_and_its_declared_alpha():
    c = _build({"kind": "topk", "k": 100, "value_dtype": "bfloat16"})
    p = c.compress(_randn(10_000))
    assert p.wire[0].dtype == torch.bfloat16 and p.nbytes == 100 * (2 + 2)
    assert c.alpha(torch.Size([10_000])) == pytest.approx(0.01 * (1 - 2.0**-16))


def test_topk_rejects_bad_k():
    with pytest.raises(ValidationError, match="a count k must be >= 1"):
        _build({"kind": "topk", "k": 0})
    with pytest.raises(ValidationError, match=r"a fraction k must be in \(0, 1\]"):
        _build({"kind": "topk", "k": 1.5})


# ---------------------------------------------------------------------- randk


def test_randk_same_seed_same_indices_and_no_indices_on_the_wire():
    c = _build({"kind": "randk", "k": 0.1})
    a, b = c.compress(_randn(50, 20), generator=_gen(9)), c.compress(_randn(50, 20, seed=1), generator=_gen(9))
    assert torch.equal(a.ctx["indices"], b.ctx["indices"])
    assert len(a.wire) == 1 and a.nbytes == 100 * 4 == c.wire_nbytes(torch.Size([50, 20]), torch.float32)
    other = c.compress(_randn(50, 20), generator=_gen(10))
    assert not torch.equal(a.ctx["indices"], other.ctx["indices"])


def test_randk_payloads_sum_on_the_wire():
    c = _build({"kind": "randk", "k": 0.2})
    x1, x2 = _randn(300), _randn(300, seed=1)
    p1, p2 = c.compress(x1, generator=_gen(0)), c.compress(x2, generator=_gen(0))
    summed = type(p1)(wire=(p1.wire[0] + p2.wire[0],), ctx=p1.ctx)
    torch.testing.assert_close(c.decompress(summed), c.decompress(p1) + c.decompress(p2))


@pytest.mark.parametrize("n,k", [(1000, 10), (1000, 400), (50, 50), (10**6, 3)])
def test_randk_indices_are_distinct_sorted_and_uniform(n, k):
    idx = sample_indices(n, k, _gen(1))
    assert idx.numel() == k and torch.equal(idx, idx.unique())
    if (n, k) == (1000, 10):
        counts = torch.zeros(n)
        for seed in range(2000):
            counts[sample_indices(n, k, _gen(seed))] += 1
        # 20 000 draws over 1000 slots: each count ~ Binomial(2000, 0.01), sd ~ 4.45
        assert (counts - 20).abs().max() < 6 * 4.45 and abs(float(counts.sum()) - 20_000) == 0


def test_randk_scaled_is_unbiased_with_declared_omega():
    c = _build({"kind": "randk", "k": 0.25})
    assert c.omega(torch.Size([40])) == 3.0 and c.alpha(torch.Size([40])) is None
    unscaled = _build({"kind": "randk", "k": 0.25, "scaled": False})
    assert unscaled.alpha(torch.Size([40])) == 0.25 and unscaled.capabilities.contractive


def test_randk_needs_a_generator():
    with pytest.raises(ValueError, match="generator every rank seeds identically"):
        _build("randk").compress(_randn(10))


# ---------------------------------------------------------------------- rankk


def test_rankk_svd_is_exact_on_rank_r_matrices():
    x = _randn(30, 3) @ _randn(3, 50, seed=1)
    c = _build({"kind": "rankk", "rank": 3, "method": "svd"})
    p = c.compress(x)
    assert [tuple(w.shape) for w in p.wire] == [(50, 3), (30, 3)]  # factors of the tall orientation
    assert p.ctx["transposed"] and p.nbytes == 4 * 3 * 80 == c.wire_nbytes(x.shape, x.dtype)
    torch.testing.assert_close(c.decompress(p), x, atol=1e-4, rtol=1e-4)
    assert c.alpha(x.shape) == 3 / 30 and not c.capabilities.stochastic


def test_rankk_views_conv_kernels_as_matrices_and_sends_vectors_dense():
    c = _build({"kind": "rankk", "rank": 2, "method": "svd"})
    w = _randn(16, 3, 3, 3)
    assert [tuple(t.shape) for t in c.compress(w).wire] == [(27, 2), (16, 2)]
    bias = _randn(64)
    assert c.compress(bias).wire[0] is bias  # a 1 x 64 matrix: factors would cost more


def test_power_iteration_converges_and_declares_its_contract_honestly():
    x = _randn(64, 2) @ _randn(2, 64, seed=1) + 1e-3 * _randn(64, 64, seed=2)
    errors = []
    for iterations in (1, 2, 4):
        c = _build({"kind": "rankk", "rank": 2, "power_iterations": iterations})
        y = c.decompress(c.compress(x, generator=_gen(0)))
        errors.append(float((y - x).norm() / x.norm()))
    assert errors[2] <= errors[0] and errors[2] < 2e-3
    assert _build({"kind": "rankk", "rank": 2}).capabilities.contractive
    assert not _build({"kind": "rankk", "rank": 2, "power_iterations": 2}).capabilities.contractive
    assert _build({"kind": "rankk", "rank": 1, "power_iterations": 3}).capabilities.contractive


@needs_native
@pytest.mark.parametrize("shape", [(300, 260), (260, 300)])
@pytest.mark.parametrize("rank_of_x", [None, 2])
def test_rankk_skinny_product_kernels_match_blas(shape, rank_of_x, monkeypatch):
    # >= 65 536 entries: the C kernels run, in both orientations; a rank-2 x makes R singular,
    # so the one-pass X^T P R^-1 falls back to a second read
    x = _randn(*shape, seed=3) if rank_of_x is None else _randn(shape[0], 2) @ _randn(2, shape[1], seed=1)
    c = _build({"kind": "rankk", "rank": 5, "power_iterations": 2})
    native = c.decompress(c.compress(x, generator=_gen(0)))
    monkeypatch.setattr(_native, "available", lambda *tensors: None)
    torch.testing.assert_close(c.decompress(c.compress(x, generator=_gen(0))), native, atol=1e-4, rtol=1e-4)


def test_rankk_warm_start_and_its_shape_check():
    c = _build({"kind": "rankk", "rank": 2})
    x = _randn(40, 30)
    first = c.compress(x, generator=_gen(0))
    again = c.compress(x, warm_start=first.wire[1])  # no generator needed
    assert (c.decompress(again) - x).norm() <= (c.decompress(first) - x).norm() + 1e-4
    with pytest.raises(ValueError, match="warm_start must have shape"):
        c.compress(x, warm_start=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="random start Q"):
        c.compress(x)


# ---------------------------------------------------------------------- natural


def test_natural_wire_is_nine_bits_per_entry():
    c = _build("natural")
    x = _randn(1003)
    p = c.compress(x, generator=_gen(0))
    assert [(w.dtype, w.numel()) for w in p.wire] == [(torch.uint8, 1003), (torch.uint8, 126)]
    assert p.nbytes == c.wire_nbytes(x.shape, x.dtype) == 1003 + 126
    assert c.bits_per_entry(torch.Size([8000]), torch.float32) == 9.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_natural_keeps_powers_of_two_and_rounds_to_a_neighbour(dtype):
    c = _build("natural")
    exact = torch.tensor([1.0, -0.5, 2.0**-20, 1024.0, 0.0, -0.0], dtype=dtype)
    assert torch.equal(c.decompress(c.compress(exact, generator=_gen(1))), exact)
    x = _randn(500, dtype=dtype)
    y = c.decompress(c.compress(x, generator=_gen(2))).float()
    low = 2.0 ** torch.floor(torch.log2(x.float().abs()))
    assert ((y.abs() == low) | (y.abs() == 2 * low)).all() and (torch.sign(y) == torch.sign(x.float())).all()


def test_natural_is_unbiased_within_the_declared_variance():
    c = _build("natural")
    x = _randn(64, seed=3) * 5
    draws = 4000
    ys = torch.stack([c.decompress(c.compress(x, generator=g)).double() for g in [_gen(0)] for _ in range(draws)])
    mean_gap = (ys.mean(0) - x.double()).norm() ** 2
    # E||mean - x||^2 <= omega ||x||^2 / N with omega = 1/8; Markov at level 1e-3
    assert mean_gap <= (1 / 8) * (x.double() ** 2).sum() / draws / 1e-3
    assert float(((ys - x.double()) ** 2).sum(1).mean() / (x.double() ** 2).sum()) <= 1 / 8 * 1.1


def test_natural_codes_from_the_kernel_and_eager_agree(eager):
    from commlmo_compressors.natural import _encode_eager

    x = _randn(1001, seed=8)
    p = _build("natural").compress(x, generator=_gen(4))  # eager (kernels off)
    assert torch.equal(p.wire[0], _encode_eager(x, draw_key(_gen(4)), 254))


@needs_native
def test_natural_kernel_matches_eager_twin():
    from commlmo_compressors.natural import _encode_eager

    x = _randn(1001, seed=8)
    p = _build("natural").compress(x, generator=_gen(4))
    assert torch.equal(p.wire[0], _encode_eager(x, draw_key(_gen(4)), 254))
    assert torch.equal(p.wire[1], bits._pack_bits_eager(x))
    hashes = counter_hash(torch.arange(100_000), (123, 456)).double() / 2**32
    assert abs(float(hashes.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / 100_000)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_natural_decode_kernel_matches_eager(dtype, monkeypatch):
    c, x = _build("natural"), _randn(1003, seed=9, dtype=dtype)
    x[::4] = 0
    payload = c.compress(x, generator=_gen(5))
    native = c.decompress(payload)
    monkeypatch.setattr(_native, "available", lambda *tensors: None)
    assert torch.equal(native, c.decompress(payload))


def test_natural_saturates_float16_at_its_largest_power_of_two():
    y = _build("natural").decompress(_build("natural").compress(torch.tensor([65504.0], dtype=torch.float16),
                                                              generator=_gen(0)))
    assert y.item() == 2.0**15


def test_natural_rejects_float64():
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        _build("natural").compress(torch.zeros(3, dtype=torch.float64), generator=_gen(0))


# ---------------------------------------------------------------------- chain


def test_chain_topk_then_natural_bytes_and_contract():
    c = _build({"kind": "chain", "stages": [{"kind": "topk", "k": 0.05}, {"kind": "natural"}]})
    x = _randn(100, 100)
    p = c.compress(x, generator=_gen(0))
    k = 500  # 5 % of 10 000: codes, packed signs, then topk's int16 indices
    assert [(w.dtype, w.numel()) for w in p.wire] == [(torch.uint8, k), (torch.uint8, 63), (torch.int16, k)]
    assert p.nbytes == k + 63 + 2 * k == c.wire_nbytes(x.shape, x.dtype)
    caps = c.capabilities
    assert caps.contractive and caps.stochastic and not caps.unbiased
    assert c.alpha(x.shape) == pytest.approx(0.05 * 7 / 8)
    y = c.decompress(p)
    kept = x.abs().view(-1).topk(k).indices
    assert (y.view(-1)[kept] != 0).all() and int((y != 0).sum()) == k


def test_chain_of_unbiased_stages_multiplies_variances():
    c = _build({"kind": "chain", "stages": [{"kind": "randk", "k": 0.5}, "natural"]})
    assert c.capabilities.unbiased and c.capabilities.shared_randomness
    assert c.omega(torch.Size([1000])) == pytest.approx((1 + 1) * (1 + 1 / 8) - 1)


def test_chain_config_errors():
    with pytest.raises(ValidationError, match="at least 2 stages"):
        _build({"kind": "chain", "stages": ["topk"]})
    with pytest.raises(ValidationError, match="did you mean 'natural'"):
        _build({"kind": "chain", "stages": ["topk", "natral"]})
    with pytest.raises(ValidationError, match="invalid 'topk' stage: k"):
        _build({"kind": "chain", "stages": [{"kind": "topk", "k": 0}, "natural"]})
    with pytest.raises(ValidationError, match="sends no floating-point wire tensor"):
        _build({"kind": "chain", "stages": ["sign", "natural"]})


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("config", ["identity", "sign", {"kind": "sign", "scale": "mean"}, "topk",
                                    "randk", "rankk", "natural",
                                    {"kind": "chain", "stages": ["topk", "natural"]}])
@pytest.mark.parametrize("size", [100, 70_000])
def test_non_finite_input_names_the_compressor(config, size):
    c = _build(config)
    x = _randn(size // 100, 100)
    x[0, 3] = math.inf
    with pytest.raises(NonFiniteInputError, match=rf"{c.kind}.*NaN or Inf"):
        c.compress(x, generator=_gen(0))


@pytest.mark.parametrize("shape", [(1024, 1024), (300, 7), (5, 3, 3, 3)])
def test_blocked_topk_sends_block_local_16_bit_indices(shape):
    c = build_plugin("compressor", {"kind": "topk", "k": 0.05, "selection": "blocked", "blocks": "auto"})
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    payload = c.compress(x)
    if payload.ctx.get("dense"):
        pytest.skip("too small to sparsify")
    values, idx = payload.wire
    assert idx.dtype in (torch.uint8, torch.int16)
    assert payload.nbytes == c.wire_nbytes(x.shape, x.dtype)
    # every kept entry is its block's top-k, and decoding puts it back where it was
    y = c.decompress(payload)
    kept = y != 0
    assert int(kept.sum()) == values.numel()
    torch.testing.assert_close(y[kept], x[kept])
    check_compressor(c, max_examples=10)


def test_native_kernels_refuse_tensors_that_are_not_plain_and_the_eager_path_takes_them():
    """FSDP2 segfaulted: the C kernels read a DTensor's data_ptr(). Subclasses, views and meta tensors go eager."""
    from commlmo_compressors import _native

    class Wrapped(torch.Tensor):  # stands in for DTensor and other tensor subclasses
        pass

    x = torch.randn(64, 8)
    assert _native.available(x.t()) is None
    assert _native.available(torch.empty(8, device="meta")) is None
    sub = x.clone().as_subclass(Wrapped)
    assert _native.available(sub) is None
    sign = build_plugin("compressor", {"kind": "sign", "zero": "positive"})
    assert torch.equal(sign.compress(sub).wire[0], sign.compress(x).wire[0])


def test_compressors_check_their_input_unless_the_caller_declared_it_finite():
    """The optimizer agrees on finite gradients first, so inside a step the per-tensor NaN check is skipped."""
    from commlmo.errors import NonFiniteInputError
    from commlmo.plugin import finite_inputs, inputs_known_finite

    x = torch.tensor([1.0, float("nan"), 2.0])
    identity = build_plugin("compressor", "identity")
    with pytest.raises(NonFiniteInputError):
        identity.compress(x)
    with finite_inputs():
        assert inputs_known_finite()
        identity.compress(x)  # trusted: no read of x
    assert not inputs_known_finite()
