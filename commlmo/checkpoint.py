r"""Checkpoints of a training run: one file per rank, written atomically, checksummed, agreed on by every rank.

    <out>/checkpoints/rank0/step-00000040.pt     torch.save of the rank's state
    <out>/checkpoints/rank0/step-00000040.json   its size, sha256 and the run config's fingerprint
    <out>/checkpoints/rank1/step-00000040.pt
    <out>/checkpoints/rank1/step-00000040.json

A rank's file holds everything that rank needs to continue alone: the model, its
own optimizer state (momentum, EF21 estimators and the *local* random generator
differ between ranks), the learning-rate scheduler, the task's state, the
random-number generators and the run loop's counters.  The model is replicated,
but each rank keeps its own copy so that no rank ever reads another's file:
resuming under ``torchrun`` on machines without a shared filesystem works the
same as on one machine.

A file is written under a temporary name, flushed to disk and renamed
(``os.replace``), then its sidecar (``.json``: byte count, sha256 of the bytes,
config fingerprint) the same way, so a rank killed mid-write leaves its previous
checkpoints untouched and a half-written one without a sidecar.  After writing,
the ranks meet at a barrier before any of them deletes an old checkpoint, so the
newest step every rank holds is never lost.

On resume every rank checks each of its files against its sidecar
(:func:`verify`: truncated, checksum mismatch, config fingerprint differs), the
ranks all-gather what they found and load the newest step that *every* rank holds
intact (:func:`agree`); each newer step they skip is reported with the rank and
the reason, and its files are renamed ``*.skipped`` so that pruning never keeps
them over good ones.  :func:`check_same_run` then compares the loaded state with
the run config field by field.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError, DistributedError
from .runconfig import RESUMABLE_CHANGES

__all__ = ["CHECKPOINTS", "FORMAT", "rank_dir", "save", "steps_held", "verify", "agree", "load", "latest_common",
           "resume_command", "comparable_config", "config_fingerprint", "check_same_run"]

CHECKPOINTS = "checkpoints"
FORMAT = 2  # 2: a sidecar with the size, sha256 and config fingerprint; the LR scheduler's state
_NAME = re.compile(r"^step-(\d{8})\.pt$")
_CHUNK = 1 << 20


def rank_dir(out_dir: str | Path, rank: int) -> Path:
    """The directory only ``rank`` writes to and reads from."""
    return Path(out_dir) / CHECKPOINTS / f"rank{rank}"


def _path(out_dir: str | Path, rank: int, step: int) -> Path:
    return rank_dir(out_dir, rank) / f"step-{step:08d}.pt"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def steps_held(out_dir: str | Path, rank: int) -> list[int]:
    """Steps of this rank's checkpoint files, oldest first (whole files: a torn write has a temporary name)."""
    d = rank_dir(out_dir, rank)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for f in d.iterdir() if (m := _NAME.match(f.name)))


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(out_dir: str | Path, rank: int, step: int, state: dict[str, Any], *, keep: int,
         fingerprint: str | None = None) -> Path:
    """Write this rank's checkpoint for ``step`` and its sidecar atomically; once every rank has, keep the newest ``keep``.

    ``fingerprint`` (:func:`config_fingerprint`) goes into the sidecar, so that a
    resume can tell a checkpoint of another run config without loading it.
    """
    d = rank_dir(out_dir, rank)
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(".step-*.tmp*"):  # left by a rank killed mid-write
        stale.unlink(missing_ok=True)
    path = _path(out_dir, rank, step)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    meta = {"format": FORMAT, "step": step, "rank": rank, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "fingerprint": fingerprint}
    _sidecar(path).unlink(missing_ok=True)  # a sidecar always describes the file next to it, or is absent
    _write_atomically(path, data)
    _write_atomically(_sidecar(path), json.dumps(meta, indent=1).encode())
    if dist.is_initialized():
        dist.barrier()  # every rank holds `step` before any rank drops an older one
    for old in steps_held(out_dir, rank)[:-keep]:
        _path(out_dir, rank, old).unlink(missing_ok=True)
        _sidecar(_path(out_dir, rank, old)).unlink(missing_ok=True)
    return path


def _read_checked(path: Path, fingerprint: str | None) -> tuple[bytes | None, str | None]:
    """The file's bytes if they match the sidecar, else ``(None, why not)``; ``(bytes, why)`` for a fingerprint only."""
    side = _sidecar(path)
    try:
        meta = json.loads(side.read_text())
        size, digest = int(meta["size"]), str(meta["sha256"])
    except FileNotFoundError:
        return None, "no checksum file (an interrupted save, or written by a commlmo without checksums)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"unreadable checksum file {side.name} ({type(exc).__name__})"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable ({type(exc).__name__}: {exc.strerror or exc})"
    if len(data) < size:
        return None, f"truncated ({len(data)} of {size} bytes)"
    if len(data) != size:
        return None, f"{len(data)} bytes where {size} were written"
    if hashlib.sha256(data).hexdigest() != digest:
        return None, "checksum mismatch (the bytes changed since they were written: sha256 differs)"
    if fingerprint is not None and meta.get("fingerprint") not in (None, fingerprint):
        return data, "config fingerprint differs (written by a run of another config)"
    return data, None


def verify(out_dir: str | Path, rank: int, step: int, fingerprint: str | None = None) -> str | None:
    """``None`` when this rank's checkpoint of ``step`` is intact (and of the config ``fingerprint``), else why not."""
    return _read_checked(_path(out_dir, rank, step), fingerprint)[1]


def _choose(found: list[dict[int, str | None]]) -> tuple[int | None, list[str], int | None]:
    """The newest step intact on every rank, the skipped newer steps, and the newest one only of another config."""
    steps = sorted(set().union(*found), reverse=True)
    skipped: list[str] = []
    other_config = None
    for step in steps:
        why = []
        for rank, held in enumerate(found):
            if step not in held:
                why.append(f"rank {rank} does not hold it")
            elif held[step] is not None:
                why.append(f"rank {rank}: {held[step]}")
        if not why:
            return step, skipped, None
        if other_config is None and all(step in h and h[step] is not None and h[step].startswith("config fingerprint")
                                        for h in found):
            other_config = step
        skipped.append(f"step {step}: " + "; ".join(why))
    return None, skipped, other_config


def agree(out_dir: str | Path, rank: int, world_size: int, fingerprint: str | None = None) -> int | None:
    """The newest step every rank holds intact (``None`` when no rank holds any checkpoint); a collective.

    Rank 0 prints each newer checkpoint it skips, with the rank and the reason, to
    stderr; every rank renames its own skipped files ``*.skipped``.  Raises when
    checkpoints exist but none is intact on every rank: the number of workers
    changed, or the files are damaged.  When every candidate is intact but of
    another config, returns the newest, for :func:`check_same_run` to say what
    changed.
    """
    mine = {step: verify(out_dir, rank, step, fingerprint) for step in steps_held(out_dir, rank)}
    found = [mine]
    if dist.is_initialized():
        found = [{} for _ in range(world_size)]
        dist.all_gather_object(found, mine)
    if not any(found):
        return None
    step, skipped, other_config = _choose(found)
    where = Path(out_dir) / CHECKPOINTS
    if step is None and other_config is not None:
        return other_config
    if step is None:
        if not any(v is not None for h in found for v in h.values()):  # all intact, none common
            per_rank = "; ".join(f"rank {r}: {sorted(h) or 'none'}" for r, h in enumerate(found))
            raise ConfigError(
                f"no checkpoint under {where} is held by every rank ({per_rank}); "
                "a run resumes on the same number of workers that wrote its checkpoints"
            )
        raise DistributedError(f"no checkpoint under {where} is intact on every rank: " + " | ".join(skipped))
    for note in skipped:
        if rank == 0:
            print(f"commlmo: resume: skipped the checkpoint at {note}", file=sys.stderr, flush=True)
    for newer in [s for s in mine if s > step]:
        for p in (_path(out_dir, rank, newer), _sidecar(_path(out_dir, rank, newer))):
            if p.exists():
                os.replace(p, p.with_name(p.name + ".skipped"))
    if skipped and rank == 0:
        print(f"commlmo: resume: resuming from step {step}", file=sys.stderr, flush=True)
    return step


def latest_common(out_dir: str | Path, world_size: int) -> int | None:
    """The newest step whose files exist for ranks ``0..world_size-1`` under ``out_dir`` (no collective, no checksum)."""
    held = [steps_held(out_dir, r) for r in range(world_size)]
    if not all(held):
        return None
    common = set(held[0]).intersection(*held[1:])
    return max(common) if common else None


def load(out_dir: str | Path, rank: int, step: int, *, fingerprint: str | None = None) -> dict[str, Any]:
    """This rank's checkpoint for ``step``, after checking it against its sidecar (size and sha256)."""
    path = _path(out_dir, rank, step)
    data, why = _read_checked(path, None)
    if data is None:
        raise DistributedError(f"rank {rank}: cannot read checkpoint {path} ({why}); "
                               "delete it to resume from the one before")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
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


def config_fingerprint(comparable: dict[str, Any]) -> str:
    """A short hash of a :func:`comparable_config`: equal exactly when the configs compute the same run."""
    text = json.dumps(comparable, sort_keys=True, default=str, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_changes(saved: dict[str, Any], config: dict[str, Any]) -> str | None:
    """``"key: old -> new; ..."`` for the first fields that differ between two comparable configs, else ``None``."""
    changed = sorted(k for k in saved.keys() | config.keys() if saved.get(k, "<unset>") != config.get(k, "<unset>"))
    if not changed:
        return None
    shown = "; ".join(f"{k}: {saved.get(k, '<unset>')!r} -> {config.get(k, '<unset>')!r}" for k in changed[:6])
    return shown + ("; ..." if len(changed) > 6 else "")


def may_change() -> str:
    return ", ".join("train." + k for k in sorted(RESUMABLE_CHANGES))


def check_same_run(state: dict[str, Any], *, world_size: int, config: dict[str, Any]) -> None:
    """Raise unless ``state`` was written by a run of ``world_size`` ranks with the same :func:`comparable_config`."""
    if state.get("world_size") != world_size:
        raise ConfigError(
            f"the checkpoint at step {state.get('step')} was written by {state.get('world_size')} workers; "
            f"this run has {world_size}. Each rank's optimizer state is its own (momentum, error feedback, "
            "random generators), so a run resumes on the number of workers that wrote it"
        )
    shown = config_changes(state["config"], config)
    if shown:
        raise ConfigError(
            f"cannot resume: the run config differs from the one that wrote the checkpoint at step "
            f"{state['step']} ({shown}). A resumed run may change only {may_change()}; for anything else "
            "start a new run (another --out)"
        )
