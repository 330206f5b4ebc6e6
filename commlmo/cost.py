r"""The cost model: the bytes each rank sends in a step, from the declared wire sizes alone.

For every bucket of every group (:mod:`commlmo.overlap`) it applies the formula of the
transport or server role the optimizer planned, with the padding those add, to the
sizes each compressor *declares* (``wire_nbytes`` / ``wire_layout``) -- no tensor is
compressed and no collective runs:

=============================  ==============================================================
mean over ``owner``            ``2(M-1)/M`` of each dtype's concatenated wire tensors, padded
                               to a multiple of ``M`` elements (all-to-all + all-gather)
mean over ``allreduce``        ``2(M-1)/M`` of the wire bytes (the backend's all-reduce)
mean over ``allgather``        ``(M-1)`` times the wire bytes
vote over ``owner``            ``2(M-1)/M`` of the packed bits padded to whole 64-bit words per
                               shard (plus the tie mask back under ``ties: abstain``, even M)
vote over ``int8``             ``2(M-1)/M`` bytes per coordinate
vote over ``allgather``        ``(M-1)`` times the packed bits in whole 64-bit words
error_feedback ``compressed``  rank r: the payloads of the parameters it does not own, plus
                               ``M-1`` times those it owns (compressed again, the same size)
owner server role              rank r: the payloads of the parameters it does not own, plus
                               ``M-1`` times the downlink messages of those it owns
=============================  ==============================================================

plus the step's agreement (``2(M-1)/M (4 + parameters)`` bytes: four flags and one per parameter) and, at the first step,
the layout check and each replicated group's agreement check.  ``tests/test_cost_model.py``
checks that this equals what the optimizer handed to its collectives, byte for byte, for
every transport and every preset, at ``M = 2..8``; ``bench/scale.py`` uses it to project
bytes per rank to ``M = 1024``.  Byte counts are what each rank *sends*; received bytes
are the same sums over the other ranks.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .optimizer import _FLAGS
from .owner import _down_nbytes, assign_owners, choose_server, owner_problem, owners_by_size
from .transport import bytes_per_rank

__all__ = ["step_bytes", "every_rank", "mean_bytes", "server_role"]

#: the flag bytes of the step's agreement before its one byte per parameter
AGREEMENT_FLAGS = len(_FLAGS)


def _mean_cost(transport: str, pieces: list[tuple[torch.dtype, int]], m: int) -> tuple[int, int]:
    """(bytes, collectives) of a mean of wire tensors ``pieces = [(dtype, elements)]``."""
    if transport == "allgather":  # one uint8 buffer of every wire tensor
        return round(bytes_per_rank("allgather", payload_bytes=sum(d.itemsize * n for d, n in pieces),
                                    dense_entries=0, world_size=m)), 1
    by_dtype: dict[torch.dtype, int] = {}
    for d, n in pieces:
        by_dtype[d] = by_dtype.get(d, 0) + n
    sent = 0
    for d, n in by_dtype.items():
        if transport == "owner":  # the owner sum pads each dtype to a multiple of M elements
            n = -(-n // m) * m
        sent += round(bytes_per_rank(transport, payload_bytes=n * d.itemsize, dense_entries=0,  # type: ignore[arg-type]
                                     world_size=m))
    return sent, len(by_dtype) * (2 if transport == "owner" else 1)


def _vote_cost(transport: str, packed: int, entries: int, m: int, abstain: bool) -> tuple[int, int]:
    """(bytes, collectives) of a majority vote of ``packed`` sign bytes over ``entries`` coordinates."""
    if transport == "int8":
        return round(bytes_per_rank("int8", payload_bytes=packed, dense_entries=entries, world_size=m)), 1
    if transport == "allgather":  # whole 64-bit words
        return round(bytes_per_rank("allgather", payload_bytes=-(-packed // 8) * 8, dense_entries=entries,
                                    world_size=m)), 1
    padded = -(-packed // (8 * m)) * 8 * m  # each owner shard whole 64-bit words
    sent = bytes_per_rank("owner", payload_bytes=padded, dense_entries=entries, world_size=m)
    if abstain and m % 2 == 0:  # the tie mask comes back with the result
        sent += (m - 1) * padded / m
    return round(sent), 2


def server_role(rt: Any, m: int, *, world_size: int) -> tuple[str, str, list[int]]:
    """``(role, transport, owners)`` of a group on ``m`` ranks: what the optimizer planned when ``m`` is its own
    world size, else what it would plan."""
    if m == world_size:
        return rt.server, rt.transport, rt.owners
    transport = rt.plan(rt.members, world_size=m)
    server = rt.config.server
    if server == "auto":
        saved = rt.transport
        rt.transport = transport
        try:
            server = choose_server(rt, rt.members, m)[0]
        finally:
            rt.transport = saved
    elif server == "owner" and owner_problem(rt) is not None:
        server = "replicated"
    return server, transport, assign_owners(rt.members, m) if server == "owner" else []


def step_bytes(opt: Any, *, step: int | None = None, world_size: int | None = None,
               rank: int | None = None) -> dict[str, tuple[int, int]]:
    """``{label: (bytes, collectives)}`` that ``rank`` sends in optimizer step ``step`` on ``world_size`` ranks.

    Labels are the group names (all buckets of a group together), ``step_agreement`` and, at
    step 0, ``layout_check``.  Defaults: the optimizer's next step, its own world and rank.
    Every parameter is assumed to have a gradient.
    """
    m = opt.comm.world_size if world_size is None else world_size
    books = every_rank(opt, step=step, world_size=m)
    return books[opt.comm.rank if rank is None else rank] if books else {}


def every_rank(opt: Any, *, step: int | None = None, world_size: int | None = None) -> list[dict[str, tuple[int, int]]]:
    """:func:`step_bytes` of every rank, ``[rank]`` (the server roles and owners planned once for all)."""
    m = opt.comm.world_size if world_size is None else world_size
    step = opt.steps if step is None else step
    if m == 1:
        return [{}]
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    books: list[dict[str, list[int]]] = [{} for _ in range(m)]

    def add(label: str, per_rank: list[int] | int, calls: int) -> None:
        for r in range(m):
            row = books[r].setdefault(label, [0, 0])
            row[0] += per_rank if isinstance(per_rank, int) else per_rank[r]
            row[1] += calls

    agreement = bytes_per_rank("allreduce", payload_bytes=AGREEMENT_FLAGS + n_params, dense_entries=0, world_size=m)
    add("step_agreement", round(agreement), 1)
    if step == 0:  # the layout check: a [count, config hash] int64 head, then 10 int64 per parameter
        add("layout_check", (m - 1) * (2 + 10 * n_params) * 8, 2)
    roles = {id(rt): server_role(rt, m, world_size=opt.comm.world_size) for rt in opt._runtimes}
    for bucket in opt._buckets:
        group, rt = opt.param_groups[bucket.entry], opt._runtimes[bucket.entry]
        label, params = group["group"], [group["params"][i] for i in bucket.index]
        server, transport, owners = roles[id(rt)]
        warmup = rt.rule is not None and not rt.rule.uplink_active(step)
        owned = server == "owner" and not warmup
        if warmup:  # a float32 mean, owner transport
            add(label, *_mean_cost("owner", [(p.dtype, p.numel()) for p in params], m))
        elif owned or transport == "compressed":
            # to each owner, and back: the payloads of the parameters a rank does not own, and M-1 times the
            # messages of those it owns (the owner role's downlink, or 1-bit Adam's compressed mean)
            up = [rt.codec(p).wire_nbytes(p.shape, p.dtype) for p in params]
            if owned:
                down, who = [_down_nbytes(rt, p) for p in params], [owners[rt.position(p)] for p in params]
            else:
                down, who = up, owners_by_size(up, m)
            total_up = sum(up)
            per_rank = [total_up] * m
            for u, d, o in zip(up, down, who):
                per_rank[o] += (m - 1) * d - u
            add(label, per_rank, 2)
        elif rt.aggregator.kind == "majority_vote":
            packed = sum(rt.codec(p).wire_nbytes(p.shape, p.dtype) for p in params)
            add(label, *_vote_cost(transport, packed, sum(p.numel() for p in params), m,
                                   rt.aggregator.config.ties == "abstain"))
        elif rt.aggregator.kind in ("mean", "ef21", "error_feedback"):
            pieces = [(d, math.prod(s)) for p in params for s, d in rt.codec(p).wire_layout(p.shape, p.dtype)]
            add(label, *_mean_cost(transport, pieces, m))
        else:
            raise ValueError(f"no cost model for aggregator {rt.aggregator.kind!r}")
        if step == 0 and not owned:  # the one-off agreement check: an int64 checksum per parameter
            add(label, (m - 1) * 8 * len(params), 1)
    return [{k: (v[0], v[1]) for k, v in book.items()} for book in books]


def mean_bytes(opt: Any, *, world_size: int, step: int = 1) -> float:
    """Bytes per rank per step on ``world_size`` ranks, averaged over the ranks (steady state: ``step`` 1)."""
    per_rank = [sum(b for b, _ in book.values()) for book in every_rank(opt, step=step, world_size=world_size)]
    return sum(per_rank) / max(len(per_rank), 1)
