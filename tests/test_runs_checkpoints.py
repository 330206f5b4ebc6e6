"""Checkpoint integrity: a damaged or foreign checkpoint is found, named and skipped, never resumed.

Each checkpoint file has a sidecar with its size, its sha256 and the run
config's fingerprint.  On resume every rank checks its own files, the ranks
agree on the newest step every one of them holds intact, and rank 0 says which
newer checkpoint it skipped, on which rank and why.  Before, 16 flipped bytes in
a buffer resumed with exit 0 and an eval loss of -3.5e36, a truncated newest
checkpoint was not skipped, and a rank 0 corruption was blamed on rank 1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from commlmo import checkpoint
from commlmo.cli import main
from resume_runs import assert_bitwise_equal

MATRIX = {"name": "m", "optimizer": "signmuon", "task": {"kind": "matrix", "m": 12, "n": 8, "noise": 0.1},
          "train": {"steps": 9, "global_batch": 1, "nproc": 1, "eval_every": 3, "checkpoint_every": 3,
                    "keep_checkpoints": 3, "schedule": {"kind": "cosine", "warmup": 2}}}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _flip(path: Path, offset: int, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _tensor_bytes_offset(path: Path) -> int:
    """Where the first parameter's float32 data sits in the torch.save zip (stored uncompressed)."""
    state = torch.load(path, weights_only=True)
    first = next(iter(state["model"].values())).contiguous().numpy().tobytes()
    offset = path.read_bytes().find(first)
    assert offset > 0
    return offset


# ---------------------------------------------------------------------------- one file at a time


def test_verify_names_truncation_corruption_another_config_and_a_missing_checksum(tmp_path):
    state = {"model": {"w": torch.arange(64, dtype=torch.float32)}, "step": 3}
    for step in (3, 6, 9, 12):
        checkpoint.save(tmp_path, 0, step, state, keep=10, fingerprint="aaaa")
    assert checkpoint.verify(tmp_path, 0, 3, "aaaa") is None
    path = lambda s: checkpoint.rank_dir(tmp_path, 0) / f"step-{s:08d}.pt"  # noqa: E731
    size = path(6).stat().st_size
    path(6).write_bytes(path(6).read_bytes()[: size // 2])
    assert checkpoint.verify(tmp_path, 0, 6) == f"truncated ({size // 2} of {size} bytes)"
    _flip(path(9), _tensor_bytes_offset(path(9)) + 8)
    assert checkpoint.verify(tmp_path, 0, 9).startswith("checksum mismatch")
    assert checkpoint.verify(tmp_path, 0, 12, "bbbb").startswith("config fingerprint differs")
    path(12).with_suffix(".json").unlink()
    assert checkpoint.verify(tmp_path, 0, 12).startswith("no checksum file")
    with pytest.raises(Exception, match=r"rank 0: cannot read checkpoint .*step-00000009.pt \(checksum mismatch"):
        checkpoint.load(tmp_path, 0, 9)
    assert torch.equal(checkpoint.load(tmp_path, 0, 3)["model"]["w"], state["model"]["w"])


def test_agree_picks_the_newest_step_intact_everywhere_and_says_what_it_skipped(capsys):
    from commlmo.checkpoint import _choose

    found = [{4: None, 8: None, 12: None}, {4: None, 8: "checksum mismatch (...)", 12: None},
             {4: None, 8: None}]
    step, skipped, _ = _choose(found)
    assert step == 4
    assert skipped == ["step 12: rank 2 does not hold it", "step 8: rank 1: checksum mismatch (...)"]


# ---------------------------------------------------------------------------- through the CLI


@pytest.fixture
def runs(tmp_path, capsys):
    """The same config straight through 9 steps, and stopped after 7 (checkpoints 3 and 6)."""
    cfg = _write(tmp_path / "m.yaml", MATRIX)
    assert main(["train", str(cfg), "--out", str(tmp_path / "straight"), "--no-progress"]) == 0
    assert main(["train", str(cfg), "--out", str(tmp_path / "stopped"), "--no-progress",
                 "--set", "train.stop_after=7"]) == 0
    capsys.readouterr()
    assert checkpoint.steps_held(tmp_path / "stopped", 0) == [3, 6]
    return cfg, tmp_path / "straight", tmp_path / "stopped"


def _resume(cfg: Path, run: Path) -> int:
    return main(["train", str(cfg), "--out", str(run), "--no-progress", "--resume", "--set", "train.stop_after=null"])


def _ckpt(run: Path, step: int, rank: int = 0) -> Path:
    return checkpoint.rank_dir(run, rank) / f"step-{step:08d}.pt"


@pytest.mark.parametrize("damage, reason", [
    ("flip", "checksum mismatch"),
    ("truncate", "truncated ("),
    ("other config", "config fingerprint differs (written by a run of another config)"),
])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(runs, tmp_path, capsys, damage, reason):
    cfg, straight, stopped = runs
    newest = _ckpt(stopped, 6)
    if damage == "flip":  # 16 bytes of a parameter's data: the file still loads, with garbage weights
        _flip(newest, _tensor_bytes_offset(newest))
    elif damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:-100])
    else:  # a step-6 checkpoint, intact, of a run with another learning rate
        other = _write(tmp_path / "other.yaml", {**MATRIX, "optimizer": {"preset": "signmuon",
                                                                        "groups": {"hidden": {"lr": 0.5}}}})
        assert main(["train", str(other), "--out", str(tmp_path / "other"), "--no-progress",
                     "--set", "train.stop_after=6"]) == 0
        for p in (newest, newest.with_suffix(".json")):
            shutil.copy(_ckpt(tmp_path / "other", 6).with_name(p.name), p)
        capsys.readouterr()
    assert _resume(cfg, stopped) == 0
    err = capsys.readouterr().err
    assert f"commlmo: resume: skipped the checkpoint at step 6: rank 0: {reason}" in err, err
    assert "commlmo: resume: resuming from step 3" in err
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["resumed_from"] == [3] and summary["steps_run"] == 9
    assert_bitwise_equal(checkpoint.load(straight, 0, 9), checkpoint.load(stopped, 0, 9))
    assert (newest.parent / "step-00000006.pt").exists()  # recomputed; the damaged one was set aside
    assert checkpoint.verify(stopped, 0, 6) is None


def test_no_intact_checkpoint_at_all_is_one_line_and_exit_2(runs, capsys):
    cfg, _, stopped = runs
    for step in (3, 6):
        _flip(_ckpt(stopped, step), _tensor_bytes_offset(_ckpt(stopped, step)))
    assert _resume(cfg, stopped) == 2
    err = capsys.readouterr().err
    assert f"commlmo train: error: no checkpoint under {stopped / 'checkpoints'} is intact on every rank: " in err
    assert "step 6: rank 0: checksum mismatch" in err and "step 3: rank 0: checksum mismatch" in err
    assert "Traceback" not in err


@pytest.mark.distributed
def test_corruption_on_rank_0_is_blamed_on_rank_0_and_two_ranks_resume_from_the_step_before(
        tmp_path, capfd, resume_runs):
    """2 ranks: rank 0's newest checkpoint has 16 bytes of a parameter flipped; rank 1's is fine."""
    straight = resume_runs["straight"]["signmuon"]
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    assert [checkpoint.steps_held(run, r) for r in range(2)] == [[4, 8, 12]] * 2
    _flip(_ckpt(run, 12, rank=0), _tensor_bytes_offset(_ckpt(run, 12, rank=0)))
    assert main(["train", str(run / "config.yaml"), "--out", str(run), "--resume", "--no-progress"]) == 0
    err = capfd.readouterr().err  # rank 0's own stderr
    assert "commlmo: resume: skipped the checkpoint at step 12: rank 0: checksum mismatch" in err, err
    assert "rank 1:" not in err
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == [8]
    for rank in range(2):
        assert_bitwise_equal(checkpoint.load(straight, rank, 12), checkpoint.load(run, rank, 12))
