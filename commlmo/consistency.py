"""Cross-rank consistency checks: same layout on the first step, same parameters when asked.

Ranks whose models differ in shape or dtype, or whose configs differ, would
otherwise exchange garbage (or hang in a collective of mismatched sizes).  On
the first step every rank all-gathers a small description of its parameters
and of its config, and a mismatch raises an error naming the parameter.  With
``verify_every: k`` the optimizer also compares an exact checksum of every
parameter's bits across ranks every ``k`` steps.
"""

from __future__ import annotations

import json
import zlib

import torch
from torch import Tensor

from .comm import Communicator
from .errors import DistributedError

__all__ = ["check_layout", "verify_parameters"]

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_MAX_DIMS = 8


def _describe(p: Tensor) -> list[int]:
    dims = list(p.shape)[:_MAX_DIMS]
    code = _DTYPES.index(p.dtype) if p.dtype in _DTYPES else len(_DTYPES)
    return [p.ndim, code, *dims, *([0] * (_MAX_DIMS - len(dims)))]


def _show(row: list[int]) -> str:
    ndim, code = row[0], row[1]
    dtype = _DTYPES[code] if code < len(_DTYPES) else "other"
    return f"shape {tuple(row[2:2 + ndim])} {dtype}"


def check_layout(entries: list[tuple[str, Tensor]], config, comm: Communicator) -> None:
    """Raise if any rank's parameters (count, shapes, dtypes) or config differ from this rank's."""
    if comm.world_size == 1:
        return
    device = entries[0][1].device if entries else torch.device("cpu")
    config_hash = zlib.crc32(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode())
    head = torch.tensor([len(entries), config_hash], dtype=torch.int64, device=device)
    heads = comm.all_gather(head, label="layout_check").tolist()
    counts = [h[0] for h in heads]
    if len(set(counts)) > 1:
        raise DistributedError(f"ranks have different numbers of parameters: {counts} (by rank); every rank must build the same model")
    if len({h[1] for h in heads}) > 1:
        raise DistributedError("ranks were given different optimizer configs; every rank must load the same config")
    rows = torch.tensor([_describe(p) for _, p in entries], dtype=torch.int64, device=device).reshape(len(entries), -1)
    everyone = comm.all_gather(rows, label="layout_check").tolist()
    for i, (name, _) in enumerate(entries):
        described = [r[i] for r in everyone]
        if any(d != described[comm.rank] for d in described):
            per_rank = "; ".join(f"rank {r}: {_show(d)}" for r, d in enumerate(described))
            raise DistributedError(
                f"parameter {name!r} differs across ranks ({per_rank}); every rank must build the same model"
            )


def _checksum(p: Tensor) -> Tensor:
    """An exact, order-independent checksum of a tensor's bits: a 0-d int64 tensor on its device (no host read)."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[p.element_size()]
    return p.detach().contiguous().view(ints).sum(dtype=torch.int64)


def checksums(tensors: list[Tensor], device: torch.device | str) -> Tensor:
    """The checksums of ``tensors``, stacked on ``device`` (what ranks all-gather to compare their bits)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.stack([_checksum(t).to(device) for t in tensors])


def verify_parameters(entries: list[tuple[str, Tensor]], comm: Communicator) -> None:
    """Raise if any parameter's bits differ across ranks (a cheap checksum compared by all-gather)."""
    if comm.world_size == 1 or not entries:
        return
    sums = checksums([p for _, p in entries], entries[0][1].device)
    everyone = comm.all_gather(sums, label="verify_parameters")
    diverged = (everyone != everyone[0]).any(dim=0).nonzero().flatten().tolist()
    if diverged:
        names = ", ".join(repr(entries[i][0]) for i in diverged[:5])
        raise DistributedError(
            f"parameters diverged across ranks after step: {names}"
            f"{' and more' if len(diverged) > 5 else ''}; the run is no longer data-parallel-consistent"
        )
