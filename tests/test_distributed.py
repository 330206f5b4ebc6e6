"""Real processes on gloo/127.0.0.1: N ranks equal one process fed the same N gradients, bitwise.

Each world size is one spawn that runs every config, so the suite pays the
process start-up once per world size.
"""

from __future__ import annotations

import math

import pytest
import torch

import commlmo
import commlmo.owner
from commlmo import simulate
from commlmo.launch import spawn
from dist_workers import SHAPES, STEPS, run_configs, train

pytestmark = pytest.mark.distributed

CONFIGS = {name: name for name in commlmo.PRESETS}
CONFIGS |= {
    "ef21muon_topk_threshold": {"preset": "ef21muon", "groups": {"hidden": {"uplink": {
        "kind": "topk", "k": 0.1, "selection": "threshold", "value_dtype": "same"}}}},
    "ef21muon_rankk": {"preset": "ef21muon", "groups": {"hidden": {"uplink": {"kind": "rankk", "rank": 2}}}},
    "ef21muon_natural": {"preset": "ef21muon", "groups": {"hidden": {"uplink": {"kind": "natural"}}}},
    "ef21muon_topk_down": {"preset": "ef21muon", "groups": {"hidden": {
        "downlink": {"kind": "ef21p", "compressor": {"kind": "topk", "k": 0.1}}}}},
    "ef21muon_rankk_down": {"preset": "ef21muon", "groups": {"hidden": {
        "downlink": {"kind": "ef21p", "compressor": {"kind": "rankk", "rank": 2, "method": "svd"}}}}},
    "ef21muon_natural_down": {"preset": "ef21muon", "groups": {"hidden": {
        "downlink": {"kind": "ef21p", "compressor": {"kind": "natural"}}}}},
    "signmuon_int8": {"preset": "signmuon", "groups": {"hidden": {"aggregator": {"kind": "majority_vote", "transport": "int8"}}}},
    "signmuon_allgather": {"preset": "signmuon", "groups": {"hidden": {
        "aggregator": {"kind": "majority_vote", "transport": "allgather"}}}},
    "muonserver_allreduce": {"preset": "muonserver", "groups": {"hidden": {
        "aggregator": {"kind": "mean", "transport": "allreduce"}, "server": "replicated"}}},
    "signmuon_abstain": {"preset": "signmuon", "groups": {"hidden": {"aggregator": {"kind": "majority_vote", "ties": "abstain"}}}},
    # every parameter through one element-wise rule
    "lion_vote": {"groups": [{"name": "all", "params": {"ndim": None}, "rule": {"kind": "lion"},
                              "uplink": {"kind": "sign"}, "aggregator": {"kind": "majority_vote"}}]},
    "lion_mean": {"groups": [{"name": "all", "params": {"ndim": None}, "rule": {"kind": "lion"}}]},
    "adamw_mean": {"groups": [{"name": "all", "params": {"ndim": None}, "rule": {"kind": "adamw"}, "lr": 1e-2}]},
    "onebit_adam": {"groups": [{"name": "all", "params": {"ndim": None}, "rule": {"kind": "onebit_adam", "warmup": 1},
                                "uplink": {"kind": "sign", "scale": "mean"}, "aggregator": {"kind": "error_feedback"}}]},
    # a conv kernel [5, 3, 3, 3] seen as a stack of 5 matrices 3 x 9, with one EF21 sign scale each
    "ef21_stack_view": {"groups": [{"name": "conv", "params": {"ndim": [4]}, "view": {"kind": "stack"},
                                    "uplink": {"kind": "sign", "scale": "mean"}, "aggregator": {"kind": "ef21"}}]},
}


#: the presets with a server step: each also runs with the owner role and the replicated one, forced (the
#: preset itself takes ``server: auto``), and with the compressed EF21-P downlinks
OWNED = ["muonserver", "muonusign", "muonsign", "ef21signmuon", "ef21muonusign", "ef21muonsign", "scion", "gluon",
         "ef21muon", "ef21muon_topk_down", "ef21muon_natural_down"]


def _with_server(name: str, server: str) -> dict:
    cfg = CONFIGS[name] if isinstance(CONFIGS[name], dict) else {"preset": name}
    hidden = {**cfg.get("groups", {}).get("hidden", {}), "server": server}
    return {**cfg, "groups": {**cfg.get("groups", {}), "hidden": hidden}}


CONFIGS |= {f"{name}_{server}": _with_server(name, server) for name in OWNED for server in ("owner", "replicated")}


@pytest.fixture(scope="module", params=[2, 3, 4])
def world(request):
    m = request.param
    real = spawn(run_configs, m, CONFIGS, timeout_s=240)
    simulated = simulate(m, lambda rank, comm: {name: train(cfg, rank, comm) for name, cfg in CONFIGS.items()})
    return m, real, simulated


def _equal(a, b):
    return all(torch.equal(a[n], b[n]) for n in SHAPES)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ranks_agree_bitwise_and_equal_one_process_fed_the_same_gradients(world, name):
    m, real, simulated = world
    for step in range(STEPS):
        ref = simulated[0][name]["history"][step]
        for rank in range(m):
            assert _equal(real[rank][name]["history"][step], real[0][name]["history"][step]), (name, step, rank)
            if name == "muonserver_allreduce" and m > 2:
                # gloo's all-reduce sums in its own order: equal to float rounding, not bitwise
                for n in SHAPES:
                    torch.testing.assert_close(real[rank][name]["history"][step][n], ref[n])
            else:
                assert _equal(real[rank][name]["history"][step], ref), (name, step, rank)


def _sent(step_bytes, prefix):
    return sum(v["sent"] for k, v in step_bytes.items() if k.startswith(prefix))


def test_measured_bytes_equal_the_transport_formulas(world):
    m, real, _ = world
    matrices = [n for n, s in SHAPES.items() if len(s) >= 2]
    d = sum(math.prod(SHAPES[n]) for n in matrices)
    packed = sum(math.ceil(math.prod(SHAPES[n]) / 8) for n in matrices)
    padded = math.ceil(packed / (8 * m)) * 8 * m
    b = real[1]
    # owner vote: all-to-all + all-gather of packed bits, 2(M-1)/M per byte
    assert _sent(b["signmuon"]["bytes"][0], "hidden/majority_vote") == round(2 * (m - 1) / m * padded)
    # int8 sum all-reduce of +-1 votes: 2(M-1)/M bytes per coordinate
    assert _sent(b["signmuon_int8"]["bytes"][0], "hidden/majority_vote") == round(2 * (m - 1) / m * d)
    # all-gather of packed signs: (M-1) bits per coordinate
    assert _sent(b["signmuon_allgather"]["bytes"][0], "hidden/majority_vote") == (m - 1) * math.ceil(packed / 8) * 8
    # float32 mean by the owner transport: 2(M-1)/M * 32 bits (on the padded length)
    assert _sent(b["muonserver_replicated"]["bytes"][0], "hidden/mean") == round(2 * (m - 1) / m * 4 * math.ceil(d / m) * m)
    # the owner role: each rank sends the payloads of the matrices it does not own, and its own matrices'
    # float32 steps to every other rank
    owners = commlmo.owner.assign_owners([torch.empty(SHAPES[n]) for n in matrices], m)
    for rank in range(m):
        up = sum(4 * math.prod(SHAPES[n]) for n, o in zip(matrices, owners) if o != rank)
        down = (m - 1) * sum(4 * math.prod(SHAPES[n]) for n, o in zip(matrices, owners) if o == rank)
        assert _sent(real[rank]["muonserver_owner"]["bytes"][1], "hidden/owner/uplink") == up
        assert _sent(real[rank]["muonserver_owner"]["bytes"][1], "hidden/owner/downlink") == down
    assert _sent(b["muonserver_allreduce"]["bytes"][0], "hidden/mean") == round(2 * (m - 1) / m * 4 * d)
    # the bias (7 entries) goes to the recipe's Distributed Lion group: one owner vote of one packed byte,
    # padded to one 64-bit word per rank
    assert _sent(b["signmuon"]["bytes"][0], "vector/majority_vote") == round(2 * (m - 1) / m * 8 * m)
    assert _sent(b["signmuon"]["bytes"][0], "fallback") == 0
    # every rank accounts the same bytes
    for r in range(m):
        assert real[r]["signmuon"]["bytes"] == real[0]["signmuon"]["bytes"]


def test_vote_is_32x_cheaper_than_float32_all_reduce_up_to_padding(world):
    m, real, _ = world
    # step 1: step 0 also carries the one-off check that every rank holds the same aggregate
    vote = _sent(real[0]["signmuon"]["bytes"][1], "hidden/")
    dense = _sent(real[0]["muonserver_allreduce"]["bytes"][1], "hidden/")
    assert _sent(real[0]["signmuon"]["bytes"][0], "hidden/agreement_check") == (m - 1) * 8 * 3
    # at most one byte of rounding per tensor and one 8*M-byte word pad; bench/comm.py measures large models
    slack = 2 * (m - 1) / m * (len(SHAPES) + 8 * m)
    assert dense / 32 <= vote <= dense / 32 + slack


def test_one_rank_through_the_distributed_path_equals_the_single_process_optimizer():
    (real,) = spawn(run_configs, 1, CONFIGS, timeout_s=120)
    for name, cfg in CONFIGS.items():
        local = train(cfg, 0)
        for step in range(STEPS):
            assert _equal(real[name]["history"][step], local["history"][step]), name
        assert all(not v for v in real[name]["bytes"])


@pytest.mark.parametrize("name", OWNED)
def test_the_owner_server_role_equals_the_replicated_one_bitwise(world, name):
    m, real, _ = world
    for rank in range(m):
        for step in range(STEPS):
            assert _equal(real[rank][f"{name}_owner"]["history"][step], real[rank][name]["history"][step]), (rank, step)


def test_bfloat16_parameters_with_float32_state_agree_bitwise_on_real_ranks():
    from dist_workers import run_bfloat16

    configs = {p: {"preset": p, "groups": {g.name: {"state_dtype": "float32"} for g in commlmo.load_config(p).groups}}
               for p in ("signmuon", "muonserver", "ef21muon")}
    first, *others = spawn(run_bfloat16, 3, configs, timeout_s=240)
    for name in configs:
        assert first[name]["state"] == ["torch.float32"], name
        assert all(p.dtype == torch.bfloat16 for p in first[name]["params"].values())
        for other in others:
            assert _equal(first[name]["params"], other[name]["params"]), name
