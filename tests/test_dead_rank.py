"""A rank that dies mid-run: the others stop with an error that says so, and the last checkpoint resumes.

``train.fault: {rank: 1, at_step: 7, kind: exit}`` is the testing hook: rank 1
calls ``os._exit(1)`` at the start of step 7, as a crash or an OOM kill would
(no exception, no clean-up).  The elastic launcher sees it exit, stops rank 0
at once (as ``torchrun`` does) and reports rank 1 as the root cause.  A rank
that hangs instead (``kind: hang``) is reported by the ranks waiting for it,
after ``train.collective_timeout_s``.  With ``train.max_restarts`` the launcher
restarts every worker, and the restarted run continues from the checkpoint.
"""

from __future__ import annotations

import time

import pytest
import yaml

from commlmo import checkpoint
from commlmo.cli import main
from resume_runs import assert_bitwise_equal, resume_config

pytestmark = pytest.mark.distributed


def test_a_rank_that_dies_stops_the_others_with_a_clear_error_and_the_checkpoint_resumes(
        tmp_path, capsys, resume_runs):
    cfg = tmp_path / "dies.yaml"
    cfg.write_text(yaml.safe_dump(resume_config(
        "signmuon", checkpoint_every=3, collective_timeout_s=5, fault={"rank": 1, "at_step": 7, "kind": "exit"})))
    out = tmp_path / "run"

    start = time.monotonic()
    assert main(["train", str(cfg), "--out", str(out), "--no-progress"]) == 2
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert "commlmo train: error: rank 1 failed; the launcher stopped the other rank:" in err
    assert "rank 1: exited with code 1 and reported nothing" in err
    assert (f"signmuon: last complete checkpoint: step 6 in {out / 'checkpoints'}; continue with "
            f"`commlmo train {out / 'config.yaml'} --out {out} --resume --set train.fault=null`") in err
    assert "Traceback" not in err
    assert elapsed < 40, elapsed  # start-up, 6 steps and the error: nobody waited for a timeout

    # the checkpoint is intact on both ranks, and readable
    assert [checkpoint.steps_held(out, r) for r in range(2)] == [[3, 6], [3, 6]]
    assert not list((out / "checkpoints").rglob(".*.tmp*"))
    assert {checkpoint.load(out, r, 6)["step"] for r in range(2)} == {6}
    assert all(checkpoint.verify(out, r, 6) is None for r in range(2))

    # and it resumes: the run ends with the same bits as one that never lost a rank
    assert main(["train", str(out / "config.yaml"), "--out", str(out), "--resume", "--set", "train.fault=null",
                 "--no-progress"]) == 0
    for rank in range(2):
        assert_bitwise_equal(checkpoint.load(resume_runs["straight"]["signmuon"], rank, 12), checkpoint.load(out, rank, 12))


def test_a_rank_that_hangs_is_reported_by_the_one_waiting_for_it(tmp_path, capsys):
    cfg = tmp_path / "hangs.yaml"
    cfg.write_text(yaml.safe_dump(resume_config(
        "signmuon", checkpoint_every=3, collective_timeout_s=3, fault={"rank": 1, "at_step": 7, "kind": "hang"})))
    out = tmp_path / "run"
    start = time.monotonic()
    assert main(["train", str(cfg), "--out", str(out), "--no-progress"]) == 2
    assert time.monotonic() - start < 60
    err = capsys.readouterr().err
    assert "commlmo train: error: rank 0 failed; the launcher stopped the other rank:" in err
    assert ("rank 0: lost contact with another rank in step 7: it died or stopped answering "
            "(each collective waits at most train.collective_timeout_s = 3 s)") in err
    assert "The last complete checkpoint is step 6" in err


def test_the_launcher_restarts_the_workers_and_the_run_continues_from_the_checkpoint(tmp_path, capfd, resume_runs):
    """train.max_restarts: 1: rank 1 dies at step 7 (the hook fires in the first attempt only), every
    worker is restarted, and the run resumes from step 6 to the same bits as one that never failed."""
    cfg = tmp_path / "restarts.yaml"
    cfg.write_text(yaml.safe_dump(resume_config(
        "signmuon", checkpoint_every=3, collective_timeout_s=5, max_restarts=1,
        fault={"rank": 1, "at_step": 7, "kind": "exit"})))
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--no-progress"]) == 0
    err = capfd.readouterr().err  # the workers' own stderr
    assert "the launcher restarted the workers after a failure (restart 1, train.max_restarts)" in err
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == [6] and summary["steps_run"] == 12
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(13))
    for rank in range(2):
        assert_bitwise_equal(checkpoint.load(resume_runs["straight"]["signmuon"], rank, 12), checkpoint.load(out, rank, 12))
