"""Max-norm (l-infinity) ball LMO: the elementwise sign (signSGD, Signum, SignMuon)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from commlmo.plugin import LMO, LMOCapabilities, PluginConfig

from ._common import accumulation_dtype, random_signs_at_zeros

__all__ = ["Sign"]


class Sign(LMO):
    r"""Max-norm (l-infinity) ball: D = sign(G), with a policy for exact zeros.

    ``argmax_{||D||_inf <= 1} <G, D> = sign(G)`` with value ``||G||_1``
    (Bernstein et al. 2018, "signSGD", arXiv 1802.04434).  On a zero entry every
    ``D_ij`` in ``[-1, 1]`` is optimal; ``zero`` picks one:

    * ``random`` -- a fair +-1 drawn from the ``generator`` passed to
      :meth:`direction`, so every entry is exactly one bit and the same seed gives
      the same step (SignMuon's convention).  Exact zeros are rare after
      Newton--Schulz (commlmo's bfloat16 iteration produced none in 793,600
      Gaussian entries) but common in raw gradients and momenta: embedding rows
      a batch never touched, dead units, masked weights.  One draw
      per zero, in row-major order: the generator advances by a data-dependent
      amount, so it must not be a stream other ranks have to stay in step with;
    * ``positive`` -- +1, deterministic (a systematic bias in majority votes);
    * ``keep`` -- 0, ``torch.sign`` itself (then D is not a +-1 message).

    NaN entries stay NaN.  Elementwise, so it runs on any rank and on shards.
    """

    class Config(PluginConfig):
        kind: Literal["sign"] = "sign"
        zero: Literal["random", "positive", "keep"] = Field("random", description="sign of exact zeros")

    config: Config
    capabilities: ClassVar[LMOCapabilities] = LMOCapabilities(min_ndim=0, elementwise=True, step_family="sign")

    def direction(self, g: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        d = torch.sign(g)
        if self.config.zero == "keep":
            return d
        zeros = d == 0
        if self.config.zero == "positive":
            return d.masked_fill_(zeros, 1)
        if generator is not None:
            return random_signs_at_zeros(d, zeros, generator)
        count = int(zeros.sum())
        if count == 0:
            return d
        raise ValueError(
            f"sign LMO with zero='random' found {count} exact zero(s) in a tensor of shape "
            f"{tuple(g.shape)} and needs a torch.Generator to draw their signs; pass "
            "generator=..., or configure zero: 'positive' or 'keep'"
        )

    def norm(self, d: Tensor) -> Tensor:
        """Max norm (l-infinity): the largest absolute entry."""
        return d.abs().amax()

    def dual_norm(self, g: Tensor) -> Tensor:
        """l1 norm: the sum of absolute entries."""
        return torch.linalg.vector_norm(g, ord=1, dtype=accumulation_dtype(g.dtype))
