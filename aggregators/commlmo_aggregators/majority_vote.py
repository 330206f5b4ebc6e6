r"""Majority vote: ``A = sign(sum_i sign(P_i))`` on packed 1-bit messages.

signSGD with majority vote (Bernstein et al. 2018, 2019), Distributed Lion
(Liu et al. 2024) and the SignMuon family (Smirnova, Kravatskiy, Kovalev)
aggregate one-bit messages this way.

Transports (bytes each rank sends per coordinate, ``M`` ranks):

* ``owner``: all-to-all of packed 1-bit shards; the owner of a shard votes on
  packed words; all-gather of the packed result: ``2(M-1)/M`` bits, exactly
  32x less than a float32 all-reduce, at any ``M``;
* ``int8``: one int8 sum all-reduce of +-1 votes: ``2(M-1)/M * 8`` bits; an int8
  sum wraps past 127 ranks, so it is refused there;
* ``allgather``: every rank gathers every packed message and votes on all of
  it: ``(M-1)`` bits.

``auto`` takes the cheapest under the cost model (always ``owner``); the choice is
made once, when the optimizer is built.  Ties of an even vote follow ``ties``:
``random`` (the SignMuon code's default) takes a bit from the generator every rank
shares -- the same bit for a coordinate under every transport, so transports agree
bitwise; ``abstain`` makes a tied coordinate 0 (no step), which costs one more bit
per coordinate on the way back (the tie mask travels with the result).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

import torch
from torch import Tensor

from commlmo.errors import DistributedError
from commlmo.plugin import Aggregator, AggregatorCapabilities, Compressor, Encoded, Payload, PluginConfig
from commlmo.transport import cheapest

from .vote import unpack_bits, vote_words

__all__ = ["MajorityVote", "MajorityVoteConfig"]


class MajorityVoteConfig(PluginConfig):
    """Config of ``majority_vote``."""

    kind: Literal["majority_vote"] = "majority_vote"
    transport: Literal["auto", "owner", "int8", "allgather"] = Field(
        "auto", description="How the votes travel: `owner` (all-to-all of packed shards, owner votes, all-gather), "
        "`int8` (sum all-reduce of +-1), `allgather`; `auto` takes the cheapest (owner).")
    ties: Literal["random", "abstain"] = Field(
        "random", description="A tied vote (even worker count): `random` shared bit, or `abstain` (0, no step).")


class MajorityVote(Aggregator):
    """sign(sum of the workers' signs), voted on packed bits; 32x fewer bytes than float32 all-reduce."""

    Config = MajorityVoteConfig
    capabilities = AggregatorCapabilities(requires=("sign_bits",), output_sign=True, robust=("amplify",), owner=True)

    def plan(self, uplink: Compressor, *, world_size: int, payload_bytes: int, dense_entries: int) -> str:
        m, t = world_size, self.config.transport
        if t == "auto":
            t = cheapest(["owner", "int8", "allgather"], payload_bytes=payload_bytes, dense_entries=dense_entries,
                         world_size=m)
        if t == "int8" and m > 127:
            raise DistributedError(
                f"the int8 vote transport sums +-1 in int8, which wraps past 127 ranks; world size is {m}. "
                "Use transport: owner (or auto)."
            )
        if t == "int8" and self.config.ties == "abstain":
            raise DistributedError("majority_vote: ties='abstain' is implemented by the owner and allgather "
                                   "transports; use one of those, or ties: random")
        return t

    def exchange(self, payloads: Sequence[Payload], *, codecs, comm, generators, transport, label, states=None):
        uplink = codecs[0]
        if any(len(p.wire) != 1 or p.wire[0].dtype != torch.uint8 for p in payloads):
            raise TypeError(f"majority vote needs one packed uint8 wire tensor per message; {uplink.kind!r} sent otherwise")
        return self._steps(payloads, uplink, comm, generators, transport, f"{label}/majority_vote")

    def _steps(self, payloads, uplink, comm, generators, transport, name):
        sizes = [p.wire[0].numel() for p in payloads]
        packed = torch.cat([p.wire[0] for p in payloads])
        m = comm.world_size
        ties: Tensor | None = None
        abstain = self.config.ties == "abstain" and m % 2 == 0
        if m == 1:
            voted = packed
        else:
            n = packed.numel()
            # owner shards are whole 64-bit words; every parameter's tie bits come from its own stream, so a
            # coordinate gets the same tie bit under every transport, bucketing and server role
            padded_len = -(-n // (8 * m)) * 8 * m
            buf = torch.cat([packed, packed.new_zeros(padded_len - n)])
            tie = None
            if m % 2 == 0 and not abstain:
                tie = torch.cat([tie_bytes(size, generators.param(j), packed.device) for j, size in enumerate(sizes)]
                                + [packed.new_zeros(padded_len - n)])
            found: list[Tensor] | None = [] if abstain else None
            if transport == "owner":
                pending = comm.all_to_all(buf, label=name, async_op=True)
                yield
                rows = pending.wait()
                mine = tie.view(m, -1)[comm.rank] if tie is not None else None
                shard = vote_words(rows.view(torch.int64), tie_bits=_words(mine), ties_out=found)
                if found:  # the tie mask travels back with the result: 2 bits per coordinate
                    shard = torch.cat([shard, found[0]])
                gathered = comm.all_gather(shard.view(torch.uint8), label=name)
                if found:
                    half = gathered.shape[1] // 2
                    ties = gathered[:, half:].reshape(-1)[:n]
                    gathered = gathered[:, :half]
                voted = gathered.reshape(-1)[:n]
            elif transport == "allgather":  # whole 64-bit words suffice here
                words = -(-n // 8) * 8
                pending = comm.all_gather(buf[:words], label=name, async_op=True)
                yield
                rows = pending.wait()
                tie_words = _words(tie[:words]) if tie is not None else None
                voted = vote_words(rows.view(torch.int64), tie_bits=tie_words, ties_out=found).view(torch.uint8)[:n]
                if found:
                    ties = found[0].view(torch.uint8)[:n]
            else:
                dense = [uplink.decompress(p) for p in payloads]
                pending = comm.all_reduce_sum_(torch.cat([d.reshape(-1).to(torch.int8) for d in dense]), label=name,
                                               async_op=True)
                yield
                voted = self._int8_repack(pending.wait(), dense, payloads, uplink, tie)
        out, offset = [], 0
        for p, size in zip(payloads, sizes):
            out.append(_encoded(voted[offset:offset + size], None if ties is None else ties[offset:offset + size],
                                p, uplink))
            offset += size
        return out

    def reduce_owned(self, rows: Sequence[Payload], codec, *, generator, world_size) -> Encoded:
        """The vote of one parameter's ``M`` packed messages, with the tie bits the replicated vote draws."""
        m = len(rows)
        size = rows[0].wire[0].numel()
        words = -(-size // 8) * 8
        stack = torch.zeros((m, words), dtype=torch.uint8, device=rows[0].wire[0].device)
        for r, p in enumerate(rows):
            stack[r, :size] = p.wire[0]
        abstain = self.config.ties == "abstain" and m % 2 == 0
        tie_words, found = None, ([] if abstain else None)
        if m % 2 == 0 and not abstain:
            tie = torch.zeros(words, dtype=torch.uint8, device=stack.device)
            tie[:size] = tie_bytes(size, generator, stack.device)
            tie_words = tie.view(torch.int64)
        voted = vote_words(stack.view(torch.int64), tie_bits=tie_words, ties_out=found).view(torch.uint8)[:size]
        return _encoded(voted, found[0].view(torch.uint8)[:size] if found else None, rows[0], codec)

    @staticmethod
    def reference(messages_per_worker: Sequence[Sequence[Tensor]], config: MajorityVoteConfig) -> list[Tensor]:
        """The definition on one process (for the contract kit): ``sign(sum_i sign(m_i))`` of the decoded
        messages; a tie is 0 under ``ties: abstain`` and NaN (either sign is right) under ``ties: random``."""
        out = []
        for per in zip(*messages_per_worker):
            total = torch.stack([m.double().sign() for m in per]).sum(0)
            voted = total.sign()
            if config.ties == "random":
                voted = voted.masked_fill(total == 0, float("nan"))
            out.append(voted.to(per[0].dtype))
        return out

    @staticmethod
    def _int8_repack(total: Tensor, dense: list[Tensor], payloads, uplink, tie: Tensor | None) -> Tensor:
        """The SignMuon paper's one integer all-reduce: ``total`` sums the +-1 votes in int8; repack its signs."""
        tie_bits = unpack_bits(tie) if tie is not None else None
        packed, offset, bit_offset = [], 0, 0
        for d, p in zip(dense, payloads):
            s = total[offset:offset + d.numel()]
            negative = s < 0
            if tie_bits is not None:
                negative |= (s == 0) & tie_bits[bit_offset:bit_offset + d.numel()].bool()
            signs = torch.where(negative, -1.0, 1.0).view(d.shape).to(d.dtype)
            packed.append(uplink.compress(signs).wire[0])
            offset += d.numel()
            bit_offset += p.wire[0].numel() * 8
        return torch.cat(packed)


def tie_bytes(size: int, generator: torch.Generator, device) -> Tensor:
    """``size`` random bytes of tie bits for one parameter's packed vote (its own shared stream)."""
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator, device=device)


def _encoded(voted: Tensor, ties: Tensor | None, p: Payload, uplink) -> Encoded:
    if ties is None:
        return Encoded(Payload((voted,), p.ctx), uplink)
    return Encoded(Payload((voted, ties), p.ctx), _Abstaining(uplink))


class _Abstaining:
    """Decodes a vote whose tied coordinates abstain: sign bits in ``wire[0]``, tie mask in ``wire[1]``."""

    def __init__(self, codec: Compressor):
        self.codec, self.kind = codec, codec.kind

    def decompress(self, payload: Payload) -> Tensor:
        signs = self.codec.decompress(Payload(payload.wire[:1], payload.ctx))
        tied = unpack_bits(payload.wire[1]).reshape(-1)[: signs.numel()].view(signs.shape).bool()
        return signs.masked_fill_(tied, 0)

    def decompress_add_(self, target: Tensor, payload: Payload, *, alpha: float = 1.0) -> Tensor:
        return target.add_(self.decompress(payload).to(target.dtype), alpha=alpha)


def _words(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous().view(torch.int64)
