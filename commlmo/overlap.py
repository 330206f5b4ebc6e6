r"""Buckets, and starting their uplink from gradient hooks while ``backward()`` runs.

The parameters of each param group are cut into *buckets* of about ``bucket_mb``
megabytes of gradient, walking the parameters backwards (the order ``backward()``
produces their gradients, as ``DistributedDataParallel`` buckets them).  A step
runs every bucket's pipeline -- worker stage and uplink compression
(:meth:`~commlmo.pipeline.GroupRuntime.prepare`), the first collectives in flight
(:meth:`~commlmo.pipeline.GroupRuntime.launch`), then the rest
(:meth:`~commlmo.pipeline.GroupRuntime.finish`) -- launching every bucket before
finishing the first, so one bucket's transfer overlaps the next one's Newton--Schulz.

With ``overlap: true`` a ``register_post_accumulate_grad_hook`` on every parameter
notices when the last gradient of a bucket has been accumulated and runs ``prepare``
and ``launch`` right there, inside ``backward()``: the worker-side LMO of that bucket
and its transfer overlap the backward pass of the layers below.  ``step()`` launches
what is left, agrees with the other ranks (one small collective: finite gradients,
which parameters have one), and finishes.  Buckets launch strictly in order, so every
rank issues the same collectives in the same order.  The arithmetic is that of the
step without overlap, and the random streams are derived per parameter
(:mod:`commlmo.streams`), so the two are bitwise equal.

What overlap changes: a bucket is sent before the ranks have agreed that every
gradient is finite -- a non-finite gradient still changes nothing (the step is skipped
or raises), but its bytes were on the wire; a parameter without a gradient on every
rank is sent as zeros and left untouched.  Gradient accumulation: run the backward
passes of every micro-batch but the last inside :meth:`CommOptimizer.no_sync`
(``DistributedDataParallel``'s convention); a bucket whose gradient changes after it
was sent (accumulation outside ``no_sync``, or ``torch.amp.GradScaler``, which unscales
after backward) is sent again by ``step()``, with a one-time warning, so the result
is still exact.  The first step runs without overlap (it checks the layout of every
rank).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from .optimizer import CommOptimizer
    from .pipeline import BucketStep

__all__ = ["Bucket", "plan_buckets", "Overlap"]


@dataclass
class Bucket:
    """Parameters of one param group (``entry`` in ``param_groups``, ``index`` in its ``params``) that travel together."""

    entry: int
    index: list[int]
    nbytes: int = 0


def plan_buckets(param_groups: list[dict], bucket_mb: float) -> list[Bucket]:
    """Each param group's parameters, backwards, cut into buckets of at most ``bucket_mb`` MiB of gradient
    (a bigger tensor is a bucket of its own); buckets in the order backward() completes them."""
    cap = bucket_mb * 2**20
    order: dict[int, int] = {}
    for g in param_groups:
        for p in g["params"]:
            order.setdefault(id(p), len(order))
    buckets: list[Bucket] = []
    for e, g in enumerate(param_groups):
        params = g["params"]
        current = Bucket(e, [])
        for i in sorted(range(len(params)), key=lambda i: -order[id(params[i])]):
            nbytes = params[i].numel() * params[i].element_size()
            if current.index and current.nbytes + nbytes > cap:
                buckets.append(current)
                current = Bucket(e, [])
            current.index.append(i)
            current.nbytes += nbytes
        if current.index:
            buckets.append(current)
    for b in buckets:  # inside a bucket, the param group's own order
        b.index.sort()
    # a bucket is complete once its earliest parameter (in forward order) has its gradient
    buckets.sort(key=lambda b: -min(order[id(param_groups[b.entry]["params"][i])] for i in b.index))
    return buckets


@dataclass
class _Record:
    """This step's progress of one bucket."""

    ready: set[int] = field(default_factory=set)
    step: BucketStep | None = None
    error: BaseException | None = None


class Overlap:
    """The gradient hooks of one optimizer and the buckets they launched in the current step."""

    def __init__(self, opt: CommOptimizer):
        import weakref

        self._opt = weakref.ref(opt)
        self.handles: list[Any] = []
        self.where: dict[int, tuple[int, int]] = {}  # id(param) -> (bucket, index in param group)
        self.records: list[_Record] = []
        self.next = 0  # the first bucket not launched yet
        self.stale = False
        self.suspended = 0  # no_sync depth
        self._warned = False
        #: buckets of the last step launched from a gradient hook, and whether they had to be sent again
        self.last_hooked, self.last_resent = 0, False

    # ------------------------------------------------------------------ hooks
    def attach(self, buckets: list[Bucket], param_groups: list[dict]) -> None:
        """(Re)register one hook per parameter for ``buckets``."""
        self.detach()
        self.where = {}
        for k, b in enumerate(buckets):
            for i in b.index:
                p = param_groups[b.entry]["params"][i]
                self.where[id(p)] = (k, i)
                if p.requires_grad:
                    self.handles.append(p.register_post_accumulate_grad_hook(self._hook))
        self.reset(len(buckets))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def reset(self, n: int) -> None:
        """Forget this step's launches (after ``step()`` finished or skipped them)."""
        self.last_hooked = self.next
        self.records = [_Record() for _ in range(n)]
        self.next, self.stale = 0, False

    @property
    def launched(self) -> bool:
        """Whether any bucket was launched from a hook this step."""
        return self.next > 0

    def _hook(self, p: Tensor) -> None:
        opt = self._opt()
        if opt is None or self.suspended or not opt._overlap_armed():
            return
        k, i = self.where.get(id(p), (None, None))
        if k is None or k >= len(self.records):
            return
        rec = self.records[k]
        if rec.step is not None:  # its gradient changed after the bucket was sent
            self.stale = True
            return
        rec.ready.add(i)
        buckets = opt._buckets
        while self.next < len(buckets) and len(self.records[self.next].ready) == len(buckets[self.next].index):
            self._launch(opt, self.next)
            self.next += 1

    def _launch(self, opt: CommOptimizer, k: int) -> None:
        rec = self.records[k]
        try:
            rec.step = opt._launch_bucket(opt._buckets[k], zero_fill=False, agreed=False)
        except Exception as exc:  # noqa: BLE001 - reported by step(), after every rank agreed to stop
            rec.error = exc
            rec.step = opt._launch_bucket(opt._buckets[k], zero_fill=False, agreed=False, dummy=True)

    def warn_stale(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"commlmo overlap: {why}; the affected step sends its buckets again from step() "
                          "(exact, but the overlap is lost). Run the backward of every micro-batch but the last "
                          "inside `with opt.no_sync():`.", stacklevel=3)

