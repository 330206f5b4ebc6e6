"""Guards that keep a run from going silently wrong (each failed before the fix it pins):

* ``load_state_dict`` refuses a state of another config or another model, and changes nothing;
* a parameter passed twice is refused (it would be updated twice per step);
* an aggregator's output is checked: count, shape, finiteness, and agreement across ranks.
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch

import commlmo
from commlmo import ConfigError, build_optimizer, simulate
from commlmo.errors import AggregatorOutputError
from commlmo.plugin import Aggregator, PluginConfig
from commlmo.transport import mean_of_payloads


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def step(model, opt, seed=0):
    torch.manual_seed(seed)
    opt.zero_grad()
    model(torch.randn(4, 6)).square().mean().backward()
    opt.step()


def snapshot(opt):
    sd = opt.state_dict()
    return {k: v.clone() for st in sd["state"].values() for k, v in st.items() if torch.is_tensor(v)}, \
        [dict(g) for g in sd["param_groups"]]


@pytest.mark.parametrize("other", [
    lambda: build_optimizer(mlp(), "ef21muon"),                                   # another config
    lambda: build_optimizer(torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(),
                                                torch.nn.Linear(9, 3)), "signmuon"),  # another model
    lambda: build_optimizer(mlp(), {"preset": "signmuon", "groups": {"hidden": {"lr": 0.5}}}),
])
def test_load_state_dict_refuses_another_config_or_model_and_changes_nothing(other):
    model = mlp()
    source = build_optimizer(model, "signmuon")
    step(model, source)
    target = other()
    for g in target.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    target.step()
    before = snapshot(target)
    with pytest.raises(ConfigError, match="cannot load this optimizer state.*nothing was changed"):
        target.load_state_dict(source.state_dict())
    after = snapshot(target)
    assert before[1] == after[1]
    assert before[0].keys() == after[0].keys() and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    target.step()  # still works


def test_load_state_dict_round_trips_its_own_state():
    model = mlp()
    opt = build_optimizer(model, "ef21muonsign")
    step(model, opt)
    sd = opt.state_dict()
    again = build_optimizer(mlp(), "ef21muonsign")
    again.load_state_dict(sd)
    assert again.steps == 1


def test_a_parameter_passed_twice_is_refused():
    w = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ConfigError, match="'b' is the same tensor as 'a'"):
        build_optimizer([("a", w), ("b", w)], "muon")
    with pytest.raises(ConfigError, match="same tensor"):
        build_optimizer([w, w], "muon")


class _BadConfig(PluginConfig):
    kind: Literal["bad_mean"] = "bad_mean"
    breaks: Literal["short", "nan", "shape", "rank"] = "short"


class BadMean(Aggregator):
    """A mean that breaks its contract in one chosen way."""

    Config = _BadConfig

    def plan(self, uplink, *, world_size, payload_bytes, dense_entries):
        return "allgather"

    def aggregate(self, payloads, messages, states, *, codecs, comm, generators, transport, label):
        out = mean_of_payloads(payloads, codecs, comm, transport="allgather", label=label)
        b = self.config.breaks
        if b == "short":
            return out[:-1]
        if b == "nan":
            out[0] = out[0] * float("nan")
        if b == "shape":
            out[0] = out[0].reshape(-1)
        if b == "rank":
            out[0] = out[0] + comm.rank
        return out


@pytest.fixture
def bad_mean():
    commlmo.register("aggregator", BadMean)
    yield
    commlmo.registry.unregister("aggregator", "bad_mean")


@pytest.mark.parametrize("breaks,match", [
    ("short", "returned 1 results for 2 parameters"),
    ("nan", "NaN or Inf for parameter 'w' although every gradient was finite"),
    ("shape", r"returned shape \(12,\) for parameter 'w' of shape \(4, 3\)"),
])
def test_aggregator_output_is_checked_and_nothing_is_applied(bad_mean, breaks, match):
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))
    cfg = {"groups": [{"name": "all", "params": {"ndim": None}, "lmo": None, "lmo_at": "none", "lr_rule": {"kind": "constant"},
                       "aggregator": {"kind": "bad_mean", "breaks": breaks}}]}
    opt = build_optimizer([("w", w), ("b", b)], cfg)
    before = [w.detach().clone(), b.detach().clone()]
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    with pytest.raises(AggregatorOutputError, match=match):
        opt.step()
    assert torch.equal(w, before[0]) and torch.equal(b, before[1])
    assert all(not s for s in opt.state.values()) or all("momentum_buffer" not in s or not s["momentum_buffer"].any()
                                                          for s in opt.state.values())


def test_aggregates_that_differ_by_rank_are_caught_at_the_first_step(bad_mean):
    cfg = {"groups": [{"name": "all", "params": {"ndim": None}, "lmo": None, "lmo_at": "none", "lr_rule": {"kind": "constant"},
                       "aggregator": {"kind": "bad_mean", "breaks": "rank"}}]}

    def worker(rank, comm):
        w = torch.nn.Parameter(torch.zeros(4, 3))
        opt = build_optimizer([("w", w)], cfg, process_group=comm)
        w.grad = torch.ones_like(w)
        try:
            opt.step()
        except AggregatorOutputError as exc:
            return str(exc), bool(w.any())
        return None, bool(w.any())

    for msg, moved in simulate(2, worker):
        assert msg is not None and "different result on ranks" in msg and "'w'" in msg
        assert not moved


def test_the_owner_role_is_refused_where_it_is_not_supported_and_auto_says_what_it_chose():
    w, b = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))
    with pytest.raises(ConfigError, match="server: owner is not supported here: lmo_at is 'worker' and aggregator "
                       "'majority_vote' keeps no server state"):
        build_optimizer([("w", w)], {"preset": "signmuon", "groups": {"hidden": {"server": "owner"}}})
    with pytest.raises(ConfigError, match="server: owner is not supported here: element-wise rules run replicated"):
        build_optimizer([("b", b)], {"preset": "signmuon", "groups": {"vector": {"server": "owner"}}})

    def worker(rank, comm):
        picks = {}
        for preset in ("muonserver", "muonsign", "muonusign"):
            opt = build_optimizer([("w", torch.nn.Parameter(torch.randn(64, 32)))],
                                  {"preset": preset, "groups": {"hidden": {"server": "auto"}}}, process_group=comm)
            picks[preset] = opt._runtimes[0].server
            assert f"server={picks[preset]}" in opt.describe_routing()
        return picks

    picks = simulate(2, worker)[0]
    # owner where it sends no more than replicated; muonusign's float32 downlink would cost 32x its 1-bit uplink
    assert picks == {"muonserver": "owner", "muonsign": "owner", "muonusign": "replicated"}


def test_a_group_built_by_add_param_group_gets_its_configured_server_role():
    """add_param_group built a group's runtime without its server role: `server: owner` ran replicated."""
    cfg = {"preset": "muonserver", "groups": {"hidden": {"server": "owner"}}}

    def worker(rank, comm):
        torch.manual_seed(0)
        opt = build_optimizer([("b", torch.nn.Parameter(torch.randn(5)))], cfg, process_group=comm)
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(6, 4))], "group": "hidden"})
        return {g["group"]: rt.server for g, rt in zip(opt.param_groups, opt._runtimes)}

    assert simulate(2, worker)[0]["hidden"] == "owner"


def test_a_group_with_parameters_on_two_devices_is_refused_at_build():
    """A group draws its random streams on one device; a parameter elsewhere would fail mid-step (randint)."""
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4, device="meta"))
    with pytest.raises(ConfigError, match="'b' is on meta, the group's other parameters on cpu.*share a device"):
        build_optimizer([("a", a), ("b", b)], "muonserver")
