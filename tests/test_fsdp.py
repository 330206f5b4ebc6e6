"""FSDP2 and HSDP under commlmo: real gloo processes on 127.0.0.1 (tests/fsdp_workers.py).

Two launches: plain FSDP2 (a 1-D mesh, 2 ranks; the refusals run in the same launch) and
HSDP (a 2 x 2 mesh, 4 ranks: 2 replicas of 2 shards).  Each rank records its gradients,
and the reference -- plain commlmo on R = 1 or 2 ranks of the unsharded model -- is fed
the same gradients (FSDP's reduce-scattered per-replica mean, gathered), so what is
compared is commlmo's sharded arithmetic alone:

* bitwise: every rank's parameters after every step (replicas and shards agree);
  muonserver and signmuon against the unsharded reference (element-wise stages on
  shards, Newton--Schulz on the gathered matrix, float32 in the signmuon configs so that
  no exact zero takes a random sign; with R = 2 the votes abstain on ties, since a random
  tie-break draws as many bits as the shard has entries); a whole-block view against the
  reference run without batching; the step after a torch.distributed.checkpoint reload
  against the step without one;
* allclose: FSDP's gradient against the mean of the shard group's plain gradients
  (float rounding of the reduce-scatter), and far from the mean over every rank (no
  all-reduce across replicas);
* not compared with the reference: ef21muon (its top-k keeps 5 % of each shard, not of
  each matrix) and signmuon with random ties at R = 2.
"""

from __future__ import annotations

import math

import pytest
import torch

from commlmo import LocalComm, build_optimizer, simulate
from commlmo.launch import spawn
from commlmo.owner import owners_by_size
from fsdp_workers import CONFIGS, STEPS, Tiny, fsdp_and_refusals, loss_of, train

pytestmark = pytest.mark.distributed

BLOCKS = {"body.weight": 2}  # 12 rows: each of 2 shards holds one whole block
UNBATCHED = {"preset": "muonserver", "groups": {"hidden": {"lmo": {"kind": "spectral", "batch": False}}}}
FSDP_CONFIGS = {**{k: CONFIGS[k] for k in ("signmuon", "muonserver", "ef21muon")},
                "muonserver_blocks": {**UNBATCHED, "blocks": BLOCKS}}
HSDP_CONFIGS = {k: CONFIGS[k] for k in ("signmuon", "signmuon_abstain", "muonserver", "ef21muon")}
DCP = ("signmuon", "ef21muon")
#: the hidden matrices and their rows on each of 2 shards
HIDDEN = {"body.weight": (12, 8), "mid.weight": (9, 12)}


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    ranks = spawn(fsdp_and_refusals, 2, FSDP_CONFIGS, str(tmp_path_factory.mktemp("fsdp")), DCP, timeout_s=240)
    return [r["train"] for r in ranks], [r["refusals"] for r in ranks], [r["nonfinite"] for r in ranks]


@pytest.fixture(scope="module")
def hsdp(tmp_path_factory):
    return spawn(train, 4, 2, HSDP_CONFIGS, str(tmp_path_factory.mktemp("hsdp")), DCP, timeout_s=240)


def reference(name: str, config, ranks: list[dict], replicas: int) -> list[list[dict]]:
    """Plain commlmo on ``replicas`` ranks (the unsharded model), fed each replica's FSDP gradients."""
    blocks = config.get("blocks") if isinstance(config, dict) else None
    config = {k: v for k, v in config.items() if k != "blocks"} if isinstance(config, dict) else config
    grads = {rank["replica"]: rank[name]["grads"] for rank in ranks}
    models = [Tiny(blocks=blocks) for _ in range(replicas)]  # here: Tiny seeds the global generator

    def run(r, comm):
        model = models[r]
        opt = build_optimizer(model, config, process_group=comm)
        history = []
        for step in range(STEPS):
            for n, p in model.named_parameters():
                p.grad = grads[r][step][n].clone()
            opt.step()
            history.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return history

    return simulate(replicas, run) if replicas > 1 else [run(0, LocalComm())]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _ranks_agree(ranks, name):
    for step in range(STEPS):
        for rank in ranks:
            assert _same(rank[name]["history"][step], ranks[0][name]["history"][step]), (name, step)
            assert all(torch.isfinite(v).all() for v in rank[name]["history"][step].values())
    first, last = ranks[0][name]["history"][0], ranks[0][name]["history"][-1]
    assert not _same(first, last)


@pytest.mark.parametrize("name", list(FSDP_CONFIGS))
def test_fsdp_ranks_agree_bitwise(fsdp, name):
    _ranks_agree(fsdp[0], name)


@pytest.mark.parametrize("name", list(HSDP_CONFIGS))
def test_hsdp_replicas_and_shards_agree_bitwise(hsdp, name):
    _ranks_agree(hsdp, name)


@pytest.mark.parametrize("name", ["signmuon", "muonserver", "muonserver_blocks"])
def test_fsdp_equals_the_centralized_method_on_the_same_gradient(fsdp, name):
    ranks = fsdp[0]
    ref = reference(name, FSDP_CONFIGS[name], ranks, 1)[0]
    for step in range(STEPS):
        assert _same(ranks[0][name]["history"][step], ref[step]), (name, step)


@pytest.mark.parametrize("name", ["signmuon_abstain", "muonserver"])
def test_hsdp_equals_commlmo_on_the_replicas_fed_their_mean_gradients(hsdp, name):
    ref = reference(name, HSDP_CONFIGS[name], hsdp, 2)
    for rank in hsdp:
        for step in range(STEPS):
            assert _same(rank[name]["history"][step], ref[rank["replica"]][step]), (name, step, rank["replica"])


def test_hsdp_gradient_is_the_shard_groups_mean_and_never_crosses_the_replicas(hsdp):
    """FSDP reduce-scatters inside the shard group only: no float32 all-reduce across replicas."""
    plain = {}
    for r in range(2):
        for s in range(2):
            model = Tiny()
            loss_of(model, r, s, 0).backward()
            plain[r, s] = {n: p.grad for n, p in model.named_parameters()}
    for rank in hsdp:
        got, r = rank["signmuon"]["grads"][0], rank["replica"]
        for n, g in got.items():
            torch.testing.assert_close(g, (plain[r, 0][n] + plain[r, 1][n]) / 2)
    everyone = {n: sum(plain[k][n] for k in plain) / 4 for n in plain[0, 0]}
    assert any(not torch.allclose(hsdp[0]["signmuon"]["grads"][0][n], everyone[n]) for n in everyone)
    assert any(not torch.equal(hsdp[0]["signmuon"]["grads"][0][n], hsdp[2]["signmuon"]["grads"][0][n])
               for n in everyone)


@pytest.mark.parametrize("name", DCP)
def test_dcp_reload_takes_the_same_step(fsdp, hsdp, name):
    """dcp.save after step 2, dcp.load into a fresh model and optimizer: step 3 is bitwise the same."""
    for rank in [*fsdp[0], *hsdp]:
        assert rank[name]["dcp"]["steps_after_load"] == STEPS - 1
        assert _same(rank[name]["dcp"]["params"], rank[name]["history"][-1]), (name, rank["replica"], rank["shard"])


def _shard_bytes(rank: int, names=tuple(HIDDEN)) -> int:
    """Bytes ``rank`` of a 2-rank shard group sends to gather the float32 matrices ``names`` to their owners
    and scatter the directions back."""
    shapes = [HIDDEN[n] for n in names]
    rows = [(math.ceil(m / 2), m - math.ceil(m / 2)) for m, _ in shapes]
    owners = owners_by_size([m * n * min(m, n) + m * n for m, n in shapes], 2)
    gather = sum(4 * rows_[rank] * n for (_, n), rows_, o in zip(shapes, rows, owners) if o != rank)
    scatter = sum(4 * rows_[1 - rank] * n for (_, n), rows_, o in zip(shapes, rows, owners) if o == rank)
    return gather + scatter


def _sent(book, prefix):
    return sum(v["sent"] for k, v in book.items() if k.startswith(prefix))


def test_fsdp_bytes_are_the_shard_groups_only(fsdp):
    for rank, result in enumerate(fsdp[0]):
        book = result["signmuon"]["bytes"][-1]
        agreement = _sent(book, "shard/step_agreement")  # the step's flag bytes, maxed over the shard group
        assert 0 < agreement <= 8
        assert result["signmuon"]["links"][-1] == {"replicate": 0, "shard": _shard_bytes(rank) + agreement}
        assert _sent(book, "shard/hidden/") == _shard_bytes(rank)
        # a whole block on each shard: its LMO runs there, only mid.weight is gathered
        assert _sent(result["muonserver_blocks"]["bytes"][-1], "shard/hidden/") == _shard_bytes(rank, ["mid.weight"])


def test_hsdp_bytes_compressed_across_replicas_full_precision_inside(hsdp):
    for result in hsdp:
        book, s = result["signmuon"]["bytes"][-1], result["shard"]
        agreement = _sent(book, "shard/step_agreement")
        assert _sent(book, "shard/hidden/") == _shard_bytes(s) and 0 < agreement <= 8
        # the vote over 2 replicas of this rank's rows: packed bits, owner transport, 2 (M-1)/M per byte
        entries = sum(rows * n for m, n in HIDDEN.values() for rows in [(math.ceil(m / 2), m // 2)[s]])
        packed = math.ceil(entries / 8)  # one tensor's bits each: at most one byte of padding per tensor
        assert packed <= _sent(book, "hidden/majority_vote") <= packed + 8 * 2
        assert result["signmuon"]["links"][-1]["shard"] == _shard_bytes(s) + agreement
    assert hsdp[0]["signmuon"]["links"][-1] == {"replicate": 76, "shard": 388}  # the figure docs/fsdp.md shows


RECIPE = "fully_shard(module, mesh=mesh['shard'])"
#: each refusal: its error type and a phrase of what to do instead
REFUSALS = {
    "native_hsdp": ("DistributedError", RECIPE),
    "native_hsdp_mesh": ("DistributedError", RECIPE),
    "shard1": ("DistributedError", "Shard(0) on a 1-D mesh"),
    "tensor_parallel": ("DistributedError", "no tensor parallelism"),
    "mixed": ("ConfigError", "Apply fully_shard to the root module too"),
    "world_as_replicate_group": ("DistributedError", "Pass mesh= instead"),
    "blocks_cut": ("ConfigError", "or set view: matrix for this group"),
    "gluon": ("ConfigError", "pick a shape-only rule"),
    "overlap": ("ConfigError", "set overlap: false"),
    "plain_with_mesh": ("ConfigError", "leave mesh out"),
    "empty_shard": ("ConfigError", "or shard over fewer ranks"),
    "add_param_group": ("ConfigError", "Build the optimizer again with every parameter"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_at_build_time_saying_what_to_do(fsdp, case):
    kind, phrase = REFUSALS[case]
    got = fsdp[1][0][case]
    assert got.startswith(kind + ":") and phrase in got, got


def test_fsdps_own_hsdp_all_reduces_across_replicas_and_cannot_be_switched_off(fsdp):
    """Why FSDP's own HSDP is refused rather than turned off: set_requires_all_reduce(False) leaves .grad empty."""
    assert "all-reduces every gradient in float32" in fsdp[1][0]["native_hsdp"]
    assert all(fsdp[1][0]["native_hsdp_no_all_reduce_grads"])


def test_a_nan_in_one_ranks_rows_skips_the_step_on_every_rank(fsdp):
    """The re-check of a non-finite sum reads each rank's own rows and agrees over the shard group first."""
    for r in fsdp[2]:
        assert r == {"skipped": 1, "unchanged": True}
