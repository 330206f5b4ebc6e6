r"""Majority vote: ``A = sign(sum_i sign(P_i))`` on packed 1-bit messages.

signSGD with majority vote (Bernstein et al. 2018, 2019) and the SignMuon
family (Smirnova, Kravatskiy, Kovalev) aggregate one-bit messages this way.

Transports (bytes each rank sends per coordinate, ``M`` ranks):

* ``owner``: all-to-all of packed 1-bit shards; the owner of a shard votes on
  packed words; all-gather of the packed result: ``2(M-1)/M`` bits, exactly
  32x less than a float32 all-reduce, at any ``M``;
* ``int8``: one int8 sum all-reduce of +-1 votes: ``2(M-1)/M * 8`` bits; an int8
  sum wraps past 127 ranks, so it is refused there;
* ``allgather``: every rank gathers every packed message and votes on all of
  it: ``(M-1)`` bits.

``auto`` takes the cheapest under the cost model (always ``owner``).  Ties of an
even vote are broken by random bits from the generator every rank shares, the
same bit for a coordinate under every transport, so transports agree bitwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

import torch
from torch import Tensor

from commlmo.errors import DistributedError
from commlmo.plugin import Aggregator, AggregatorCapabilities, Encoded, Payload, PluginConfig
from commlmo.transport import cheapest

from .vote import unpack_bits, vote_words

__all__ = ["MajorityVote", "MajorityVoteConfig"]


class MajorityVoteConfig(PluginConfig):
    """Config of ``majority_vote``."""

    kind: Literal["majority_vote"] = "majority_vote"
    transport: Literal["auto", "owner", "int8", "allgather"] = Field(
        "auto", description="How the votes travel: `owner` (all-to-all of packed shards, owner votes, all-gather), "
        "`int8` (sum all-reduce of +-1), `allgather`; `auto` takes the cheapest (owner).")


class MajorityVote(Aggregator):
    """sign(sum of the workers' signs), voted on packed bits; 32x fewer bytes than float32 all-reduce."""

    Config = MajorityVoteConfig
    capabilities = AggregatorCapabilities(requires=("sign_bits",), output_sign=True)

    def _transport(self, m: int, nbytes: int, entries: int) -> str:
        t = self.config.transport
        if t == "auto":
            t = cheapest(["owner", "int8", "allgather"], payload_bytes=nbytes, dense_entries=entries, world_size=m)
        if t == "int8" and m > 127:
            raise DistributedError(
                f"the int8 vote transport sums +-1 in int8, which wraps past 127 ranks; world size is {m}. "
                "Use transport: owner (or auto)."
            )
        return t

    def aggregate(self, vectors: Sequence[Tensor], states, *, uplink, comm, generators, label) -> list[Encoded]:
        payloads = [uplink.compress(v, generator=generators.local) for v in vectors]
        if any(len(p.wire) != 1 or p.wire[0].dtype != torch.uint8 for p in payloads):
            raise TypeError(f"majority vote needs one packed uint8 wire tensor per message; {uplink.kind!r} sent otherwise")
        sizes = [p.wire[0].numel() for p in payloads]
        packed = torch.cat([p.wire[0] for p in payloads])
        m = comm.world_size
        if m == 1:
            voted = packed
        else:
            n = packed.numel()
            # owner shards are whole 64-bit words; tie bits are drawn for that length under
            # every transport, so a coordinate gets the same tie bit whichever transport runs
            padded_len = -(-n // (8 * m)) * 8 * m
            buf = torch.cat([packed, packed.new_zeros(padded_len - n)])
            tie = (
                torch.randint(0, 256, (padded_len,), dtype=torch.uint8, generator=generators.shared, device=packed.device)
                if m % 2 == 0 else None
            )
            entries = sum(v.numel() for v in vectors)
            transport = self._transport(m, n, entries)
            name = f"{label}/majority_vote"
            if transport == "owner":
                rows = comm.all_to_all(buf, label=name)
                mine = tie.view(m, -1)[comm.rank] if tie is not None else None
                shard = vote_words(rows.view(torch.int64), tie_bits=_words(mine))
                voted = comm.all_gather(shard.view(torch.uint8), label=name).reshape(-1)[:n]
            elif transport == "allgather":  # whole 64-bit words suffice here
                words = -(-n // 8) * 8
                rows = comm.all_gather(buf[:words], label=name)
                tie_words = _words(tie[:words]) if tie is not None else None
                voted = vote_words(rows.view(torch.int64), tie_bits=tie_words).view(torch.uint8)[:n]
            else:
                voted = self._int8_vote(vectors, payloads, uplink, comm, tie, name)
        out, offset = [], 0
        for p, size in zip(payloads, sizes):
            out.append(Encoded(Payload((voted[offset:offset + size],), p.ctx), uplink))
            offset += size
        return out

    @staticmethod
    def _int8_vote(vectors, payloads, uplink, comm, tie: Tensor | None, label: str) -> Tensor:
        """The SignMuon paper's one integer all-reduce: sum +-1 votes in int8, then repack."""
        votes = [uplink.decompress(p).reshape(-1).to(torch.int8) for p in payloads]
        total = comm.all_reduce_sum_(torch.cat(votes), label=label)
        tie_bits = unpack_bits(tie) if tie is not None else None
        packed, offset, bit_offset = [], 0, 0
        for v, p in zip(vectors, payloads):
            s = total[offset:offset + v.numel()]
            negative = s < 0
            if tie_bits is not None:
                negative |= (s == 0) & tie_bits[bit_offset:bit_offset + v.numel()].bool()
            signs = torch.where(negative, -1.0, 1.0).view(v.shape).to(v.dtype)
            packed.append(uplink.compress(signs).wire[0])
            offset += v.numel()
            bit_offset += p.wire[0].numel() * 8
        return torch.cat(packed)


def _words(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous().view(torch.int64)
