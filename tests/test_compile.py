"""torch.compile: the compressors, the LMOs and a compiled model under a commlmo optimizer.

``fullgraph=True`` turns any graph break into an error, so each test below pins "no
graph break".  Most use the ``eager`` backend (Dynamo's tracing only: graph breaks are a
tracing matter, and inductor's code generation would cost seconds per function on two
cores); the end-to-end ones use ``aot_eager``, which also runs the custom ops' fake
implementations, functionalises the in-place ``commlmo::add_packed_signs`` and traces
the backward pass.

What still breaks, by design: drawing from an explicit ``torch.Generator`` (``sign`` with
``zero: random``, ``randk``, ``natural``, ``rankk`` power iteration, the ``sign`` LMO's
random zeros): Dynamo cannot put a generator in a graph, so those calls run eagerly
between two graphs.  Their decoding compiles whole and is tested here.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import commlmo
from commlmo.plugin import Payload
from commlmo.registry import build_plugin


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed))


def _fullgraph(fn, backend: str = "eager"):
    return torch.compile(fn, backend=backend, fullgraph=True)


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


# Compressors whose compress draws from no generator compile whole, decoding included.
NO_GENERATOR = [
    "identity",
    {"kind": "sign", "zero": "positive"},
    {"kind": "sign", "scale": "mean", "blocks": 4, "zero": "positive"},
    {"kind": "topk", "k": 0.05},
    {"kind": "topk", "k": 0.05, "selection": "exact"},
    {"kind": "topk", "k": 0.05, "selection": "blocked", "blocks": 3},
    {"kind": "topk", "k": 0.05, "value_dtype": "bfloat16"},
    {"kind": "rankk", "rank": 2, "method": "svd"},
]
# Compressors that draw from a generator: their decoding compiles whole.
WITH_GENERATOR = [
    {"kind": "sign"},
    {"kind": "randk", "k": 0.05},
    "natural",
    {"kind": "rankk", "rank": 2},
    {"kind": "chain", "stages": [{"kind": "topk", "k": 0.05}, "natural"]},
]


@pytest.mark.parametrize("config", NO_GENERATOR, ids=str)
def test_compress_compiles_without_graph_breaks_and_gives_the_eager_payload(config):
    # 65 792 entries: topk's threshold selection (the commlmo::topk_abs op) starts at 65 536
    c, x = build_plugin("compressor", config), _x(256, 257)
    compiled = _fullgraph(lambda t: c.compress(t).wire)(x)
    assert _equal(compiled, c.compress(x).wire)


@pytest.mark.parametrize("config", NO_GENERATOR + WITH_GENERATOR, ids=str)
def test_decompress_and_decompress_add_compile_without_graph_breaks(config):
    c, x = build_plugin("compressor", config), _x(64, 48)
    payload = c.compress(x, generator=_gen(1))
    decode = _fullgraph(lambda wire: c.decompress(Payload(wire=wire, ctx=payload.ctx)))
    assert torch.equal(decode(payload.wire), c.decompress(payload))
    target, want = _x(64, 48, seed=2), _x(64, 48, seed=2)
    _fullgraph(lambda t, wire: c.decompress_add_(t, Payload(wire=wire, ctx=payload.ctx), alpha=-0.5))(
        target, payload.wire)
    assert torch.equal(target, c.decompress_add_(want, payload, alpha=-0.5))


@pytest.mark.parametrize("config", WITH_GENERATOR[:3], ids=str)
def test_compress_with_a_generator_breaks_only_at_the_draw_and_keeps_the_eager_payload(config):
    c, x = build_plugin("compressor", config), _x(64, 48)
    x[0, :5] = 0  # zeros for the random-zero sign policy
    compiled = torch.compile(lambda t, g: c.compress(t, generator=g).wire, backend="eager")(x, _gen(3))
    assert _equal(compiled, c.compress(x, generator=_gen(3)).wire)


LMOS = [
    "spectral",
    {"kind": "spectral", "method": "polar_express", "dtype": "float32"},
    {"kind": "spectral", "method": "svd"},
    {"kind": "sign", "zero": "positive"},
    {"kind": "sign", "zero": "keep"},
    "colnorm",
    "rownorm",
    "euclidean",
]


@pytest.mark.parametrize("config", LMOS, ids=str)
def test_lmo_direction_compiles_without_graph_breaks(config):
    lmo, g = build_plugin("lmo", config), _x(32, 24)
    torch.testing.assert_close(_fullgraph(lmo.direction)(g), lmo.direction(g), atol=0, rtol=0)
    stack = [_x(16, 8, seed=s) for s in range(3)]
    for got, want in zip(_fullgraph(lmo.directions)(stack), lmo.directions(stack)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_bias_rms_direction_compiles_without_graph_breaks():
    lmo, g = build_plugin("lmo", "bias_rms"), _x(24)
    assert torch.equal(_fullgraph(lmo.direction)(g), lmo.direction(g))


def test_sign_roundtrip_and_vote_through_aot_autograd():
    """Fake implementations, the functionalised in-place apply and the vote, end to end."""
    from commlmo_aggregators.vote import vote_words

    sign = build_plugin("compressor", {"kind": "sign", "zero": "positive"})

    def step(grads: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        rows = torch.stack([sign.compress(g).wire[0] for g in grads])  # 3 workers, 1 bit each
        voted = vote_words(rows.view(torch.int64))
        payload = Payload(wire=(voted.view(torch.uint8),), ctx={"shape": param.shape, "dtype": param.dtype})
        return sign.decompress_add_(param, payload, alpha=-0.01)

    grads, param = _x(3, 32, 16), _x(32, 16, seed=9)
    want = step(grads, param.clone())
    assert torch.equal(_fullgraph(step, backend="aot_eager")(grads, param), want)


class _TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 16)
        self.hidden = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 32)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.relu(self.hidden(self.embed(tokens))))
        return torch.nn.functional.cross_entropy(self.head(h).flatten(0, 1), tokens.roll(-1, 1).flatten())


def test_a_compiled_model_with_a_commlmo_optimizer_trains_without_graph_breaks():
    """The optimizer hooks the module (a DDP probe); forward and backward must still be one graph each."""
    torch.manual_seed(0)
    model = _TinyLM()
    opt = commlmo.build_optimizer(model, "signmuon")
    compiled = torch.compile(model, backend="aot_eager")
    tokens = torch.randint(0, 32, (4, 8), generator=_gen(5))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        opt.zero_grad()
        loss = compiled(tokens)
        loss.backward()
        opt.step()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
