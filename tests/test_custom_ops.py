"""The ``commlmo::`` custom ops: every implementation gives the same bits, fakes give the shapes.

Each op has a CPU kernel (C where it applies, the eager torch twin otherwise) and a
branch-free torch implementation that CUDA and every other device run.  The latter is
device-generic, so it is checked here on CPU tensors against both CPU paths, bit for bit
(to rounding for the sums and matrix products); ``tests/test_cuda_kernels.py`` checks the
same ops on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from commlmo_aggregators import vote
from commlmo_compressors import _native, bits, natural, rankk, sign, topk
from torch._subclasses.fake_tensor import FakeTensorMode

from commlmo.registry import build_plugin

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
KEY = torch.tensor([0x9E3779B9, 0x7F4A7C15])


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_zeros(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, generator=_gen(seed)).to(dtype)
    x[torch.rand(n, generator=_gen(seed + 1)) < 0.3] = 0.0
    x[::5] *= -0.0 if n > 4 else 1  # signed zeros among them
    return x


@pytest.fixture(params=["native", "eager"])
def cpu_path(request, monkeypatch):
    """Run the CPU kernels with the C kernels (where built) and without them (the eager twins)."""
    if request.param == "eager":
        monkeypatch.setattr(_native, "available", lambda *tensors: None)
    elif _native.kernels() is None:
        pytest.skip("no C compiler: only the eager kernels exist here")
    return request.param


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------- device twins == CPU kernels


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 13, 1001, 70_001])
@pytest.mark.parametrize("mode", [1, 2])
def test_pack_signs_device_path_matches_the_cpu_kernels(cpu_path, dtype, n, mode):
    x = _with_zeros(n, dtype, seed=n)
    assert _same(bits._pack_device(x, KEY, mode), bits._pack_cpu(x, KEY, mode))


def test_pack_signs_device_path_counts_non_finite_entries():
    x = torch.tensor([1.0, float("nan"), 0.0, float("-inf"), -2.0])
    packed, counts = bits._pack_device(x, KEY, 1)
    assert counts.tolist() == [2, 1]
    assert bits._pack_cpu(x, KEY, 1)[1].tolist()[0] == 2


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n,offset,blocks", [(5, 0, 0), (13, 3, 0), (1000, 0, 4), (70_000, 5, 4), (70_001, 11, 0)])
def test_add_packed_signs_device_path_matches_the_cpu_kernels(cpu_path, dtype, n, offset, blocks):
    packed = bits._pack_cpu(_with_zeros(n + offset + 9, torch.float32, seed=n), KEY, 2)[0]
    scales = torch.rand(blocks, generator=_gen(2)) if blocks else None
    start = torch.randn(n, generator=_gen(3)).to(dtype)
    want, got = start.clone(), start.clone()
    bits._add_cpu(want, packed, scales, -0.37, offset)
    bits._add_device(got, packed, scales, -0.37, offset)
    assert torch.equal(got, want)


@pytest.mark.parametrize("m", range(1, 10))
def test_vote_c_kernel_and_torch_twin_agree(m):
    rows = torch.randint(-(2**62), 2**62, (m, 1003), generator=_gen(m))
    tie = torch.randint(-(2**62), 2**62, (1003,), generator=_gen(99))
    want_ties = m % 2 == 0 and m > 1
    for tie_bits, ask in [(tie, False), (None, want_ties)]:
        if tie_bits is None and not ask and want_ties:
            continue
        assert _same(vote._vote_cpu(rows, tie_bits, ask), vote._vote_torch(rows, tie_bits, ask))


def test_vote_refuses_a_tie_without_tie_bits_in_every_implementation():
    rows = torch.zeros(4, 8, dtype=torch.int64)
    for fn in (vote._vote_cpu, vote._vote_torch):
        with pytest.raises(ValueError, match="tie_bits are required"):
            fn(rows, None, False)


@pytest.mark.parametrize("k", [1, 17, 700, 23_000])
def test_topk_device_path_matches_the_cpu_kernels_ties_included(cpu_path, k):
    x = torch.randn(70_001, generator=_gen(4))
    x[::7] = 0.5  # thousands of tied magnitudes straddle the k-th largest for some k
    x[3::7] = -0.5
    idx, values, bad = topk._topk_device(x, k)
    assert _same((idx, values), topk._topk_cpu(x, k)[:2]) and int(bad) == 0
    assert torch.equal(idx, idx.sort().values)  # ascending, as the wire carries them
    assert torch.equal(x.abs()[idx].sort().values, x.abs().topk(k).values.sort().values)


@pytest.mark.parametrize("n", [1, 100, 70_001])
def test_natural_device_path_matches_the_cpu_kernels(cpu_path, n):
    x = torch.randn(n, generator=_gen(n)) * 1e3
    x[::4] = 0
    encoded = natural._encode_device(x, KEY, 254)
    assert _same(encoded, natural._encode_cpu(x, KEY, 254))
    assert torch.equal(natural._decode_device(*encoded[:2]), natural._decode_cpu(*encoded[:2]))


def test_block_means_and_skinny_products_agree_to_rounding(cpu_path):
    blocks = torch.randn(4, 20_000, generator=_gen(5))
    want = blocks.abs().double().mean(1).float()
    torch.testing.assert_close(sign._block_means_cpu(blocks), want)
    torch.testing.assert_close(sign._block_means_device(blocks), want)
    x, v = torch.randn(300, 260, generator=_gen(6)), torch.randn(260, 5, generator=_gen(7))
    u = torch.randn(300, 5, generator=_gen(8))
    torch.testing.assert_close(rankk._xq_cpu(x, v), x @ v, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rankk._xtp_cpu(x, u), u.T @ x, atol=1e-4, rtol=1e-4)
    p, gram = rankk._xq_xtp_cpu(x, v)
    torch.testing.assert_close(gram, (x @ v).T @ x, atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------------- the ops themselves


def _samples():
    x = _with_zeros(1001, torch.float32)
    packed = bits._pack_cpu(x, KEY, 2)[0]
    big = torch.randn(70_001, generator=_gen(1))
    yield "pack_signs", (x, KEY, 2)
    yield "pack_signs", (x.bfloat16(), KEY, 1)
    yield "add_packed_signs", (torch.randn(1000), packed, torch.rand(4), 0.5, 1)
    yield "add_packed_signs", (torch.randn(997), packed, None, -0.25, 3)
    yield "vote_words", (torch.randint(-(2**62), 2**62, (4, 17), generator=_gen(2)), None, True)
    yield "vote_words", (torch.randint(-(2**62), 2**62, (3, 17), generator=_gen(3)), None, False)
    yield "topk_abs", (big, 70)
    yield "natural_encode", (x, KEY, 254)
    yield "natural_decode", (torch.randint(0, 255, (13,), dtype=torch.uint8), torch.tensor([5, 1], dtype=torch.uint8))
    yield "block_abs_means", (torch.randn(3, 40),)
    yield "skinny_xq", (torch.randn(30, 20), torch.randn(20, 3))
    yield "skinny_xtp", (torch.randn(30, 20), torch.randn(30, 3))
    yield "skinny_xq_xtp", (torch.randn(30, 20), torch.randn(20, 3))


@pytest.mark.parametrize("name,args", list(_samples()), ids=lambda v: v if isinstance(v, str) else "")
def test_op_passes_torch_library_opcheck(name, args):
    """Schema (mutation declared), fake implementation and AOT dispatch agree with the kernels."""
    torch.library.opcheck(getattr(torch.ops.commlmo, name).default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("name,args", list(_samples()), ids=lambda v: v if isinstance(v, str) else "")
def test_dispatcher_and_direct_cpu_call_agree(name, args):
    """``_native.call`` skips the dispatcher for plain eager CPU tensors: the result must not change."""
    op = getattr(torch.ops.commlmo, name).default
    mutated = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    through = op(*mutated)
    direct_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    kernel = {"pack_signs": bits._pack_cpu, "add_packed_signs": bits._add_cpu, "vote_words": vote._vote_cpu,
              "topk_abs": topk._topk_cpu, "natural_encode": natural._encode_cpu,
              "natural_decode": natural._decode_cpu, "block_abs_means": sign._block_means_cpu,
              "skinny_xq": rankk._xq_cpu, "skinny_xtp": rankk._xtp_cpu, "skinny_xq_xtp": rankk._xq_xtp_cpu}[name]
    direct = _native.call(op, kernel, *direct_args)
    outs = lambda r: r if isinstance(r, tuple) else (r,)  # noqa: E731
    if through is None:  # the mutating op: compare the targets
        through, direct = (mutated[0],), (direct_args[0],)
    for a, b in zip(outs(through), outs(direct), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4) if a.is_floating_point() and "skinny" in name \
            else torch.testing.assert_close(a, b, atol=0, rtol=0)


COMPRESSORS = [
    {"kind": "sign", "zero": "positive"},
    {"kind": "sign"},
    {"kind": "sign", "scale": "mean", "blocks": 4},
    {"kind": "topk", "k": 0.01},
    {"kind": "topk", "k": 0.05, "selection": "blocked", "blocks": "auto"},
    "natural",
    {"kind": "rankk", "rank": 4},
    {"kind": "chain", "stages": [{"kind": "topk", "k": 0.05}, "natural"]},
]


@pytest.mark.parametrize("config", COMPRESSORS, ids=str)
def test_compressors_run_on_meta_and_fake_tensors_with_the_declared_wire(config):
    """Shape inference without values (what FakeTensor, DTensor planning and torch.compile need)."""
    c = build_plugin("compressor", config)
    with FakeTensorMode():
        fake = c.compress(torch.empty(512, 256), generator=_gen())
    meta = c.compress(torch.empty(512, 256, device="meta"), generator=_gen())
    declared = [(s, d) for s, d in c.wire_layout(torch.Size([512, 256]), torch.float32)]
    for payload in (fake, meta):
        assert [(w.shape, w.dtype) for w in payload.wire] == declared
    target = torch.empty(512, 256, device="meta")
    assert c.decompress_add_(target, meta) is target and c.decompress(meta).shape == (512, 256)


def test_call_routes_subclasses_to_the_kernel_and_fakes_to_the_op(monkeypatch):
    """Plain eager CPU tensors and wrapper subclasses (a DTensor has no sharding rule for a commlmo::
    op) run the CPU kernel, which takes any tensor; meta, fake and compiled code go through the op."""
    op, kernel = (lambda *a: "op"), (lambda *a: "kernel")
    assert _native.call(op, kernel, torch.zeros(3), 1) == "kernel"
    assert _native.call(op, kernel, torch.zeros(3, device="meta")) == "op"
    with FakeTensorMode():
        assert _native.call(op, kernel, torch.zeros(3)) == "op"
    assert torch.compile(lambda t: _native.call(op, kernel, t) == "op", backend="eager", fullgraph=True)(
        torch.zeros(3))
    monkeypatch.setattr(_native, "dispatches_itself", lambda t: True)
    assert _native.call(op, kernel, torch.zeros(3, device="meta")) == "kernel"


@pytest.mark.parametrize("config", COMPRESSORS, ids=str)
def test_cpu_kernels_allocate_on_the_cpu_under_a_default_device(config):
    """``with torch.device(...)`` changes where a bare ``torch.empty`` allocates: a C kernel writing
    through such a pointer would crash, so the kernels name the CPU for their outputs."""
    c, x = build_plugin("compressor", config), torch.randn(512, 256, generator=_gen(3))
    want = c.compress(x, generator=_gen(4))
    with torch.device("meta"):
        got = c.compress(x, generator=_gen(4))
        target = torch.zeros(512, 256, device="cpu")
        c.decompress_add_(target, got)
    assert all(torch.equal(a, b) for a, b in zip(want.wire, got.wire))
    assert torch.equal(target, c.decompress_add_(torch.zeros(512, 256), want))
