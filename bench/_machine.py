"""One line describing the machine a benchmark ran on (shared by the bench scripts)."""

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
