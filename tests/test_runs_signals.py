"""Stopping ``commlmo train --nproc 2`` from outside: every worker goes, nothing leaks, one line, 128 + signal.

The launcher is a subprocess in its own session (so a signal to its process
group is what Ctrl-C in a terminal sends); its temporary directory is a private
``TMPDIR`` so that a leaked ``commlmo-spawn-*`` is this test's own.  psutil is
not installed: the process tree is read from ``/proc``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]

LONG = {"name": "long", "optimizer": "signmuon", "task": {"kind": "matrix", "m": 12, "n": 8, "noise": 0.1},
        "train": {"steps": 1_000_000, "global_batch": 2, "nproc": 2, "eval_every": 0, "checkpoint_every": 20}}


def _children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return out


def _descendants(pid: int) -> set[int]:
    seen, todo = set(), [pid]
    while todo:
        for c in _children(todo.pop()):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    cfg = tmp_path / "long.yaml"
    cfg.write_text(yaml.safe_dump(LONG))
    tmp, out = tmp_path / "tmp", tmp_path / "run"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "commlmo", "train", str(cfg), "--out", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # training: both workers up and rank 0 past step 20
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") > 25 and len(_descendants(proc.pid)) >= 2:
            return proc, tmp, out
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.communicate()}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the run did not start training: {proc.communicate()}")


def _gone_within(pids: set[int], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = {p for p in pids if _alive(p)}
        if not left:
            return set()
        time.sleep(0.1)
    return {p for p in pids if _alive(p)}


@pytest.mark.parametrize("sig, to", [(signal.SIGTERM, "launcher"), (signal.SIGINT, "launcher"),
                                     (signal.SIGINT, "group")],
                         ids=["SIGTERM", "SIGINT", "ctrl-c"])
def test_a_signal_to_the_launcher_stops_every_worker(tmp_path, sig, to):
    proc, tmp, out = _start(tmp_path)
    workers = _descendants(proc.pid)
    start = time.monotonic()
    if to == "group":  # what the terminal does on Ctrl-C: every process of the foreground group
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the launcher did not exit within 30 s of the signal")
    took = time.monotonic() - start
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert took < 15, took
    assert not _gone_within(workers, 5), "workers outlived the launcher"
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith(f"commlmo train: interrupted by {sig.name}; "
                                                         "every worker stopped; last complete checkpoint: step"), err
    assert f"--out {out} --resume" in lines[-1]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    leaked = [p.name for p in tmp.iterdir() if p.name.startswith(("commlmo-spawn-", "torchelastic_"))]
    assert leaked == [], "temporary directories left behind"


def test_workers_stop_when_the_launcher_is_killed(tmp_path):
    """SIGKILL leaves the launcher no chance to clean up; the workers still stop (PR_SET_PDEATHSIG)."""
    proc, _, _ = _start(tmp_path)
    workers = _descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert not _gone_within(workers, 15), "workers outlived the killed launcher"


def test_a_run_past_train_timeout_s_is_stopped_with_an_error(tmp_path):
    cfg = tmp_path / "long.yaml"
    cfg.write_text(yaml.safe_dump({**LONG, "train": {**LONG["train"], "timeout_s": 8}}))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run([sys.executable, "-m", "commlmo", "train", str(cfg), "--out", str(tmp_path / "run"),
                           "--no-progress"], capture_output=True, text=True, timeout=90,
                          env={**os.environ, "TMPDIR": str(tmp), "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2, proc.stderr
    assert ("commlmo train: error: the run took longer than its time limit (8 s, train.timeout_s); every worker "
            "was stopped") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not [p for p in tmp.iterdir() if p.name.startswith(("commlmo-spawn-", "torchelastic_"))]
