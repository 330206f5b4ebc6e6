"""Every SignMuon-family preset is pinned against the dense reference, on 1 and on 3 workers."""

from __future__ import annotations

import pytest
import torch

import commlmo
from commlmo import build_optimizer, simulate
from reference import Reference

SIGNMUON_FAMILY = ["muon", "muonserver", "signmuon", "muonusign", "muonsign",
                   "ef21signmuon", "ef21muonusign", "ef21muonsign", "signsgd"]
SHAPE = (12, 7)  # tall, and 84 entries: not a multiple of 8 (nor of 3)
STEPS = 4


def preset_config(name):
    cfg = {"preset": name, "groups": {"hidden": {"lr": 0.05}}}
    if commlmo.PRESETS[name].lmo is not None:
        cfg["groups"]["hidden"]["lmo"] = {"kind": "spectral", "dtype": "float32"}
    return cfg


def worker_grads(workers, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(SHAPE, generator=g) for _ in range(workers)] for _ in range(STEPS)]


def run_optimizer(name, grads_per_step, rank, comm):
    x = torch.nn.Parameter(torch.randn(SHAPE, generator=torch.Generator().manual_seed(123)))
    opt = build_optimizer([("w", x)], preset_config(name), process_group=comm)
    for grads in grads_per_step:
        x.grad = grads[rank].clone()
        opt.step()
    return x.detach().clone()


def run_reference(name, grads_per_step, workers):
    ref = Reference(name, torch.randn(SHAPE, generator=torch.Generator().manual_seed(123)), workers, lr=0.05)
    for grads in grads_per_step:
        ref.step(grads)
    return ref.params()


@pytest.mark.parametrize("name", SIGNMUON_FAMILY)
def test_preset_on_one_process_matches_the_centralized_method(name):
    grads = worker_grads(1)
    ours = run_optimizer(name, grads, 0, None)
    ref = run_reference(name, grads, 1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SIGNMUON_FAMILY)
def test_preset_on_three_simulated_workers_matches_the_reference(name):
    grads = worker_grads(3)
    results = simulate(3, lambda rank, comm: run_optimizer(name, grads, rank, comm))
    for r in results[1:]:
        assert torch.equal(r, results[0])
    torch.testing.assert_close(results[0], run_reference(name, grads, 3), rtol=1e-5, atol=1e-6)


def test_presets_differ_only_where_the_table_says():
    rows = {name: commlmo.load_config(name).groups[0] for name in SIGNMUON_FAMILY}
    base = rows["muonserver"]
    for name, row in rows.items():
        differing = {f for f in type(row).model_fields if getattr(row, f) != getattr(base, f)}
        assert differing <= {"lmo", "lmo_at", "uplink", "aggregator", "downlink"}, (name, differing)


def test_presets_cli_lists_every_preset(capsys):
    from commlmo.cli import main

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in commlmo.PRESETS:
        assert f"\n{name} " in out
    assert "majority_vote" in out and "ef21p" in out
