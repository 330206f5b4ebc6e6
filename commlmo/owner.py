r"""The owner server role: each parameter is aggregated, given its server step and compressed once, by one rank.

With ``server: owner`` every parameter of a group has an owner rank, balanced by cost
(the LMO's FLOPs, ``m n min(m, n)`` for a matrix, plus its bytes), as the distributed
Muon of modded-nanogpt and the SignMuon NanoGPT code assign theirs::

    uplink    every rank sends its payload of parameter X to owner(X)     all-to-all-v
    server    owner(X) combines the M payloads in rank order (mean, vote, EF21's
              g <- g + mean c_i), runs the LMO once and compresses the downlink
              (EF21-P: moves the exact model it keeps and compresses X - W)
    downlink  every owner's compressed steps reach every rank             all-gather-v

so the LMO (Newton--Schulz) runs once per matrix instead of once per rank, state only
the server needs (EF21's ``g``, EF21-P's exact model) lives on the owner alone, and a
payload that does not sum on the wire (top-k, scaled sign) costs its sender
``(M-1)/M`` of its size on average instead of ``M - 1`` times it under an all-gather:
per rank, ``(M-1)/M * (uplink + downlink)`` payload bytes on average over the ranks.

The owner combines exactly what the replicated aggregate combines, in the same order,
and every random draw comes from the parameter's own stream (:mod:`commlmo.streams`),
so a step under ``owner`` is bitwise the step under ``replicated`` wherever the
arithmetic is the same (``tests/test_distributed.py``).

Supported: aggregators that declare ``capabilities.owner`` (``mean``, ``majority_vote``,
``ef21``, ``error_feedback``) with fixed-size uplinks, in groups with a server step
(``lmo_at: server``, or a stateful aggregator such as EF21 whose estimate the owner
keeps); any downlink, ``ef21p`` included; any learning-rate rule (Gluon's dual norm
travels with the step).  Element-wise rules run replicated.  ``server: auto`` takes the
owner role where it is supported, sends no more bytes per rank on average than the
replicated one, and its busiest rank's extra bytes are worth less than the LMO work it
saves (with fewer matrices than ranks they are not: :func:`choose_server`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .plugin import Payload
from .transport import as_bytes, bytes_per_rank, cat_bytes, cut

if TYPE_CHECKING:
    from .comm import Communicator
    from .pipeline import BucketStep, GroupRuntime

__all__ = ["owner_problem", "assign_owners", "owners_by_size", "choose_server", "send_to_owners",
           "share_from_owners", "uplink_steps", "finish_owned", "owner_bytes", "lmo_flops", "BYTES_PER_FLOP"]


def owner_problem(rt: GroupRuntime) -> str | None:
    """``None`` if the group can run the owner role, else why not."""
    cfg = rt.config
    if rt.rule is not None:
        return "element-wise rules run replicated"
    if not rt.aggregator.capabilities_of(rt.aggregator.config).owner:
        return f"aggregator {rt.aggregator.kind!r} does not implement the owner role (capabilities.owner)"
    if cfg.lmo_at != "server" and not rt.aggregator.capabilities_of(rt.aggregator.config).stateful:
        return (f"lmo_at is {cfg.lmo_at!r} and aggregator {rt.aggregator.kind!r} keeps no server state: "
                "there is no server step to own")
    if not rt.uplink.capabilities.fixed_size:
        return f"uplink {rt.uplink.kind!r} payloads have no fixed size, which the owner's all-to-all-v needs"
    return None


def _cost(p: Tensor) -> float:
    m, n = (p.shape[0], p[0].numel()) if p.ndim >= 2 else (1, p.numel())
    return float(m) * n * min(m, n) + 4.0 * p.numel()


def assign_owners(params: Sequence[Tensor], world_size: int, owners: Sequence[int] = ()) -> list[int]:
    """Owner rank of each parameter: largest first to the least-loaded rank (ties to the lower rank).

    ``owners`` are the ranks of the first parameters, assigned before (``add_param_group``):
    they keep them (and the state they hold); only the parameters after them are placed.
    """
    load = [0.0] * world_size
    for p, r in zip(params, owners):
        load[r] += _cost(p)
    out = list(owners) + [0] * (len(params) - len(owners))
    for i in sorted(range(len(owners), len(params)), key=lambda i: (-_cost(params[i]), i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += _cost(params[i])
    return out


def _down_nbytes(rt: GroupRuntime, p: Tensor) -> int:
    """Bytes of one parameter's downlink message: its compressed step (and Gluon's dual norm)."""
    return rt.codec(p, rt.downlink).wire_nbytes(p.shape, p.dtype) + (8 if rt.lr_rule.needs_dual_norm else 0)


def owner_bytes(rt: GroupRuntime, params: Sequence[Tensor], owners: Sequence[int], world_size: int) -> list[int]:
    """Bytes each rank sends in one step of ``params`` under the owner role (uplink and downlink)."""
    m = world_size
    up = [rt.codec(p).wire_nbytes(p.shape, p.dtype) for p in params]
    down = [_down_nbytes(rt, p) for p in params]
    sent = [0] * m
    for r in range(m):
        sent[r] += sum(u for u, o in zip(up, owners) if o != r)  # my payloads to their owners
        sent[r] += (m - 1) * sum(d for d, o in zip(down, owners) if o == r)  # my steps to every other rank
    return sent


#: What ``server: auto`` assumes one byte on the link costs, in LMO FLOPs' time: a 1 Gbit/s link against
#: about 100 GFLOP/s of float32 Newton--Schulz on a CPU; a 100 Gbit/s link against about 1 PFLOP/s of
#: bfloat16 on an accelerator.
BYTES_PER_FLOP = {"cpu": 125e6 / 100e9, "accelerator": 12.5e9 / 1e15}


def lmo_flops(rt: GroupRuntime, p: Tensor) -> float:
    """FLOPs of one server LMO of ``p``: Newton--Schulz's ``steps * (4 a^2 b + 2 a^3)`` for an ``a x b``
    matrix (``a <= b``) under the spectral LMO, a few per entry for the element-wise and norm LMOs."""
    lmo = rt.lmo
    if lmo is not None and lmo.kind == "spectral" and p.ndim >= 2:
        a, b = sorted((p.shape[0], p[0].numel()))
        return float(getattr(lmo.config, "steps", 5)) * (4.0 * a * a * b + 2.0 * a ** 3)
    return 4.0 * p.numel()


def choose_server(rt: GroupRuntime, params: Sequence[Tensor], world_size: int) -> tuple[str, str]:
    """``(server role, why)`` for ``server: auto``, from the cost model's bytes and the LMO's FLOPs.

    Owner where it is supported, sends no more bytes per rank on average than the
    replicated role, and its busiest rank's extra bytes (an owner sends its steps to
    every other rank, so with fewer parameters than ranks one rank can carry many
    times the average) cost less link time than the LMO work it saves that rank,
    at :data:`BYTES_PER_FLOP`.  Replicated transports are balanced: every rank sends
    the same bytes.
    """
    why = owner_problem(rt)
    if why is not None or world_size == 1:
        return "replicated", why or "a world of one"
    m = world_size
    up = sum(rt.codec(p).wire_nbytes(p.shape, p.dtype) for p in params)
    replicated = bytes_per_rank(rt.transport, payload_bytes=up, world_size=m,  # type: ignore[arg-type]
                                dense_entries=sum(p.numel() for p in params))
    owners = assign_owners(params, m)
    sent = owner_bytes(rt, params, owners, m)
    mean = sum(sent) / m
    if mean > replicated:
        return "replicated", f"owner would send {mean:.0f} bytes per rank on average, replicated {replicated:.0f}"
    flops = [lmo_flops(rt, p) for p in params]
    busiest = max(range(m), key=lambda r: (sent[r], r))
    saved = sum(flops) - sum(f for f, o in zip(flops, owners) if o == busiest)
    device = params[0].device.type if params else "cpu"
    allowance = saved * BYTES_PER_FLOP["cpu" if device == "cpu" else "accelerator"]
    if sent[busiest] - replicated > allowance:
        return "replicated", (f"owner's busiest rank would send {sent[busiest]:.0f} bytes, replicated "
                              f"{replicated:.0f}: more than the {saved:.3g} LMO FLOPs it saves that rank are worth")
    return "owner", (f"{mean:.0f} <= {replicated:.0f} bytes per rank on average (busiest rank {sent[busiest]:.0f}), "
                     "and the server step runs once per parameter")


# --------------------------------------------------------------------------- the step


def owners_by_size(sizes: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each of ``sizes`` bytes of payload: largest first to the least-loaded rank."""
    load = [0] * world_size
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[i], load[r] = r, load[r] + sizes[i]
    return owners


def send_to_owners(payloads: Sequence[Payload], owners: Sequence[int], comm: Communicator, *, label: str):
    """Each payload to its owner (all-to-all-v; steps, see :mod:`commlmo.transport`).

    Returns ``{j: [payload of rank 0, ..., rank M-1]}`` for each position ``j`` this rank owns.
    """
    m, me = comm.world_size, comm.rank
    sizes = [p.nbytes for p in payloads]
    send = [sum(sz for sz, o in zip(sizes, owners) if o == r) for r in range(m)]
    mine = [j for j, o in enumerate(owners) if o == me]
    recv = [sum(sizes[j] for j in mine)] * m
    pieces = [as_bytes(w) for r in range(m) for p, o in zip(payloads, owners) if o == r for w in p.wire]
    flat = cat_bytes(pieces, payloads[0].wire[0].device if payloads else "cpu")
    pending = comm.all_to_all_v(flat, send, recv, label=label, async_op=True)
    yield
    rows = pending.wait()
    own = [payloads[j] for j in mine]
    received = [cut(rows[r], own) if r != me else own for r in range(m)]
    return {j: [received[r][k] for r in range(m)] for k, j in enumerate(mine)}


def share_from_owners(outgoing: dict[int, Payload], like: Sequence[Payload], owners: Sequence[int],
                      comm: Communicator, *, label: str) -> list[Payload]:
    """Every owner's payloads to every rank (an all-gather-v): the payload of every position, shaped like
    ``like`` (this rank's own for the positions it owns)."""
    m, me = comm.world_size, comm.rank
    per_owner = [sum(like[j].nbytes for j, o in enumerate(owners) if o == r) for r in range(m)]
    pieces = [as_bytes(w) for j in sorted(outgoing) for w in outgoing[j].wire]
    flat = cat_bytes(pieces, like[0].wire[0].device if like else "cpu")
    received = comm.all_to_all_v(flat.repeat(m), [per_owner[me]] * m, per_owner, label=label)
    cursor = [0] * m
    out = []
    for j, o in enumerate(owners):
        if o == me:
            out.append(outgoing[j])
            continue
        wires, cursor[o] = _cut(received[o], cursor[o], like[j].wire)
        out.append(Payload(wires, like[j].ctx))
    return out


def uplink_steps(rt: GroupRuntime, b: BucketStep, comm: Communicator):
    """Stage 3's exchange under the owner role: each payload to its parameter's owner (all-to-all-v)."""
    owners = [rt.owners[i] for i in b.positions]
    return (yield from send_to_owners(b.payloads, owners, comm, label=f"{rt.config.name}/owner/uplink"))


def finish_owned(rt: GroupRuntime, b: BucketStep, rows: dict[int, list[Payload]], comm: Communicator) -> None:
    """Stages 3-5 under the owner role, once :func:`uplink_steps` delivered this rank's payloads."""
    m = comm.world_size
    agg, lr, wd = rt.aggregator, b.group["lr"], b.group["weight_decay"]
    owners = [rt.owners[i] for i in b.positions]
    mine = sorted(rows)

    # 3. aggregate: the owner combines its parameters' payloads; every rank commits its own worker state
    ties = rt.generators.at(b.step, "aggregate", b.positions)
    reduced = {j: agg.reduce_owned(rows[j], b.codecs[j], generator=ties.param(j), world_size=m) for j in mine}
    for j, (p, msg, s, codec) in enumerate(zip(b.payloads, b.messages, b.states, b.codecs)):
        agg.commit_local(p, msg, s, codec)
    aggregates = [agg.commit_owned(reduced[j], b.states[j], b.codecs[j]) for j in mine]

    # 4. server: the LMO once per parameter, on its owner
    directions, duals = rt.server_step(b, aggregates, only=mine) if mine else ([], [])
    for s, upd in zip(b.states, b.pending):  # the collectives have succeeded: commit worker and server state
        s.update(upd)

    # 5. downlink: the owner compresses (EF21-P: moves its exact model first); everyone applies
    down = rt.generators.at(b.step, "downlink", b.positions)
    dual_norm = rt.lr_rule.needs_dual_norm  # Gluon's radius reads it: it travels with the step
    outgoing: dict[int, Payload] = {}
    for j, d, dual in zip(mine, directions, duals):
        p = b.params[j]
        payload = rt.codec(p, rt.downlink).downlink_payload(
            p, b.states[j], d, lr=lr, wd=wd, scale=rt.lr_scale(p, b.names[j], dual), generator=down.param(j))
        extra = (torch.tensor([dual], dtype=torch.float64, device=p.device),) if dual_norm else ()
        outgoing[j] = Payload(payload.wire + extra, payload.ctx)
    like = []
    for p in b.params:
        template = _layout(rt.codec(p, rt.downlink), p)
        extra = (torch.empty(1, dtype=torch.float64, device=p.device),) if dual_norm else ()
        like.append(Payload(template.wire + extra, template.ctx))
    received = share_from_owners(outgoing, like, owners, comm, label=f"{rt.config.name}/owner/downlink")
    duals = torch.cat([p.wire[-1] for p in received]).tolist() if dual_norm else [None] * len(received)
    for j, (p, s, name, o, payload, dual) in enumerate(zip(b.params, b.states, b.names, owners, received, duals)):
        wires = payload.wire[:-1] if dual_norm else payload.wire
        rt.codec(p, rt.downlink).apply_downlink_payload_(p, s, Payload(wires, payload.ctx), lr=lr, wd=wd,
                                                         scale=rt.lr_scale(p, name, dual), owner=o == comm.rank)


_LAYOUTS: dict[tuple, Payload] = {}


def _layout(codec, p: Tensor) -> Payload:
    """A payload shaped like ``codec``'s downlink message for a tensor like ``p`` (wire shapes, dtypes and
    ``ctx`` depend on the shape and dtype only for fixed-size compressors), computed once."""
    key = (type(codec), codec.config, tuple(p.shape), p.dtype, str(p.device))
    if key not in _LAYOUTS:
        template = codec.compress(torch.zeros_like(p), generator=torch.Generator(device=p.device).manual_seed(0))
        _LAYOUTS[key] = Payload(tuple(torch.empty_like(w) for w in template.wire), template.ctx)
    return _LAYOUTS[key]


def _cut(row: Tensor, offset: int, like: Sequence[Tensor]) -> tuple[tuple[Tensor, ...], int]:
    out = []
    for w in like:
        nb = w.numel() * w.element_size()
        out.append(row[offset:offset + nb].clone().view(w.dtype).view(w.shape))
        offset += nb
    return tuple(out), offset

