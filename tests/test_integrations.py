"""The framework recipes of docs/integrations.md: HuggingFace ``Trainer``, accelerate, Lightning
``Trainer`` and ``Fabric``, torchtitan's optimizer container, and plain torch as the reference.

For each recipe, on 2 gloo processes and on 1: N steps, a checkpoint saved through the framework,
K more steps, against a resume from that checkpoint in fresh objects: parameters and optimizer state
bitwise equal, on each rank; every step's bytes those of the plain-torch loop (one compressed
exchange); DDP's all-reduce, which reduces every gradient entry at once, never ran.  Plus what the
recipes exist for: without them DDP reduces in float32 and the first step refuses; an optimizer
built before the process group binds to it; a state of one rank only is refused on another.

One torchrun-style launch of 2 processes runs everything, one of 1 process the recipes
(tests/integration_workers.py): importing transformers and Lightning costs more than the runs.
"""

from __future__ import annotations

import pytest
import torch

import integration_workers as workers

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

FRAMEWORKS = ["hf", "accelerate", "lightning", "fabric", "torchtitan"]
#: the tiny model's parameter count: DDP's all-reduce reduces all of them in one bucket
P = sum(p.numel() for p in workers.Tiny().parameters())


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Each rank's results of the recipes on 2 processes."""
    results = workers.launch(str(tmp_path_factory.mktemp("integrations")), nproc=2)
    return [results[r] for r in sorted(results)]


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> list[dict]:
    """The results of the recipes on 1 process started by torchrun (``WORLD_SIZE=1``)."""
    results = workers.launch(str(tmp_path_factory.mktemp("integrations-1")), nproc=1)
    return [results[0]]


def _of(ranks: list[dict], name: str) -> list[dict]:
    out = [r[name] for r in ranks]
    if "skipped" in out[0]:
        pytest.skip(f"{name} is not installed ({out[0]['skipped']}); pip install -e '.[integrations]'")
    for r in out:
        assert "error" not in r, r.get("error")
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_recipe_resumes_bitwise_on_every_rank(ranks, framework):
    runs = _of(ranks, framework)
    for rank, run in enumerate(runs):
        straight, resumed = run["straight"], run["resumed"]
        assert straight["steps"] == resumed["steps"] == workers.N + workers.K
        assert _same(straight["params"], resumed["params"]), f"rank {rank}: parameters differ after the resume"
        assert _same_state(straight["state"], resumed["state"]), f"rank {rank}: optimizer state differs"
        assert straight["comm"] == f"TorchComm(backend=gloo, rank={rank}, world_size=2)"
    assert _same(runs[0]["straight"]["params"], runs[1]["straight"]["params"])  # still data-parallel
    # the state is per rank (worker momentum): a resume from rank 0's state would not have matched rank 1's
    assert not _same_state(runs[0]["straight"]["state"], runs[1]["straight"]["state"])


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_recipe_resumes_bitwise_on_one_process_and_sends_nothing(one, framework):
    (run,) = _of(one, framework)
    straight, resumed = run["straight"], run["resumed"]
    assert straight["steps"] == resumed["steps"] == workers.N + workers.K
    assert _same(straight["params"], resumed["params"]) and _same_state(straight["state"], resumed["state"])
    assert all(b == {} for b in straight["bytes"] + resumed["bytes"])  # a world of one calls no collective
    assert straight["comm"].endswith("rank=0, world_size=1)")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_recipe_sends_each_step_once_compressed_and_ddp_reduces_nothing(ranks, framework):
    reference = [r["reference_bytes"] for r in _of(ranks, "torch")]
    float32_all_reduce = 2 * (2 - 1) / 2 * 4 * P  # bytes a rank sends when DDP all-reduces every gradient
    for rank, run in enumerate(_of(ranks, framework)):
        if framework == "torchtitan":  # built from torch-style param groups: its own routing, the same every step
            later = run["straight"]["bytes"][-1]
            assert all(b == later for b in run["straight"]["bytes"][1:] + run["resumed"]["bytes"])
            assert {label.split("/")[-2] for label in later} == {"step_agreement", "majority_vote"}
        else:  # the plain loop's bytes, step by step (the first step also checks the layout)
            first, later = reference[rank][0], reference[rank][-1]
            assert run["straight"]["bytes"] == reference[rank]
            assert all(b in (first, later) for b in run["resumed"]["bytes"])
            assert sum(later.values()) == 56 and float32_all_reduce == 332  # the figures of docs/integrations.md
        assert sum(later.values()) < float32_all_reduce / 4
        for which in ("straight", "resumed"):
            done = run[which]
            if framework != "torchtitan":  # the framework wrapped the model: its reduction was turned off
                assert done["ddp_hooks"] == ["local_gradients"]
            # DDP's all-reduce reduces every gradient entry; the all-reduces that ran reduced a few flags
            assert max(done["collectives"]["all_reduce_numel"]) < P, done["collectives"]
        # nothing else exchanges what commlmo exchanges (torchtitan's resume runs a zero-gradient step before it)
        done = run["straight"]
        assert done["collectives"]["gloo:all_to_all"] == done["commlmo_calls"]["gloo:all_to_all"]


def test_without_the_recipe_ddp_reduces_in_float32_and_the_first_step_refuses(ranks):
    for hf, lightning in zip(_of(ranks, "hf"), _of(ranks, "lightning")):
        assert "runs inside DistributedDataParallel" in hf["plain_error"]
        assert "docs/integrations.md" in hf["plain_error"] and "Nothing was sent" in hf["plain_error"]
        assert hf["plain_steps"] == 0 and not hf["plain_commlmo_calls"]
        assert P in hf["plain_collectives"]["all_reduce_numel"]  # what the recipe saves: every entry, float32
        assert "runs inside DistributedDataParallel" in lightning["plain_error"]


@pytest.mark.parametrize(("framework", "fix"), [
    ("hf", "TrainingArguments(ddp_broadcast_buffers=False)"),
    ("accelerate", "DistributedDataParallelKwargs(broadcast_buffers=False)"),
    ("lightning", "DDPStrategy(broadcast_buffers=False)")])
def test_a_model_whose_buffers_ddp_would_broadcast_at_every_forward_is_refused(ranks, framework, fix):
    for run in _of(ranks, framework):
        assert "broadcasts from rank 0 at every forward" in run["buffers_error"] and fix in run["buffers_error"]


def test_an_optimizer_built_before_the_process_group_binds_to_it(ranks):
    for rank, (hf, plain) in enumerate(zip(_of(ranks, "hf"), _of(ranks, "torch"))):
        # built before TrainingArguments initialised torch.distributed; bound at its first step
        assert ranks[rank]["initialised_at_start"] is False
        assert hf["built_on"] == "LocalComm(rank=0, world_size=1)"
        assert hf["straight"]["comm"] == f"TorchComm(backend=gloo, rank={rank}, world_size=2)"
        # built before too, bound when it loaded a state: it takes its own rank's part
        assert plain["early_built_on"] == "LocalComm(rank=0, world_size=1)"
        assert plain["early_resumed"]["comm"] == f"TorchComm(backend=gloo, rank={rank}, world_size=2)"


def test_a_consolidated_state_resumes_every_rank_and_one_ranks_state_is_refused_on_another(ranks):
    plain = _of(ranks, "torch")
    for rank, run in enumerate(plain):
        assert run["file_ranks"] == [1]  # rank 0's file holds rank 1's differing entries
        assert _same(run["early_resumed"]["params"], run["reference"]["params"])
        assert _same_state(run["early_resumed"]["state"], run["reference"]["state"])
    assert plain[0]["unconsolidated_load"] is None  # rank 0's own state
    refusal = plain[1]["unconsolidated_load"]
    assert "per-rank state of rank(s) [0]" in refusal and "not of rank 1" in refusal
    assert "consolidate_state_dict()" in refusal and "nothing was changed" in refusal
    assert plain[1]["unconsolidated_unchanged"]


@pytest.mark.parametrize(("case", "refused", "says"), [
    ("ddp", True, "all-reduces every gradient in float32"),
    ("ddp_fp16_hook", True, "communication hook fp16_compress_hook"),
    ("no_sync_backward_only", True, "forward runs inside it too"),
    ("no_sync_forward_and_backward", False, None),
    ("turned_off", False, None)])
def test_ddp_reduction_is_detected_at_the_first_step(ranks, case, refused, says):
    for run in _of(ranks, "torch"):
        guard = run["guards"][case]
        if refused:
            assert "runs inside DistributedDataParallel" in guard["error"] and "Nothing was sent" in guard["error"]
            assert says in guard["error"]
            assert guard["steps"] == 0 and guard["unchanged"]
        else:
            assert guard["error"] is None and guard["steps"] == 1


def test_torchtitan_param_groups_keep_their_names_and_learning_rates(ranks):
    for run in _of(ranks, "torchtitan"):
        names, lrs = run["straight"]["group_names"], run["straight"]["lrs"]
        assert sorted(n for g in names for n in g) == sorted(n for n, _ in workers.Tiny().named_parameters())
        by_name = {n: lr for g, lr in zip(names, lrs) for n in g}
        assert by_name["body.0.weight"] == by_name["body.0.bias"] == 0.05  # the ParamGroupConfig's lr
        assert by_name["body.2.bias"] != 0.05
