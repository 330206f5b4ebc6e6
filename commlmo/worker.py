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
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import DistributedError
from .metrics import MetricsWriter, human_bytes
from .optimizer import build_optimizer
from .runconfig import RunConfig, load_run_config
from .tasks import build_task, prepare_task

__all__ = ["run_rank", "run_many"]


def _device(cfg: RunConfig, rank: int) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DistributedError("train.device = 'cuda' but CUDA is not available; use device: cpu or auto")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return torch.device("cpu")


def _check_same_init(model: torch.nn.Module) -> None:
    """Every rank must start from the same weights: the optimizer keeps them equal, it cannot make them so."""
    with torch.no_grad():
        mine = [float(p.double().sum()) + float(p.double().square().sum()) for p in model.parameters()]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if any(e != everyone[0] for e in everyone):
        bad = next(r for r, e in enumerate(everyone) if e != everyone[0])
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


def run_rank(rank: int, world_size: int, raw_config: dict[str, Any], out_dir: str | None,
             progress: bool = True) -> dict[str, Any]:
    """Train one rank of the run described by ``raw_config``; rank 0 writes ``out_dir``.

    Returns the run summary on rank 0 (``{"rank": r}`` elsewhere).  Module-level
    so :func:`commlmo.launch.spawn` can start it in fresh processes.
    """
    # torch deprecates the collective commlmo.comm uses; once per rank is noise in every run's output
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    cfg = load_run_config(raw_config)
    tc = cfg.train
    device = _device(cfg, rank)
    distributed = dist.is_initialized()

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
        _check_same_init(model)

    # ---- optimizer: aggregates across ranks itself, so the model is never wrapped in DDP
    opt = build_optimizer(model, cfg.optimizer_config())
    base_lrs = [g["lr"] for g in opt.param_groups]

    writer = MetricsWriter(Path(out_dir) / "metrics.jsonl") if rank == 0 and out_dir else None
    bar = None
    if rank == 0 and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, desc=cfg.label(), unit="step", dynamic_ncols=True, mininterval=0.5)

    def evaluate() -> dict[str, float]:
        return {f"eval_{k}": v for k, v in task.evaluate().items()} if rank == 0 else {}

    start = time.perf_counter()
    train_time, sent_total, received_total = 0.0, 0, 0
    ema_loss, last_eval = math.nan, evaluate()
    best_eval = last_eval.get("eval_loss", math.inf)
    if writer:
        writer.write({"step": 0, "sent_total": 0, "received_total": 0, "time": 0.0, **last_eval})
    stopped_at_target, step = False, 0
    target = tc.target_loss

    for step in range(1, tc.steps + 1):
        t0 = time.perf_counter()
        lr_mult = tc.schedule(step - 1, tc.steps)
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * lr_mult
        loss, metrics = task.loss(task.train_batch(step - 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        train_time += t2 - t0
        sent, received = opt.bytes.step_sent, opt.bytes.step_received
        sent_total += sent
        received_total += received

        evaluated = _due(step, tc)
        if evaluated:
            last_eval = evaluate()  # rank 0 only; the others go on and wait in the next step
            best_eval = min(best_eval, last_eval.get("eval_loss", math.inf))
            if tc.stop_at_target:
                stopped_at_target = _agree(rank == 0 and last_eval["eval_loss"] <= target, device)
        if rank == 0:
            value = metrics.pop("loss", float(loss.detach()))
            ema_loss = value if math.isnan(ema_loss) else 0.9 * ema_loss + 0.1 * value
            if writer:
                writer.write({
                    "step": step, "loss": value, **metrics, "lr": opt.param_groups[0]["lr"],
                    "sent": sent, "received": received, "sent_total": sent_total, "received_total": received_total,
                    "step_time": t2 - t0, "opt_time": t2 - t1, "time": train_time,
                    **(last_eval if evaluated else {}),
                })
            if bar is not None:
                acc = last_eval.get("eval_acc", metrics.get("acc"))
                bar.set_postfix_str(
                    f"loss {ema_loss:.4g}" + (f" acc {acc:.3f}" if acc is not None else "")
                    + f" sent {human_bytes(sent)}/step", refresh=False)
                bar.update(1)
        if stopped_at_target:
            break
    wall_time = time.perf_counter() - start
    if bar is not None:
        bar.close()

    # ---- every rank's own byte accounting, gathered for the summary
    mine = {"rank": rank, "sent": opt.bytes.total_sent, "received": opt.bytes.total_received,
            "by_collective": {k: dict(v) for k, v in opt.bytes.total.items()}}
    by_rank = _gather(mine)
    if rank != 0:
        return {"rank": rank}
    summary = {
        "name": cfg.label(), "world_size": world_size, "steps": tc.steps, "steps_run": step,
        "stopped_at_target": stopped_at_target, "target_loss": target,
        "final": {"train_loss_ema": ema_loss, **last_eval}, "best_eval_loss": best_eval,
        "wall_time": wall_time, "train_time": train_time,
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
             progress: bool = True) -> list[dict[str, Any]]:
    """:func:`run_rank` for each ``(raw_config, out_dir)`` in turn, on the same workers."""
    return [run_rank(rank, world_size, raw, out if rank == 0 else None, progress) for raw, out in jobs]
