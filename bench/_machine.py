"""What the bench scripts share: the machine they ran on, their provenance lines, timed optimizer steps."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch


def describe_machine() -> str:
    """CPU model, core count, torch and Python versions."""
    cpu = platform.processor()
    if not cpu and Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else ""
    return (f"{cpu or platform.machine()} ({platform.machine()}), {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def provenance(started: float, machine: str) -> list[str]:
    """The "Command: ... Machine: ..." lines every recorded benchmark table starts with."""
    return [
        f"Command: `python {' '.join(sys.argv)}` -- {datetime.date.today().isoformat()}, "
        f"{time.perf_counter() - started:.0f} s.",
        f"Machine: {machine}.",
    ]


def timed_steps(opt, params, grads, steps: int, *, barrier: bool = True) -> list[float]:
    """Seconds of each of ``steps`` optimizer steps, every parameter given its gradient first
    (and the ranks lined up by a barrier, so a step's time is its own)."""
    import torch.distributed as dist

    times = []
    for _ in range(steps):
        for p, g in zip(params, grads):
            p.grad = g
        if barrier and dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times
