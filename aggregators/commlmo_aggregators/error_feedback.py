r"""Error feedback around a compressed mean (Seide et al. 2014; Karimireddy et al. 2019).

Worker ``i`` keeps the part of its messages that compression dropped, ``e_i``, and
adds it back before compressing the next one::

    c_i = C(v_i + e_i);   e_i <- v_i + e_i - c_i;   A = mean_i c_i

This is the worker side of 1-bit Adam's error-compensated compressed all-reduce
(Tang et al. 2021, arXiv 2102.02888; DeepSpeed's ``compressed_allreduce``): with
a scaled-sign uplink the momentum travels as one bit per entry plus one scale
per block, and nothing the compressor drops is lost, only delayed.  Unlike
EF21 the aggregate is a mean of this step's messages, not a running estimate.
(DeepSpeed also compresses the server's chunk of the mean with a second,
server-side error; here the mean is applied as decoded, so every rank's step
is exactly the mean of what the workers sent.)  ``e_i`` is optimizer state
(``ef_error``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from commlmo.plugin import AggregatorCapabilities, Compressor, Payload, PluginConfig

from .mean import MeanTransported, average

__all__ = ["ErrorFeedback", "ErrorFeedbackConfig"]


class ErrorFeedbackConfig(PluginConfig):
    """Config of ``error_feedback``."""

    kind: Literal["error_feedback"] = "error_feedback"
    transport: Literal["auto", "owner", "allreduce", "allgather"] = Field(
        "auto", description="How the compressed messages travel, as for `mean`.")


class ErrorFeedback(MeanTransported):
    """Error-compensated mean: send C(v_i + e_i), keep e_i = what compression dropped (1-bit Adam's uplink)."""

    Config = ErrorFeedbackConfig
    capabilities = AggregatorCapabilities(stateful=True, owner=True)
    label_suffix = "error_feedback"

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        return {"ef_error": torch.zeros_like(param)}

    def message(self, v: Tensor, state: dict[str, Tensor]) -> Tensor:
        return v + state["ef_error"]

    def combine(self, exchanged, payloads, messages, states, *, codecs) -> list[Tensor]:
        for s, p, codec, msg in zip(states, payloads, codecs, messages):  # after the collectives succeeded
            self.commit_local(p, msg, s, codec)
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
