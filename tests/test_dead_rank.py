"""A rank that dies mid-run: the others stop with an error that says so, and the last checkpoint resumes.

``train.fault: {rank: 1, at_step: 7, kind: exit}`` is the testing hook: rank 1
calls ``os._exit(1)`` at the start of step 7, as a crash or an OOM kill would
(no exception, no clean-up).  Rank 0 is then inside step 7's first collective;
gloo reports the closed connection at once (a rank that hangs instead is
reported after ``train.collective_timeout_s``).
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
    assert "commlmo train: error: 2 of 2 ranks failed" in err
    assert "rank 1: exited with code 1 and reported nothing" in err
    assert ("rank 0: lost contact with another rank in step 7: it died or stopped answering "
            "(each collective waits at most train.collective_timeout_s = 5 s)") in err
    assert (f"signmuon: last complete checkpoint: step 6 in {out / 'checkpoints'}; continue with "
            f"`commlmo train {out / 'config.yaml'} --out {out} --resume --set train.fault=null`") in err
    assert elapsed < 40, elapsed  # start-up, 6 steps and the error: nobody waited for a timeout

    # the checkpoint is intact on both ranks, and readable
    assert [checkpoint.steps_held(out, r) for r in range(2)] == [[3, 6], [3, 6]]
    assert not list((out / "checkpoints").rglob(".*.tmp*"))
    assert {checkpoint.load(out, r, 6)["step"] for r in range(2)} == {6}

    # and it resumes: the run ends with the same bits as one that never lost a rank
    assert main(["train", str(out / "config.yaml"), "--out", str(out), "--resume", "--set", "train.fault=null",
                 "--no-progress"]) == 0
    for rank in range(2):
        assert_bitwise_equal(checkpoint.load(resume_runs["straight"]["signmuon"], rank, 12), checkpoint.load(out, rank, 12))
