"""Measured bytes per rank equal the cost model, for every transport, server role and preset.

The cost model is :func:`commlmo.cost.step_bytes`: the formula of each bucket's
transport or server role (owner and allreduce ``2(M-1)/M * payload``, allgather
``(M-1) * payload``, int8 ``2(M-1)/M * entries``; the owner role's all-to-all-v of each
payload to its parameter's owner and all-gather-v of each owner's downlink messages)
applied to the *declared* wire sizes, with the padding the transports add, plus the
step's agreement flags and, on the first step only, ``layout_check`` and each replicated
group's ``agreement_check``.  The measured side is ``opt.bytes.step`` (what the optimizer
handed to each collective), summed by group label.  Simulated ranks (threads, the same
:class:`~commlmo.comm.Communicator` accounting) cover ``M = 2..8``; one real gloo run at
``M = 3`` checks that real and simulated byte books are identical, label by label.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import commlmo
from commlmo import simulate
from commlmo.cost import step_bytes
from commlmo.launch import spawn

WORLDS = range(2, 9)
STEPS = 2  # step 0: one-off checks (and 1-bit Adam's shortened warm-up); step 1: the steady state
TOPK = {"kind": "topk", "k": 0.05, "selection": "blocked", "blocks": "auto", "value_dtype": "bfloat16"}
SCALED_SIGN = {"kind": "sign", "scale": "mean"}


def _hidden(**fields):
    return {"groups": {"hidden": fields}}


#: each transport of each built-in aggregator, by overriding one group of a preset (the presets
#: themselves cover mean and majority vote over owner, the transport ``auto`` picks); the other
#: groups keep the preset's routing and are checked too
TRANSPORTS = {
    "mean_allreduce": {"preset": "muonserver", **_hidden(server="replicated", aggregator={"kind": "mean", "transport": "allreduce"})},
    "mean_allgather": {"preset": "muonserver", **_hidden(server="replicated", aggregator={"kind": "mean", "transport": "allgather"})},
    "vote_int8": {"preset": "signmuon", **_hidden(aggregator={"kind": "majority_vote", "transport": "int8"})},
    "vote_allgather": {"preset": "signmuon", **_hidden(aggregator={"kind": "majority_vote", "transport": "allgather"})},
    "vote_owner_abstain": {"preset": "signmuon", **_hidden(aggregator={"kind": "majority_vote", "ties": "abstain"})},
    "vote_allgather_abstain": {"preset": "signmuon", **_hidden(
        aggregator={"kind": "majority_vote", "transport": "allgather", "ties": "abstain"})},
    "ef21_sign_allgather": {"preset": "ef21muonusign", **_hidden(server="replicated",
        uplink=SCALED_SIGN, aggregator={"kind": "ef21", "transport": "allgather"})},
    "ef21_topk_allgather": {"preset": "ef21muon", **_hidden(server="replicated", uplink=TOPK, aggregator={"kind": "ef21", "transport": "allgather"})},
    "ef21_identity_owner": {"preset": "ef21muon", **_hidden(server="replicated", uplink={"kind": "identity"}, aggregator={"kind": "ef21"})},
    "error_feedback_sign_allgather": {"preset": "ef21muon", "groups": {
        "embedding": {"uplink": SCALED_SIGN, "aggregator": {"kind": "error_feedback", "transport": "allgather",
                                                            "server_compression": False}}}},
    "error_feedback_topk_allgather": {"preset": "ef21muon", "groups": {
        "embedding": {"uplink": TOPK, "aggregator": {"kind": "error_feedback", "transport": "allgather",
                                                     "server_compression": False}},
        "vector": {"uplink": TOPK, "aggregator": {"kind": "error_feedback"}}}},
    # the server roles, forced either way (the presets take server: auto)
    "owner_mean": {"preset": "muonserver", **_hidden(server="owner")},
    "replicated_mean": {"preset": "muonserver", **_hidden(server="replicated")},
    "owner_vote_sign_down": {"preset": "muonsign", **_hidden(server="owner")},
    "owner_vote_abstain": {"preset": "muonusign", **_hidden(
        server="owner", aggregator={"kind": "majority_vote", "ties": "abstain"})},
    "owner_ef21_sign": {"preset": "ef21muonusign", **_hidden(server="owner")},
    "owner_ef21_topk": {"preset": "ef21muon", **_hidden(server="owner")},
    "owner_ef21p_sign": {"preset": "ef21muonsign", **_hidden(server="owner")},
    "owner_ef21p_topk": {"preset": "ef21muon", **_hidden(
        server="owner", downlink={"kind": "ef21p", "compressor": TOPK})},
    "owner_worker_lmo_ef21": {"preset": "ef21signmuon", **_hidden(server="owner")},
    "owner_gluon_dual_norm": {"preset": "gluon", **_hidden(server="owner")},
    "replicated_ef21p_sign": {"preset": "ef21muonsign", **_hidden(server="replicated")},
    # small buckets: every tensor its own bucket, its own collectives and padding
    "buckets_vote": {"preset": "signmuon", "bucket_mb": 1e-9},
    "buckets_owner": {"preset": "ef21muonsign", "bucket_mb": 1e-9, **_hidden(server="owner")},
}
CONFIGS = {name: name for name in commlmo.PRESETS} | TRANSPORTS


class Tiny(nn.Module):
    """Every role once, with sizes that divide by no world size here and by no word size."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(37, 11)          # embedding
        self.body = nn.Linear(11, 23)            # hidden weight, bias
        self.norm = nn.LayerNorm(23)             # norm weight and bias
        self.experts = nn.Parameter(torch.zeros(3, 5, 23))  # hidden, a stack of 3 matrices (one scale each)
        self.body2 = nn.Linear(23, 23, bias=False)
        self.head = nn.Linear(23, 19)            # head (the last Linear), bias


def steady_state(source) -> commlmo.OptimizerConfig:
    """1-bit Adam's float32 warm-up cut to one step: step 0 is the warm-up, step 1 compressed."""
    return commlmo.load_config(source).with_rule_options("onebit_adam", warmup=1)


# ----------------------------------------------------------------------------- the model


def predicted(opt, step: int) -> dict[str, int]:
    """Bytes this rank sends at ``step`` under the cost model: per group label, and the checks."""
    return {label: sent for label, (sent, _) in step_bytes(opt, step=step).items()}


def measured(book: dict[str, dict[str, int]], groups: list[str]) -> dict[str, int]:
    """``opt.bytes.step`` summed by group label (the first part of each label)."""
    out: dict[str, int] = {}
    for label, row in book.items():
        head = label.split("/")[0]
        assert head in groups or head in ("step_agreement", "layout_check"), f"unaccounted label {label!r}"
        assert row["sent"] == row["received"] or "/owner/" in label, label  # an owner receives its own share
        out[head] = out.get(head, 0) + row["sent"]
    return out


# ----------------------------------------------------------------------------- runs


def run(rank: int, comm, configs: dict) -> dict:
    """Every config for ``STEPS`` steps on ``Tiny``; per config and step the byte book and the model."""
    out = {}
    for name, cfg in configs.items():
        model = Tiny()
        init = torch.Generator().manual_seed(0)  # the same values on every rank (threads share torch's global RNG)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=init))
        opt = commlmo.build_optimizer(model, steady_state(cfg), process_group=comm)
        g = torch.Generator().manual_seed(1000 + rank)
        books, models = [], []
        for step in range(STEPS):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            books.append({k: dict(v) for k, v in opt.bytes.step.items()})
            models.append(predicted(opt, step))
        out[name] = {"books": books, "model": models, "groups": [g["group"] for g in opt.param_groups],
                     "transports": {g["group"]: rt.transport if rt.server == "replicated" else "owner role"
                                    for rt, g in zip(opt._runtimes, opt.param_groups)}}
    return out


def run_real(rank: int, world_size: int, configs: dict) -> dict:
    """Spawned entry point: :func:`run` on the real gloo process group."""
    return run(rank, None, configs)


@pytest.fixture(scope="module")
def simulated() -> dict[int, list[dict]]:
    return {m: simulate(m, lambda rank, comm: run(rank, comm, CONFIGS)) for m in WORLDS}


@pytest.mark.parametrize("m", list(WORLDS))
def test_measured_bytes_equal_the_cost_model(simulated, m):
    bad = []
    for rank, res in enumerate(simulated[m]):
        for name, r in res.items():
            for step in range(STEPS):
                got = measured(r["books"][step], r["groups"])
                want = r["model"][step]
                if got != want:
                    diff = {k: (got.get(k), want.get(k)) for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)}
                    bad.append(f"M={m} rank {rank} {name} step {step} transports {r['transports']}: "
                               f"measured vs model {diff}")
    assert not bad, "\n".join(bad[:20])


def test_every_transport_of_every_builtin_aggregator_was_exercised(simulated):
    seen = {(kind, t) for res in simulated[4] for r in res.values() for kind, t in _kinds(r)}
    for kind, transports in {"mean": ("owner", "allreduce", "allgather"),
                             "majority_vote": ("owner", "int8", "allgather"),
                             "ef21": ("owner", "allgather"), "error_feedback": ("allgather", "compressed")}.items():
        for t in transports:
            assert (kind, t) in seen, (kind, t)
    roles = {(name, g): t for name, r in simulated[4][0].items() for g, t in r["transports"].items()}
    for name in ("owner_mean", "owner_vote_sign_down", "owner_ef21_sign", "owner_ef21_topk", "owner_ef21p_sign",
                 "owner_ef21p_topk", "owner_worker_lmo_ef21", "owner_gluon_dual_norm", "buckets_owner"):
        assert roles[(name, "hidden")] == "owner role", name


def _kinds(r: dict):
    for label, t in r["transports"].items():
        for book_label in r["books"][1]:
            parts = book_label.split("/")
            if parts[0] == label and len(parts) == 3 and parts[1] not in ("warmup",):
                yield parts[1], t


def test_ranks_agree_on_every_byte_book_but_the_owner_roles(simulated):
    for m, ranks in simulated.items():
        for name in CONFIGS:
            if {"owner role", "compressed"} & set(ranks[0][name]["transports"].values()):
                continue  # each rank sends its own share
            assert all(r[name]["books"] == ranks[0][name]["books"] for r in ranks), (m, name)


@pytest.mark.distributed
def test_real_gloo_ranks_keep_the_same_byte_book_as_simulated_ones(simulated):
    real = spawn(run_real, 3, CONFIGS, timeout_s=300)
    for rank in range(3):
        for name in CONFIGS:
            assert real[rank][name]["books"] == simulated[3][rank][name]["books"], (rank, name)
            assert real[rank][name]["transports"] == simulated[3][rank][name]["transports"], (rank, name)


def test_auto_leaves_the_owner_role_when_one_rank_would_carry_far_more_than_it_saves():
    """Four hidden 256x256 matrices: on 4 ranks each owner sends its step to 3 others (the mean, and
    Newton-Schulz runs once per matrix); on 64 ranks the four owners would each send their step to 63
    ranks, ~8x what a replicated rank sends, for three matrices' LMO saved: ``auto`` stays replicated."""
    from commlmo.cost import server_role
    from commlmo.owner import BYTES_PER_FLOP, assign_owners, lmo_flops, owner_bytes

    model = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(5)])
    opt = commlmo.build_optimizer(model, "muonserver")
    rt = next(r for r in opt._runtimes if r.lmo is not None and r.lmo.kind == "spectral")
    assert lmo_flops(rt, rt.members[0]) == 5 * 6 * 256 ** 3
    assert server_role(rt, 4, world_size=1)[0] == "owner"
    role, _, owners = server_role(rt, 64, world_size=1)
    assert role == "replicated" and owners == []
    replicated = 2 * 63 / 64 * 4 * sum(p.numel() for p in rt.members)  # a float32 all-reduce
    sent = owner_bytes(rt, rt.members, assign_owners(rt.members, 64), 64)
    assert sum(sent) / 64 <= replicated < 8 * replicated < max(sent)  # the busiest rank's fault, not the mean's
    assert BYTES_PER_FLOP["cpu"] > BYTES_PER_FLOP["accelerator"]
