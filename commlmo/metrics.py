"""Metrics files of a run, and the tables made from them.

A run directory holds

* ``metrics.jsonl`` -- one JSON object per step, written by rank 0 as it trains:
  ``step, loss, acc, lr, sent, received, sent_total, received_total, step_time,
  opt_time, time`` and, at evaluation steps, ``eval_loss, eval_acc``.  ``sent``
  and ``received`` are rank 0's bytes for that step as the optimizer's
  :class:`~commlmo.comm.ByteCounter` measured them; ``time`` is the cumulative
  training time (evaluation excluded); ``skipped: true`` marks a step the
  optimizer skipped (``nonfinite: skip``).  Step 0 is the evaluation before training.
* ``summary.json`` -- totals, every rank's byte accounting, the task's facts,
  and how the run went: ``stopped_after``, ``resumed_from`` (the checkpoint
  steps it was resumed from), ``last_checkpoint``, ``skipped_steps``, ``adversaries``.
* ``checkpoints/rank<r>/step-<k>.pt`` and ``.json`` -- with ``train.checkpoint_every``:
  each rank's own checkpoints and their checksums (:mod:`commlmo.checkpoint`).
* ``config.yaml`` -- the resolved run config.

:func:`load_run` reads them back; :func:`reach` finds the first evaluation at
or below a target loss; :func:`compare_table` and :func:`run_table` format them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

__all__ = ["MetricsWriter", "RunResult", "Reached", "load_run", "reach", "human_bytes", "best_eval",
           "run_table", "compare_table", "default_target"]


class MetricsWriter:
    """Appends one JSON line per record, flushed at once (a crashed run keeps its history).

    ``resume_after=K`` continues an existing file from step ``K``: the records of
    steps after ``K`` (written before an interruption, and about to be computed
    again) and a torn last line are dropped first, so no step appears twice.
    """

    def __init__(self, path: str | Path, *, resume_after: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after is not None:
            _truncate_after(self.path, resume_after)
        self._f: TextIO | None = open(self.path, "a" if resume_after is not None else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        assert self._f is not None, "MetricsWriter is closed"
        self._f.write(json.dumps(record, allow_nan=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _truncate_after(path: Path, step: int) -> None:
    """Keep the records of steps ``<= step`` (atomically: a temporary file, then ``os.replace``)."""
    kept = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # torn by the interruption
                continue
            if isinstance(record, dict) and record.get("step", math.inf) <= step:
                kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def human_bytes(n: float, *, digits: int = 1) -> str:
    """``1536 -> '1.5 KiB'`` (``digits`` after the point above bytes)."""
    if not math.isfinite(n):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _seconds(t: float) -> str:
    if not math.isfinite(t):
        return "-"
    return f"{t:.1f} s" if t < 120 else f"{t / 60:.1f} min"


@dataclass
class RunResult:
    """A finished run read back from its directory."""

    name: str
    path: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "eval_loss" in r]

    @property
    def has_accuracy(self) -> bool:
        return bool(self.summary.get("has_accuracy"))


def load_run(path: str | Path, name: str | None = None) -> RunResult:
    path = Path(path)
    with open(path / "metrics.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    return RunResult(name or summary.get("name", path.name), path, records, summary)


@dataclass
class Reached:
    """First evaluation at or below the target: step, rank 0's cumulative bytes sent, training time."""

    step: int
    sent: int
    time: float


def reach(run: RunResult, target: float) -> Reached | None:
    for r in run.evals:
        if r["eval_loss"] <= target:
            return Reached(r["step"], r["sent_total"], r["time"])
    return None


def default_target(runs: list[RunResult]) -> float:
    """The loss every run reached: the largest of the runs' best evaluated losses."""
    bests = [min((r["eval_loss"] for r in run.evals), default=math.inf) for run in runs]
    finite = [b for b in bests if math.isfinite(b)]
    return max(finite) if finite else math.inf


def _final(run: RunResult) -> dict[str, Any]:
    return run.evals[-1] if run.evals else {}


def best_eval(run: RunResult) -> tuple[float, int | None]:
    """The lowest evaluated loss and the (first) step it was reached at; ``(nan, None)`` without evaluations."""
    evals = [r for r in run.evals if math.isfinite(r["eval_loss"])]
    if not evals:
        return math.nan, None
    best = min(evals, key=lambda r: r["eval_loss"])
    return best["eval_loss"], best["step"]


def _format_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def run_table(run: RunResult) -> str:
    """The end-of-run summary of ``commlmo train``: results, then bytes by collective."""
    s, fin = run.summary, _final(run)
    steps = max(s["steps_run"], 1)
    notes = [("stopped at target" if s.get("stopped_at_target") else ""),
             (f"of {s['steps']}, stopped by train.stop_after" if s.get("stopped_after") is not None else ""),
             ("resumed from step " + ", ".join(map(str, s["resumed_from"])) if s.get("resumed_from") else ""),
             (f"{s['skipped_steps']} skipped: non-finite gradients" if s.get("skipped_steps") else "")]
    notes = [n for n in notes if n]
    rows = [
        ["steps", f"{s['steps_run']}" + (f" ({'; '.join(notes)})" if notes else "")],
        ["workers", f"{s['world_size']} ({s['backend']}, {s['device']})"],
        ["eval loss (final / best)", f"{fin.get('eval_loss', math.nan):.4f} / {s['best_eval_loss']:.4f}"
         + (f" (best at step {best_eval(run)[1]})" if best_eval(run)[1] is not None else "")],
    ]
    if s.get("adversaries"):
        adv = s["adversaries"]
        rows.insert(2, ["adversaries", f"ranks {adv['ranks']} send {adv['mode']} messages"])
    if run.has_accuracy and "eval_acc" in fin:
        rows.append(["eval accuracy", f"{100 * fin['eval_acc']:.2f} %"])
    b = s["bytes"]
    rows += [
        ["sent per worker", f"{human_bytes(b['sent_per_worker'])} ({human_bytes(b['sent_per_worker'] / steps)}/step)"],
        ["received per worker",
         f"{human_bytes(b['received_per_worker'])} ({human_bytes(b['received_per_worker'] / steps)}/step)"],
        ["wall time", f"{_seconds(s['wall_time'])} ({1000 * s['train_time'] / steps:.1f} ms/step training)"],
    ]
    if s.get("target_loss") is not None:
        hit = reach(run, s["target_loss"])
        rows.append([f"to loss {s['target_loss']:g}",
                     f"step {hit.step}, {human_bytes(hit.sent)} sent, {_seconds(hit.time)}" if hit else "not reached"])
    out = _format_table([run.name, ""], rows)
    by = s["bytes"]["by_rank"][0]["by_collective"]
    if by:
        coll = [[label, str(v["calls"]), human_bytes(v["sent"]), human_bytes(v["received"])] for label, v in sorted(by.items())]
        out += "\n\n" + _format_table(["rank 0 bytes by collective", "calls", "sent", "received"], coll)
    return out


def compare_table(runs: list[RunResult], target: float) -> str:
    """One row per run: final and best eval loss (and the best's step), final accuracy, bytes per worker,
    bytes and time to ``target``, wall time."""
    acc = any(r.has_accuracy for r in runs)
    head = ["run", "final eval loss", "best eval loss", "best at step"] + (["eval acc"] if acc else []) + [
        "sent/worker", "sent/step", f"bytes to {target:.4g}", f"time to {target:.4g}", "steps", "wall"]
    rows = []
    for run in runs:
        s, fin = run.summary, _final(run)
        hit = reach(run, target)
        best, at = best_eval(run)
        row = [run.name, f"{fin.get('eval_loss', math.nan):.4f}", f"{best:.4f}", "-" if at is None else str(at)]
        if acc:
            row.append(f"{100 * fin['eval_acc']:.2f} %" if "eval_acc" in fin else "-")
        row += [
            human_bytes(s["bytes"]["sent_per_worker"]),
            human_bytes(s["bytes"]["sent_per_worker"] / max(s["steps_run"], 1)),
            human_bytes(hit.sent) if hit else "not reached",
            _seconds(hit.time) if hit else "-",
            str(s["steps_run"]),
            _seconds(s["wall_time"]),
        ]
        rows.append(row)
    return _format_table(head, rows)
