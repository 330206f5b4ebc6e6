r"""What every rank runs: the training loop behind ``commlmo train``.

Start it with the CLI, which starts the workers itself (torch's elastic launcher)::

    commlmo train examples/mnist1d_cnn.yaml --nproc 4

or with ``torchrun``, one process per rank (``--nproc`` is then ignored)::

    torchrun --standalone --nproc_per_node 4 -m commlmo train examples/mnist1d_cnn.yaml

Each rank builds the same model from the same seed and its own shard of every
global batch, and runs::

    loss, metrics = task.loss(task.train_batch(step))   # this rank's shard
    loss.backward()                                     # local gradient; no DDP
    opt.step()                                          # the optimizer aggregates across ranks
    scheduler.step()                                    # torch.optim.lr_scheduler.LambdaLR (train.schedule)

``opt.step()`` is the only communication of a step; its bytes are what the
optimizer's :class:`~commlmo.comm.ByteCounter` measured from the tensors it
handed to the collectives.  Rank 0 also evaluates every ``eval_every`` steps
(the other ranks wait for it inside the next step's collectives), writes one
JSON line per step to ``metrics.jsonl`` and draws the progress bar.  At the
end every rank's byte totals are gathered into ``summary.json``.

The loop is :class:`RankRun`: :meth:`~RankRun.train_step`,
:meth:`~RankRun.evaluate`, :meth:`~RankRun.log_step`,
:meth:`~RankRun.checkpoint` and :meth:`~RankRun.summary`, called in turn by
:meth:`~RankRun.run`.

With ``train.checkpoint_every: k`` every rank writes its own checkpoint every
``k`` steps (:mod:`commlmo.checkpoint`); ``resume=True`` continues from the
newest one every rank holds intact, bitwise as if never interrupted (a run the
launcher restarted, ``train.max_restarts``, resumes the same way).  A collective
that fails because another rank died or hung (after at most
``train.collective_timeout_s``) ends the rank with a
:class:`~commlmo.errors.DistributedError` that says so and names the last
checkpoint.  ``train.adversaries`` makes chosen ranks Byzantine, and
``train.stop_after`` and ``train.fault`` are testing hooks (see
docs/reliability.md).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint
from .errors import CommlmoError, ConfigError, DistributedError
from .launch import restart_count
from .metrics import MetricsWriter, human_bytes
from .optimizer import CommOptimizer, build_optimizer
from .runconfig import FaultConfig, RunConfig, load_run_config
from .tasks import Task, build_task, prepare_task

__all__ = ["run_rank", "run_many", "RankRun"]


def _device(cfg: RunConfig, rank: int) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DistributedError("train.device = 'cuda' but CUDA is not available; use device: cpu or auto")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return torch.device("cpu")


def _odd_ones_out(values: list[Any]) -> tuple[list[int], str]:
    """The ranks whose value differs from the majority's, and how to say it (all ranks when no majority)."""
    counts = Counter(map(repr, values))
    top, n = counts.most_common(1)[0]
    if n * 2 > len(values):
        bad = [r for r, v in enumerate(values) if repr(v) != top]
        return bad, f"rank(s) {', '.join(map(str, bad))} differ from the other {n}"
    groups: dict[str, list[int]] = {}
    for r, v in enumerate(values):
        groups.setdefault(repr(v), []).append(r)
    return list(range(len(values))), ("no majority: " + " / ".join(
        "ranks " + ", ".join(map(str, g)) for g in groups.values()) + " each agree only among themselves")


def _check_same_model(model: torch.nn.Module, *, resumed: bool = False) -> None:
    """Every rank must hold the same weights: the optimizer keeps them equal, it cannot make them so."""
    with torch.no_grad():
        mine = [float(p.double().sum()) + float(p.double().square().sum()) for p in model.parameters()]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if any(e != everyone[0] for e in everyone):
        _, who = _odd_ones_out(everyone)
        if resumed:
            raise DistributedError(
                f"the ranks loaded different weights from their checkpoints ({who}); the checkpoint files "
                "under <out>/checkpoints/rank*/ do not belong to one run"
            )
        raise DistributedError(
            f"the ranks built different initial models ({who}); the task must build its model "
            "from the seed alone (torch.manual_seed(seed) before creating the layers)"
        )


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every rank (one byte; outside the optimizer's accounting)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.uint8, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


@dataclass
class _Progress:
    """The run loop's counters: what a checkpoint saves besides the model, optimizer, scheduler and task."""

    step: int = 0
    train_time: float = 0.0
    sent_total: int = 0
    received_total: int = 0
    ema_loss: float = math.nan
    last_eval: dict[str, float] = field(default_factory=dict)
    best_eval: float = math.inf
    stopped_at_target: bool = False
    wall_time: float = 0.0  # of the steps kept: time lost to an interruption is not counted
    resumed_from: list[int] = field(default_factory=list)


@dataclass
class StepResult:
    """What one training step measured."""

    loss: float
    metrics: dict[str, float]
    lr: float
    sent: int
    received: int
    step_time: float
    opt_time: float
    skipped: bool


def _comparable(cfg: RunConfig, opt: CommOptimizer) -> dict[str, Any]:
    return checkpoint.comparable_config(cfg.model_dump(mode="json"), opt.config.model_dump(mode="json"))


def _resume_hint(out_dir: str | None, rank: int, world_size: int, tc: Any) -> str:
    if not out_dir:
        return ""
    if not tc.checkpoint_every:
        return "No checkpoint is written (train.checkpoint_every = 0), so the run cannot be resumed."
    step = checkpoint.latest_common(out_dir, world_size)
    if step is None:
        mine = checkpoint.steps_held(out_dir, rank)
        if not mine:
            return f"No checkpoint under {Path(out_dir) / checkpoint.CHECKPOINTS} yet."
        # the other ranks' files are elsewhere (no shared filesystem): --resume agrees on the step
        return (f"This rank's newest checkpoint is step {mine[-1]}; continue with: "
                f"{checkpoint.resume_command(out_dir, tc)}")
    return f"The last complete checkpoint is step {step}; continue with: {checkpoint.resume_command(out_dir, tc)}"


_LOST = re.compile(r"gloo|nccl|connection|timed out|timeout|peer|socket|broken pipe", re.IGNORECASE)


def _lost_contact(exc: RuntimeError) -> bool:
    """Whether a collective failed because another rank is gone (gloo raises a bare RuntimeError)."""
    if isinstance(exc, CommlmoError):
        return False
    return isinstance(exc, dist.DistError) or bool(dist.is_initialized() and _LOST.search(str(exc)))


def _fail(fault: FaultConfig, rank: int) -> None:
    """The ``train.fault`` testing hook: die at once, as a crash would, or stop answering."""
    print(f"commlmo: rank {rank}: train.fault: {fault.kind} at step {fault.at_step} (testing hook)",
          file=sys.stderr, flush=True)
    if fault.kind == "exit":
        os._exit(1)
    while True:
        time.sleep(3600)


# ----------------------------------------------------------------------------- the run


class RankRun:
    """One rank's run: built from the config, then :meth:`run` calls the pieces below in turn."""

    def __init__(self, rank: int, world_size: int, cfg: RunConfig, out_dir: str | None, *,
                 progress: bool = True, resume: bool = False):
        self.rank, self.world_size, self.cfg, self.tc = rank, world_size, cfg, cfg.train
        self.out_dir, self.progress, self.resume = out_dir, progress, resume
        self.device = _device(cfg, rank)
        self.distributed = dist.is_initialized()
        tc = self.tc
        if tc.adversaries is not None:
            try:
                tc.adversaries.check(world_size)
            except ValueError as exc:
                raise ConfigError(f"train.adversaries: {exc}") from None
        if (tc.checkpoint_every or resume) and not out_dir:
            raise ConfigError("checkpoints and --resume need an output directory (out_dir)")
        self.task, self.model = self._build_task()
        # the optimizer aggregates across ranks itself, so the model is never wrapped in DDP
        adversary = tc.adversaries.mode_of(rank) if tc.adversaries is not None else None
        self.opt = build_optimizer(self.model, cfg.optimizer_config(), adversary=adversary)
        if rank == 0:
            self._report_routing()
        self.scheduler = tc.schedule.scheduler(self.opt, tc.steps)
        self.comparable = _comparable(cfg, self.opt)
        self.fingerprint = checkpoint.config_fingerprint(self.comparable)
        self.loop = _Progress()
        self.resumed = False
        self.writer: MetricsWriter | None = None
        self.bar: Any = None
        self.stopped_after: int | None = None

    def _report_routing(self) -> None:
        """Where every parameter went: one line per group here, every tensor in ``<out>/routing.txt``."""
        full = self.opt.describe_routing()
        lines = [ln for ln in full.splitlines() if not ln.startswith(" ")]
        where = ""
        if self.out_dir:
            path = Path(self.out_dir) / "routing.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(full + "\n")
            where = f" (every tensor: {path})"
        print(f"commlmo: routing{where}:\n" + "\n".join(f"  {ln}" for ln in lines), flush=True)

    def _build_task(self) -> tuple[Task, torch.nn.Module]:
        """Rank 0 prepares shared files (a generated dataset) first; every rank then builds the same model."""
        if self.rank == 0:
            prepare_task(self.cfg.task)
        if self.distributed:
            dist.barrier()
        task = build_task(self.cfg.task, rank=self.rank, world_size=self.world_size, seed=self.tc.seed,
                          global_batch=self.tc.global_batch)
        task.to(self.device)
        task.model.train()
        if self.distributed:
            _check_same_model(task.model)
        return task, task.model

    # ---- checkpoints

    def snapshot(self) -> dict[str, Any]:
        """Everything this rank needs to continue alone."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": checkpoint.FORMAT, "step": self.loop.step, "world_size": self.world_size,
            "config": self.comparable, "fingerprint": self.fingerprint,
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.scheduler.state_dict(), "task": self.task.state_dict(), "rng": rng,
            "bytes": {k: dict(v) for k, v in self.opt.bytes.total.items()}, "progress": asdict(self.loop),
        }

    def restore(self, state: dict[str, Any]) -> None:
        checkpoint.check_same_run(state, world_size=self.world_size, config=self.comparable)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.opt.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the next step's rate, exactly as the scheduler left it
        self.task.load_state_dict(state["task"])
        for label, row in state["bytes"].items():
            self.opt.bytes.total[label].update(row)
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        for key, value in state["progress"].items():
            setattr(self.loop, key, value)
        self.loop.resumed_from = [*self.loop.resumed_from, self.loop.step]

    def try_resume(self) -> None:
        """Continue from the newest checkpoint every rank holds intact, if there is one."""
        out = self.out_dir
        assert out is not None
        at = checkpoint.agree(out, self.rank, self.world_size, self.fingerprint)
        if at is None:
            if self.rank == 0:
                print(f"commlmo: no checkpoint under {Path(out) / checkpoint.CHECKPOINTS} yet: starting from step 0",
                      file=sys.stderr)
            return
        self.restore(checkpoint.load(out, self.rank, at))
        self.resumed = True
        if self.distributed:
            _check_same_model(self.model, resumed=True)
        if self.rank == 0:
            (Path(out) / "config.yaml").write_text(self.cfg.to_yaml())

    def checkpoint(self, step: int, wall_time: float) -> None:
        """Every ``train.checkpoint_every`` steps: this rank's checkpoint (the ranks meet at a barrier)."""
        if not (self.tc.checkpoint_every and step % self.tc.checkpoint_every == 0):
            return
        self.loop.wall_time = wall_time
        checkpoint.save(self.out_dir, self.rank, step, self.snapshot(),  # type: ignore[arg-type]
                        keep=self.tc.keep_checkpoints, fingerprint=self.fingerprint)

    # ---- one step, one evaluation, one line of metrics

    def train_step(self, step: int) -> StepResult:
        """Forward, backward, the optimizer's step (its collectives) and the scheduler's; ``step`` is 1-based."""
        tc = self.tc
        if tc.fault is not None and tc.fault.rank == self.rank and step == tc.fault.at_step and restart_count() == 0:
            _fail(tc.fault, self.rank)
        t0 = time.perf_counter()
        lr = self.opt.param_groups[0]["lr"]
        loss, metrics = self.task.loss(self.task.train_batch(step - 1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        skipped_before = self.opt.skipped_steps
        self.opt.step()
        self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        loop = self.loop
        loop.step = step
        loop.train_time += t2 - t0
        sent, received = self.opt.bytes.step_sent, self.opt.bytes.step_received
        loop.sent_total += sent
        loop.received_total += received
        value = metrics.pop("loss", None)
        value = float(loss.detach()) if value is None else value
        return StepResult(value, metrics, lr, sent, received, t2 - t0, t2 - t1, self.opt.skipped_steps > skipped_before)

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics on rank 0 (``{}`` elsewhere: the others go on and wait in the next step)."""
        results = {f"eval_{k}": v for k, v in self.task.evaluate().items()} if self.rank == 0 else {}
        self.loop.last_eval = results
        self.loop.best_eval = min(self.loop.best_eval, results.get("eval_loss", math.inf))
        return results

    def due_for_eval(self, step: int) -> bool:
        return step == self.tc.steps or (self.tc.eval_every > 0 and step % self.tc.eval_every == 0)

    def reached_target(self) -> bool:
        """Whether rank 0's last evaluation reached ``train.target_loss`` (``stop_at_target``), on every rank."""
        if not self.tc.stop_at_target:
            return False
        hit = self.rank == 0 and self.loop.last_eval["eval_loss"] <= self.tc.target_loss  # type: ignore[operator]
        self.loop.stopped_at_target = _agree(hit, self.device)
        return self.loop.stopped_at_target

    def log_step(self, step: int, r: StepResult, evaluated: bool) -> None:
        """Rank 0: one line of ``metrics.jsonl`` and the progress bar."""
        if self.rank != 0:
            return
        loop = self.loop
        if math.isfinite(r.loss):  # a skipped non-finite step must not poison the average
            loop.ema_loss = r.loss if math.isnan(loop.ema_loss) else 0.9 * loop.ema_loss + 0.1 * r.loss
        if self.writer:
            self.writer.write({
                "step": step, "loss": r.loss, **r.metrics, "lr": r.lr,
                "sent": r.sent, "received": r.received, "sent_total": loop.sent_total,
                "received_total": loop.received_total, "step_time": r.step_time, "opt_time": r.opt_time,
                "time": loop.train_time, **(loop.last_eval if evaluated else {}),
                **({"skipped": True} if r.skipped else {}),
            })
        if self.bar is not None:
            acc = loop.last_eval.get("eval_acc", r.metrics.get("acc"))
            self.bar.set_postfix_str(
                f"loss {loop.ema_loss:.4g}" + (f" acc {acc:.3f}" if acc is not None else "")
                + f" sent {human_bytes(r.sent)}/step", refresh=False)
            self.bar.update(1)

    def _open_outputs(self) -> None:
        if self.rank != 0:
            return
        if self.out_dir:
            self.writer = MetricsWriter(Path(self.out_dir) / "metrics.jsonl",
                                        resume_after=self.loop.step if self.resumed else None)
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.tc.steps, initial=self.loop.step, desc=self.cfg.label(), unit="step",
                            dynamic_ncols=True, mininterval=0.5)

    # ---- the loop

    def run(self) -> dict[str, Any]:
        """Train to ``train.steps`` (or the target, or ``stop_after``); the summary on rank 0."""
        if self.resume:
            self.try_resume()
        self._open_outputs()
        loop, tc = self.loop, self.tc
        start, wall_before = time.perf_counter(), loop.wall_time
        if not self.resumed:
            self.evaluate()
            if self.writer:
                self.writer.write({"step": 0, "sent_total": 0, "received_total": 0, "time": 0.0, **loop.last_eval})
        step = loop.step
        try:
            for step in range(loop.step + 1, tc.steps + 1):
                result = self.train_step(step)
                evaluated = self.due_for_eval(step)
                if evaluated:
                    self.evaluate()
                    self.reached_target()
                self.log_step(step, result, evaluated)
                if loop.stopped_at_target:
                    break
                self.checkpoint(step, wall_before + time.perf_counter() - start)
                if tc.stop_after is not None and step >= tc.stop_after:
                    self.stopped_after = step
                    break
        except RuntimeError as exc:
            if not _lost_contact(exc):
                raise
            raise DistributedError(
                f"rank {self.rank}: lost contact with another rank in step {step}: it died or stopped answering "
                f"(each collective waits at most train.collective_timeout_s = {tc.collective_timeout_s:g} s). "
                f"{_resume_hint(self.out_dir, self.rank, self.world_size, tc)}\n"
                f"  ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
        finally:
            if self.bar is not None:
                self.bar.close()
        return self.summary(wall_before + time.perf_counter() - start)

    def summary(self, wall_time: float) -> dict[str, Any]:
        """Every rank's byte accounting gathered; rank 0 writes ``summary.json`` and returns it."""
        opt, loop, tc, rank = self.opt, self.loop, self.tc, self.rank
        mine = {"rank": rank, "sent": opt.bytes.total_sent, "received": opt.bytes.total_received,
                "by_collective": {k: dict(v) for k, v in opt.bytes.total.items()}}
        by_rank = _gather(mine)
        if rank != 0:
            return {"rank": rank}
        held = checkpoint.steps_held(self.out_dir, 0) if self.out_dir else []
        summary = {
            "name": self.cfg.label(), "world_size": self.world_size, "steps": tc.steps, "steps_run": loop.step,
            "stopped_at_target": loop.stopped_at_target, "target_loss": tc.target_loss,
            "stopped_after": self.stopped_after, "resumed_from": loop.resumed_from,
            "skipped_steps": opt.skipped_steps, "last_checkpoint": held[-1] if held else None,
            "adversaries": tc.adversaries.model_dump() if tc.adversaries is not None else None,
            "final": {"train_loss_ema": loop.ema_loss, **loop.last_eval}, "best_eval_loss": loop.best_eval,
            "wall_time": wall_time, "train_time": loop.train_time,
            "bytes": {"by_rank": by_rank,
                      "sent_per_worker": max(r["sent"] for r in by_rank),
                      "received_per_worker": max(r["received"] for r in by_rank)},
            "task": self.task.info, "has_accuracy": self.task.has_accuracy,
            "optimizer": opt.config.model_dump(mode="json"), "routing": opt.routing(),
            "backend": dist.get_backend() if self.distributed else "none", "device": str(self.device),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(),
        }
        if self.out_dir:
            (Path(self.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if self.writer:
            self.writer.close()
        return summary


def run_rank(rank: int, world_size: int, raw_config: dict[str, Any], out_dir: str | None,
             progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Train one rank of the run described by ``raw_config``; every rank checkpoints into ``out_dir``,
    rank 0 also writes the metrics and the summary there.

    ``resume`` continues from the newest checkpoint every rank holds intact (from
    step 0 when there is none); so does a run the launcher restarted.  Returns the
    run summary on rank 0 (``{"rank": r}`` elsewhere).  Module-level so
    :func:`commlmo.launch.launch` can start it in fresh processes.
    """
    # torch deprecates the collective commlmo.comm uses; once per rank is noise in every run's output
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    cfg = load_run_config(raw_config)
    resume = resume or restart_count() > 0
    return RankRun(rank, world_size, cfg, out_dir, progress=progress, resume=resume).run()


def run_many(rank: int, world_size: int, jobs: list[tuple[dict[str, Any], str | None]],
             progress: bool = True, resume: bool = False) -> list[dict[str, Any]]:
    """:func:`run_rank` for each ``(raw_config, out_dir)`` in turn, on the same workers."""
    if restart_count() and rank == 0:
        print(f"commlmo: the launcher restarted the workers after a failure (restart {restart_count()}, "
              "train.max_restarts): continuing from the newest intact checkpoint", file=sys.stderr, flush=True)
    return [run_rank(rank, world_size, raw, out, progress, resume) for raw, out in jobs]
