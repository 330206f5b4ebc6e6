"""commlmo.integrations on one process: the per-rank state dict and the torch-style factory.

The recipes themselves run on 2 gloo ranks in tests/test_integrations.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

import commlmo
from commlmo import ConfigError, build_optimizer
from commlmo.integrations import commlmo_optimizer, find_ddp, turn_off_ddp_reduction

PRESET = "signmuon"


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def train(model, opt, steps) -> None:
    for s in steps:
        opt.zero_grad()
        g = torch.Generator().manual_seed(s)
        model(torch.randn(4, 6, generator=g)).square().mean().backward()
        opt.step()


def test_a_consolidated_world_of_one_round_trips_bitwise():
    model = mlp()
    opt = build_optimizer(model, PRESET)
    train(model, opt, [0, 1])
    opt.consolidate_state_dict()
    saved = copy.deepcopy(opt.state_dict())
    assert saved["commlmo"]["ranks"] == {}  # nobody else
    twin = mlp(seed=3)
    twin.load_state_dict(model.state_dict())
    opt2 = build_optimizer(twin, PRESET)
    opt2.load_state_dict(saved)
    train(model, opt, [2])
    train(twin, opt2, [2])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert "ranks" not in opt.state_dict()["commlmo"]  # the collection is of the step it was made at


def test_a_state_of_another_rank_is_refused_and_changes_nothing():
    model = mlp()
    opt = build_optimizer(model, PRESET)
    train(model, opt, [0])
    saved = copy.deepcopy(opt.state_dict())
    saved["commlmo"]["rank"], saved["commlmo"]["world_size"] = 1, 2  # as rank 1 of 2 saved it
    target = build_optimizer(mlp(), PRESET)
    with pytest.raises(ConfigError, match=r"per-rank state of rank\(s\) \[1\].*not of rank 0.*consolidate_state_dict"):
        target.load_state_dict(saved)
    assert target.steps == 0 and not target.state
    # with rank 0's entries collected in it, the same file loads
    saved["commlmo"]["rank_keys"], saved["commlmo"]["ranks"] = {}, {0: {}}
    target.load_state_dict(saved)
    assert target.steps == 1


def test_the_wrappers_are_unwrapped_and_an_unwrapped_model_is_left_alone():
    model = mlp()
    opt = build_optimizer(model, PRESET)

    class Wrapper:  # accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer: .optimizer / ._optimizer
        def __init__(self, inner):
            self.optimizer = inner

    assert commlmo_optimizer(Wrapper(Wrapper(opt))) is opt
    assert commlmo_optimizer(torch.optim.SGD(model.parameters(), lr=0.1)) is None
    assert find_ddp(model) is None and turn_off_ddp_reduction(model) is model
    turn_off_ddp_reduction(Wrapper(opt))  # no DDP yet: the one that first runs the model gets the hook
    assert opt._ddp_turn_off


def test_torchtitan_factory_takes_torch_param_groups_and_drops_the_implementation_switches():
    pytest.importorskip("torchtitan.components.optimizer")
    from commlmo.integrations.torchtitan import build_commlmo

    model = mlp()
    named = list(model.named_parameters())
    groups = [{"params": [p for _, p in named], "param_names": [n for n, _ in named], "fused": True,
               "foreach": False, "lr": 0.05}]
    opt = build_commlmo(groups, config=PRESET)
    assert sorted(n for g in opt.param_groups for n in g["param_names"]) == sorted(n for n, _ in named)
    assert {g["lr"] for g in opt.param_groups} == {0.05}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'betas'.*set them in the optimizer config"):
        build_commlmo([{**groups[0], "betas": (0.9, 0.95)}], config=PRESET)
    assert isinstance(opt, commlmo.CommOptimizer)
