"""Start N local worker processes with a real process group (gloo on 127.0.0.1, or NCCL).

Used by ``commlmo train --nproc N`` and by the distributed tests.  Under
``torchrun`` you do not need it: the environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) is already set, and :func:`init_from_env`
joins the group.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .errors import DistributedError

__all__ = ["free_port", "spawn", "init_from_env", "launched_by_torchrun"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_by_torchrun() -> bool:
    """Whether the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) is set."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def default_backend() -> str:
    """NCCL when CUDA is available, else gloo."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_from_env(*, backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the process group described by the torchrun environment; returns ``(rank, world_size)``."""
    if not dist.is_initialized():
        backend = backend or default_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _entry(rank: int, world_size: int, port: int, backend: str, timeout_s: float,
           fn: Callable[..., Any], args: tuple, outdir: str) -> None:
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })
    torch.set_num_threads(1)  # N workers share the machine's cores
    out = Path(outdir) / f"rank{rank}.pkl"
    try:
        init_from_env(backend=backend, timeout_s=timeout_s)
        result = fn(rank, world_size, *args)
        with open(out, "wb") as f:
            pickle.dump(("ok", result), f)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        with open(out, "wb") as f:
            pickle.dump(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"), f)
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float | None = 120.0,
    collective_timeout_s: float | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined by a process group.

    ``fn`` must be importable (a module-level function).  Returns each rank's
    return value, in rank order; if any rank fails, raises with that rank's
    traceback.  ``timeout_s`` bounds the whole run (``None``: no bound);
    ``collective_timeout_s`` (default: ``timeout_s``, else 300 s) bounds each
    collective.  When a rank dies, the survivors get ``collective_timeout_s`` to
    notice (gloo usually errors at once on the closed connection) before they are
    killed, so a dead rank never leaves the others hanging.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    coll = collective_timeout_s or timeout_s or 300.0
    with tempfile.TemporaryDirectory(prefix="commlmo-spawn-") as outdir:
        procs = [
            ctx.Process(target=_entry, args=(r, world_size, port, backend, coll, fn, args, outdir), daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        _wait(procs, timeout_s=timeout_s, grace_s=coll + 10)
        results, failures = [], []
        for r in range(world_size):
            path = Path(outdir) / f"rank{r}.pkl"
            if not path.exists():
                failures.append(f"rank {r}: exited with code {procs[r].exitcode} and reported nothing")
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                failures.append(f"rank {r}: {value}")
            results.append(value)
        if failures:
            raise DistributedError(f"{len(failures)} of {world_size} ranks failed:\n" + "\n".join(failures))
        return results


def _wait(procs: list, *, timeout_s: float | None, grace_s: float) -> None:
    """Join ``procs``; kill them past ``timeout_s``, or ``grace_s`` after the first one failed."""
    start = time.monotonic()
    first_failure: float | None = None
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        if first_failure is None and any(p.exitcode not in (None, 0) for p in procs):
            first_failure = now
        late = timeout_s is not None and now - start > timeout_s
        if late or (first_failure is not None and now - first_failure > grace_s):
            for p in procs:
                if p.is_alive():
                    p.kill()
        time.sleep(0.05)
    for p in procs:
        p.join()
