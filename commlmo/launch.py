"""Start N local worker processes with a real process group (gloo on 127.0.0.1, or NCCL).

:func:`launch` is what ``commlmo train --nproc N`` uses: torch's elastic launcher
(:func:`torch.distributed.launcher.api.elastic_launch`, the machinery behind
``torchrun``) with a ``c10d`` rendezvous on 127.0.0.1 and a port the OS picks.
Signals, exit codes, error files and restarts therefore behave as under
``torchrun``:

* SIGTERM or SIGINT to the launcher (Ctrl-C, ``kill PID``) stops every worker
  within a few seconds (SIGKILL after ``shutdown_timeout_s``) and raises
  :class:`Interrupted`; a worker also stops if the launcher itself is killed
  (``PR_SET_PDEATHSIG`` on Linux).
* When a worker fails, the launcher stops the others at once and raises a
  :class:`~commlmo.errors.DistributedError` naming that worker (the root cause)
  and what it reported through its error file
  (:func:`torch.distributed.elastic.multiprocessing.errors.record`).
* ``max_restarts`` restarts the whole group that many times after a failure;
  each worker sees the attempt in ``TORCHELASTIC_RESTART_COUNT``
  (:func:`restart_count`).

:func:`spawn` is the older, simpler starter the distributed tests and benches
use: every rank's return value or exception comes back to the caller, and when
one rank dies the survivors get ``collective_timeout_s`` to notice and report
their own error before they are killed.

Under ``torchrun`` you need neither: the environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) is already set, and :func:`init_from_env`
joins the group.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import logging
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import CommlmoError, ConfigError, DistributedError

__all__ = ["free_port", "launch", "spawn", "init_from_env", "launched_by_torchrun", "restart_count",
           "Interrupted", "stop_on_signals"]

#: The signals that stop a run: the launcher passes them on to every worker.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_TMP_PREFIX = "commlmo-spawn-"


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT, SIGTERM); ``signum`` is which."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)

    @property
    def exit_code(self) -> int:
        """``128 + signum``, as a shell reports a process ended by the signal (130 for SIGINT)."""
        return 128 + self.signum


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_by_torchrun() -> bool:
    """Whether the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) is set."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def restart_count() -> int:
    """Which attempt this process is: 0 at first, ``k`` after the launcher restarted the group ``k`` times."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def default_backend() -> str:
    """NCCL when CUDA is available, else gloo."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_from_env(*, backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the process group described by the torchrun environment; returns ``(rank, world_size)``."""
    if not dist.is_initialized():
        backend = backend or default_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
        timeout = datetime.timedelta(seconds=timeout_s)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # The elastic agent's store outlives a restart, and with it the previous attempt's keys
            # (gloo's peer addresses): a restarted rank could read a dead peer's address. One prefix
            # per attempt keeps the attempts apart.
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                  is_master=False, timeout=timeout)
            store = dist.PrefixStore(f"commlmo/attempt_{restart_count()}", store)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def leave_group(*, finished: bool) -> None:
    """Destroy the default process group; after a finished run, only once every rank is done.

    Ranks finish at different times (rank 0 still writes the summary after the last
    collective).  A rank that tears its group down closes its gloo sockets, and a peer
    whose group is still alive can see the closed connection in gloo's I/O thread,
    which throws there and aborts the whole process (SIGABRT).  So a rank that
    finished meets the others at a barrier first; after a failure it does not wait
    (the others may be gone).
    """
    if not dist.is_initialized():
        return
    if finished:
        with contextlib.suppress(Exception):
            dist.barrier()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- signals


@contextlib.contextmanager
def stop_on_signals(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Interrupted`; the previous handlers come back after.

    Outside the main thread (where Python cannot set handlers) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in signals}

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _restore_signals(signals: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")) -> Iterator[None]:
    """Put back the handlers the elastic launcher replaces with its own (it never restores them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [getattr(signal, s) for s in signals if hasattr(signal, s)]
    before = {s: signal.getsignal(s) for s in sigs}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


_stopped_by: int | None = None  # in a worker: the signal that asked it to stop


def _stop_handler(signum: int, frame: Any) -> None:
    global _stopped_by
    if _stopped_by is None:
        _stopped_by = signum
        raise Interrupted(signum)


def _as_worker() -> None:
    """In a fresh worker: stop quietly on SIGTERM/SIGINT, and when the launcher dies; one thread."""
    global _stopped_by
    _stopped_by = None
    for s in STOP_SIGNALS:
        signal.signal(s, _stop_handler)
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):  # PR_SET_PDEATHSIG = 1: SIGTERM when the launcher dies
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # it died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    torch.set_num_threads(1)  # N workers share the machine's cores


# ----------------------------------------------------------------------------- launch (elastic)


def _commlmo_error_file(exc: CommlmoError) -> None:
    """Record a commlmo error in the worker's elastic error file, as ``record`` would, plus its type."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": f"{type(exc).__name__}: {exc}", "extraInfo": {
        "py_callstack": traceback.format_exc(), "timestamp": str(int(time.time())),
        "commlmo": {"type": type(exc).__name__, "config_error": isinstance(exc, ConfigError), "text": str(exc)},
    }}}
    with contextlib.suppress(OSError), open(path, "w") as f:
        json.dump(data, f)


def _elastic_worker(fn: Callable[..., Any], args: tuple, backend: str, collective_timeout_s: float) -> Any:
    """What every worker :func:`launch` starts runs (module-level: the spawn start method pickles it)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    @record
    def main() -> Any:
        _as_worker()
        try:
            rank, world_size = init_from_env(backend=backend, timeout_s=collective_timeout_s)
            result = fn(rank, world_size, *args)
        except BaseException as exc:  # noqa: BLE001
            if _stopped_by is not None:  # the launcher (or Ctrl-C) stopped it: not this rank's failure
                sys.exit(128 + _stopped_by)
            leave_group(finished=False)
            if isinstance(exc, CommlmoError):  # the message says it all: no traceback on the console
                _commlmo_error_file(exc)
                sys.exit(1)
            raise  # a bug: `record` writes the traceback into the error file
        leave_group(finished=True)
        return result

    return main()


_ELASTIC_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")


@contextlib.contextmanager
def _quiet_elastic() -> Iterator[None]:
    """The elastic agent logs every start, signal and failure; commlmo reports them itself (LOGLEVEL=INFO shows them)."""
    if os.environ.get("LOGLEVEL"):
        yield
        return
    import torch.distributed.elastic.agent.server.local_elastic_agent  # noqa: F401 - create the loggers first
    import torch.multiprocessing.spawn  # noqa: F401
    import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend  # noqa: F401
    import torch.distributed.elastic.rendezvous.dynamic_rendezvous  # noqa: F401

    loggers = [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
               if name.startswith(_ELASTIC_LOGGERS)]
    before = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in before:
            lg.setLevel(level)


def _describe_failure(rank: int, failure: Any) -> tuple[str, bool]:
    """One worker's failure as a line, and whether it was a config error on the user's side."""
    data = failure.error_file_data or {}
    message = data.get("message") if isinstance(data, dict) else None
    if isinstance(message, dict):
        mine = (message.get("extraInfo") or {}).get("commlmo")
        if isinstance(mine, dict):
            return str(mine.get("text", "")), bool(mine.get("config_error"))
        callstack = (message.get("extraInfo") or {}).get("py_callstack", "")
        return f"rank {rank}: {message.get('message', '')}\n{callstack}".rstrip(), False
    if isinstance(message, str) and message and message not in ("<NONE>", "<N/A>"):
        return f"rank {rank}: {message}", False
    if failure.exitcode < 0:
        return f"rank {rank}: killed by signal {failure.signal_name()} and reported nothing", False
    if failure.exitcode - 128 in {int(s) for s in STOP_SIGNALS}:
        name = signal.Signals(failure.exitcode - 128).name
        return f"rank {rank}: stopped by {name} (exit code {failure.exitcode}) and reported nothing", False
    return (f"rank {rank}: exited with code {failure.exitcode} and reported nothing (a crash, an out-of-memory "
            "kill or os._exit)"), False


def launch(
    fn: Callable[..., Any],
    nproc: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float | None = None,
    collective_timeout_s: float | None = None,
    max_restarts: int = 0,
    start_method: str = "spawn",
    shutdown_timeout_s: int = 5,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``nproc`` local workers through torch's elastic launcher.

    Returns each rank's return value, in rank order.  A failed worker raises
    :class:`~commlmo.errors.DistributedError` (:class:`~commlmo.errors.ConfigError`
    when it failed on a config error) with what that worker reported; the others
    are stopped at once, as ``torchrun`` does.  SIGTERM/SIGINT raise
    :class:`Interrupted` once every worker is gone; ``timeout_s`` bounds the whole
    run.  ``fn`` must be importable (a module-level function).
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    coll = collective_timeout_s or timeout_s or 300.0
    fired, active, lock = threading.Event(), [True], threading.Lock()

    def overdue() -> None:
        with lock:
            if active[0]:
                fired.set()
                os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread: the agent stops every worker

    timer = threading.Timer(timeout_s, overdue) if timeout_s else None
    with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX) as logs, _restore_signals(), stop_on_signals(), \
            _quiet_elastic():
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"commlmo-{uuid.uuid4().hex[:12]}",
            rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=max_restarts, monitor_interval=0.1,
            start_method=start_method, logs_specs=DefaultLogsSpecs(log_dir=logs), shutdown_timeout=shutdown_timeout_s,
        )
        try:
            if timer is not None:
                timer.daemon = True
                timer.start()
            results = elastic_launch(config, _elastic_worker)(fn, args, backend, coll)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            text, config_error = _describe_failure(rank, failure)
            if config_error:
                raise ConfigError(text) from None
            others = ("the launcher stopped the other rank" if nproc == 2 else
                      f"the launcher stopped the other {nproc - 1} ranks" if nproc > 2 else "it was the only rank")
            tries = f" after {max_restarts} restart(s) (train.max_restarts)" if max_restarts else ""
            raise DistributedError(f"rank {rank} failed{tries}; {others}:\n{text}") from None
        except (SignalException, Interrupted) as exc:
            signum = exc.sigval if isinstance(exc, SignalException) else exc.signum
            if fired.is_set():
                raise DistributedError(f"the run took longer than its time limit ({timeout_s:g} s, train.timeout_s); "
                                       "every worker was stopped") from None
            raise Interrupted(signum) from None
        finally:
            with lock:
                active[0] = False
            if timer is not None:
                timer.cancel()
    return [results[r] for r in range(nproc)]


# ----------------------------------------------------------------------------- spawn (tests, benches)


def _entry(rank: int, world_size: int, port: int, backend: str, timeout_s: float,
           fn: Callable[..., Any], args: tuple, outdir: str) -> None:
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })
    _as_worker()
    out = Path(outdir) / f"rank{rank}.pkl"
    try:
        init_from_env(backend=backend, timeout_s=timeout_s)
        result = fn(rank, world_size, *args)
        with open(out, "wb") as f:
            pickle.dump(("ok", result), f)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        if _stopped_by is not None:
            os._exit(128 + _stopped_by)  # stopped by the parent: nothing to report, nothing to clean up
        with open(out, "wb") as f:
            pickle.dump(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"), f)
        leave_group(finished=False)
        raise SystemExit(1) from None
    leave_group(finished=True)


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
    killed, so a dead rank never leaves the others hanging.  An exception in the
    caller while it waits (Ctrl-C) kills every worker before it propagates.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    coll = collective_timeout_s or timeout_s or 300.0
    with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX) as outdir:
        procs = [
            ctx.Process(target=_entry, args=(r, world_size, port, backend, coll, fn, args, outdir), daemon=False)
            for r in range(world_size)
        ]
        try:
            for p in procs:
                p.start()
            _wait(procs, timeout_s=timeout_s, grace_s=coll + 10)
        except BaseException:
            _stop(procs)
            raise
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


def _stop(procs: list, grace_s: float = 3.0) -> None:
    """SIGTERM every live worker, SIGKILL what is left after ``grace_s``, and reap them all."""
    for p in procs:
        if p.pid is not None and p.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    end = time.monotonic() + grace_s
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.kill()
            p.join()


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
