"""Checkpoint and resume: a run interrupted and resumed is bitwise the run that never stopped.

The reference runs (``resume_runs`` in conftest.py) go straight through 12
steps on 2 gloo workers; the same configs with ``train.stop_after: 6`` stop
after step 6 (the last checkpoint is step 4, so steps 5 and 6 are computed
twice).  A fresh set of processes started by ``torchrun`` resumes those:
every rank reads only its own files.  The final checkpoints of both must hold
the same bits: parameters, momentum, EF21 estimators, every random generator
(vote tie-breaks with 2 workers, the natural compressor's local draws), the
AdamW fallback's state and the data position.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from commlmo import checkpoint
from commlmo.cli import main
from commlmo.errors import ConfigError
from commlmo.metrics import MetricsWriter, load_run
from commlmo.train import train
from resume_runs import RESUME_METHODS, STEPS, STOP, assert_bitwise_equal, flat

LAST_BEFORE_STOP = 4

def _final(run_dir: Path, step: int = STEPS) -> list[dict]:
    return [checkpoint.load(run_dir, rank, step) for rank in range(2)]


def _records(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def resumed(resume_runs):
    """The stopped runs before (records, summary, checkpoints held) and after a resume under torchrun."""
    before = {name: {"records": _records(d), "summary": json.loads((d / "summary.json").read_text()),
                     "held": [checkpoint.steps_held(d, r) for r in range(2)]} for name, d in resume_runs["stopped"].items()}
    # A fresh start of every process, as after a torchrun restart: each rank reads its own files.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "commlmo", "compare", *map(str, resume_runs["configs"].values()), "--out", str(resume_runs["out"]),
           "--resume", "--set", "train.stop_after=null", "--no-progress"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    # what killed a worker first (CI shows the head of a long message): gloo's or Python's last words
    last_words = [ln for ln in proc.stderr.splitlines() if re.search(r"terminate|Fatal|what\(\)|Error|Signal", ln)]
    assert proc.returncode == 0, "\n".join(last_words[:20]) + "\n---\n" + proc.stderr[-8000:] + proc.stdout[-3000:]
    return resume_runs["stopped"], before


pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("name", list(RESUME_METHODS))
def test_interrupted_then_resumed_run_is_bitwise_the_uninterrupted_one(name, resumed, resume_runs):
    runs, _ = resumed
    straight, again = _final(resume_runs["straight"][name]), _final(runs[name])
    for rank in range(2):
        assert_bitwise_equal(straight[rank], again[rank])
    # the state really is per rank, so one shared file could not have resumed it: each rank's
    # momentum is of its own shard, its local generator its own, and so are its EF21 estimates
    a, b = (dict(flat(s["optimizer"])) for s in straight)
    differ = {k.split(".")[-1] for k in a if torch.is_tensor(a[k]) and not torch.equal(a[k], b[k])}
    assert {"momentum_buffer", "local"} <= differ
    assert ("ef21_local" in differ) == (name == "ef21muon")


@pytest.mark.parametrize("name", list(RESUME_METHODS))
def test_the_interruption_stopped_after_step_6_with_step_4_the_last_checkpoint(name, resumed):
    _, before = resumed
    b = before[name]
    assert [r["step"] for r in b["records"]] == list(range(STOP + 1))
    assert b["summary"]["stopped_after"] == STOP and b["summary"]["last_checkpoint"] == LAST_BEFORE_STOP
    assert b["held"] == [[LAST_BEFORE_STOP], [LAST_BEFORE_STOP]]


@pytest.mark.parametrize("name", list(RESUME_METHODS))
def test_resumed_metrics_continue_the_file_without_duplicate_steps(name, resumed, resume_runs):
    runs, _ = resumed
    again, straight = _records(runs[name]), _records(resume_runs["straight"][name])
    assert [r["step"] for r in again] == list(range(STEPS + 1))
    computed = ("loss", "acc", "lr", "eval_loss", "eval_acc")
    for a, s in zip(again, straight):
        assert {k: a.get(k) for k in computed} == {k: s.get(k) for k in computed}, a["step"]
    run = load_run(runs[name])
    assert run.summary["resumed_from"] == [LAST_BEFORE_STOP] and run.summary["steps_run"] == STEPS
    assert run.summary["stopped_after"] is None
    # the byte totals cover the whole run: the per-step counts still add up to them
    assert sum(r.get("sent", 0) for r in again) == run.summary["bytes"]["by_rank"][0]["sent"] == again[-1]["sent_total"]
    assert [checkpoint.steps_held(runs[name], r) for r in range(2)] == [[4, 8, 12]] * 2  # keep_checkpoints: 3


# ---------------------------------------------------------------------------- in one process (fast)

MATRIX = {"name": "m", "optimizer": "signmuon", "task": {"kind": "matrix", "m": 12, "n": 8, "noise": 0.1},
          "train": {"steps": 10, "global_batch": 1, "nproc": 1, "eval_every": 2, "checkpoint_every": 3,
                    "schedule": {"kind": "linear"}}}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_resume_through_the_cli_in_one_process_is_bitwise(tmp_path, capsys):
    cfg = _write(tmp_path / "m.yaml", {**MATRIX, "train": {**MATRIX["train"], "steps": 9}})
    assert main(["train", str(cfg), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert main(["train", str(cfg), "--out", str(tmp_path / "b"), "--no-progress", "--set", "train.stop_after=5"]) == 0
    printed = capsys.readouterr().out
    assert "stopped after step 5 (train.stop_after); continue from step 3 with: commlmo train" in printed
    assert "--resume --set train.stop_after=null" in printed
    assert main(["train", str(cfg), "--out", str(tmp_path / "b"), "--no-progress", "--resume",
                 "--set", "train.stop_after=null"]) == 0
    assert re.search(r"steps +9 \(resumed from step 3\)", capsys.readouterr().out)
    assert_bitwise_equal(checkpoint.load(tmp_path / "a", 0, 9), checkpoint.load(tmp_path / "b", 0, 9))
    assert [r["step"] for r in _records(tmp_path / "b")] == list(range(10))


def test_resume_refuses_a_config_that_changes_what_the_run_computes(tmp_path):
    train(MATRIX, out=tmp_path, progress=False, report=False, overrides={"train.stop_after": 4})
    changed = {**MATRIX, "optimizer": {"preset": "signmuon", "groups": {"hidden": {"lr": 0.5}}}}
    # the run directory's config.yaml is checked before any worker starts
    with pytest.raises(ConfigError, match=r"cannot resume: the run config differs from the one in "
                       r".*config.yaml \(optimizer.groups.0.lr: 0.02 -> 0.5\)"):
        train(changed, out=tmp_path, progress=False, report=False, resume=True)
    # and each checkpoint's own copy of the config, should config.yaml be gone
    (tmp_path / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"cannot resume: the run config differs from the one that wrote the "
                       r"checkpoint at step 3 \(optimizer.groups.0.lr: 0.02 -> 0.5\)"):
        train(changed, out=tmp_path, progress=False, report=False, resume=True)
    with pytest.raises(ConfigError, match=r"train.steps: 10 -> 20\).*may change only train.backend"):
        train(MATRIX, out=tmp_path, progress=False, report=False, resume=True, overrides={"train.steps": 20})
    # what only steers the run may change
    run = train(MATRIX, out=tmp_path, progress=False, report=False, resume=True,
                overrides={"train.checkpoint_every": 5, "train.timeout_s": 99})
    assert run.summary["resumed_from"] == [3] and run.summary["steps_run"] == 10


def test_resume_with_no_checkpoint_yet_starts_at_step_0(tmp_path, capsys):
    run = train(MATRIX, out=tmp_path / "new", progress=False, report=False, resume=True)
    assert run.summary["resumed_from"] == [] and run.summary["steps_run"] == 10
    assert "no checkpoint under" in capsys.readouterr().err


def test_resume_without_out_continues_the_newest_run_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(MATRIX, progress=False, report=False, overrides={"train.stop_after": 7})
    (first,) = Path("runs").glob("m-*")
    run = train(MATRIX, progress=False, report=False, resume=True, overrides={"train.stop_after": None})
    assert run.path == first and run.summary["resumed_from"] == [6]
    with pytest.raises(ConfigError, match=r"--resume: no run of 'other' with checkpoints under runs/"):
        train({**MATRIX, "name": "other"}, progress=False, report=False, resume=True)


def test_metrics_writer_resume_drops_the_steps_to_redo_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / (s + 1)}) for s in range(8)]
    path.write_text("\n".join(lines) + '\n{"step": 8, "lo')  # killed mid-write
    w = MetricsWriter(path, resume_after=5)
    w.write({"step": 6, "loss": 0.5})
    w.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2, 3, 4, 5, 6]


def test_a_checkpoint_counts_only_once_every_rank_has_written_it(tmp_path):
    for rank, steps in ((0, [4, 8]), (1, [4])):
        for s in steps:
            checkpoint.save(tmp_path, rank, s, {"step": s}, keep=2)
    (checkpoint.rank_dir(tmp_path, 1) / ".step-00000008.pt.tmp123").write_bytes(b"torn")  # killed mid-write
    assert checkpoint.steps_held(tmp_path, 1) == [4]
    assert checkpoint.latest_common(tmp_path, 2) == 4
    assert checkpoint.load(tmp_path, 0, 8) == {"step": 8}
    checkpoint.save(tmp_path, 1, 8, {"step": 8}, keep=1)  # also sweeps the torn file
    assert checkpoint.steps_held(tmp_path, 1) == [8] and not list(checkpoint.rank_dir(tmp_path, 1).glob(".*"))
    (checkpoint.rank_dir(tmp_path, 0) / "step-00000012.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match=r"rank 0: cannot read checkpoint .*step-00000012.pt"):
        checkpoint.load(tmp_path, 0, 12)
