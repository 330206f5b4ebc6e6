"""CUDA paths of the ``commlmo::`` ops, bit for bit against the CPU kernels.

Skipped without a GPU (``bench/gpu.sh`` runs this file on one).  Each op runs on the CPU
(the C kernel) and on CUDA -- the torch implementation, and the fused Triton kernels
with ``COMMLMO_TRITON=1`` where ``triton`` imports -- and the results must be identical
(to rounding for sums and matrix products, whose order differs by device).  The torch
implementation itself is device-generic and is checked on CPU tensors by
``tests/test_custom_ops.py``; the last test here runs the Triton kernels in Triton's
interpreter on the CPU when ``triton`` is installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from commlmo_aggregators.vote import vote_words
from commlmo_compressors import bits

from commlmo.plugin import Payload
from commlmo.registry import build_plugin

CUDA = torch.cuda.is_available()
TRITON = importlib.util.find_spec("triton") is not None
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device here (bench/gpu.sh runs these on one)")
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
KEY = torch.tensor([0x9E3779B9, 0x7F4A7C15])


@pytest.fixture(params=["torch", "triton"])
def cuda_path(request, monkeypatch):
    """The torch implementation, then the Triton kernels (``COMMLMO_TRITON=1``)."""
    if not CUDA:
        pytest.skip("no CUDA device here (bench/gpu.sh runs these on one)")
    if request.param == "triton" and not TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("COMMLMO_TRITON", "1" if request.param == "triton" else "0")
    return request.param


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_zeros(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, generator=_gen(seed)).to(dtype)
    x[torch.rand(n, generator=_gen(seed + 1)) < 0.3] = 0.0
    x[::5] *= -0.0
    return x


def _on_cpu(result):
    return tuple(t.cpu() for t in result) if isinstance(result, tuple) else result.cpu()


@pytest.mark.parametrize("dtype", FLOATS + [torch.float64])
@pytest.mark.parametrize("n", [13, 70_001, 1 << 22])
@pytest.mark.parametrize("mode", [1, 2])
def test_pack_signs(cuda_path, dtype, n, mode):
    x = _with_zeros(n, dtype, seed=n)
    cpu = torch.ops.commlmo.pack_signs.default(x, KEY, mode)
    gpu = _on_cpu(torch.ops.commlmo.pack_signs.default(x.cuda(), KEY.cuda(), mode))
    assert torch.equal(cpu[0], gpu[0]) and torch.equal(cpu[1], gpu[1])


@pytest.mark.parametrize("dtype", FLOATS + [torch.float64])
@pytest.mark.parametrize("n,offset,blocks", [(13, 3, 0), (70_000, 5, 4), (1 << 22, 0, 0), (1 << 22, 0, 4)])
def test_add_packed_signs(cuda_path, dtype, n, offset, blocks):
    packed = bits.pack_signs(torch.randn(n + offset + 9, generator=_gen(n)), zero="positive")
    scales = torch.rand(blocks, generator=_gen(2)) if blocks else None
    target = torch.randn(n, generator=_gen(3)).to(dtype)
    on_gpu = target.cuda()
    torch.ops.commlmo.add_packed_signs.default(target, packed, scales, -0.37, offset)
    torch.ops.commlmo.add_packed_signs.default(on_gpu, packed.cuda(), None if scales is None else scales.cuda(),
                                               -0.37, offset)
    assert torch.equal(target, on_gpu.cpu())


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 16, 33])
def test_vote_words(cuda_path, m):
    rows = torch.randint(-(2**62), 2**62, (m, 70_003), generator=_gen(m))
    tie = torch.randint(-(2**62), 2**62, (70_003,), generator=_gen(99))
    assert torch.equal(vote_words(rows, tie_bits=tie), vote_words(rows.cuda(), tie_bits=tie.cuda()).cpu())
    cpu_ties, gpu_ties = [], []
    assert torch.equal(vote_words(rows, ties_out=cpu_ties), vote_words(rows.cuda(), ties_out=gpu_ties).cpu())
    assert len(cpu_ties) == len(gpu_ties) and all(torch.equal(a, b.cpu()) for a, b in zip(cpu_ties, gpu_ties))


@needs_cuda
@pytest.mark.parametrize("k", [1, 700, 23_000, 700_000])
def test_topk_abs_ties_included(k):
    x = torch.randn(1 << 21, generator=_gen(4))
    x[::7] = 0.5
    cpu = torch.ops.commlmo.topk_abs.default(x, k)
    gpu = _on_cpu(torch.ops.commlmo.topk_abs.default(x.cuda(), k))
    assert all(torch.equal(a, b) for a, b in zip(cpu, gpu))


@needs_cuda
@pytest.mark.parametrize("n", [100, 1 << 22])
def test_natural_encode_and_decode(n):
    x = torch.randn(n, generator=_gen(n)) * 1e3
    x[::4] = 0
    cpu = torch.ops.commlmo.natural_encode.default(x, KEY, 254)
    gpu = _on_cpu(torch.ops.commlmo.natural_encode.default(x.cuda(), KEY.cuda(), 254))
    assert all(torch.equal(a, b) for a, b in zip(cpu, gpu))
    decoded = torch.ops.commlmo.natural_decode.default(cpu[0].cuda(), cpu[1].cuda()).cpu()
    assert torch.equal(decoded, torch.ops.commlmo.natural_decode.default(cpu[0], cpu[1]))


@needs_cuda
def test_block_means_and_skinny_products_to_rounding():
    blocks = torch.randn(4, 1 << 20, generator=_gen(5))
    torch.testing.assert_close(torch.ops.commlmo.block_abs_means.default(blocks.cuda()).cpu(),
                               torch.ops.commlmo.block_abs_means.default(blocks))
    x, v = torch.randn(1024, 512, generator=_gen(6)), torch.randn(512, 8, generator=_gen(7))
    for name, args in [("skinny_xq", (x, v)), ("skinny_xtp", (x, x @ v)), ("skinny_xq_xtp", (x, v))]:
        op = getattr(torch.ops.commlmo, name).default
        cpu, gpu = op(*args), _on_cpu(op(*(a.cuda() for a in args)))
        for a, b in zip(cpu if isinstance(cpu, tuple) else (cpu,), gpu if isinstance(gpu, tuple) else (gpu,)):
            torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-3)


COMPRESSORS = [
    {"kind": "sign"},
    {"kind": "sign", "scale": "mean", "blocks": 4},
    {"kind": "topk", "k": 0.01},
    {"kind": "topk", "k": 0.05, "selection": "blocked", "blocks": "auto"},
    "natural",
    {"kind": "chain", "stages": [{"kind": "topk", "k": 0.05}, "natural"]},
]


@pytest.mark.parametrize("config", COMPRESSORS, ids=str)
def test_compressors_send_the_same_wire_from_cuda(cuda_path, config):
    """One CPU generator drives both, so the stochastic ones draw the same key."""
    c = build_plugin("compressor", config)
    x = torch.randn(1024, 1031, generator=_gen(8))
    x[::3, ::5] = 0
    cpu, gpu = c.compress(x, generator=_gen(9)), c.compress(x.cuda(), generator=_gen(9))
    assert all(w.is_cuda for w in gpu.wire)
    exact = config != {"kind": "sign", "scale": "mean", "blocks": 4}  # float64 sums in another order
    for a, b in zip(cpu.wire, gpu.wire):
        if exact or a.dtype == torch.uint8:
            assert torch.equal(a, b.cpu())
        else:
            torch.testing.assert_close(a, b.cpu(), atol=0, rtol=1e-6)
    target = torch.randn(1024, 1031, generator=_gen(10))
    want = c.decompress_add_(target.clone(), cpu, alpha=-0.1)
    got = c.decompress_add_(target.cuda(), Payload(tuple(w.cuda() for w in cpu.wire), cpu.ctx), alpha=-0.1)
    assert torch.equal(want, got.cpu())


@needs_cuda
def test_newton_schulz_on_cuda_is_close_to_the_cpu():
    spectral = build_plugin("lmo", {"kind": "spectral", "dtype": "float32"})
    g = torch.randn(512, 256, generator=_gen(11))
    torch.testing.assert_close(spectral.direction(g.cuda()).cpu(), spectral.direction(g), atol=2e-3, rtol=2e-3)


@needs_cuda
def test_sign_roundtrip_and_vote_compile_with_inductor_on_cuda():
    sign = build_plugin("compressor", {"kind": "sign", "zero": "positive"})

    def step(grads: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        rows = torch.stack([sign.compress(g).wire[0] for g in grads])
        voted = vote_words(rows.view(torch.int64))
        payload = Payload(wire=(voted.view(torch.uint8),), ctx={"shape": param.shape, "dtype": param.dtype})
        return sign.decompress_add_(param, payload, alpha=-0.01)

    grads, param = torch.randn(3, 256, 128, device="cuda"), torch.randn(256, 128, device="cuda")
    want = step(grads, param.clone())
    assert torch.equal(torch.compile(step, fullgraph=True)(grads, param), want)


_INTERPRETER_CHECK = """
import torch
from commlmo_aggregators import vote
from commlmo_compressors import _triton, bits

assert _triton.enabled(torch.zeros(1))
key = torch.tensor([0x9E3779B9, 0x7F4A7C15])
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for n in (1, 13, 5001):
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, generator=g).to(dtype)
        x[torch.rand(n, generator=g) < 0.3] = 0.0
        x[::5] *= -0.0
        for mode in (1, 2):
            want, got = bits._pack_cpu(x, key, mode), _triton.pack_signs(x, key, mode)
            assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1]), (dtype, n, mode)
        packed = bits._pack_cpu(torch.randn(n + 16, generator=g), key, 1)[0]
        for offset, scales in ((0, None), (3, None), (5, torch.rand(1, generator=g))):
            want = torch.randn(n, generator=g).to(dtype)
            got = want.clone()
            bits._add_cpu(want, packed, scales, -0.37, offset)
            bits._add_device(got, packed, scales, -0.37, offset)
            assert torch.equal(want, got), (dtype, n, offset)
for m in range(1, 8):
    g = torch.Generator().manual_seed(m)
    rows = torch.randint(-(2**62), 2**62, (m, 77), generator=g)
    tie = torch.randint(-(2**62), 2**62, (77,), generator=g)
    even = m % 2 == 0 and m > 1
    for tie_bits, want_ties in ((tie, False), (None, even)):
        if tie_bits is None and even and not want_ties:
            continue
        want, got = vote._vote_cpu(rows, tie_bits, want_ties), _triton.vote_words(rows, tie_bits, want_ties)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1]), m
"""


@pytest.mark.skipif(not TRITON or CUDA, reason="needs triton, and only matters without a GPU (which runs them)")
def test_triton_kernels_match_the_cpu_kernels_in_the_interpreter():
    """Without a GPU, Triton's interpreter runs the kernels on CPU tensors (in a separate process:
    the interpreter is chosen when the kernels are defined).  It rounds float32 to bfloat16 by
    truncation, which is why the bfloat16 apply rounds by hand."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "COMMLMO_TRITON": "1"}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
