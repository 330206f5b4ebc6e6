"""PNG plots of one run (``curves.png``) and of a comparison (``compare.png``).

Drawn with matplotlib's object API on the Agg canvas, so nothing touches
pyplot's global state or needs a display.
"""

from __future__ import annotations

import math
from pathlib import Path

from .metrics import RunResult

__all__ = ["plot_run", "plot_compare"]


def _figure(ncols: int, nrows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * ncols, 3.8 * nrows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    return fig, axes


def _ema(values: list[float], beta: float = 0.95) -> list[float]:
    out, m = [], math.nan
    for v in values:
        m = v if math.isnan(m) else beta * m + (1 - beta) * v
        out.append(m)
    return out


def _loss_scale(ax, values: list[float]) -> None:
    pos = [v for v in values if v > 0 and math.isfinite(v)]
    if pos and max(pos) / min(pos) > 100:
        ax.set_yscale("log")


def _mib(n: float) -> float:
    return n / 2**20


def plot_run(run: RunResult, path: str | Path) -> Path:
    """Loss against steps, loss against bytes sent per worker, and accuracy (when the task has it)."""
    steps = [r for r in run.records if "loss" in r]
    evals = run.evals
    ncols = 3 if run.has_accuracy else 2
    fig, (ax_step, ax_bytes, *rest) = _figure(ncols)

    xs = [r["step"] for r in steps]
    ax_step.plot(xs, [r["loss"] for r in steps], color="C0", alpha=0.25, lw=0.8, label="train (rank 0 shard)")
    ax_step.plot(xs, _ema([r["loss"] for r in steps]), color="C0", lw=1.5, label="train, smoothed")
    ax_step.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="C3", ms=3, label="eval")
    _loss_scale(ax_step, [r["loss"] for r in steps] + [r["eval_loss"] for r in evals])
    ax_step.set(xlabel="step", ylabel="loss", title=f"{run.name}: loss")
    ax_step.legend(fontsize=8)

    ev = [r for r in evals if r["sent_total"] > 0]
    if ev:
        ax_bytes.plot([_mib(r["sent_total"]) for r in ev], [r["eval_loss"] for r in ev], "o-", color="C3", ms=3)
        ax_bytes.set_xscale("log")
        _loss_scale(ax_bytes, [r["eval_loss"] for r in ev])
    else:
        ax_bytes.text(0.5, 0.5, "nothing communicated\n(one worker)", ha="center", va="center", transform=ax_bytes.transAxes)
    ax_bytes.set(xlabel="MiB sent per worker (cumulative)", ylabel="eval loss", title="loss vs bytes communicated")

    if rest:
        ax_acc = rest[0]
        if steps and "acc" in steps[0]:
            ax_acc.plot(xs, _ema([r["acc"] for r in steps]), color="C0", lw=1.2, label="train, smoothed")
        ax_acc.plot([r["step"] for r in evals], [r.get("eval_acc", math.nan) for r in evals], "o-",
                    color="C3", ms=3, label="eval")
        ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy")
        ax_acc.legend(fontsize=8)
    for ax in fig.axes:
        ax.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path)
    return path


def plot_compare(runs: list[RunResult], path: str | Path, *, target: float | None = None, title: str = "") -> Path:
    """Every run on shared axes: eval loss against steps, bytes sent per worker and training time; accuracy."""
    acc = any(r.has_accuracy for r in runs)
    fig, axes = _figure(2, 2)
    ax_step, ax_bytes, ax_time, ax_last = axes
    all_losses = [r["eval_loss"] for run in runs for r in run.evals]
    for i, run in enumerate(runs):
        ev, color = run.evals, f"C{i}"
        ax_step.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "-", color=color, label=run.name)
        sent = [r for r in ev if r["sent_total"] > 0]
        ax_bytes.plot([_mib(r["sent_total"]) for r in sent], [r["eval_loss"] for r in sent], "-", color=color, label=run.name)
        ax_time.plot([r["time"] for r in ev], [r["eval_loss"] for r in ev], "-", color=color, label=run.name)
        if acc:
            ax_last.plot([r["step"] for r in ev], [r.get("eval_acc", math.nan) for r in ev], "-", color=color, label=run.name)
        else:
            steps = [r for r in run.records if "loss" in r]
            ax_last.plot([r["step"] for r in steps], _ema([r["loss"] for r in steps]), "-", color=color, label=run.name)
    for ax in (ax_step, ax_bytes, ax_time):
        _loss_scale(ax, all_losses)
        if target is not None and math.isfinite(target):
            ax.axhline(target, color="gray", ls="--", lw=0.8, label=f"target {target:.4g}")
    if any(r["sent_total"] > 0 for run in runs for r in run.evals):
        ax_bytes.set_xscale("log")
    else:
        ax_bytes.text(0.5, 0.5, "nothing communicated\n(one worker)", ha="center", va="center",
                      transform=ax_bytes.transAxes)
    ax_step.set(xlabel="step", ylabel="eval loss", title="loss vs steps")
    ax_bytes.set(xlabel="MiB sent per worker (cumulative)", ylabel="eval loss", title="loss vs bytes communicated")
    ax_time.set(xlabel="training time (s)", ylabel="eval loss", title="loss vs wall-clock")
    if acc:
        ax_last.set(xlabel="step", ylabel="eval accuracy", title="accuracy")
    else:
        _loss_scale(ax_last, all_losses)
        ax_last.set(xlabel="step", ylabel="train loss (smoothed)", title="train loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path)
    return path
