"""User errors of ``commlmo train`` / ``commlmo compare``: one line ``commlmo CMD: error: ...``, exit 2, nothing lost.

A fresh run into a directory that already holds a run is refused (it used to
overwrite ``metrics.jsonl`` and prune the old run's checkpoints as "older");
``--overwrite`` moves the old run aside instead, ``--resume`` continues it but
only with a config that computes the same run.  ``--out`` pointing at a file, a
malformed ``--set`` and an absurd ``--nproc`` are refused the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from commlmo.cli import main
from commlmo.errors import ConfigError
from commlmo.train import MAX_NPROC, check_nproc, cpu_cores

MATRIX = {"name": "m", "optimizer": "signmuon", "task": {"kind": "matrix", "m": 12, "n": 8, "noise": 0.1},
          "train": {"steps": 8, "global_batch": 1, "nproc": 1, "eval_every": 2, "checkpoint_every": 3}}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _one_error_line(capsys, command: str = "train") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"commlmo {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def finished(tmp_path, capsys):
    """One short run in tmp/run, finished, with checkpoints at steps 3 and 6."""
    cfg = _write(tmp_path / "m.yaml", MATRIX)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    capsys.readouterr()
    return cfg, tmp_path / "run"


def _state(run: Path) -> dict:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_fresh_run_into_a_directory_holding_a_run_is_refused_and_changes_nothing(finished, capsys):
    cfg, run = finished
    before = _state(run)
    assert main(["train", str(cfg), "--out", str(run), "--no-progress", "--set", "train.steps=4"]) == 2
    line = _one_error_line(capsys)
    assert f"--out {run} already holds a run (config.yaml, metrics.jsonl, summary.json, checkpoints)" in line
    assert "--resume" in line and "another --out" in line and "--overwrite" in line
    assert _state(run) == before  # metrics, summary and both checkpoints untouched


def test_overwrite_moves_the_old_run_aside_and_starts_afresh(finished, capsys):
    cfg, run = finished
    before = _state(run)
    assert main(["train", str(cfg), "--out", str(run), "--no-progress", "--overwrite", "--set", "train.steps=4"]) == 0
    err = capsys.readouterr().err
    (old,) = run.parent.glob("run.old-*")
    assert f"moved the old run in {run} aside to {old}" in err
    assert _state(old) == before
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5))
    assert json.loads((run / "summary.json").read_text())["steps_run"] == 4


def test_resume_and_overwrite_together_are_refused(finished, capsys):
    cfg, run = finished
    assert main(["train", str(cfg), "--out", str(run), "--resume", "--overwrite"]) == 2
    assert "pass one of them" in _one_error_line(capsys)


def test_resume_checks_the_run_directory_config_before_starting(tmp_path, capsys):
    """Even with no checkpoint yet, --resume into another config's run would splice two runs together."""
    cfg = _write(tmp_path / "m.yaml", {**MATRIX, "train": {**MATRIX["train"], "checkpoint_every": 0}})
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    before = _state(run)
    assert main(["train", str(cfg), "--out", str(run), "--resume", "--set", "task.noise=0.5"]) == 2
    line = _one_error_line(capsys)
    assert f"cannot resume: the run config differs from the one in {run / 'config.yaml'} (task.noise: 0.1 -> 0.5)" in line
    assert _state(run) == before


def test_a_fresh_comparison_into_an_existing_one_is_refused(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "signmuon", "--task", "matrix", "--steps", "3", "--nproc", "1", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    before = _state(out)
    assert main(argv) == 2
    line = _one_error_line(capsys, "compare")
    assert f"--out {out} already holds a comparison (compare.json, compare.txt, signmuon/)" in line
    assert _state(out) == before
    assert main([*argv, "--overwrite"]) == 0
    assert len(list(tmp_path.glob("cmp.old-*"))) == 1


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_out_pointing_at_a_file_is_one_line(tmp_path, capsys, where):
    cfg = _write(tmp_path / "m.yaml", MATRIX)
    (tmp_path / "f").write_text("not a directory")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    assert main(["train", str(cfg), "--out", str(out)]) == 2
    assert f"{tmp_path / 'f'} is a file, not a directory" in _one_error_line(capsys)


@pytest.mark.parametrize("item, message", [
    ("train.steps=[1,", "--set train.steps=[1,: the value is not valid YAML"),
    ("task.noise={a: 1", "--set task.noise={a: 1: the value is not valid YAML"),
    ("name=!!python/object:os.system x", "the value is not valid YAML (could not determine a constructor"),
    ("train..steps=3", "--set train..steps: empty part in the key"),
    ("train.steps", "--set 'train.steps': expected KEY=VALUE"),
    ("=3", "--set '=3': expected KEY=VALUE"),
    ("train.steps.x=3", "--set train.steps.x: 'steps' is not a section"),
])
def test_a_malformed_set_is_one_line(tmp_path, capsys, item, message):
    cfg = _write(tmp_path / "m.yaml", MATRIX)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--set", item]) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_far_too_many_workers_are_refused_naming_the_cores(tmp_path, capsys):
    cfg = _write(tmp_path / "m.yaml", MATRIX)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--nproc", "1000"]) == 2
    line = _one_error_line(capsys)
    cores = cpu_cores()
    assert f"--nproc 1000: more than 8 per core on the {cores} CPU core(s)" in line or "hard cap" in line
    assert not (tmp_path / "run").exists()


def test_more_workers_than_cores_warn_in_one_line_and_a_bound_refuses():
    assert check_nproc(2, cores=2) is None
    warning = check_nproc(8, cores=2)
    assert warning is not None and "\n" not in warning
    assert warning.startswith("commlmo: warning: 8 workers on 2 CPU core(s)") and "4.0x" in warning
    assert check_nproc(16, cores=2) is not None  # 8 per core: allowed, with the warning
    with pytest.raises(ConfigError, match=r"--nproc 17: more than 8 per core on the 2 CPU core\(s\) this process "
                       r"may use \(at most 16\)"):
        check_nproc(17, cores=2)
    with pytest.raises(ConfigError, match=rf"more than the hard cap of {MAX_NPROC}"):
        check_nproc(MAX_NPROC + 1, cores=1000)
