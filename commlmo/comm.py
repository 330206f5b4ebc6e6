r"""Communicators: the collectives the aggregators use, with byte accounting.

Three implementations share one interface:

* :class:`TorchComm` -- real ``torch.distributed`` collectives on a process
  group (gloo for CPU tensors, NCCL for CUDA tensors);
* :class:`LocalComm` -- a world of one: every collective is the identity and
  nothing is sent;
* :class:`SimulatedComm` -- M workers as threads of one process exchanging
  tensors in memory (research mode, and the single-process reference the
  distributed tests compare against; never a stand-in for the real path).

Bytes are counted from the tensors handed to each collective.  Per rank, for a
tensor of ``n`` bytes and ``M`` ranks, a bandwidth-optimal implementation moves

===================  ==========================  ==========================
collective           sent                        received
===================  ==========================  ==========================
all_reduce           2(M-1)/M * n                2(M-1)/M * n
all_gather (input n) (M-1) * n                   (M-1) * n
all_to_all (input n) (M-1)/M * n                 (M-1)/M * n
all_to_all_v         what it sends to the others   what the others send it
===================  ==========================  ==========================

and that is what :class:`ByteCounter` records (the chunk a rank keeps for
itself never crosses the wire).  With ``M = 1`` no collective is called.

Every collective takes ``async_op=True`` to return a :class:`Pending` at once
(``torch.distributed``'s asynchronous work underneath); ``.wait()`` gives the
result.  The optimizer starts the uplink of a bucket of gradients this way from
a gradient hook, while ``backward()`` goes on, and waits in ``step()``.
Collectives are issued in program order on every rank, so ranks agree on their
order however long each one takes.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import DistributedError

__all__ = ["ByteCounter", "Communicator", "LocalComm", "TorchComm", "SimulatedComm", "Pending", "simulate",
           "make_communicator"]


@dataclass
class ByteCounter:
    """Bytes handed to, sent and received by each collective; per step and in total."""

    step: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    total: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))

    def record(self, label: str, handed: int, sent: float, received: float) -> None:
        """Add one collective call: bytes handed to it and bytes this rank sent and received."""
        for book in (self.step, self.total):
            row = book[label]
            row["calls"] += 1
            row["handed"] += int(handed)
            row["sent"] += int(round(sent))
            row["received"] += int(round(received))

    def new_step(self) -> None:
        """Start a new step's book (the optimizer calls this at the top of ``step``)."""
        self.step = defaultdict(lambda: defaultdict(int))

    @staticmethod
    def _sum(book: dict[str, dict[str, int]], key: str) -> int:
        return sum(row[key] for row in book.values())

    @property
    def step_sent(self) -> int:
        """Bytes this rank sent in the last step, all collectives together."""
        return self._sum(self.step, "sent")

    @property
    def step_received(self) -> int:
        """Bytes this rank received in the last step."""
        return self._sum(self.step, "received")

    @property
    def total_sent(self) -> int:
        """Bytes this rank sent since the optimizer was built."""
        return self._sum(self.total, "sent")

    @property
    def total_received(self) -> int:
        """Bytes this rank received since the optimizer was built."""
        return self._sum(self.total, "received")

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict snapshot (for JSON logs)."""
        return {
            "step": {k: dict(v) for k, v in self.step.items()},
            "total": {k: dict(v) for k, v in self.total.items()},
            "step_sent": self.step_sent,
            "step_received": self.step_received,
            "total_sent": self.total_sent,
            "total_received": self.total_received,
        }


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class Pending:
    """A collective in flight: :meth:`wait` blocks until it is done and returns its result.

    ``work`` is the backend's handle (``torch.distributed.Work``) or ``None`` when the
    collective already ran; ``finish`` turns the raw output into the result.
    """

    def __init__(self, result: Any, work: Any = None, finish: Callable[[Any], Any] | None = None):
        self._result, self._work, self._finish, self._done = result, work, finish, work is None and finish is None

    def wait(self) -> Any:
        """The collective's result (the same value on repeated calls)."""
        if not self._done:
            if self._work is not None:
                self._work.wait()
            if self._finish is not None:
                self._result = self._finish(self._result)
            self._done, self._work, self._finish = True, None, None
        return self._result

    @property
    def done(self) -> bool:
        """Whether :meth:`wait` would return at once (the backend finished, or there was nothing to wait for)."""
        return self._done or (self._work is not None and bool(self._work.is_completed()))


def _ready(result: Any, async_op: bool) -> Any:
    return Pending(result) if async_op else result


class Communicator:
    """Collectives over ``world_size`` ranks; subclasses implement the ``_`` methods.

    Every method takes a ``label`` (e.g. ``"hidden/majority_vote/all_to_all"``)
    under which its bytes are recorded.  All inputs must be contiguous.
    """

    rank: int = 0
    world_size: int = 1

    def __init__(self) -> None:
        self.bytes = ByteCounter()

    # -- public API ------------------------------------------------------
    def all_reduce_sum_(self, t: Tensor, *, label: str, async_op: bool = False) -> Any:
        """In-place sum over ranks (order of summation is the backend's)."""
        if self.world_size == 1:
            return _ready(t, async_op)
        m, n = self.world_size, _nbytes(t)
        self.bytes.record(f"{label}/all_reduce", n, 2 * (m - 1) / m * n, 2 * (m - 1) / m * n)
        return self._run(self._all_reduce_sum_, t, async_op)

    def all_gather(self, t: Tensor, *, label: str, async_op: bool = False) -> Any:
        """``(world_size, *t.shape)`` stack of every rank's ``t`` (rank order)."""
        if self.world_size == 1:
            return _ready(t.unsqueeze(0), async_op)
        m, n = self.world_size, _nbytes(t)
        self.bytes.record(f"{label}/all_gather", n, (m - 1) * n, (m - 1) * n)
        return self._run(self._all_gather, t.contiguous(), async_op)

    def all_to_all(self, t: Tensor, *, label: str, async_op: bool = False) -> Any:
        """Split ``t`` (1-D, length divisible by world_size) into chunks; chunk ``j`` goes to
        rank ``j``.  Returns the ``(world_size, chunk)`` matrix of chunks received, row ``i``
        coming from rank ``i``."""
        m = self.world_size
        if t.ndim != 1 or t.numel() % m:
            raise ValueError(f"all_to_all needs a 1-D tensor whose length divides by {m}; got shape {tuple(t.shape)}")
        if m == 1:
            return _ready(t.unsqueeze(0), async_op)
        n = _nbytes(t)
        self.bytes.record(f"{label}/all_to_all", n, (m - 1) / m * n, (m - 1) / m * n)
        out = self._run(self._all_to_all, t.contiguous(), async_op)
        if isinstance(out, Pending):
            return Pending(out, finish=lambda p: p.wait().view(m, -1))
        return out.view(m, -1)

    def all_to_all_v(self, t: Tensor, send: list[int], recv: list[int], *, label: str,
                     async_op: bool = False) -> Any:
        """Uneven all-to-all of a 1-D ``t``: its first ``send[0]`` elements go to rank 0, the next
        ``send[1]`` to rank 1...; ``recv[i]`` elements come from rank ``i`` (every rank must know
        them).  Returns the list of chunks received, in rank order."""
        m = self.world_size
        if t.ndim != 1 or sum(send) != t.numel() or len(send) != m or len(recv) != m:
            raise ValueError(f"all_to_all_v needs a 1-D tensor of sum(send) elements and {m} send/recv sizes; "
                             f"got shape {tuple(t.shape)}, send {send}, recv {recv}")
        if m == 1:
            return _ready([t], async_op)
        size = t.element_size()
        me = self.rank
        self.bytes.record(f"{label}/all_to_all_v", _nbytes(t), size * (sum(send) - send[me]),
                          size * (sum(recv) - recv[me]))
        out = self._run(lambda x: self._all_to_all_v(x, list(send), list(recv)), t.contiguous(), async_op)
        split = lambda flat: list(torch.split(flat, list(recv)))  # noqa: E731
        if isinstance(out, Pending):
            return Pending(out, finish=lambda p: split(p.wait()))
        return split(out)

    def all_max_(self, t: Tensor, *, label: str, async_op: bool = False) -> Any:
        """In-place elementwise max over ranks (flags: agree on skipping a step)."""
        if self.world_size == 1:
            return _ready(t, async_op)
        m, n = self.world_size, _nbytes(t)
        self.bytes.record(f"{label}/all_reduce", n, 2 * (m - 1) / m * n, 2 * (m - 1) / m * n)
        return self._run(self._all_max_, t, async_op)

    def _run(self, fn: Callable[[Tensor], Any], t: Tensor, async_op: bool) -> Any:
        """Run one backend collective, now or (``async_op``) in flight; backends that cannot defer run it now."""
        return _ready(fn(t), async_op)

    def describe(self) -> str:
        """One line naming the communicator, its rank and world size."""
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"

    # -- backend ---------------------------------------------------------
    def _all_reduce_sum_(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _all_max_(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _all_gather(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _all_to_all(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _all_to_all_v(self, t: Tensor, send: list[int], recv: list[int]) -> Tensor:
        raise NotImplementedError


class LocalComm(Communicator):
    """A world of one process: no collective is ever called."""


# torch 2.13 renamed all_gather_into_tensor (the old name warns); older releases lack the new one
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TorchComm(Communicator):
    """Collectives of a ``torch.distributed`` process group (default: the world)."""

    def __init__(self, group: Any = None) -> None:
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError("TorchComm needs torch.distributed initialised (dist.init_process_group)")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.backend = str(dist.get_backend(self.group))

    # each backend call returns (result, work); ``_run`` waits at once unless asked not to
    _async = False

    def _run(self, fn: Callable[[Tensor], Any], t: Tensor, async_op: bool) -> Any:
        self._async = async_op
        try:
            out, work = fn(t)
        finally:
            self._async = False
        if async_op:
            return Pending(out, work)
        if work is not None:
            work.wait()
        return out

    def _all_reduce_sum_(self, t: Tensor) -> Any:
        return t, dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

    def _all_max_(self, t: Tensor) -> Any:
        return t, dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True)

    def _all_gather(self, t: Tensor) -> Any:
        out = torch.empty((self.world_size * t.numel(),), dtype=t.dtype, device=t.device)
        work = _all_gather_flat(out, t.reshape(-1), group=self.group, async_op=True)
        return out.view(self.world_size, *t.shape), work

    def _all_to_all(self, t: Tensor) -> Any:
        out = torch.empty_like(t)
        return out, dist.all_to_all_single(out, t, group=self.group, async_op=True)

    def _all_to_all_v(self, t: Tensor, send: list[int], recv: list[int]) -> Any:
        out = torch.empty(sum(recv), dtype=t.dtype, device=t.device)
        return out, dist.all_to_all_single(out, t, output_split_sizes=recv, input_split_sizes=send,
                                           group=self.group, async_op=True)

    def describe(self) -> str:
        """One line naming the backend, rank and world size."""
        return f"TorchComm(backend={self.backend}, rank={self.rank}, world_size={self.world_size})"


class _Hub:
    """Rendezvous of the simulated ranks: deposit, wait for everyone, read, wait again."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.slots: list[Any] = [None] * world_size
        self.barrier = threading.Barrier(world_size)

    def exchange(self, rank: int, t: Any) -> list[Any]:
        self.slots[rank] = t.clone() if isinstance(t, Tensor) else t
        self.barrier.wait()
        everyone = list(self.slots)  # type: ignore[arg-type]
        self.barrier.wait()  # nobody overwrites a slot before all have read it
        return everyone  # type: ignore[return-value]


class SimulatedComm(Communicator):
    """One of ``world_size`` simulated ranks living as threads of one process.

    Reductions sum in rank order, so results are deterministic.  Use
    :func:`simulate` to run a function on every simulated rank.
    """

    def __init__(self, rank: int, hub: _Hub):
        super().__init__()
        self.rank, self.world_size, self._hub = rank, hub.world_size, hub

    def _all_reduce_sum_(self, t: Tensor) -> Tensor:
        parts = self._hub.exchange(self.rank, t)
        acc = parts[0].clone()
        for p in parts[1:]:
            acc += p
        return t.copy_(acc)

    def _all_max_(self, t: Tensor) -> Tensor:
        return t.copy_(torch.stack(self._hub.exchange(self.rank, t)).amax(0))

    def _all_gather(self, t: Tensor) -> Tensor:
        return torch.stack(self._hub.exchange(self.rank, t))

    def _all_to_all(self, t: Tensor) -> Tensor:
        parts = self._hub.exchange(self.rank, t)
        return torch.cat([p.view(self.world_size, -1)[self.rank] for p in parts])

    def _all_to_all_v(self, t: Tensor, send: list[int], recv: list[int]) -> Tensor:
        sends = self._hub.exchange(self.rank, list(send))
        parts = self._hub.exchange(self.rank, t)
        out = []
        for r, (part, sizes) in enumerate(zip(parts, sends)):
            start = sum(sizes[:self.rank])
            if sizes[self.rank] != recv[r]:
                raise DistributedError(f"all_to_all_v: rank {r} sends {sizes[self.rank]} elements to rank "
                                       f"{self.rank}, which expects {recv[r]}")
            out.append(part[start:start + recv[r]])
        return torch.cat(out)


def simulate(world_size: int, fn: Callable[[int, Communicator], Any], *, timeout: float | None = None) -> list[Any]:
    """Run ``fn(rank, comm)`` on ``world_size`` simulated ranks (threads); return their results.

    An exception on any rank aborts the rendezvous so the others fail fast
    instead of waiting forever, and is re-raised here.  With ``timeout`` a rank
    that waits longer than that in a collective (another rank called a different
    one, or none) breaks the rendezvous: ``threading.BrokenBarrierError``.
    """
    hub = _Hub(world_size)
    if timeout is not None:
        hub.barrier = threading.Barrier(world_size, timeout=timeout)
    results: list[Any] = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    threads_per_rank = torch.get_num_threads()

    def run(rank: int) -> None:
        # MKL keeps its thread count per OS thread: a new thread would run float32 GEMMs multi-threaded,
        # with another summation order than the caller's (and than a real rank's) -- set it here
        torch.set_num_threads(threads_per_rank)
        try:
            results[rank] = fn(rank, SimulatedComm(rank, hub))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors[rank] = exc
            hub.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,), name=f"commlmo-sim-{r}") for r in range(world_size)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results


def make_communicator(group: Any = None) -> Communicator:
    """:class:`TorchComm` over ``group`` when torch.distributed is initialised, else :class:`LocalComm`."""
    if isinstance(group, Communicator):
        return group
    if dist.is_available() and dist.is_initialized():
        return TorchComm(group)
    if group is not None:
        raise DistributedError("a process group was given but torch.distributed is not initialised")
    return LocalComm()
