"""Measured bytes per rank equal the cost model, for every transport and every preset's routing.

The cost model is :func:`commlmo.transport.bytes_per_rank` -- owner and allreduce
``2(M-1)/M * payload``, allgather ``(M-1) * payload``, int8 ``2(M-1)/M * entries`` --
applied to each group's *declared* wire sizes (``rt.codec(p).wire_layout``), with the
padding the transports add:

* the owner sum (:func:`commlmo.transport.owner_sum`) pads each dtype's concatenated
  wire tensors to a multiple of ``M`` elements;
* majority vote's owner transport pads the packed bits to whole 64-bit words per
  shard (a multiple of ``8M`` bytes), its allgather transport to whole 64-bit words;
  ``ties: abstain`` sends the tie mask back with the result (its extra all-gather);
* the allreduce and int8 transports do not pad.

Plus the step's agreement flags (one uint8 all-max of ``1 + parameters`` bytes) and,
on the first step only, ``layout_check`` and each group's ``agreement_check``.
The measured side is ``opt.bytes.step`` (what the optimizer handed to each collective),
summed by group label.  Simulated ranks (threads, the same :class:`~commlmo.comm.Communicator`
accounting) cover ``M = 2..8``; one real gloo run at ``M = 3`` checks that real and
simulated byte books are identical, label by label.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import commlmo
from commlmo import simulate
from commlmo.launch import spawn
from commlmo.transport import bytes_per_rank

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
    "mean_allreduce": {"preset": "muonserver", **_hidden(aggregator={"kind": "mean", "transport": "allreduce"})},
    "mean_allgather": {"preset": "muonserver", **_hidden(aggregator={"kind": "mean", "transport": "allgather"})},
    "vote_int8": {"preset": "signmuon", **_hidden(aggregator={"kind": "majority_vote", "transport": "int8"})},
    "vote_allgather": {"preset": "signmuon", **_hidden(aggregator={"kind": "majority_vote", "transport": "allgather"})},
    "vote_owner_abstain": {"preset": "signmuon", **_hidden(aggregator={"kind": "majority_vote", "ties": "abstain"})},
    "vote_allgather_abstain": {"preset": "signmuon", **_hidden(
        aggregator={"kind": "majority_vote", "transport": "allgather", "ties": "abstain"})},
    "ef21_sign_allgather": {"preset": "ef21muonusign", **_hidden(
        uplink=SCALED_SIGN, aggregator={"kind": "ef21", "transport": "allgather"})},
    "ef21_topk_allgather": {"preset": "ef21muon", **_hidden(uplink=TOPK, aggregator={"kind": "ef21", "transport": "allgather"})},
    "ef21_identity_owner": {"preset": "ef21muon", **_hidden(uplink={"kind": "identity"}, aggregator={"kind": "ef21"})},
    "error_feedback_sign_allgather": {"preset": "ef21muon", "groups": {
        "embedding": {"uplink": SCALED_SIGN, "aggregator": {"kind": "error_feedback", "transport": "allgather"}}}},
    "error_feedback_topk_allgather": {"preset": "ef21muon", "groups": {
        "embedding": {"uplink": TOPK, "aggregator": {"kind": "error_feedback", "transport": "allgather"}},
        "vector": {"uplink": TOPK, "aggregator": {"kind": "error_feedback"}}}},
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


def _pieces(rt, p: torch.Tensor) -> list[tuple[torch.dtype, int]]:
    """``(dtype, elements)`` of each wire tensor ``p``'s uplink payload declares."""
    return [(dtype, math.prod(shape)) for shape, dtype in rt.codec(p).wire_layout(p.shape, p.dtype)]


def _mean_bytes(transport: str, pieces: list[tuple[torch.dtype, int]], m: int) -> int:
    """A mean over ``transport`` of wire tensors ``pieces``: one collective per dtype when summed."""
    if transport == "allgather":  # one uint8 buffer of every wire tensor, all-gathered
        return round(bytes_per_rank("allgather", payload_bytes=sum(d.itemsize * n for d, n in pieces),
                                    dense_entries=0, world_size=m))
    by_dtype: dict[torch.dtype, int] = {}
    for d, n in pieces:
        by_dtype[d] = by_dtype.get(d, 0) + n
    total = 0
    for d, n in by_dtype.items():
        if transport == "owner":  # owner_sum pads to a multiple of M elements (transport._pad)
            n = -(-n // m) * m
        total += round(bytes_per_rank(transport, payload_bytes=n * d.itemsize, dense_entries=0, world_size=m))
    return total


def _vote_bytes(transport: str, packed: int, entries: int, m: int, abstain: bool) -> int:
    """Majority vote of ``packed`` sign bytes (``entries`` coordinates) over ``transport``."""
    if transport == "int8":
        return round(bytes_per_rank("int8", payload_bytes=packed, dense_entries=entries, world_size=m))
    if transport == "allgather":  # whole 64-bit words
        return round(bytes_per_rank("allgather", payload_bytes=-(-packed // 8) * 8, dense_entries=entries, world_size=m))
    padded = -(-packed // (8 * m)) * 8 * m  # every owner shard whole 64-bit words
    sent = bytes_per_rank("owner", payload_bytes=padded, dense_entries=entries, world_size=m)
    if abstain and m % 2 == 0:  # the tie mask travels back with the result: one more bit per coordinate
        sent += (m - 1) * padded / m
    return round(sent)


def predicted(opt, step: int) -> dict[str, int]:
    """Bytes this rank sends at ``step`` under the cost model: per group label, and the checks."""
    m = opt.comm.world_size
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    out = {"step_agreement": round(bytes_per_rank("allreduce", payload_bytes=1 + n_params, dense_entries=0,
                                                  world_size=m))}
    if step == 0:  # the layout check: a [count, config hash] int64 head, then 10 int64 per parameter
        out["layout_check"] = (m - 1) * (2 + 10 * n_params) * 8
    for rt, group in zip(opt._runtimes, opt.param_groups):
        params, name = group["params"], group["group"]
        warmup = rt.rule is not None and not rt.rule.uplink_active(step)
        if warmup:  # a float32 mean, owner transport
            sent = _mean_bytes("owner", [(p.dtype, p.numel()) for p in params], m)
        elif rt.aggregator.kind == "majority_vote":
            packed = sum(rt.codec(p).wire_nbytes(p.shape, p.dtype) for p in params)
            sent = _vote_bytes(rt.transport, packed, sum(p.numel() for p in params), m,
                               rt.aggregator.config.ties == "abstain")
        elif rt.aggregator.kind in ("mean", "ef21", "error_feedback"):
            sent = _mean_bytes(rt.transport, [piece for p in params for piece in _pieces(rt, p)], m)
        else:
            raise AssertionError(f"no cost model here for aggregator {rt.aggregator.kind!r}")
        if step == 0:  # the one-off agreement check: one int64 checksum per parameter, all-gathered
            # (on the compressed path and on a rule's float32 warm-up alike)
            sent += (m - 1) * 8 * len(params)
        out[name] = sent
    return out


def measured(book: dict[str, dict[str, int]], groups: list[str]) -> dict[str, int]:
    """``opt.bytes.step`` summed by group label (the first part of each label)."""
    out: dict[str, int] = {}
    for label, row in book.items():
        head = label.split("/")[0]
        assert head in groups or head in ("step_agreement", "layout_check"), f"unaccounted label {label!r}"
        assert row["sent"] == row["received"], label
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
                     "transports": {g["group"]: rt.transport for rt, g in zip(opt._runtimes, opt.param_groups)}}
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
                             "ef21": ("owner", "allgather"), "error_feedback": ("allgather",)}.items():
        for t in transports:
            assert (kind, t) in seen, (kind, t)


def _kinds(r: dict):
    for label, t in r["transports"].items():
        for book_label in r["books"][1]:
            parts = book_label.split("/")
            if parts[0] == label and len(parts) == 3 and parts[1] not in ("warmup",):
                yield parts[1], t


def test_ranks_agree_on_every_byte_book(simulated):
    for m, ranks in simulated.items():
        for name in CONFIGS:
            assert all(r[name]["books"] == ranks[0][name]["books"] for r in ranks), (m, name)


@pytest.mark.distributed
def test_real_gloo_ranks_keep_the_same_byte_book_as_simulated_ones(simulated):
    real = spawn(run_real, 3, CONFIGS, timeout_s=300)
    for rank in range(3):
        for name in CONFIGS:
            assert real[rank][name]["books"] == simulated[3][rank][name]["books"], (rank, name)
            assert real[rank][name]["transports"] == simulated[3][rank][name]["transports"], (rank, name)
