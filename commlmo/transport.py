r"""How payloads travel: dense sums, all-gathers of packed payloads, and the cost model.

The *owner* transport computes a sum over ranks with an all-to-all of shards
(rank ``j`` owns shard ``j``), a local sum in rank order by the owner, and an
all-gather of the summed shards: ``2(M-1)/M * n`` bytes per rank, the same as a
ring all-reduce, but with a fixed summation order, so that a run on ``M``
ranks is bitwise equal to one process summing the same ``M`` tensors in rank
order.  DeepSpeed's compressed all-reduce (1-bit Adam) moves its data the same
way.

Payloads that do not sum (top-k, natural, rank-k factors) are serialised to one
``uint8`` buffer per rank and all-gathered: ``(M-1) * payload`` bytes per rank
(the owner *server role*, :mod:`commlmo.owner`, sends them to one rank per
parameter instead).

Each exchange is written as a generator ("steps"): it issues its first collective
asynchronously and ``yield``\ s, and whatever follows waits for it.  The pipeline
drives it to the end at once (:func:`run`) or starts it from a gradient hook while
``backward()`` is still running and finishes it in ``step()``
(:class:`Started`).  Plain functions (:func:`owner_sum`, :func:`mean_of_payloads`...)
run their steps at once.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from .comm import Communicator
from .plugin import Compressor, Payload

__all__ = [
    "owner_sum", "dense_sum", "sum_by_dtype", "gather_payloads", "mean_of_payloads", "as_bytes", "cat_bytes",
    "Transport",
    "bytes_per_rank", "run", "Started", "Steps", "mean_steps", "gather_steps", "sum_steps",
]

Transport = Literal["owner", "allreduce", "allgather", "int8"]
T = TypeVar("T")
#: an exchange written as a generator: it yields once its first collectives are in flight
Steps = Generator[None, None, T]


def run(steps: Steps[T]) -> T:
    """Drive an exchange to its end and return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


class Started:
    """An exchange whose first collectives are in flight: :meth:`finish` waits and returns its result."""

    def __init__(self, steps: Steps[Any]):
        self._steps, self._done, self._value = steps, False, None
        try:
            next(steps)
        except StopIteration as stop:  # nothing to wait for (a world of one)
            self._done, self._value = True, stop.value

    def finish(self) -> Any:
        """The exchange's result (its remaining collectives run now)."""
        if not self._done:
            self._value, self._done = run(self._steps), True
        return self._value


def as_bytes(t: Tensor) -> Tensor:
    """A flat ``uint8`` view of ``t``'s bytes (copying only if ``t`` is not contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def cat_bytes(pieces: Sequence[Tensor], device: torch.device | str) -> Tensor:
    """The ``uint8`` pieces end to end (an empty ``uint8`` tensor on ``device`` when there are none)."""
    return torch.cat(list(pieces)) if pieces else torch.zeros(0, dtype=torch.uint8, device=device)


def _pad(t: Tensor, multiple: int) -> Tensor:
    extra = (-t.numel()) % multiple
    return torch.cat([t, t.new_zeros(extra)]) if extra else t


# --------------------------------------------------------------------------- sums


def sum_steps(flats: Sequence[Tensor], comm: Communicator, *, transport: Transport, label: str) -> Steps[list[Tensor]]:
    """Each 1-D tensor of ``flats`` summed over ranks: the owner transport (sum in rank order) or the
    backend's all-reduce.  All first-phase collectives are issued before the ``yield``."""
    m = comm.world_size
    if m == 1:
        return list(flats)
    if transport == "allreduce":
        pending = [comm.all_reduce_sum_(f.clone(), label=label, async_op=True) for f in flats]
        yield
        return [p.wait() for p in pending]
    pending = [comm.all_to_all(_pad(f, m), label=label, async_op=True) for f in flats]
    yield
    out = []
    for f, p in zip(flats, pending):
        rows = p.wait()
        shard = rows[0].clone()
        for r in range(1, m):
            shard += rows[r]
        out.append(comm.all_gather(shard, label=label).reshape(-1)[:f.numel()])
    return out


def owner_sum(flat: Tensor, comm: Communicator, *, label: str) -> Tensor:
    """Sum of the 1-D ``flat`` over ranks, in rank order, via all-to-all + all-gather."""
    return run(sum_steps([flat], comm, transport="owner", label=label))[0]


def dense_sum(flat: Tensor, comm: Communicator, *, transport: Transport, label: str) -> Tensor:
    """Sum over ranks with the ``owner`` transport or the backend's own all-reduce."""
    return run(sum_steps([flat], comm, transport=transport, label=label))[0]


def _by_dtype(tensors: Sequence[Tensor]) -> dict[torch.dtype, list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return groups


def sum_by_dtype_steps(tensors: Sequence[Tensor], comm: Communicator, *, transport: Transport,
                       label: str) -> Steps[list[Tensor]]:
    """Each tensor summed over ranks, one collective per dtype (a whole bucket travels together)."""
    groups = _by_dtype(tensors)
    flats = [torch.cat([tensors[i].reshape(-1) for i in members]) for members in groups.values()]
    sums = yield from sum_steps(flats, comm, transport=transport, label=label)
    out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for members, flat in zip(groups.values(), sums):
        for i, part in zip(members, torch.split(flat, [tensors[i].numel() for i in members])):
            out[i] = part.view(tensors[i].shape)
    return out


def sum_by_dtype(tensors: Sequence[Tensor], comm: Communicator, *, transport: Transport, label: str) -> list[Tensor]:
    """Each tensor summed over ranks, with one collective per dtype (a whole group travels together)."""
    return run(sum_by_dtype_steps(tensors, comm, transport=transport, label=label))


# --------------------------------------------------------------------------- gathers


def cut(row: Tensor, payloads: Sequence[Payload]) -> list[Payload]:
    """Cut one rank's ``uint8`` buffer into payloads shaped like ``payloads`` (same wire layout)."""
    out, offset = [], 0
    for p in payloads:
        wires = []
        for w in p.wire:
            nb = w.numel() * w.element_size()
            # clone: a dtype view of a sliced uint8 buffer needs an aligned start
            wires.append(row[offset:offset + nb].clone().view(w.dtype).view(w.shape))
            offset += nb
        out.append(Payload(tuple(wires), p.ctx))
    return out


def gather_steps(payloads: Sequence[Payload], comm: Communicator, *, label: str) -> Steps[list[list[Payload]]]:
    """Every rank's payloads, ``[rank][param]``, decodable with this rank's ``ctx``.

    Fixed-size payloads of the same parameters have the same wire layout on
    every rank, so one ``uint8`` buffer per rank is all-gathered and cut up
    using this rank's own wire shapes and dtypes.
    """
    if comm.world_size == 1:
        return [list(payloads)]
    buffer = torch.cat([as_bytes(w) for p in payloads for w in p.wire])
    pending = comm.all_gather(buffer, label=label, async_op=True)
    yield
    rows = pending.wait()
    return [list(payloads) if r == comm.rank else cut(rows[r], payloads) for r in range(comm.world_size)]


def gather_payloads(payloads: Sequence[Payload], comm: Communicator, *, label: str) -> list[list[Payload]]:
    """Every rank's payloads, ``[rank][param]`` (see :func:`gather_steps`)."""
    return run(gather_steps(payloads, comm, label=label))


def decoded_mean(rows: Sequence[Payload], codec: Compressor) -> Tensor:
    """``(1/M) sum_r decompress(rows[r])``, summed in rank order (the same bits wherever it runs)."""
    acc = codec.decompress(rows[0]).clone()
    for p in rows[1:]:
        acc += codec.decompress(p)
    return acc.div_(len(rows)) if len(rows) > 1 else acc


def mean_steps(
    payloads: Sequence[Payload], codecs: Compressor | Sequence[Compressor], comm: Communicator, *,
    transport: Transport, label: str,
) -> Steps[list[Tensor]]:
    """``(1/M) * sum_i decompress(P_i)`` for each parameter, identical on every rank (see :func:`mean_of_payloads`)."""
    m = comm.world_size
    codec_of = list(codecs) if isinstance(codecs, Sequence) else [codecs] * len(payloads)
    if m == 1:  # a world of one: this rank's messages, decoded, with no flat copy of them
        return [codec.decompress(p) for p, codec in zip(payloads, codec_of)]
    if transport in ("owner", "allreduce"):
        for codec in codec_of:
            if not codec.capabilities.summable:
                raise ValueError(f"transport {transport!r} sums wire tensors, but {codec.kind!r} payloads do not sum")
        sums = yield from sum_by_dtype_steps([w for p in payloads for w in p.wire], comm, transport=transport,
                                             label=label)
        summed = iter(sums)
        return [codec.decompress(Payload(tuple(next(summed) for _ in p.wire), p.ctx)).div_(m)
                for p, codec in zip(payloads, codec_of)]
    gathered = yield from gather_steps(payloads, comm, label=label)
    return [decoded_mean([gathered[r][i] for r in range(m)], codec) for i, codec in enumerate(codec_of)]


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
    return run(mean_steps(payloads, codecs, comm, transport=transport, label=label))


# --------------------------------------------------------------------------- cost model


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
