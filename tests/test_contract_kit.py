"""The contract kit over every installed compressor, and proof that it fails broken ones.

``commlmo.registry.names("compressor")`` lists built-in and third-party
compressors alike; each is checked with representative configs (a third-party
one with its defaults).  The broken compressors below each break one promise,
and the kit must say which.
"""

from __future__ import annotations

import math
from typing import Literal

import pytest
import torch
from hypothesis import given, settings

from commlmo import registry
from commlmo.plugin import Compressor, CompressorCapabilities, Payload, PluginConfig
from commlmo.testing import DTYPES, PATTERNS, check_compressor, tensors

# representative configs per built-in kind; any other installed name runs with its defaults
REPRESENTATIVE: dict[str, list] = {
    "identity": ["identity"],
    "sign": [{"kind": "sign"}, {"kind": "sign", "scale": "mean", "zero": "positive"}],
    "topk": [{"kind": "topk", "k": 0.1}, {"kind": "topk", "k": 3, "selection": "blocked", "blocks": 2},
             {"kind": "topk", "k": 0.2, "value_dtype": "bfloat16"}],
    "randk": [{"kind": "randk", "k": 0.1}, {"kind": "randk", "k": 0.2, "scaled": False}],
    "rankk": [{"kind": "rankk", "rank": 2, "method": "svd"}, {"kind": "rankk", "rank": 2},
              {"kind": "rankk", "rank": 3, "power_iterations": 2, "factor_dtype": "same"}],
    "natural": ["natural"],
    "chain": [{"kind": "chain", "stages": [{"kind": "topk", "k": 0.1}, "natural"]},
              {"kind": "chain", "stages": [{"kind": "randk", "k": 0.25}, "natural"]}],
}


def _installed_configs():
    for name in registry.names("compressor"):
        for config in REPRESENTATIVE.get(name, [name]):
            yield pytest.param(name, config, id=f"{name}-{REPRESENTATIVE.get(name, [name]).index(config)}")


@pytest.mark.parametrize("name,config", list(_installed_configs()))
def test_every_installed_compressor_keeps_its_contract(name, config):
    compressor = registry.build_plugin("compressor", config)
    if name == "ef21p" and compressor.capabilities.downlink_only:
        pytest.skip("ef21p compresses the model on the downlink and is tested with the aggregators")
    check_compressor(compressor)


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(x=tensors())
def test_tensors_cover_the_documented_space(x):
    assert x.dtype in DTYPES and x.ndim in (1, 2, 4) and 1 <= x.numel() <= 2048


# ---------------------------------------------------------------------- broken compressors


class _Base(Compressor):
    """Identity done right; each subclass breaks one thing."""

    capabilities = CompressorCapabilities(summable=True, unbiased=True, contractive=True)

    def compress(self, x, *, generator=None):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{self.kind}: NaN or Inf input")
        return Payload(wire=(x.clone(),), ctx={})

    def decompress(self, payload):
        return payload.wire[0]

    def wire_nbytes(self, shape, dtype):
        return math.prod(shape) * dtype.itemsize

    def alpha(self, shape):
        return 1.0

    def omega(self, shape):
        return 0.0


def _config(kind: str) -> type[PluginConfig]:
    return type(f"{kind}Config", (PluginConfig,), {"__annotations__": {"kind": Literal[kind]}, "kind": kind})


class MutatesInput(_Base):
    Config = _config("mutates_input")

    def compress(self, x, *, generator=None):
        x.clamp_(-1, 1)
        return super().compress(x)


class MiscountsBytes(_Base):
    Config = _config("miscounts_bytes")

    def wire_nbytes(self, shape, dtype):
        return math.prod(shape) * 4  # forgets that bfloat16 and float16 are 2 bytes


class Biased(_Base):
    """Rounds |x| down to a power of two and claims to be unbiased (natural without the coin)."""

    Config = _config("biased")
    capabilities = CompressorCapabilities(unbiased=True)

    def decompress(self, payload):
        x = payload.wire[0].float()
        return (torch.sign(x) * 2.0 ** torch.floor(torch.log2(x.abs()))).nan_to_num(0).to(payload.wire[0].dtype)

    def omega(self, shape):
        return 1 / 8


class OverclaimsContraction(_Base):
    Config = _config("overclaims_contraction")
    capabilities = CompressorCapabilities(contractive=True)

    def decompress(self, payload):
        return payload.wire[0] / 2  # ||C(x) - x||^2 = ||x||^2 / 4, not <= 0.1 ||x||^2

    def alpha(self, shape):
        return 0.9


class UnderstatesVariance(_Base):
    """Scaled rand-k with omega = (d/k - 1) / 2."""

    Config = _config("understates_variance")
    capabilities = CompressorCapabilities(unbiased=True, stochastic=True, shared_randomness=True)

    def compress(self, x, *, generator=None):
        super().compress(x)
        keep = torch.rand(x.shape, generator=generator) < 0.25
        return Payload(wire=(x * keep * 4,), ctx={})

    def omega(self, shape):
        return 1.5


class AcceptsNaN(_Base):
    Config = _config("accepts_nan")

    def compress(self, x, *, generator=None):
        return Payload(wire=(x.clone(),), ctx={})


class DataInCtx(_Base):
    """Scaled sign that keeps its scale in ctx: other ranks would decode with their own scale."""

    Config = _config("data_in_ctx")
    capabilities = CompressorCapabilities()

    def compress(self, x, *, generator=None):
        super().compress(x)
        return Payload(wire=((x < 0).to(torch.uint8),), ctx={"scale": x.abs().float().mean(), "dtype": x.dtype})

    def decompress(self, payload):
        return ((1 - 2 * payload.wire[0].float()) * payload.ctx["scale"]).to(payload.ctx["dtype"])

    def wire_nbytes(self, shape, dtype):
        return math.prod(shape)


class IgnoresGenerator(_Base):
    """Draws from torch's global generator instead of the one it is given."""

    Config = _config("ignores_generator")
    capabilities = CompressorCapabilities(stochastic=True)

    def compress(self, x, *, generator=None):
        super().compress(x)
        return Payload(wire=(x * (torch.rand(x.shape) < 0.5),), ctx={})


BROKEN = [
    (MutatesInput, "compress\\(\\) changed its input"),
    (MiscountsBytes, "wire_nbytes"),
    (Biased, "declared unbiased, but the mean"),
    (OverclaimsContraction, "exceeds \\(1 - alpha\\)"),
    (UnderstatesVariance, "above the declared omega"),
    (AcceptsNaN, "compressed without an error"),
    (DataInCtx, "ctx must hold only data-independent metadata"),
    (IgnoresGenerator, "same generator state gave different wire"),
]


@pytest.mark.parametrize("cls,message", BROKEN, ids=[cls.__name__ for cls, _ in BROKEN])
def test_the_kit_catches_a_broken_compressor(cls, message):
    with pytest.raises(AssertionError, match=message):
        check_compressor(cls(), max_examples=15)


def test_a_third_party_compressor_is_checked_through_the_registry():
    class Halves(_Base):
        """A third party's plugin: identity in float16 on the wire."""

        Config = _config("halves")
        capabilities = CompressorCapabilities(contractive=True)

        def compress(self, x, *, generator=None):
            super().compress(x)
            return Payload(wire=(x.to(torch.float16),), ctx={"dtype": x.dtype})

        def decompress(self, payload):
            return payload.wire[0].to(payload.ctx["dtype"])

        def wire_nbytes(self, shape, dtype):
            return 2 * math.prod(shape)

        def alpha(self, shape):
            return 0.99

    registry.register("compressor", Halves)
    try:
        assert "halves" in registry.names("compressor")
        # float16 on the wire cannot hold float32's tiny and huge values: the kit finds that
        with pytest.raises(AssertionError, match="halves"):
            check_compressor("halves", max_examples=40)
        check_compressor("halves", dtypes=[torch.float16], max_examples=10)  # fine where it fits
    finally:
        registry.unregister("compressor", "halves")


def test_patterns_are_documented():
    assert set(PATTERNS) >= {"zeros", "constant", "tiny", "huge", "signed_zeros"}
