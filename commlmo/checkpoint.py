r"""Checkpoints of a training run: one file per rank, written atomically, agreed on by every rank.

    <out>/checkpoints/rank0/step-00000040.pt
    <out>/checkpoints/rank1/step-00000040.pt

A rank's file holds everything that rank needs to continue alone: the model, its
own optimizer state (momentum, EF21 estimators and the *local* random generator
differ between ranks), the task's state, the random-number generators and the
run loop's counters.  The model is replicated, but each rank keeps its own copy
so that no rank ever reads another's file: resuming under ``torchrun`` on
machines without a shared filesystem works the same as on one machine.

A file is written under a temporary name, flushed to disk and renamed
(``os.replace``), so a rank killed mid-write leaves its previous checkpoints
untouched.  After writing, the ranks meet at a barrier before any of them
deletes an old checkpoint, so the newest step every rank holds is never lost.
On resume the ranks all-gather the steps they hold and load the newest one they
all have (:func:`agree`), after checking that it was written by a run of the same
config on as many ranks (:func:`check_same_run`).
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError, DistributedError
from .runconfig import RESUMABLE_CHANGES

__all__ = ["CHECKPOINTS", "rank_dir", "save", "steps_held", "agree", "load", "latest_common", "resume_command",
           "comparable_config", "check_same_run"]

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def rank_dir(out_dir: str | Path, rank: int) -> Path:
    """The directory only ``rank`` writes to and reads from."""
    return Path(out_dir) / CHECKPOINTS / f"rank{rank}"


def _path(out_dir: str | Path, rank: int, step: int) -> Path:
    return rank_dir(out_dir, rank) / f"step-{step:08d}.pt"


def steps_held(out_dir: str | Path, rank: int) -> list[int]:
    """Steps of this rank's complete checkpoint files, oldest first."""
    d = rank_dir(out_dir, rank)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for f in d.iterdir() if (m := _NAME.match(f.name)))


def save(out_dir: str | Path, rank: int, step: int, state: dict[str, Any], *, keep: int) -> Path:
    """Write this rank's checkpoint for ``step`` atomically; once every rank has, keep only the newest ``keep``."""
    d = rank_dir(out_dir, rank)
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(".step-*.tmp*"):  # left by a rank killed mid-write
        stale.unlink(missing_ok=True)
    path = _path(out_dir, rank, step)
    tmp = d / f".{path.name}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()  # every rank holds `step` before any rank drops an older one
    for old in steps_held(out_dir, rank)[:-keep]:
        _path(out_dir, rank, old).unlink(missing_ok=True)
    return path


def _common(held: list[list[int]]) -> int | None:
    common = set(held[0]).intersection(*held[1:])
    return max(common) if common else None


def agree(out_dir: str | Path, rank: int, world_size: int) -> int | None:
    """The newest step every rank holds a checkpoint of (``None`` when no rank holds any); a collective.

    Raises when some ranks hold checkpoints but no step is common to all of them,
    which happens when the number of workers changed.
    """
    mine = steps_held(out_dir, rank)
    held = [mine]
    if dist.is_initialized():
        held = [[] for _ in range(world_size)]
        dist.all_gather_object(held, mine)
    if not any(held):
        return None
    step = _common(held)
    if step is None:
        per_rank = "; ".join(f"rank {r}: {h or 'none'}" for r, h in enumerate(held))
        raise ConfigError(
            f"no checkpoint under {Path(out_dir) / CHECKPOINTS} is held by every rank ({per_rank}); "
            "a run resumes on the same number of workers that wrote its checkpoints"
        )
    return step


def latest_common(out_dir: str | Path, world_size: int) -> int | None:
    """The newest step whose files exist for ranks ``0..world_size-1`` under ``out_dir`` (no collective)."""
    held = [steps_held(out_dir, r) for r in range(world_size)]
    return _common(held) if all(held) else None


def load(out_dir: str | Path, rank: int, step: int) -> dict[str, Any]:
    """This rank's checkpoint for ``step``."""
    path = _path(out_dir, rank, step)
    try:
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DistributedError(f"rank {rank}: cannot read checkpoint {path} ({type(exc).__name__}: {first}); "
                               "delete it to resume from the one before") from None


def resume_command(out_dir: str | Path, train: Any) -> str:
    """The command that continues the run in ``out_dir`` (``train``: its train config), testing hooks switched off."""
    hooks = "".join(f" --set train.{k}=null" for k in ("stop_after", "fault") if getattr(train, k, None) is not None)
    return f"commlmo train {Path(out_dir) / 'config.yaml'} --out {out_dir} --resume{hooks}"


def comparable_config(run: dict[str, Any], optimizer: dict[str, Any]) -> dict[str, Any]:
    """What must not change between a run and its resumption, as flat dotted keys.

    ``run`` is the run config's JSON dump; ``optimizer`` the *resolved* optimizer
    config (a preset or a file is compared by content, not by name).
    """
    raw = {k: v for k, v in run.items() if k not in ("name", "optimizer")}
    raw["optimizer"] = optimizer
    raw["task"] = {k: v for k, v in raw["task"].items() if k != "paths"}  # a custom task's paths include the cwd
    raw["train"] = {k: v for k, v in raw["train"].items() if k not in RESUMABLE_CHANGES}

    def flat(x: Any, prefix: str) -> dict[str, Any]:
        items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
        out = {k: v for key, val in items for k, v in flat(val, f"{prefix}{key}.").items()}
        return out or {prefix[:-1]: x}

    return flat(raw, "")


def check_same_run(state: dict[str, Any], *, world_size: int, config: dict[str, Any]) -> None:
    """Raise unless ``state`` was written by a run of ``world_size`` ranks with the same :func:`comparable_config`."""
    if state.get("world_size") != world_size:
        raise ConfigError(
            f"the checkpoint at step {state.get('step')} was written by {state.get('world_size')} workers; "
            f"this run has {world_size}. Each rank's optimizer state is its own (momentum, error feedback, "
            "random generators), so a run resumes on the number of workers that wrote it"
        )
    saved = state["config"]
    changed = sorted(k for k in saved.keys() | config.keys() if saved.get(k, "<unset>") != config.get(k, "<unset>"))
    if changed:
        shown = "; ".join(f"{k}: {saved.get(k, '<unset>')!r} -> {config.get(k, '<unset>')!r}" for k in changed[:6])
        raise ConfigError(
            f"cannot resume: the run config differs from the one that wrote the checkpoint at step "
            f"{state['step']} ({shown}{'; ...' if len(changed) > 6 else ''}). A resumed run may change only "
            f"{', '.join('train.' + k for k in sorted(RESUMABLE_CHANGES))}; for anything else start a new run "
            "(another --out)"
        )
