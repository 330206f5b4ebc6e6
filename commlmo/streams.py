r"""Random streams derived from the seed, the step and the parameter: nothing to store, nothing to replay.

Every random draw of a step -- the sign of an exact zero, a vote's tie-break, a
stochastic compressor, a Byzantine worker's noise -- comes from a
``torch.Generator`` seeded with a hash of

    (seed, group, step, stage, parameter[, rank])

so a draw does not depend on what was drawn before it: not on how the group's
parameters are cut into buckets, not on whether a bucket's uplink ran inside
``backward()`` (overlap) or in ``step()``, not on which rank owns a parameter
(the owner server role), and not on anything a checkpoint would have to keep.
Resuming needs only the step count, so the optimizer state of two ranks differs
only where the algorithm says it does (momentum, error-feedback memories) -- the
same idea as counter-based generators (Salmon et al. 2011, "Parallel random
numbers: as easy as 1, 2, 3").

Streams are *shared* (the same on every rank: tie-breaks, shared-seed
compressors such as ``randk``, the downlink) or *local* (this rank's own: the
sign of a zero in a worker's message, an adversary's noise).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["Generators", "Streams", "derived_seed"]

#: stages of the pipeline that draw random numbers (part of every derived seed)
STAGES = ("worker", "uplink", "aggregate", "server", "downlink", "adversary")


def derived_seed(*key: int | str) -> int:
    """A 63-bit seed from ``key``: blake2b of its items, so nearby keys give unrelated streams."""
    h = hashlib.blake2b(digest_size=8)
    for k in key:
        h.update(k.encode() if isinstance(k, str) else struct.pack("<q", int(k)))
        h.update(b"|")
    return int.from_bytes(h.digest(), "little") >> 1


class Streams:
    """The random streams of one group at one step and stage, for the parameters ``indices``.

    ``param(j)`` is the stream of the ``j``-th parameter handed to the stage (its index
    in the group is ``indices[j]``); ``shared``/``local`` are one stream for the whole
    call (the first parameter's), for plugins that draw once per call.  Generators are
    made on first use.
    """

    def __init__(self, base: int, rank: int, step: int, stage: str, indices: Sequence[int], device: Any):
        self._base, self._rank, self._step, self._stage = base, rank, step, stage
        self.indices = list(indices)
        self._device = torch.device(device) if device is not None else torch.device("cpu")

    def _make(self, index: int, shared: bool) -> torch.Generator:
        key = (self._base, self._step, self._stage, index, -1 if shared else self._rank)
        return torch.Generator(device=self._device).manual_seed(derived_seed(*key))

    def param(self, j: int, *, shared: bool = True) -> torch.Generator:
        """The stream of the ``j``-th parameter of this call (shared by default)."""
        return self._make(self.indices[j] if self.indices else j, shared)

    @property
    def shared(self) -> torch.Generator:
        """One stream, the same on every rank, for the whole call."""
        return self._make(self.indices[0] if self.indices else 0, True)

    @property
    def local(self) -> torch.Generator:
        """One stream of this rank's own, for the whole call."""
        return self._make(self.indices[0] if self.indices else 0, False)

    def for_(self, compressor: Any, j: int) -> torch.Generator:
        """The stream of parameter ``j`` that ``compressor`` needs: shared if it declares shared randomness."""
        return self.param(j, shared=bool(compressor.capabilities.shared_randomness))

    def stage(self, stage: str) -> Streams:
        """The same step and parameters at another stage."""
        return Streams(self._base, self._rank, self._step, stage, self.indices, self._device)


class Generators:
    """The random streams of one group: :meth:`at` gives those of a step, derived, never stored.

    ``state()`` only records what the streams are derived from (the group's base seed
    and the rank) and ``load()`` ignores what it is given (including the stored
    generator states of checkpoints written before streams were derived): a step's
    streams are a function of ``seed``, the group, the step and the rank.
    """

    def __init__(self, *, seed: int, group_index: int, rank: int, device: Any):
        self.seed, self.group_index, self.rank = seed, group_index, rank
        self.base = derived_seed(seed, group_index)
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def at(self, step: int, stage: str, indices: Sequence[int] = ()) -> Streams:
        """The streams of ``stage`` at optimizer step ``step`` for the group's parameters ``indices``."""
        return Streams(self.base, self.rank, step, stage, indices, self.device)

    def state(self) -> dict[str, Any]:
        """What the streams derive from, as tensors: ``shared`` (the group's base seed) and ``local`` (the rank).

        Nothing needs restoring (the step count, which the optimizer saves, does the rest).
        """
        return {"shared": torch.tensor([self.base], dtype=torch.int64),
                "local": torch.tensor([self.rank], dtype=torch.int64)}

    def load(self, state: Any) -> None:
        """Accept any saved state (older checkpoints stored generator states); there is nothing to restore."""
