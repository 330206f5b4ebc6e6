r"""``commlmo train`` and ``commlmo compare``: start the workers, then report.

    commlmo train examples/mnist1d_cnn.yaml --nproc 4          # spawns 4 local workers
    commlmo train examples/matrix.yaml --steps 100 --set task.noise=0.1
    commlmo compare signmuon muon signsgd --task mnist1d-cnn --nproc 4
    commlmo compare examples/mnist1d_cnn.yaml runs/other.yaml
    torchrun --standalone --nproc_per_node 4 -m commlmo train examples/mnist1d_cnn.yaml
    commlmo train examples/mnist1d_cnn.yaml --out runs/cnn --set train.checkpoint_every=100
    commlmo train examples/mnist1d_cnn.yaml --out runs/cnn --resume   # after an interruption

Without ``torchrun`` the command starts ``--nproc`` (or ``train.nproc``) worker
processes on this machine joined by a process group (gloo on 127.0.0.1, NCCL
when CUDA is present) and runs :func:`commlmo.worker.run_rank` in each; under
``torchrun`` the process is one rank.  Rank 0 writes ``metrics.jsonl`` and
``summary.json`` into the run directory; this module then prints the summary
table and draws the plots from those files.

With ``train.checkpoint_every`` every rank checkpoints into ``<out>/checkpoints``;
``--resume`` continues the run in ``--out`` (default: the newest ``runs/<name>-*``
with a checkpoint) from the newest checkpoint every rank holds, bitwise as if it
had never stopped.  Under ``torchrun --max-restarts`` pass ``--out`` and
``--resume`` from the first attempt: a run with no checkpoint yet starts at step 0.

The same from Python::

    from commlmo.train import train, compare
    run = train("examples/mnist1d_cnn.yaml", nproc=4, out="runs/cnn")
    runs = compare(["signmuon", "muon"], task="mnist1d-cnn", nproc=4)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINTS, latest_common, resume_command
from .errors import ConfigError, DistributedError
from .launch import default_backend, init_from_env, launched_by_torchrun, spawn
from .metrics import RunResult, compare_table, default_target, load_run, run_table
from .runconfig import TASKS, RunConfig, is_run_config, load_run_config
from .tasks import shard_size

__all__ = ["train", "compare", "add_cli"]


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _launch(jobs: list[tuple[RunConfig, Path]], *, progress: bool, resume: bool = False) -> bool:
    """Run each ``(config, out)`` in turn on one set of workers; True where this process holds the results.

    The workers are started once for all the jobs (a comparison pays the process
    start-up once), so every job must ask for the same number of workers.
    """
    from .worker import run_many

    nprocs = {cfg.train.nproc for cfg, _ in jobs}
    backends = {cfg.train.backend for cfg, _ in jobs}
    if len(nprocs) > 1 or len(backends) > 1:  # cannot share the workers: one launch per job
        return all([_launch([job], progress=progress, resume=resume) for job in jobs])
    first = jobs[0][0].train
    payload = [(cfg.model_dump(mode="json"), str(out)) for cfg, out in jobs]
    if launched_by_torchrun():
        import torch.distributed as dist

        rank, world = init_from_env(backend=None if first.backend == "auto" else first.backend,
                                    timeout_s=first.collective_timeout_s)
        shared = [payload]
        dist.broadcast_object_list(shared, src=0)  # rank 0's output directories (a time stamp may differ)
        payload = shared[0]
        for (cfg, _), (_, out) in zip(jobs, payload):
            shard_size(cfg.train.global_batch, world)
            if rank == 0:
                _write_config(cfg, Path(out), resume)
        try:
            run_many(rank, world, payload, progress, resume)
        finally:  # a rank that exits with the group alive can abort in gloo's threads
            dist.destroy_process_group()
        return rank == 0
    for cfg, out in jobs:
        shard_size(cfg.train.global_batch, cfg.train.nproc)  # fail here, not in every worker
        _write_config(cfg, out, resume)
    if first.nproc == 1:  # in this process, on one thread like each spawned worker
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run_many(0, 1, payload, progress, resume)
        finally:
            torch.set_num_threads(threads)
        return True
    backend = default_backend() if first.backend == "auto" else first.backend
    timeout = sum(cfg.train.timeout_s for cfg, _ in jobs)
    try:
        spawn(run_many, first.nproc, payload, progress, resume, backend=backend, timeout_s=timeout,
              collective_timeout_s=first.collective_timeout_s)
    except DistributedError as exc:
        raise DistributedError(f"{exc}\n{_checkpoint_note(jobs)}") from None
    return True


def _write_config(cfg: RunConfig, out: Path, resume: bool) -> None:
    """``config.yaml`` of a new run; a resumed run's is rewritten by rank 0 once its checkpoint accepted the config."""
    out.mkdir(parents=True, exist_ok=True)
    if not (resume and (out / "config.yaml").exists()):
        (out / "config.yaml").write_text(cfg.to_yaml())


def _checkpoint_note(jobs: list[tuple[RunConfig, Path]]) -> str:
    """Where each run stands on disk after a failed launch, and the command that continues it."""
    lines = []
    for cfg, out in jobs:
        if not (out / "metrics.jsonl").exists():
            continue  # never started
        if (out / "summary.json").exists():
            done = json.loads((out / "summary.json").read_text())
            if done.get("steps_run") == cfg.train.steps or done.get("stopped_at_target"):
                continue  # finished before the failure
        step = latest_common(out, cfg.train.nproc) if cfg.train.checkpoint_every else None
        if step is None:
            why = "checkpoint_every = 0" if not cfg.train.checkpoint_every else "none complete yet"
            lines.append(f"{cfg.label()}: no checkpoint to resume from ({why})")
        else:
            lines.append(f"{cfg.label()}: last complete checkpoint: step {step} in {out / CHECKPOINTS}; continue with "
                         f"`{resume_command(out, cfg.train)}`")
    return "\n".join(lines)


def _latest_run(cfg: RunConfig) -> Path:
    """The newest ``runs/<name>-<time>`` holding a checkpoint, for ``--resume`` without ``--out``."""
    stamped = re.compile(rf"{re.escape(cfg.label())}-\d{{8}}-\d{{6}}")  # as _stamp() names them
    runs = sorted(p for p in Path("runs").glob(f"{cfg.label()}-*") if stamped.fullmatch(p.name))
    for run in reversed(runs):
        if (run / CHECKPOINTS).is_dir():
            return run
    raise ConfigError(
        f"--resume: no run of {cfg.label()!r} with checkpoints under runs/ (looked for runs/{cfg.label()}-*/"
        f"{CHECKPOINTS}); name the run directory with --out"
    )


def _report_run(run: RunResult, cfg: RunConfig) -> None:
    from .plots import plot_run

    print(run_table(run))
    if run.summary.get("stopped_after") is not None:
        ckpt = run.summary.get("last_checkpoint")
        print(f"\nstopped after step {run.summary['stopped_after']} (train.stop_after); "
              + (f"continue from step {ckpt} with: {resume_command(run.path, cfg.train)}"
                 if ckpt is not None else "no checkpoint to continue from"))
    png = plot_run(run, run.path / "curves.png")
    print(f"\nmetrics: {run.path / 'metrics.jsonl'}\nsummary: {run.path / 'summary.json'}\nplots:   {png}")


def _world_overrides(overrides: Mapping[str, Any] | None, nproc: int | None) -> dict[str, Any]:
    """``train.nproc`` from ``--nproc``, or from ``WORLD_SIZE`` under torchrun (which decides it)."""
    out = dict(overrides or {})
    if launched_by_torchrun():
        out["train.nproc"] = int(os.environ["WORLD_SIZE"])
    elif nproc is not None:
        out["train.nproc"] = nproc
    return out


def train(config: Any, *, nproc: int | None = None, out: str | Path | None = None,
          overrides: Mapping[str, Any] | None = None, progress: bool = True, report: bool = True,
          resume: bool = False) -> RunResult | None:
    """Train one run config (path or mapping); returns the run read back from ``out`` (``None`` on ranks > 0).

    ``resume=True`` continues the run in ``out`` (default: the newest ``runs/<name>-*``
    holding a checkpoint) from its newest checkpoint; with none there yet it starts at step 0.
    """
    cfg = load_run_config(config, _world_overrides(overrides, nproc))
    if out:
        out = Path(out)
    elif resume:
        out = _latest_run(cfg)
    else:
        out = Path("runs") / f"{cfg.label()}-{_stamp()}"
    if not _launch([(cfg, out)], progress=progress, resume=resume):
        return None
    run = load_run(out)
    if report:
        _report_run(run, cfg)
    return run


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


def compare_configs(sources: Sequence[Any], *, task: str | None = None, nproc: int | None = None,
                    overrides: Mapping[str, Any] | None = None) -> list[RunConfig]:
    """Run configs for ``sources``: run configs as they are, optimizers (presets, files) on ``task``."""
    overrides = _world_overrides(overrides, nproc)
    template: dict[str, Any] | None = None
    if task is not None:
        if task in TASKS:
            template = json.loads(json.dumps(TASKS[task]))
        elif is_run_config(task):
            template = load_run_config(task).model_dump(mode="json", exclude={"name", "optimizer"})
        else:
            raise ConfigError(
                f"--task {task!r}: neither a named task ({', '.join(TASKS)}) nor a run config file with a 'task' section"
            )
    configs = []
    for src in sources:
        if is_run_config(src):
            configs.append(load_run_config(src, overrides))
            continue
        if template is None:
            raise ConfigError(
                f"{src!r} is an optimizer, not a run config: name the task with --task "
                f"({', '.join(TASKS)}, or a run config file)"
            )
        name = Path(str(src)).stem if isinstance(src, str) else None
        configs.append(load_run_config({**template, "optimizer": src, "name": name}, overrides))
    names = _unique([c.label() for c in configs])
    return [c.model_copy(update={"name": n}) for c, n in zip(configs, names)]


def compare(sources: Sequence[Any], *, task: str | None = None, nproc: int | None = None,
            out: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
            target_loss: float | None = None, progress: bool = True, report: bool = True,
            resume: bool = False) -> list[RunResult] | None:
    """Run each source on the same task and seed; print one table and draw one plot of all runs.

    ``resume=True`` continues every run under ``out`` from its newest checkpoint.
    """
    if not sources:
        raise ConfigError("compare needs at least one config or preset")
    configs = compare_configs(sources, task=task, nproc=nproc, overrides=overrides)
    if resume and not out:
        raise ConfigError("compare --resume needs --out: the directory of the comparison to continue")
    out = Path(out) if out else Path("runs") / f"compare-{_stamp()}"
    tasks = {json.dumps(c.task.model_dump(mode="json"), sort_keys=True) for c in configs}
    seeds = {c.train.seed for c in configs}
    if (len(tasks) > 1 or len(seeds) > 1) and _is_rank0():
        print("commlmo compare: note: the runs differ in task or seed, so the table compares more than the optimizer",
              file=sys.stderr)
    if not _launch([(cfg, out / cfg.label()) for cfg in configs], progress=progress, resume=resume):
        return None
    runs = [load_run(out / c.label(), c.label()) for c in configs]
    targets = {c.train.target_loss for c in configs}
    if target_loss is None:
        target_loss = targets.pop() if len(targets) == 1 and None not in targets else default_target(runs)
    if report:
        _report_compare(runs, out, target_loss, configs)
    return runs


def _report_compare(runs: list[RunResult], out: Path, target: float, configs: list[RunConfig]) -> None:
    from .plots import plot_compare, plot_run

    for run in runs:
        plot_run(run, run.path / "curves.png")
    c0 = configs[0]
    title = (f"{c0.task.kind} ({getattr(c0.task, 'model', '')}), {c0.train.nproc} workers, "
             f"{c0.train.steps} steps, global batch {c0.train.global_batch}, seed {c0.train.seed}")
    png = plot_compare(runs, out / "compare.png", target=target, title=title)
    table = compare_table(runs, target)
    note = ("target loss: the largest of the runs' best eval losses (every run reached it)"
            if not any(c.train.target_loss for c in configs) else "target loss from the configs / --target-loss")
    text = f"{title}\n\n{table}\n\n{note}; bytes are per worker, as the optimizer measured them\n"
    (out / "compare.txt").write_text(text)
    (out / "compare.json").write_text(json.dumps({
        "target_loss": target if math.isfinite(target) else None,
        "runs": [{"name": r.name, "dir": str(r.path),
                  **{k: r.summary[k] for k in ("final", "best_eval_loss", "wall_time", "train_time", "steps_run")},
                  "sent_per_worker": r.summary["bytes"]["sent_per_worker"]} for r in runs],
    }, indent=2, default=str))
    print("\n" + text)
    print(f"plot:    {png}\ntable:   {out / 'compare.txt'}\nper run: {out}/<run>/metrics.jsonl, curves.png")


# --------------------------------------------------------------------------- CLI


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flag, key in (("steps", "train.steps"), ("global_batch", "train.global_batch"), ("seed", "train.seed"),
                      ("eval_every", "train.eval_every"), ("target_loss", "train.target_loss")):
        if getattr(args, flag, None) is not None:
            out[key] = getattr(args, flag)
    for item in args.set or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=200 or --set task.model=mlp")
        out[key] = value
    return out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, help="number of local workers (default: train.nproc; ignored under torchrun)")
    p.add_argument("--out", help="output directory (default: runs/<name>-<time>)")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--global-batch", type=int, help="override train.global_batch (split across workers)")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--eval-every", type=int, help="override train.eval_every")
    p.add_argument("--target-loss", type=float, help="report bytes and time to reach this eval loss")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any field, e.g. task.model=mlp (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint (see train.checkpoint_every)")


def _cmd_train(args: argparse.Namespace) -> int:
    train(args.config, nproc=args.nproc, out=args.out, overrides=_overrides(args), progress=not args.no_progress,
          resume=args.resume)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    ov = _overrides(args)
    ov.pop("train.target_loss", None)
    compare(args.configs, task=args.task, nproc=args.nproc, out=args.out, overrides=ov,
            target_loss=args.target_loss, progress=not args.no_progress, resume=args.resume)
    return 0


def add_cli(subparsers: Any) -> None:
    """Register ``train`` and ``compare`` with the ``commlmo`` argument parser."""
    p = subparsers.add_parser("train", help="train a task on N local workers (or one torchrun rank)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="run config (.yaml/.toml/.json) with optimizer, task and train sections")
    _common(p)
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("compare", help="several optimizers on one task, one table and one plot",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="run configs, or optimizers (preset names, optimizer files) with --task")
    p.add_argument("--task", help=f"the task for optimizers given by name: {', '.join(TASKS)}, or a run config file")
    _common(p)
    p.set_defaults(func=_cmd_compare)
