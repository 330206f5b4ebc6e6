r"""What every rank runs: the training loop behind ``commlmo train``.

Start it with the CLI, which spawns the workers itself::

    commlmo train examples/mnist1d_cnn.yaml --nproc 4

or with ``torchrun``, one process per rank (``--nproc`` is then ignored)::

    torchrun --standalone --nproc_per_node 4 -m commlmo train examples/mnist1d_cnn.yaml

Each rank builds the same model from the same seed and its own shard of every
global batch, and runs::

    loss, metrics = task.loss(task.train_batch(step))   # this rank's shard
    loss.backward()                                     # local gradient; no DDP
    opt.step()                                          # the optimizer aggregates across ranks

``opt.step()`` is the only communication of a step; its bytes are what the
optimizer's :class:`~commlmo.comm.ByteCounter` measured from the tensors it
handed to the collectives.  Rank 0 also evaluates every ``eval_every`` steps
(the other ranks wait for it inside the next step's collectives), writes one
JSON line per step to ``metrics.jsonl`` and draws the progress bar.  At the
end every rank's byte totals are gathered into ``summary.json``.

With ``train.checkpoint_every: k`` every rank writes its own checkpoint every
``k`` steps (:mod:`commlmo.checkpoint`); ``resume=True`` continues from the
newest one every rank holds, bitwise as if never interrupted.  A collective
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint
from .errors import CommlmoError, ConfigError, DistributedError
from .metrics import MetricsWriter, human_bytes
from .optimizer import CommOptimizer, build_optimizer
from .runconfig import FaultConfig, RunConfig, load_run_config
from .tasks import Task, build_task, prepare_task

__all__ = ["run_rank", "run_many"]


def _device(cfg: RunConfig, rank: int) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DistributedError("train.device = 'cuda' but CUDA is not available; use device: cpu or auto")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return torch.device("cpu")


def _check_same_model(model: torch.nn.Module, *, resumed: bool = False) -> None:
    """Every rank must hold the same weights: the optimizer keeps them equal, it cannot make them so."""
    with torch.no_grad():
        mine = [float(p.double().sum()) + float(p.double().square().sum()) for p in model.parameters()]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if any(e != everyone[0] for e in everyone):
        bad = next(r for r, e in enumerate(everyone) if e != everyone[0])
        if resumed:
            raise DistributedError(
                f"rank {bad} loaded different weights from its checkpoint than rank 0; the checkpoint files "
                "under <out>/checkpoints/rank*/ do not belong to one run"
            )
        raise DistributedError(
            f"rank {bad} built a different initial model than rank 0; the task must build its model "
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
    """The run loop's counters: what a checkpoint saves besides the model, optimizer and task."""

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


# ----------------------------------------------------------------------------- checkpoints


def _comparable(cfg: RunConfig, opt: CommOptimizer) -> dict[str, Any]:
    return checkpoint.comparable_config(cfg.model_dump(mode="json"), opt.config.model_dump(mode="json"))


def _snapshot(cfg: RunConfig, opt: CommOptimizer, model: torch.nn.Module, task: Task, loop: _Progress,
              world_size: int) -> dict[str, Any]:
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "format": 1, "step": loop.step, "world_size": world_size, "config": _comparable(cfg, opt),
        "model": model.state_dict(), "optimizer": opt.state_dict(), "task": task.state_dict(), "rng": rng,
        "bytes": {k: dict(v) for k, v in opt.bytes.total.items()}, "progress": asdict(loop),
    }


def _restore(state: dict[str, Any], cfg: RunConfig, opt: CommOptimizer, model: torch.nn.Module, task: Task,
             loop: _Progress, world_size: int) -> None:
    checkpoint.check_same_run(state, world_size=world_size, config=_comparable(cfg, opt))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    task.load_state_dict(state["task"])
    for label, row in state["bytes"].items():
        opt.bytes.total[label].update(row)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    for key, value in state["progress"].items():
        setattr(loop, key, value)
    loop.resumed_from = [*loop.resumed_from, loop.step]


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


def run_rank(rank: int, world_size: int, raw_config: dict[str, Any], out_dir: str | None,
             progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Train one rank of the run described by ``raw_config``; every rank checkpoints into ``out_dir``,
    rank 0 also writes the metrics and the summary there.

    ``resume`` continues from the newest checkpoint every rank holds (from step 0
    when there is none).  Returns the run summary on rank 0 (``{"rank": r}``
    elsewhere).  Module-level so :func:`commlmo.launch.spawn` can start it in
    fresh processes.
    """
    # torch deprecates the collective commlmo.comm uses; once per rank is noise in every run's output
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    cfg = load_run_config(raw_config)
    tc = cfg.train
    device = _device(cfg, rank)
    distributed = dist.is_initialized()
    if tc.adversaries is not None:
        try:
            tc.adversaries.check(world_size)
        except ValueError as exc:
            raise ConfigError(f"train.adversaries: {exc}") from None
    if (tc.checkpoint_every or resume) and not out_dir:
        raise ConfigError("checkpoints and --resume need an output directory (out_dir)")

    # ---- task and model: rank 0 prepares shared files (a generated dataset) first
    if rank == 0:
        prepare_task(cfg.task)
    if distributed:
        dist.barrier()
    task = build_task(cfg.task, rank=rank, world_size=world_size, seed=tc.seed, global_batch=tc.global_batch)
    task.to(device)
    model = task.model
    model.train()
    if distributed:
        _check_same_model(model)

    # ---- optimizer: aggregates across ranks itself, so the model is never wrapped in DDP
    adversary = tc.adversaries.mode_of(rank) if tc.adversaries is not None else None
    opt = build_optimizer(model, cfg.optimizer_config(), adversary=adversary)
    base_lrs = [g["lr"] for g in opt.param_groups]

    loop = _Progress()
    resumed = False
    if resume:
        at = checkpoint.agree(out_dir, rank, world_size)  # type: ignore[arg-type]
        if at is not None:
            _restore(checkpoint.load(out_dir, rank, at), cfg, opt, model, task, loop, world_size)  # type: ignore[arg-type]
            resumed = True
            if distributed:
                _check_same_model(model, resumed=True)
            if rank == 0:
                (Path(out_dir) / "config.yaml").write_text(cfg.to_yaml())  # type: ignore[arg-type]
        elif rank == 0:
            print(f"commlmo: no checkpoint under {Path(out_dir) / checkpoint.CHECKPOINTS} yet: "  # type: ignore[arg-type]
                  "starting from step 0", file=sys.stderr)

    writer = None
    if rank == 0 and out_dir:
        writer = MetricsWriter(Path(out_dir) / "metrics.jsonl", resume_after=loop.step if resumed else None)
    bar = None
    if rank == 0 and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, initial=loop.step, desc=cfg.label(), unit="step", dynamic_ncols=True,
                   mininterval=0.5)

    def evaluate() -> dict[str, float]:
        return {f"eval_{k}": v for k, v in task.evaluate().items()} if rank == 0 else {}

    start, wall_before = time.perf_counter(), loop.wall_time
    if not resumed:
        loop.last_eval = evaluate()
        loop.best_eval = loop.last_eval.get("eval_loss", math.inf)
        if writer:
            writer.write({"step": 0, "sent_total": 0, "received_total": 0, "time": 0.0, **loop.last_eval})
    target, stopped_after = tc.target_loss, None

    step = loop.step
    try:
        for step in range(loop.step + 1, tc.steps + 1):
            if tc.fault is not None and tc.fault.rank == rank and step == tc.fault.at_step:
                _fail(tc.fault, rank)
            t0 = time.perf_counter()
            lr_mult = tc.schedule(step - 1, tc.steps)
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * lr_mult
            loss, metrics = task.loss(task.train_batch(step - 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t1 = time.perf_counter()
            skipped_before = opt.skipped_steps
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t2 = time.perf_counter()
            loop.step = step
            loop.train_time += t2 - t0
            sent, received = opt.bytes.step_sent, opt.bytes.step_received
            loop.sent_total += sent
            loop.received_total += received

            evaluated = _due(step, tc)
            if evaluated:
                loop.last_eval = evaluate()  # rank 0 only; the others go on and wait in the next step
                loop.best_eval = min(loop.best_eval, loop.last_eval.get("eval_loss", math.inf))
                if tc.stop_at_target:
                    loop.stopped_at_target = _agree(rank == 0 and loop.last_eval["eval_loss"] <= target, device)
            if rank == 0:
                value = metrics.pop("loss", float(loss.detach()))
                if math.isfinite(value):  # a skipped non-finite step must not poison the average
                    loop.ema_loss = value if math.isnan(loop.ema_loss) else 0.9 * loop.ema_loss + 0.1 * value
                if writer:
                    writer.write({
                        "step": step, "loss": value, **metrics, "lr": opt.param_groups[0]["lr"],
                        "sent": sent, "received": received, "sent_total": loop.sent_total,
                        "received_total": loop.received_total, "step_time": t2 - t0, "opt_time": t2 - t1,
                        "time": loop.train_time, **(loop.last_eval if evaluated else {}),
                        **({"skipped": True} if opt.skipped_steps > skipped_before else {}),
                    })
                if bar is not None:
                    acc = loop.last_eval.get("eval_acc", metrics.get("acc"))
                    bar.set_postfix_str(
                        f"loss {loop.ema_loss:.4g}" + (f" acc {acc:.3f}" if acc is not None else "")
                        + f" sent {human_bytes(sent)}/step", refresh=False)
                    bar.update(1)
            if loop.stopped_at_target:
                break
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                loop.wall_time = wall_before + time.perf_counter() - start
                checkpoint.save(out_dir, rank, step, _snapshot(cfg, opt, model, task, loop, world_size),  # type: ignore[arg-type]
                                keep=tc.keep_checkpoints)
            if tc.stop_after is not None and step >= tc.stop_after:
                stopped_after = step
                break
    except RuntimeError as exc:
        if not _lost_contact(exc):
            raise
        raise DistributedError(
            f"rank {rank}: lost contact with another rank in step {step}: it died or stopped answering (each "
            f"collective waits at most train.collective_timeout_s = {tc.collective_timeout_s:g} s). "
            f"{_resume_hint(out_dir, rank, world_size, tc)}\n"
            f"  ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    wall_time = wall_before + time.perf_counter() - start
    if bar is not None:
        bar.close()

    # ---- every rank's own byte accounting, gathered for the summary
    mine = {"rank": rank, "sent": opt.bytes.total_sent, "received": opt.bytes.total_received,
            "by_collective": {k: dict(v) for k, v in opt.bytes.total.items()}}
    by_rank = _gather(mine)
    if rank != 0:
        return {"rank": rank}
    held = checkpoint.steps_held(out_dir, 0) if out_dir else []
    summary = {
        "name": cfg.label(), "world_size": world_size, "steps": tc.steps, "steps_run": loop.step,
        "stopped_at_target": loop.stopped_at_target, "target_loss": target,
        "stopped_after": stopped_after, "resumed_from": loop.resumed_from, "skipped_steps": opt.skipped_steps,
        "last_checkpoint": held[-1] if held else None,
        "adversaries": tc.adversaries.model_dump() if tc.adversaries is not None else None,
        "final": {"train_loss_ema": loop.ema_loss, **loop.last_eval}, "best_eval_loss": loop.best_eval,
        "wall_time": wall_time, "train_time": loop.train_time,
        "bytes": {"by_rank": by_rank,
                  "sent_per_worker": max(r["sent"] for r in by_rank),
                  "received_per_worker": max(r["received"] for r in by_rank)},
        "task": task.info, "has_accuracy": task.has_accuracy,
        "optimizer": opt.config.model_dump(mode="json"), "routing": opt.routing(),
        "backend": dist.get_backend() if distributed else "none", "device": str(device),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    if out_dir:
        (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if writer:
        writer.close()
    return summary


def _due(step: int, tc: Any) -> bool:
    return step == tc.steps or (tc.eval_every > 0 and step % tc.eval_every == 0)


def run_many(rank: int, world_size: int, jobs: list[tuple[dict[str, Any], str | None]],
             progress: bool = True, resume: bool = False) -> list[dict[str, Any]]:
    """:func:`run_rank` for each ``(raw_config, out_dir)`` in turn, on the same workers."""
    return [run_rank(rank, world_size, raw, out, progress, resume) for raw, out in jobs]
