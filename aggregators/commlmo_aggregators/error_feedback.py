r"""Error feedback around a compressed mean (Seide et al. 2014; Karimireddy et al. 2019).

Worker ``i`` keeps the part of its messages that compression dropped, ``e_i``, and
adds it back before compressing the next one::

    c_i = C(v_i + e_i);   e_i <- v_i + e_i - c_i;   A = mean_i c_i

This is the worker side of 1-bit Adam's error-compensated compressed all-reduce
(Tang et al. 2021, arXiv 2102.02888; DeepSpeed's ``compressed_allreduce``): with
a scaled-sign uplink the momentum travels as one bit per entry plus one scale
per block, and nothing the compressor drops is lost, only delayed.  Unlike
EF21 the aggregate is a mean of this step's messages, not a running estimate.
``e_i`` is optimizer state (``ef_error``).

``server_compression: true`` adds the server side of that all-reduce: each
parameter's owner rank compresses the mean once more, with an error memory of
its own, before every rank receives it::

    s = mean_i c_i + e_s;   A = C(s);   e_s <- s - A          (on the owner)

so the payloads travel to their owners (all-to-all-v) and the compressed means
back (all-gather-v): ``2(M-1)/M`` payloads per rank on average at any ``M``,
where the plain mean of payloads that do not sum is all-gathered, ``(M-1)``
payloads per rank.  ``e_s`` (``ef_server_error``) lives on the owner.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from commlmo.owner import owners_by_size, send_to_owners, share_from_owners
from commlmo.plugin import AggregatorCapabilities, Compressor, Payload, PluginConfig
from commlmo.transport import decoded_mean

from .mean import MeanTransported, average

__all__ = ["ErrorFeedback", "ErrorFeedbackConfig"]


class ErrorFeedbackConfig(PluginConfig):
    """Config of ``error_feedback``."""

    kind: Literal["error_feedback"] = "error_feedback"
    transport: Literal["auto", "owner", "allreduce", "allgather"] = Field(
        "auto", description="How the compressed messages travel, as for `mean` (without server_compression).")
    server_compression: bool = Field(
        False, strict=True, description="1-bit Adam's two-stage all-reduce: each parameter's owner compresses the "
        "mean again with a server-side error memory, and the compressed means are all-gathered: 2(M-1)/M payloads "
        "per rank at any M.")


class ErrorFeedback(MeanTransported):
    """Error-compensated mean: send C(v_i + e_i), keep e_i = what compression dropped (1-bit Adam's uplink)."""

    Config = ErrorFeedbackConfig
    capabilities = AggregatorCapabilities(stateful=True, owner=True)
    label_suffix = "error_feedback"

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        return {"ef_error": torch.zeros_like(param)}

    def plan(self, uplink: Compressor, *, world_size: int, payload_bytes: int, dense_entries: int) -> str:
        if self.config.server_compression:
            return "compressed"
        return super().plan(uplink, world_size=world_size, payload_bytes=payload_bytes, dense_entries=dense_entries)

    def exchange(self, payloads, *, codecs, comm, generators, transport, label, states=None):
        if transport != "compressed":
            return super().exchange(payloads, codecs=codecs, comm=comm, generators=generators, transport=transport,
                                    label=label)
        return self._compressed(payloads, codecs, comm, generators, states, f"{label}/error_feedback")

    def _compressed(self, payloads, codecs, comm, generators, states, label):
        """The two-stage all-reduce; returns ``(aggregates, {position: new server error})`` (nothing committed)."""
        owners = owners_by_size([p.nbytes for p in payloads], comm.world_size)
        rows = yield from send_to_owners(payloads, owners, comm, label=label)
        outgoing, errors = {}, {}
        for j, mine in rows.items():
            codec = codecs[j]
            s = decoded_mean(mine, codec)
            if "ef_server_error" in states[j]:
                s += states[j]["ef_server_error"]
            outgoing[j] = codec.compress(s, generator=generators.param(j))
            errors[j] = codec.decompress_add_(s, outgoing[j], alpha=-1.0)  # s - C(s), in place
        received = share_from_owners(outgoing, payloads, owners, comm, label=label)
        return [c.decompress(p) for c, p in zip(codecs, received)], errors

    def message(self, v: Tensor, state: dict[str, Tensor]) -> Tensor:
        return v + state["ef_error"]

    def combine(self, exchanged, payloads, messages, states, *, codecs) -> list[Tensor]:
        for s, p, codec, msg in zip(states, payloads, codecs, messages):  # after the collectives succeeded
            self.commit_local(p, msg, s, codec)
        if self.config.server_compression:
            exchanged, errors = exchanged
            for j, err in errors.items():
                states[j]["ef_server_error"] = err
        return list(exchanged)

    def commit_local(self, payload: Payload, message: Tensor, state: dict[str, Tensor], codec: Compressor) -> None:
        """``e_i <- v_i + e_i - c_i``: what compression dropped from this worker's message."""
        err = state["ef_error"]
        err.copy_(message)
        codec.decompress_add_(err, payload, alpha=-1.0)

    @staticmethod
    def reference(messages_per_worker, config) -> list[Tensor]:
        """The first step on one process (for the contract kit): ``e_i = 0``, so ``A = mean_i C(v_i)``."""
        return average(messages_per_worker)
