r"""The owner server role: each matrix is aggregated, orthogonalised and compressed once, by one rank.

With ``server: owner`` a server-side group gives every parameter an owner rank, balanced
by cost (the LMO's FLOPs, ``m n min(m, n)`` for a matrix, plus its bytes), as the
distributed Muon of modded-nanogpt and the SignMuon NanoGPT code do::

    uplink    every rank sends its payload of parameter X to owner(X)      all-to-all
    server    owner(X) sums (mean) or votes (majority_vote) the M payloads,
              runs the LMO once and compresses the downlink
    downlink  every owner's compressed steps reach every rank              all-gather

so Newton--Schulz runs once per matrix instead of once per rank, and per-rank bytes are
``(M-1)/M`` of the uplink payload plus ``(M-1)/M`` of the downlink payload.  The sums and
votes are taken in rank order over the same bits as the replicated path (tie bits of an
even vote included), so the step is bitwise the replicated one wherever the arithmetic is
the same; the downlink's own randomness (the sign of an exact zero) comes from a stream
derived from the seed, the step and the parameter, the same on every rank.

Supported: ``lmo_at: server`` with ``mean`` over a summable uplink (owner transport) or
``majority_vote`` (owner transport), any downlink compressor but ``ef21p``, and
learning-rate rules that read the shape only.  ``server: auto`` picks the owner role
where it is supported and sends no more bytes than the replicated one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .plugin import Encoded, Payload
from .transport import as_bytes, bytes_per_rank

if TYPE_CHECKING:
    from .comm import Communicator
    from .pipeline import GroupRuntime

__all__ = ["owner_problem", "assign_owners", "owner_step", "choose_server"]


def owner_problem(rt: GroupRuntime) -> str | None:
    """``None`` if the group can run the owner role, else why not."""
    cfg = rt.config
    if cfg.lmo_at != "server" or rt.lmo is None:
        return f"lmo_at is {cfg.lmo_at!r}: only a server-side LMO has a server step to own"
    if rt.rule is not None:
        return "element-wise rules run replicated"
    if rt.aggregator.kind not in ("mean", "majority_vote"):
        return f"aggregator {rt.aggregator.kind!r} keeps per-rank state the owner role does not split yet"
    if rt.transport != "owner":
        return f"the {rt.aggregator.kind} transport is {rt.transport!r}; the owner role needs transport: owner"
    if rt.downlink.capabilities.downlink_only:
        return f"downlink {rt.downlink.kind!r} keeps the exact model on every rank"
    if rt.lr_rule.needs_dual_norm:
        return f"lr_rule {rt.lr_rule.kind!r} reads the dual norm on every rank"
    return None


def _cost(p: Tensor) -> float:
    m, n = (p.shape[0], p[0].numel()) if p.ndim >= 2 else (1, p.numel())
    return float(m) * n * min(m, n) + 4.0 * p.numel()


def assign_owners(params: Sequence[Tensor], world_size: int) -> list[int]:
    """Owner rank of each parameter: largest first to the least-loaded rank (ties to the lower rank)."""
    load = [0.0] * world_size
    owners = [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: (-_cost(params[i]), i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += _cost(params[i])
    return owners


def choose_server(rt: GroupRuntime, params: Sequence[Tensor], world_size: int) -> tuple[str, str]:
    """``(server role, why)`` for ``server: auto``: owner where supported and no dearer in bytes."""
    why = owner_problem(rt)
    if why is not None or world_size == 1:
        return "replicated", why or "a world of one"
    up = sum(rt.codec(p).wire_nbytes(p.shape, p.dtype) for p in params)
    down = sum(rt.codec(p, rt.downlink).wire_nbytes(p.shape, p.dtype) for p in params)
    m = world_size
    replicated = bytes_per_rank("owner", payload_bytes=up, dense_entries=0, world_size=m)
    owner = (m - 1) / m * (up + down)
    if owner <= replicated:
        return "owner", f"{owner:.0f} <= {replicated:.0f} bytes per rank, and the LMO runs once per matrix"
    return "replicated", f"owner would send {owner:.0f} bytes per rank, replicated {replicated:.0f}"


def _exchange(chunks: list[list[Tensor]], comm: Communicator, label: str) -> Tensor:
    """All-to-all of per-destination byte chunks (padded to one length): ``[M, L]`` rows received."""
    m = comm.world_size
    flats = [torch.cat(c) if c else torch.zeros(0, dtype=torch.uint8) for c in chunks]
    length = max(max(f.numel() for f in flats), 1)
    buf = torch.zeros(m * length, dtype=torch.uint8)
    for j, f in enumerate(flats):
        buf[j * length:j * length + f.numel()] = f
    return comm.all_to_all(buf, label=label)


_LAYOUTS: dict[tuple, tuple[tuple[Tensor, ...], dict]] = {}


def _layout(codec, p: Tensor) -> tuple[tuple[Tensor, ...], dict]:
    """The wire tensors' shapes and dtypes, and the ``ctx``, of ``codec``'s payload for a tensor like ``p``
    (fixed-size compressors: they depend on the shape and dtype only), computed once."""
    key = (type(codec), codec.config, tuple(p.shape), p.dtype, str(p.device))
    if key not in _LAYOUTS:
        template = codec.compress(torch.zeros_like(p), generator=torch.Generator(device=p.device).manual_seed(0))
        _LAYOUTS[key] = (tuple(torch.empty_like(w) for w in template.wire), template.ctx)
    return _LAYOUTS[key]


def _cut(row: Tensor, offset: int, like: Sequence[Tensor]) -> tuple[tuple[Tensor, ...], int]:
    out = []
    for w in like:
        nb = w.numel() * w.element_size()
        out.append(row[offset:offset + nb].clone().view(w.dtype).view(w.shape))
        offset += nb
    return tuple(out), offset


def owner_step(
    rt: GroupRuntime, params: Sequence[Tensor], states: Sequence[dict], names: Sequence[str],
    payloads: Sequence[Payload], codecs: Sequence, comm: Communicator, *, lr: float, wd: float, step: int,
) -> None:
    """One step of the group under the owner role (see the module docstring).

    ``payloads`` are this rank's compressed messages (the pipeline's uplink stage).
    """
    from commlmo_aggregators.vote import vote_words

    from .pipeline import block_directions

    m, me, label = comm.world_size, comm.rank, rt.config.name
    owners = assign_owners(params, m)
    vote = rt.aggregator.kind == "majority_vote"

    # the shared tie bits, drawn exactly as the replicated vote draws them (same stream, same bytes)
    tie = None
    if vote and m % 2 == 0:
        n = sum(p.wire[0].numel() for p in payloads)
        padded = -(-n // (8 * m)) * 8 * m
        tie = torch.randint(0, 256, (padded,), dtype=torch.uint8, generator=rt.generators.shared,
                            device=payloads[0].wire[0].device)

    # uplink: each payload to its owner
    chunks: list[list[Tensor]] = [[] for _ in range(m)]
    for p, r in zip(payloads, owners):
        chunks[r].extend(as_bytes(w) for w in p.wire)
    rows = _exchange(chunks, comm, f"{label}/owner/uplink").view(m, -1)

    # server: sum or vote in rank order, the LMO once, the downlink compressed
    mine = [i for i, r in enumerate(owners) if r == me]
    offset, aggregates, byte_offset = 0, {}, 0
    offsets = []  # each payload's byte offset in the group's packed layout (the vote's tie bits)
    for p in payloads:
        offsets.append(byte_offset)
        byte_offset += p.wire[0].numel() if vote else 0
    for i in mine:
        p, codec = payloads[i], codecs[i]
        wires = [_cut(rows[r], offset, p.wire)[0] for r in range(m)]
        offset += sum(w.numel() * w.element_size() for w in p.wire)
        if vote:
            size = p.wire[0].numel()
            words = -(-size // 8) * 8
            stack = torch.zeros((m, words), dtype=torch.uint8)
            for r in range(m):
                stack[r, :size] = wires[r][0]
            tie_words = None
            if tie is not None:
                tie_words = torch.zeros(words, dtype=torch.uint8)
                tie_words[:size] = tie[offsets[i]:offsets[i] + size]
                tie_words = tie_words.view(torch.int64)
            voted = vote_words(stack.view(torch.int64).view(m, -1), tie_bits=tie_words).view(torch.uint8)[:size]
            aggregates[i] = codec.decompress(Payload((voted,), p.ctx))
        else:
            summed = []
            for k in range(len(p.wire)):
                acc = wires[0][k].clone()
                for r in range(1, m):
                    acc += wires[r][k]
                summed.append(acc)
            aggregates[i] = codec.decompress(Payload(tuple(summed), p.ctx)).div_(m)
    owned = [params[i] for i in mine]
    shapes = [rt.block_shape(p) for p in owned]
    views = [rt.view_of(p).kind for p in owned]
    directions = block_directions(rt.lmo, [aggregates[i] for i in mine], shapes, views=views,  # type: ignore[arg-type]
                                  generator=rt.generators.shared) if mine else []
    down_chunks: list[Tensor] = []
    down_payloads: dict[int, Payload] = {}
    direction_of = dict(zip(mine, directions))
    shared = rt.generators.shared
    for i, p in enumerate(params):
        down = rt.codec(p, rt.downlink)
        # the replicated path compresses every step in parameter order from the shared stream; here
        # the owner compresses from a copy of that stream's state and every rank advances it alike
        state = shared.get_state()
        if not down.advance_generator(shared, p.shape, p.dtype):
            shared.set_state(state)  # data-dependent draws: a stream derived per step and parameter
            state = torch.Generator(device=p.device).manual_seed(
                ((rt.generators.seed_base * 1_000_003 + step) * 100_003 + i) % 2**63).get_state()
        if i in direction_of:
            gen = torch.Generator(device=p.device)
            gen.set_state(state)
            payload = down.compress(direction_of[i], generator=gen)
            down_payloads[i] = payload
            down_chunks.extend(as_bytes(w) for w in payload.wire)

    # downlink: every owner's compressed steps to every rank
    lengths = [0] * m  # each owner's downlink bytes: the all-gather's row length is the largest
    for p, o in zip(params, owners):
        lengths[o] += rt.codec(p, rt.downlink).wire_nbytes(p.shape, p.dtype)
    length = max(max(lengths), 1)
    flat = torch.zeros(length, dtype=torch.uint8)
    if down_chunks:
        mine_flat = torch.cat(down_chunks)
        flat[:mine_flat.numel()] = mine_flat
    gathered = comm.all_gather(flat, label=f"{label}/owner/downlink")
    cursor = [0] * m
    for i, (p, s, name, o) in enumerate(zip(params, states, names, owners)):
        down = rt.codec(p, rt.downlink)
        if o == me:
            payload = down_payloads[i]
        else:
            like, ctx = _layout(down, p)
            wires, cursor[o] = _cut(gathered[o], cursor[o], like)
            payload = Payload(wires, ctx)
        if wd:
            p.mul_(1 - lr * wd)
        Encoded(payload, down).add_to_(p, alpha=-lr * rt.lr_scale(p, name))
