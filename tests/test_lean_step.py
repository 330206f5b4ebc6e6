"""A step synchronises with the host at most twice: the agreement's one read, and nothing per parameter.

On an accelerator every read of a tensor's value on the host (``.item()``, ``bool()``,
``.tolist()``) waits for the device.  The optimizer folds the finiteness check into the
step's one agreement collective and reads that once; LMOs, rules and compressors take
branch-free paths where a value would otherwise be read (a CPU tensor may still take a
cheaper path that reads: :func:`commlmo.plugin.host_reads_free`).  The tests count reads
with a dispatch mode, under :func:`commlmo.plugin.as_if_on_accelerator`, so the CPU suite
measures what a GPU would synchronise on.
"""

from __future__ import annotations

import threading
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import commlmo
from commlmo import simulate
from commlmo.plugin import as_if_on_accelerator

ROOT = Path(__file__).resolve().parents[1]
READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}


class HostReads(TorchDispatchMode):
    """Counts, on this thread, every op that hands a tensor's value to Python, and every ``tolist()``.

    Reads inside the CPU kernels of the compressors (``commlmo_compressors``) are not counted: they read
    CPU tensors (a 2-word key, a few scales), and their device twins, which an accelerator runs, read
    nothing (``tests/test_custom_ops.py`` runs those twins on the CPU).
    """

    _patched = False
    _active: dict[int, HostReads] = {}

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.thread = threading.get_ident()

    def record(self, what: str) -> None:
        if not any("commlmo_compressors" in f.filename for f in traceback.extract_stack(limit=12)):
            self.reads.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.record(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        if not HostReads._patched:  # one wrapper for every thread: it reports to that thread's counter
            inner = torch.Tensor.tolist

            def tolist(t):
                mode = HostReads._active.get(threading.get_ident())
                if mode is not None:
                    mode.record("tolist")
                return inner(t)

            torch.Tensor.tolist = tolist  # type: ignore[method-assign]
            HostReads._patched = True
        HostReads._active[self.thread] = self
        return super().__enter__()

    def __exit__(self, *exc):
        HostReads._active.pop(self.thread, None)
        return super().__exit__(*exc)


def _model():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.ReLU(), torch.nn.Linear(24, 24), torch.nn.ReLU(),
                                torch.nn.Linear(24, 6))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _reads_per_step(config, rank: int = 0, comm=None, steps: int = 3) -> list[int]:
    model = _model()
    opt = commlmo.build_optimizer(model, config, process_group=comm)
    g = torch.Generator().manual_seed(1 + rank)
    counts = []
    for step in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        mode = HostReads()
        with as_if_on_accelerator(), mode:
            opt.step()
        counts.append(len(mode.reads))
    return counts


@pytest.mark.parametrize("config", [ROOT / "examples/torch_muon.yaml", "muonserver", "muon"])
def test_one_process_step_reads_the_host_at_most_twice(config):
    counts = _reads_per_step(config)
    assert all(c <= 2 for c in counts[1:]), counts  # the first step also checks the layout


@pytest.mark.parametrize("preset", ["muonserver", "muonsign", "signmuon", "ef21muonsign"])
def test_distributed_step_reads_the_host_at_most_twice(preset):
    counts = simulate(2, lambda rank, comm: _reads_per_step(preset, rank, comm))
    for per_rank in counts:
        assert all(c <= 2 for c in per_rank[1:]), per_rank
