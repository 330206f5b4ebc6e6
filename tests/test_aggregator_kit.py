"""The aggregator contract kit over every installed aggregator and the median plugin, and proof
that it catches broken ones.

Every built-in aggregator (distribution ``commlmo``) runs with the uplinks it is used
with (identity and scaled sign for the means, sign for the vote) and each of its
transports; any other installed aggregator runs with its defaults.  The example
third-party ``median`` (plugins/commlmo-median) is checked as the registry loads it when
it is installed, and from its source file otherwise.  ``BrokenAggregator`` breaks one
promise per setting, and the kit must name that promise.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch

import commlmo
from commlmo import registry
from commlmo.errors import DistributedError
from commlmo.plugin import Aggregator, PluginConfig
from commlmo.testing import AggregatorContractError, AggregatorKitNote, check_aggregator
from commlmo.testing._broken import AGGREGATOR_BREAKS, BrokenAggregator
from commlmo.testing.aggregator_kit import DEFAULT_SHAPES, KNOWN_ATTACKS, PROPERTIES, _Check, _Example
from commlmo.transport import gather_payloads, mean_of_payloads

ROOT = Path(__file__).resolve().parents[1]
SCALED_SIGN = {"kind": "sign", "scale": "mean"}

# (aggregator config, uplink) per built-in kind; any other installed name runs with its defaults
REPRESENTATIVE: dict[str, list] = {
    "mean": [("mean", "identity"), ("mean", SCALED_SIGN), ({"kind": "mean", "transport": "allreduce"}, "identity"),
             ({"kind": "mean", "transport": "allgather"}, "identity")],
    "majority_vote": [("majority_vote", "sign"), ({"kind": "majority_vote", "transport": "int8"}, "sign"),
                      ({"kind": "majority_vote", "transport": "allgather"}, "sign"),
                      ({"kind": "majority_vote", "ties": "abstain"}, "sign"),
                      ({"kind": "majority_vote", "ties": "abstain", "transport": "allgather"}, "sign")],
    "ef21": [("ef21", "identity"), ("ef21", SCALED_SIGN), ({"kind": "ef21", "transport": "allgather"}, "identity")],
    "error_feedback": [("error_feedback", "identity"), ("error_feedback", SCALED_SIGN)],
}


def _installed():
    for row in registry.listing("aggregator"):
        if row.status != "ok" and not row.info.builtin:
            continue
        name = row.info.name
        for i, (config, uplink) in enumerate(REPRESENTATIVE.get(name, [(row.info.kind, None)])):
            yield pytest.param(config, uplink, id=f"{name}-{i}")


@pytest.mark.parametrize("config,uplink", list(_installed()))
def test_every_installed_aggregator_keeps_its_contract(config, uplink):
    report = check_aggregator(config, uplink=uplink)
    assert "reference" in report.checked  # every built-in declares its single-process definition
    assert "state" in report.checked


def _median_class() -> type[Aggregator]:
    """The plugin as the registry loads it if installed, else from plugins/commlmo-median."""
    if "median" in registry.names("aggregator"):
        return registry.get("aggregator", "median")
    path = ROOT / "plugins" / "commlmo-median" / "commlmo_median" / "__init__.py"
    spec = importlib.util.spec_from_file_location("commlmo_median", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("commlmo_median", module)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.Median


@pytest.mark.parametrize("uplink", ["identity", SCALED_SIGN, "sign"])
def test_the_median_plugin_keeps_its_contract_and_its_robustness_claims(uplink):
    median = _median_class()()
    report = check_aggregator(median, uplink=uplink, world_sizes=(1, 2, 3, 4))
    assert report.checked == list(PROPERTIES)
    assert set(median.capabilities.robust) == {"flip", "random", "zero"}


def test_the_median_is_not_one_vote_however_loud_and_the_kit_says_so():
    # a louder attacker moves a median (within the honest range), so the plugin does not claim "amplify"
    with pytest.raises(AggregatorContractError) as info:
        check_aggregator(_median_class()(), robust=("amplify",), world_sizes=(1,), examples=1)
    assert info.value.property == "robust" and "-10 v instead of -v" in str(info.value)


@pytest.mark.parametrize("breaks", sorted(AGGREGATOR_BREAKS))
def test_the_kit_names_the_broken_promise(breaks):
    with pytest.raises(AggregatorContractError) as info:
        check_aggregator(BrokenAggregator(breaks=breaks))
    err = info.value
    assert isinstance(err, AssertionError)
    assert err.property == AGGREGATOR_BREAKS[breaks] and err.property in PROPERTIES
    msg = str(err)
    assert f"property {err.property!r}" in msg and "broken_aggregator" in msg and f"breaks={breaks!r}" in msg
    assert "simulated worker(s), shapes [(13,)" in msg and "dtype torch." in msg and "seed 0" in msg
    assert "transport 'allgather'" in msg and "uplink Identity()" in msg


def test_a_correct_aggregator_passes_every_check():
    report = check_aggregator(BrokenAggregator(breaks="nothing"), uplink=SCALED_SIGN, examples=4)
    assert report.checked == [p for p in PROPERTIES if p != "robust"]
    assert set(report.skipped) == {"robust"}


@pytest.mark.parametrize("config,uplink", [("mean", "identity"), ("majority_vote", "sign"), ("ef21", SCALED_SIGN),
                                           ("error_feedback", SCALED_SIGN)])
def test_the_kit_runs_exactly_what_the_optimizer_applies(config, uplink):
    """One group, no momentum, no LMO, lr 1 on zero parameters: the update is -aggregate, bit for bit."""
    agg = registry.build_plugin("aggregator", config)
    ex = _Example(3, DEFAULT_SHAPES, torch.float32, "normal", 0)
    kit = _Check(agg, registry.build_plugin("compressor", uplink), ex, agg.capabilities, 60).run(steps=1, inject=False)

    def optimizer_step(rank, comm):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in ex.shapes]
        group = {"name": "g", "params": {"ndim": None}, "lmo": None, "lmo_at": "none", "momentum": None,
                 "lr_rule": {"kind": "constant"}, "uplink": uplink, "aggregator": config, "lr": 1.0}
        opt = commlmo.build_optimizer([(f"w{i}", p) for i, p in enumerate(params)], {"groups": [group]},
                                      process_group=comm)
        for p, v in zip(params, ex.vectors(rank, 0)):
            p.grad = v
        opt.step()
        return [-p.detach() for p in params]

    applied = commlmo.simulate(3, optimizer_step)
    for rank in range(3):
        assert all(torch.equal(a, b) for a, b in zip(kit[0][rank].dense, applied[rank]))


class _NoReference(Aggregator):
    """A mean without a reference()."""

    class Config(PluginConfig):
        kind: Literal["no_reference"] = "no_reference"

    def aggregate(self, payloads, messages, states, *, codecs, comm, generators, transport, label):
        return mean_of_payloads(payloads, codecs, comm, transport="allgather", label=label)


def test_an_aggregator_without_reference_is_checked_for_the_rest_with_a_note():
    with pytest.warns(AggregatorKitNote, match="declares no reference"):
        report = check_aggregator(_NoReference(), examples=1)
    assert "reference" in report.skipped and "reference" not in report.checked and "agreement" in report.checked


class _Swallows(_NoReference):
    """Catches the failure of its collective and returns its own message instead."""

    class Config(PluginConfig):
        kind: Literal["swallows"] = "swallows"

    def aggregate(self, payloads, messages, states, *, codecs, comm, generators, transport, label):
        try:
            return super().aggregate(payloads, messages, states, codecs=codecs, comm=comm, generators=generators,
                                     transport=transport, label=label)
        except DistributedError:
            return [m.clone() for m in messages]


class _Skips(_NoReference):
    """Rank 0 makes one collective more than the others: the kit must not hang."""

    class Config(PluginConfig):
        kind: Literal["skips"] = "skips"

    def aggregate(self, payloads, messages, states, *, codecs, comm, generators, transport, label):
        if comm.rank == 0:
            gather_payloads(payloads, comm, label=label)
        return super().aggregate(payloads, messages, states, codecs=codecs, comm=comm, generators=generators,
                                 transport=transport, label=label)


@pytest.mark.filterwarnings("ignore::commlmo.testing.AggregatorKitNote")
def test_a_swallowed_failure_and_mismatched_collectives_are_reported():
    with pytest.raises(AggregatorContractError, match="returned normally; a failed collective must propagate") as info:
        check_aggregator(_Swallows(), examples=1)
    assert info.value.property == "state"
    with pytest.raises(AggregatorContractError, match="did not make the same collective calls") as info:
        check_aggregator(_Skips(), world_sizes=(2,), examples=1, timeout=1.0)
    assert info.value.property == "agreement"


def test_robustness_claims_are_checked_as_declared_or_as_asked():
    # majority vote declares "amplify"; it also keeps every coordinate in the honest range
    assert commlmo.build_plugin("aggregator", "majority_vote").capabilities.robust == ("amplify",)
    check_aggregator("majority_vote", robust=tuple(KNOWN_ATTACKS), world_sizes=(3,), examples=1)
    for attack in KNOWN_ATTACKS:  # a float32 mean resists none of them
        with pytest.raises(AggregatorContractError) as info:
            check_aggregator("mean", robust=(attack,), world_sizes=(1,), examples=1)
        assert info.value.property == "robust" and attack in str(info.value)
    with pytest.raises(ValueError, match="cannot check; known attacks: amplify"):
        check_aggregator("mean", robust=("collusion",))


def test_the_uplink_must_fit_and_a_fitting_one_is_chosen_by_default():
    report = check_aggregator("majority_vote", world_sizes=(1,), examples=1)  # identity lacks sign bits
    assert report.uplink.startswith("SignCompressor(scale='none'")
    with pytest.raises(ValueError, match="needs an uplink compressor that is sign_bits"):
        check_aggregator("majority_vote", uplink="identity")
