r"""``commlmo train`` and ``commlmo compare``: start the workers, then report.

    commlmo train examples/mnist1d_cnn.yaml --nproc 4          # starts 4 local workers
    commlmo train examples/matrix.yaml --steps 100 --set task.noise=0.1
    commlmo compare signmuon muon signsgd --task mnist1d-cnn --nproc 4
    commlmo compare examples/mnist1d_cnn.yaml runs/other.yaml
    torchrun --standalone --nproc_per_node 4 -m commlmo train examples/mnist1d_cnn.yaml
    commlmo train examples/mnist1d_cnn.yaml --out runs/cnn --set train.checkpoint_every=100
    commlmo train examples/mnist1d_cnn.yaml --out runs/cnn --resume     # after an interruption
    commlmo train examples/mnist1d_cnn.yaml --out runs/cnn --overwrite  # start over; the old run is kept aside

Without ``torchrun`` the command starts ``--nproc`` (or ``train.nproc``) worker
processes on this machine through torch's elastic launcher (what ``torchrun``
uses: a c10d rendezvous on 127.0.0.1), joined by a process group (gloo, NCCL
when CUDA is present), and runs :func:`commlmo.worker.run_rank` in each; under
``torchrun`` the process is one rank.  Ctrl-C or SIGTERM stops every worker and
exits with 130 / 143; when a worker fails the others are stopped and the error
names it (``train.max_restarts`` restarts them from the last checkpoint
instead).  More workers than 8 per CPU core are refused; more than the cores
get a warning.  Rank 0 writes ``metrics.jsonl`` and ``summary.json`` into the
run directory; this module then prints the summary table and draws the plots
from those files.  The harness needs ``pip install 'commlmo[train]'``.

A fresh run into an ``--out`` that already holds a run (``config.yaml``,
``metrics.jsonl``, ``checkpoints/``) is refused: continue it with ``--resume``,
choose another ``--out``, or pass ``--overwrite``, which moves the old run aside
to ``<out>.old-<time>`` (nothing is deleted).

With ``train.checkpoint_every`` every rank checkpoints into ``<out>/checkpoints``,
each file with a sha256 checksum and the run config's fingerprint.  ``--resume``
continues the run in ``--out`` (default: the newest ``runs/<name>-*`` with a
checkpoint) from the newest checkpoint every rank holds intact, bitwise as if it
had never stopped; it names each newer checkpoint it skips and why (truncated,
checksum mismatch, another config), and refuses a config that computes another
run.  Under ``torchrun --max-restarts`` pass ``--out``: a restarted attempt
resumes by itself (from step 0 when there is no checkpoint yet).

The same from Python::

    from commlmo.train import train, compare
    run = train("examples/mnist1d_cnn.yaml", nproc=4, out="runs/cnn")
    runs = compare(["signmuon", "muon"], task="mnist1d-cnn", nproc=4)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINTS, comparable_config, config_changes, latest_common, may_change, resume_command
from .errors import CommlmoError, ConfigError, DistributedError
from .launch import (Interrupted, default_backend, init_from_env, launch, launched_by_torchrun, leave_group,
                     restart_count)
from .metrics import RunResult, best_eval, compare_table, default_target, load_run, run_table
from .runconfig import TASKS, RunConfig, is_run_config, load_run_config
from .tasks import shard_size

__all__ = ["train", "compare", "add_cli", "check_nproc", "require_harness", "MissingExtraError"]


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


class MissingExtraError(CommlmoError, ImportError):
    """The training harness's own dependencies are not installed (``pip install 'commlmo[train]'``)."""


#: What the harness imports (progress bars, plots), and what each task kind imports.
_HARNESS_MODULES = ("tqdm", "matplotlib")
_TASK_MODULES = {"mnist1d": ("mnist1d",), "gpt": ("tokenizers",)}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a blocked or half-installed module
        return False


def require_harness(configs: Sequence[RunConfig] = ()) -> None:
    """Raise :class:`MissingExtraError` (one line) unless the ``commlmo[train]`` extra is installed."""
    wanted = list(_HARNESS_MODULES)
    for cfg in configs:
        wanted += [m for m in _TASK_MODULES.get(cfg.task.kind, ()) if m not in wanted]
    missing = [m for m in wanted if not _importable(m)]
    if missing:
        raise MissingExtraError(f"the training harness needs its extra: pip install 'commlmo[train]' "
                                f"(missing: {', '.join(missing)})")


# --------------------------------------------------------------------------- workers and run directories

#: More workers than this many per core is refused (and above MAX_NPROC whatever the cores).
MAX_NPROC_PER_CORE = 8
MAX_NPROC = 256


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_nproc(nproc: int, cores: int | None = None) -> str | None:
    """Raise for more local workers than the machine can sensibly run; a one-line warning for more than its cores."""
    cores = cores or cpu_cores()
    limit = min(MAX_NPROC, MAX_NPROC_PER_CORE * cores)
    if nproc > limit:
        why = (f"more than {MAX_NPROC_PER_CORE} per core on the {cores} CPU core(s) this process may use"
               if limit < MAX_NPROC else f"more than the hard cap of {MAX_NPROC}")
        raise ConfigError(f"--nproc {nproc}: {why} (at most {limit}); each worker is a process with its own "
                          "copy of the model. Use fewer workers, or torchrun across machines")
    if nproc > cores:
        return (f"commlmo: warning: {nproc} workers on {cores} CPU core(s): they take turns on the cores, so every "
                f"step waits for the slowest (expect roughly {nproc / cores:.1f}x the time per step)")
    return None


_RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", CHECKPOINTS)


def _holds_run(out: Path) -> list[str]:
    return [name for name in _RUN_FILES if (out / name).exists()] if out.is_dir() else []


def _check_not_a_file(out: Path) -> None:
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"--out {out}: {p} is a file, not a directory; name a directory "
                                  "(created if missing)")
            return


def _check_out(cfg: RunConfig, out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a fresh run over an existing one, and a resume with a config that computes another run."""
    _check_not_a_file(out)
    held = _holds_run(out)
    if not resume:
        if held and not overwrite:
            raise ConfigError(
                f"--out {out} already holds a run ({', '.join(held)}); continue it with --resume, choose "
                "another --out, or pass --overwrite to move the old run aside first"
            )
        return
    saved = out / "config.yaml"
    if not saved.is_file():
        return
    try:
        old = load_run_config(saved)
        before = comparable_config(old.model_dump(mode="json"), old.optimizer_config().model_dump(mode="json"))
    except CommlmoError:
        return  # e.g. its optimizer file is gone: the checkpoints' own copy of the config decides
    now = comparable_config(cfg.model_dump(mode="json"), cfg.optimizer_config().model_dump(mode="json"))
    shown = config_changes(before, now)
    if shown:
        raise ConfigError(
            f"cannot resume: the run config differs from the one in {saved} ({shown}). A resumed run may change "
            f"only {may_change()}; for anything else start a new run (another --out)"
        )


def _move_aside(out: Path) -> Path:
    """Rename ``out`` to ``<out>.old-<time>`` (``-2``, ``-3``... when taken); returns the new name."""
    base = out.with_name(f"{out.name}.old-{_stamp()}")
    dest, n = base, 1
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    os.replace(out, dest)
    print(f"commlmo: --overwrite: moved the old run in {out} aside to {dest}", file=sys.stderr)
    return dest


def _prepare_out(cfg: RunConfig, out: Path, *, resume: bool, overwrite: bool) -> None:
    """Create the run directory (after moving an old run aside with ``overwrite``) and write ``config.yaml``."""
    if not resume and overwrite and _holds_run(out):
        _move_aside(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # a resumed run's is rewritten by rank 0 once a checkpoint accepted the config
        if not (resume and ((out / "config.yaml").exists() or (out / CHECKPOINTS).exists())):
            (out / "config.yaml").write_text(cfg.to_yaml())
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write the run directory ({exc.strerror or exc})") from None


def _interrupted_hint(jobs: list[tuple[RunConfig, Path]]) -> str:
    """One line: how to continue what an interruption stopped."""
    resumable = [(cfg, out) for cfg, out in jobs if cfg.train.checkpoint_every
                 and latest_common(out, cfg.train.nproc) is not None]
    if len(jobs) == 1 and resumable:
        cfg, out = resumable[0]
        return (f"last complete checkpoint: step {latest_common(out, cfg.train.nproc)}; continue with: "
                f"{resume_command(out, cfg.train)}")
    if resumable:
        return "continue with the same command and --resume"
    if any(cfg.train.checkpoint_every for cfg, _ in jobs):
        return "no checkpoint written yet to continue from"
    return "no checkpoint to continue from (train.checkpoint_every = 0)"


def _launch(jobs: list[tuple[RunConfig, Path]], *, progress: bool, resume: bool = False,
            overwrite: bool = False) -> bool:
    """Run each ``(config, out)`` in turn on one set of workers; True where this process holds the results.

    The workers are started once for all the jobs (a comparison pays the process
    start-up once), so every job must ask for the same number of workers.
    """
    from .worker import run_many

    kinds = {(cfg.train.nproc, cfg.train.backend, cfg.train.max_restarts) for cfg, _ in jobs}
    if len(kinds) > 1:  # cannot share the workers: one launch per job, once every job passed its checks
        if not launched_by_torchrun():
            for cfg, out in jobs:
                check_nproc(cfg.train.nproc)
                shard_size(cfg.train.global_batch, cfg.train.nproc)
                _check_out(cfg, out, resume=resume, overwrite=overwrite)
        return all([_launch([job], progress=progress, resume=resume, overwrite=overwrite) for job in jobs])
    first = jobs[0][0].train
    payload = [(cfg.model_dump(mode="json"), str(out)) for cfg, out in jobs]
    if launched_by_torchrun():
        import torch.distributed as dist

        rank, world = init_from_env(backend=None if first.backend == "auto" else first.backend,
                                    timeout_s=first.collective_timeout_s)
        resume = resume or restart_count() > 0  # torchrun --max-restarts: continue from the checkpoint
        try:
            problem = None
            if rank == 0:  # rank 0 decides for all, so that no rank starts while another refuses
                try:
                    for cfg, out in jobs:
                        shard_size(cfg.train.global_batch, world)
                        _check_out(cfg, out, resume=resume, overwrite=overwrite)
                    for cfg, out in jobs:
                        _prepare_out(cfg, out, resume=resume, overwrite=overwrite)
                except CommlmoError as exc:
                    problem = str(exc)
            shared = [payload, problem]
            dist.broadcast_object_list(shared, src=0)  # rank 0's output directories (a time stamp may differ)
            payload, problem = shared
            if problem is not None:
                raise ConfigError(problem)
            run_many(rank, world, payload, progress, resume)
        except BaseException:
            leave_group(finished=False)
            raise
        leave_group(finished=True)  # with the group alive at exit a rank can abort in gloo's threads
        return rank == 0
    warning = check_nproc(first.nproc)
    for cfg, out in jobs:  # check everything before anything is written or started
        shard_size(cfg.train.global_batch, cfg.train.nproc)
        _check_out(cfg, out, resume=resume, overwrite=overwrite)
    for cfg, out in jobs:
        _prepare_out(cfg, out, resume=resume, overwrite=overwrite)
    if warning:
        print(warning, file=sys.stderr)
    try:
        if first.nproc == 1:  # in this process, on one thread like each launched worker
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
            launch(run_many, first.nproc, payload, progress, resume, backend=backend, timeout_s=timeout,
                   collective_timeout_s=first.collective_timeout_s, max_restarts=first.max_restarts)
        except ConfigError:  # a worker's, e.g. a checkpoint of another config: as it is
            raise
        except DistributedError as exc:
            raise DistributedError(f"{exc}\n{_checkpoint_note(jobs)}".rstrip()) from None
    except Interrupted as exc:
        exc.hint = _interrupted_hint(jobs)  # type: ignore[attr-defined]
        raise
    return True


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


def _check_flags(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite moves it aside; pass one of them")


def train(config: Any, *, nproc: int | None = None, out: str | Path | None = None,
          overrides: Mapping[str, Any] | None = None, progress: bool = True, report: bool = True,
          resume: bool = False, overwrite: bool = False) -> RunResult | None:
    """Train one run config (path or mapping); returns the run read back from ``out`` (``None`` on ranks > 0).

    ``resume=True`` continues the run in ``out`` (default: the newest ``runs/<name>-*``
    holding a checkpoint) from its newest intact checkpoint; with none there yet it
    starts at step 0.  A fresh run into an ``out`` that already holds a run is
    refused, unless ``overwrite=True`` moves that run aside to ``<out>.old-<time>``.
    """
    _check_flags(resume, overwrite)
    cfg = load_run_config(config, _world_overrides(overrides, nproc))
    require_harness([cfg])
    if out:
        out = Path(out)
    elif resume:
        out = _latest_run(cfg)
    else:
        out = Path("runs") / f"{cfg.label()}-{_stamp()}"
    if not _launch([(cfg, out)], progress=progress, resume=resume, overwrite=overwrite):
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
            resume: bool = False, overwrite: bool = False) -> list[RunResult] | None:
    """Run each source on the same task and seed; print one table and draw one plot of all runs.

    ``resume=True`` continues every run under ``out`` from its newest checkpoint.
    A fresh comparison into an ``out`` that already holds one (or any of its runs)
    is refused, unless ``overwrite=True`` moves that directory aside to ``<out>.old-<time>``.
    """
    if not sources:
        raise ConfigError("compare needs at least one config or preset")
    _check_flags(resume, overwrite)
    configs = compare_configs(sources, task=task, nproc=nproc, overrides=overrides)
    require_harness(configs)
    if resume and not out:
        raise ConfigError("compare --resume needs --out: the directory of the comparison to continue")
    out = Path(out) if out else Path("runs") / f"compare-{_stamp()}"
    _check_not_a_file(out)
    # (under torchrun rank 0 alone checks each run's directory, in _launch, and tells the others)
    if not resume and not launched_by_torchrun():
        held = ([name for name in ("compare.json", "compare.txt") if (out / name).exists()]
                + [f"{c.label()}/" for c in configs if _holds_run(out / c.label())]) if out.is_dir() else []
        if held and not overwrite:
            raise ConfigError(
                f"--out {out} already holds a comparison ({', '.join(held)}); continue it with --resume, choose "
                "another --out, or pass --overwrite to move it aside first"
            )
        if held:
            _move_aside(out)
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
    detail = getattr(c0.task, "model", None) or (
        f"vocab {c0.task.vocab}, width {c0.task.width}, {c0.task.layers} layers" if c0.task.kind == "gpt" else None)
    title = (f"{c0.task.kind}{f' ({detail})' if detail else ''}, {c0.train.nproc} workers, "
             f"{c0.train.steps} steps, global batch {c0.train.global_batch}, seed {c0.train.seed}")
    png = plot_compare(runs, out / "compare.png", target=target, title=title)
    table = compare_table(runs, target)
    note = ("target loss: the largest of the runs' best eval losses (every run reached it)"
            if not any(c.train.target_loss for c in configs) else "target loss from the configs / --target-loss")
    text = (f"{title}\n\n{table}\n\nfinal: the last evaluation; best: the lowest evaluated loss and the step of it "
            f"(a run that overfits ends above its best)\n{note}; bytes are per worker, as the optimizer measured them\n")
    (out / "compare.txt").write_text(text)
    (out / "compare.json").write_text(json.dumps({
        "target_loss": target if math.isfinite(target) else None,
        "runs": [{"name": r.name, "dir": str(r.path),
                  **{k: r.summary[k] for k in ("final", "best_eval_loss", "wall_time", "train_time", "steps_run")},
                  "final_eval_loss": r.evals[-1]["eval_loss"] if r.evals else None,
                  "best_eval_step": best_eval(r)[1],
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
                   help="continue the run in --out from its newest intact checkpoint (see train.checkpoint_every); "
                   "refused if --out holds a run of another config")
    p.add_argument("--overwrite", action="store_true",
                   help="a fresh run into an --out that already holds a run is refused; with --overwrite the old "
                   "run is first moved aside to <out>.old-<time> (nothing is deleted)")


def _cmd_train(args: argparse.Namespace) -> int:
    train(args.config, nproc=args.nproc, out=args.out, overrides=_overrides(args), progress=not args.no_progress,
          resume=args.resume, overwrite=args.overwrite)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    ov = _overrides(args)
    ov.pop("train.target_loss", None)
    compare(args.configs, task=args.task, nproc=args.nproc, out=args.out, overrides=ov,
            target_loss=args.target_loss, progress=not args.no_progress, resume=args.resume,
            overwrite=args.overwrite)
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
