"""The learning-rate schedule is torch's LambdaLR, checkpointed and resumed; the tables show best and final loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from commlmo import build_optimizer, checkpoint
from commlmo.cli import main
from commlmo.metrics import RunResult, best_eval, compare_table, run_table
from commlmo.runconfig import ScheduleConfig


def _opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    return model, build_optimizer(model, "signmuon")


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_the_schedule_is_a_lambdalr_with_the_closed_form_multiplier(kind):
    sched_cfg = ScheduleConfig(kind=kind, warmup=3, final=0.1)
    model, opt = _opt()
    base = [g["lr"] for g in opt.param_groups]
    sched = sched_cfg.scheduler(opt, 20)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    for k in range(20):  # step k+1 runs at base * multiplier(k), bit for bit
        assert [g["lr"] for g in opt.param_groups] == [b * sched_cfg(k, 20) for b in base]
        model(torch.randn(2, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def test_the_scheduler_state_resumes_bitwise():
    cfg = ScheduleConfig(kind="cosine", warmup=2)
    model, opt = _opt()
    sched = cfg.scheduler(opt, 10)
    for _ in range(4):
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    later = []
    for _ in range(3):
        opt.step()
        sched.step()
        later.append([g["lr"] for g in opt.param_groups])
    model2, opt2 = _opt()
    sched2 = cfg.scheduler(opt2, 10)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    again = []
    for _ in range(3):
        opt2.step()
        sched2.step()
        again.append([g["lr"] for g in opt2.param_groups])
    assert again == later


def test_a_run_checkpoints_the_scheduler_and_logs_the_rate_it_used(tmp_path, capsys):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "m", "optimizer": "signmuon", "task": {"kind": "matrix", "m": 12, "n": 8},
        "train": {"steps": 8, "global_batch": 1, "eval_every": 4, "checkpoint_every": 4,
                  "schedule": {"kind": "cosine", "warmup": 3}}}))
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    state = checkpoint.load(tmp_path / "run", 0, 8)
    assert state["scheduler"]["last_epoch"] == 8 and state["format"] == checkpoint.FORMAT
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    base = state["optimizer"]["param_groups"][0]["initial_lr"]
    schedule = ScheduleConfig(kind="cosine", warmup=3)
    assert [r["lr"] for r in records if "lr" in r] == [base * schedule(k, 8) for k in range(8)]


def _run(name: str, losses: list[float], steps: int = 1500) -> RunResult:
    every = steps // (len(losses) - 1)
    records = [{"step": i * every, "eval_loss": v, "eval_acc": 0.5, "sent_total": 1000 * i, "time": float(i)}
               for i, v in enumerate(losses)]
    summary = {"name": name, "steps": steps, "steps_run": steps, "world_size": 4, "backend": "gloo", "device": "cpu",
               "best_eval_loss": min(losses), "wall_time": 10.0, "train_time": 9.0, "has_accuracy": True,
               "bytes": {"sent_per_worker": 1000 * (len(losses) - 1), "received_per_worker": 0,
                         "by_rank": [{"by_collective": {}}]}}
    return RunResult(name, Path(name), records, summary)


def test_the_tables_report_the_best_and_the_final_eval_loss():
    overfits = _run("overfits", [2.3, 0.9, 0.6, 0.7, 0.85])  # best at step 750, then climbs
    assert best_eval(overfits) == (0.6, 750)
    table = compare_table([overfits, _run("steady", [2.3, 1.0, 0.8, 0.7, 0.65])], target=0.7)
    head, _, row1, row2 = table.splitlines()
    assert "final eval loss" in head and "best eval loss" in head and "best at step" in head
    assert row1.split()[:4] == ["overfits", "0.8500", "0.6000", "750"]
    assert row2.split()[:4] == ["steady", "0.6500", "0.6500", "1500"]
    assert "0.8500 / 0.6000 (best at step 750)" in run_table(overfits)
    assert math.isnan(best_eval(_run("none", [math.nan, math.nan]))[0])
