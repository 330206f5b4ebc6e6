r"""How payloads travel: dense sums, all-gathers of packed payloads, and the cost model.

The *owner* transport computes a sum over ranks with an all-to-all of shards
(rank ``j`` owns shard ``j``), a local sum in rank order by the owner, and an
all-gather of the summed shards: ``2(M-1)/M * n`` bytes per rank, the same as a
ring all-reduce, but with a fixed summation order, so that a run on ``M``
ranks is bitwise equal to one process summing the same ``M`` tensors in rank
order.  DeepSpeed's compressed all-reduce (1-bit Adam) moves its data the same
way.

Payloads that do not sum (top-k, natural, rank-k factors) are serialised to one
``uint8`` buffer per rank and all-gathered: ``(M-1) * payload`` bytes per rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .comm import Communicator
from .plugin import Compressor, Payload

__all__ = [
    "owner_sum", "dense_sum", "sum_by_dtype", "gather_payloads", "mean_of_payloads", "as_bytes", "Transport",
    "bytes_per_rank",
]

Transport = Literal["owner", "allreduce", "allgather", "int8"]


def as_bytes(t: Tensor) -> Tensor:
    """A flat ``uint8`` view of ``t``'s bytes (copying only if ``t`` is not contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _pad(t: Tensor, multiple: int) -> Tensor:
    extra = (-t.numel()) % multiple
    return torch.cat([t, t.new_zeros(extra)]) if extra else t


def owner_sum(flat: Tensor, comm: Communicator, *, label: str) -> Tensor:
    """Sum of the 1-D ``flat`` over ranks, in rank order, via all-to-all + all-gather."""
    m = comm.world_size
    if m == 1:
        return flat
    n = flat.numel()
    rows = comm.all_to_all(_pad(flat, m), label=label)
    shard = rows[0].clone()
    for r in range(1, m):
        shard += rows[r]
    return comm.all_gather(shard, label=label).reshape(-1)[:n]


def dense_sum(flat: Tensor, comm: Communicator, *, transport: Transport, label: str) -> Tensor:
    """Sum over ranks with the ``owner`` transport or the backend's own all-reduce."""
    if transport == "allreduce":
        return comm.all_reduce_sum_(flat.clone() if comm.world_size > 1 else flat, label=label)
    return owner_sum(flat, comm, label=label)


def sum_by_dtype(tensors: Sequence[Tensor], comm: Communicator, *, transport: Transport, label: str) -> list[Tensor]:
    """Each tensor summed over ranks, with one collective per dtype (a whole group travels together)."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for members in by_dtype.values():
        flat = dense_sum(torch.cat([tensors[i].reshape(-1) for i in members]), comm, transport=transport, label=label)
        for i, part in zip(members, torch.split(flat, [tensors[i].numel() for i in members])):
            out[i] = part.view(tensors[i].shape)
    return out


def gather_payloads(payloads: Sequence[Payload], comm: Communicator, *, label: str) -> list[list[Payload]]:
    """Every rank's payloads, ``[rank][param]``, decodable with this rank's ``ctx``.

    Fixed-size payloads of the same parameters have the same wire layout on
    every rank, so one ``uint8`` buffer per rank is all-gathered and cut up
    using this rank's own wire shapes and dtypes.
    """
    if comm.world_size == 1:
        return [list(payloads)]
    buffer = torch.cat([as_bytes(w) for p in payloads for w in p.wire])
    rows = comm.all_gather(buffer, label=label)
    out: list[list[Payload]] = []
    for r in range(comm.world_size):
        if r == comm.rank:
            out.append(list(payloads))
            continue
        row, offset, mine = rows[r], 0, []
        for p in payloads:
            wires = []
            for w in p.wire:
                nb = w.numel() * w.element_size()
                # clone: a dtype view of a sliced uint8 buffer needs an aligned start
                wires.append(row[offset:offset + nb].clone().view(w.dtype).view(w.shape))
                offset += nb
            mine.append(Payload(tuple(wires), p.ctx))
        out.append(mine)
    return out


def mean_of_payloads(
    payloads: Sequence[Payload],
    codecs: Compressor | Sequence[Compressor],
    comm: Communicator,
    *,
    transport: Transport,
    label: str,
) -> list[Tensor]:
    """``(1/M) * sum_i decompress(P_i)`` for each parameter, identical on every rank.

    ``codecs`` is one compressor for every payload, or one per payload.
    """
    m = comm.world_size
    codec_of = list(codecs) if isinstance(codecs, Sequence) else [codecs] * len(payloads)
    if m == 1:  # a world of one: this rank's messages, decoded, with no flat copy of them
        return [codec.decompress(p) for p, codec in zip(payloads, codec_of)]
    if transport in ("owner", "allreduce"):
        for codec in codec_of:
            if not codec.capabilities.summable:
                raise ValueError(f"transport {transport!r} sums wire tensors, but {codec.kind!r} payloads do not sum")
        summed = iter(sum_by_dtype([w for p in payloads for w in p.wire], comm, transport=transport, label=label))
        out = []
        for p, codec in zip(payloads, codec_of):
            total = codec.decompress(Payload(tuple(next(summed) for _ in p.wire), p.ctx))
            out.append(total.div_(m) if m > 1 else total)
        return out
    gathered = gather_payloads(payloads, comm, label=label)
    out = []
    for i, codec in enumerate(codec_of):
        acc = codec.decompress(gathered[0][i]).clone()
        for r in range(1, m):
            acc += codec.decompress(gathered[r][i])
        out.append(acc.div_(m) if m > 1 else acc)
    return out


def bytes_per_rank(transport: Transport, *, payload_bytes: int, dense_entries: int, world_size: int) -> float:
    """Bytes each rank sends under ``transport`` (the cost model that picks ``auto``).

    ``payload_bytes`` is one rank's wire size, ``dense_entries`` the number of
    coordinates (for the int8 vote transport).
    """
    m = world_size
    if m == 1:
        return 0.0
    if transport in ("owner", "allreduce"):
        return 2 * (m - 1) / m * payload_bytes
    if transport == "allgather":
        return (m - 1) * payload_bytes
    if transport == "int8":
        return 2 * (m - 1) / m * dense_entries
    raise ValueError(f"unknown transport {transport!r}")


def cheapest(options: Sequence[Transport], **sizes: int) -> Transport:
    """The transport with the fewest bytes per rank; ties go to the earlier option."""
    return min(options, key=lambda t: (bytes_per_rank(t, **sizes), options.index(t)))  # type: ignore[arg-type]

