"""The PyTorch training stack around the optimizer: DDP wrapped after the build, an optimizer
built before the process group (bound to it at its first step), and ``torch.amp.GradScaler``
whose inf check differs by rank.

The distributed cases run in one spawned 2-rank gloo world (one process start-up for all).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import commlmo
from commlmo import DistributedError, build_optimizer
from commlmo.launch import spawn

PRESET = "signmuon"  # a 1-bit vote on the hidden matrices, Lion on the rest: every group communicates


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def loss_of(model, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return model(torch.randn(4, 6, generator=g)).square().mean()


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------- one process


def test_world_size_in_the_environment_without_a_process_group_refuses_to_step(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = mlp()
    opt = build_optimizer(model, PRESET)  # building is allowed (inspection, loading a state)
    loss_of(model, 0).backward()
    before = _params(model)
    with pytest.raises(DistributedError, match=r"WORLD_SIZE=2.*never initialised.*init_process_group"):
        opt.step()
    assert _same(before, model.parameters()) and opt.steps == 0
    # a world of one on purpose
    opt = build_optimizer(model, PRESET, process_group=commlmo.LocalComm())
    opt.step()
    assert opt.steps == 1


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_grad_scaler_skips_an_inf_step_and_then_equals_the_unscaled_step(policy):
    model, ref = mlp(), mlp()
    cfg = {"preset": PRESET, "nonfinite": policy}
    opt, ref_opt = build_optimizer(model, cfg), build_optimizer(ref, cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(loss_of(model, 0)).backward()
    model[0].weight.grad[0, 0] = float("inf")
    before = _params(model)
    scaler.step(opt)  # called even though the scaler found an inf, and skipped whatever the policy
    scaler.update()
    assert opt.skipped_steps == 1 and opt.steps == 0 and _same(before, model.parameters())
    assert scaler.get_scale() == 2.0**9  # the scaler saw the inf and backed off
    for step in (1, 2):
        opt.zero_grad()
        ref_opt.zero_grad()
        scaler.scale(loss_of(model, step)).backward()
        if step == 2:  # unscale_ first (to clip, say): the step must not unscale again
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        loss_of(ref, step).backward()
        ref_opt.step()
        assert _same(ref.parameters(), model.parameters()), step  # power-of-two scales unscale exactly
    assert opt.steps == 2


def test_ddp_hooks_on_parameters_are_detected_at_the_first_step():
    """DDP's compiled (python) reducer and delayed all-reduce leave hooks on the parameters."""
    class DistributedDataParallel:  # what DDP registers: a hook whose qualname is one of DDP's methods
        def _register_accum_grad_hook(self, p):
            def compiled_accum_grad_hook(param, *, param_index):
                pass
            compiled_accum_grad_hook.__qualname__ = ("DistributedDataParallel._register_accum_grad_hook."
                                                     "<locals>.compiled_accum_grad_hook")
            import functools
            p.register_post_accumulate_grad_hook(functools.partial(compiled_accum_grad_hook, param_index=0))

    params = [("w", torch.nn.Parameter(torch.randn(4, 4)))]
    opt = build_optimizer(params, PRESET)
    DistributedDataParallel()._register_accum_grad_hook(params[0][1])
    params[0][1].grad = torch.randn(4, 4)
    with pytest.raises(DistributedError, match=r"DistributedDataParallel.*twice.*Nothing was sent"):
        opt.step()


def test_the_ddp_probe_survives_copy_and_pickle_of_the_model():
    import copy
    import io

    model = mlp()
    build_optimizer(model, PRESET)
    clone = copy.deepcopy(model)
    torch.save(model, io.BytesIO())  # the probe pickles without its optimizer
    loss_of(clone, 0).backward()


# ---------------------------------------------------------------------------- two gloo ranks


def _amp(rank: int) -> dict:
    """Rank 1's scaled gradient overflows: both ranks must skip together, then step together."""
    model = mlp()
    opt = build_optimizer(model, PRESET)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(loss_of(model, rank)).backward()
    if rank == 1:
        model[2].weight.grad[1, 2] = float("inf")
    before = _params(model)
    scaler.step(opt)
    scaler.update()
    skipped = {"skipped": opt.skipped_steps, "unchanged": _same(before, model.parameters()),
               "scale": scaler.get_scale()}
    opt.zero_grad()
    scaler.scale(loss_of(model, 10 + rank)).backward()
    scaler.step(opt)
    scaler.update()
    return {**skipped, "steps": opt.steps, "changed": not _same(before, model.parameters()),
            "params": _params(model)}


def _ddp_after_build(rank: int) -> dict:
    model = mlp()
    opt = build_optimizer(model, PRESET)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loss_of(ddp, rank).backward()
    before = _params(model)
    try:
        opt.step()
        return {"error": None}
    except DistributedError as exc:
        return {"error": str(exc), "unchanged": _same(before, model.parameters())}


def _built_before_init(rank: int, world_size: int, store_path: str) -> dict:
    dist.destroy_process_group()  # as in a script that builds the optimizer first (WORLD_SIZE is set)
    model, twin = mlp(), mlp()
    opt = build_optimizer(model, PRESET)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank, world_size=world_size)
    out: dict = {"comm": opt.comm.describe()}
    ref = build_optimizer(twin, PRESET)  # built after: the reference
    for step in range(2):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            loss_of(m, 10 * step + rank).backward()
            o.step()
    out["bound"] = opt.comm.describe()
    out["same_as_built_after"] = _same(_params(model), _params(twin))
    out["params"] = _params(model)
    return out


def stack_worker(rank: int, world_size: int, store_path: str) -> dict:
    """Spawned entry point: the three cases in turn (the last one replaces the process group)."""
    torch.set_num_threads(1)
    return {"amp": _amp(rank), "ddp": _ddp_after_build(rank),
            "order": _built_before_init(rank, world_size, store_path)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "filestore"
    # a hang (a rank left alone in a collective) fails the test instead of blocking it
    return spawn(stack_worker, 2, str(store), timeout_s=150, collective_timeout_s=30)


@pytest.mark.distributed
def test_grad_scaler_inf_on_one_rank_makes_every_rank_skip(two_ranks):
    amp = [r["amp"] for r in two_ranks]
    assert [a["skipped"] for a in amp] == [1, 1] and all(a["unchanged"] for a in amp)
    assert amp[1]["scale"] == 2.0**9 and amp[0]["scale"] == 2.0**10  # each scaler saw its own inf check
    assert [a["steps"] for a in amp] == [1, 1] and all(a["changed"] for a in amp)
    assert _same(amp[0]["params"], amp[1]["params"])  # still data-parallel consistent


@pytest.mark.distributed
def test_ddp_wrapped_after_the_build_is_refused_at_the_first_step(two_ranks):
    for r in two_ranks:
        assert r["ddp"]["error"] is not None and r["ddp"]["unchanged"]
        assert "runs inside DistributedDataParallel" in r["ddp"]["error"]
        assert "cross the wire twice" in r["ddp"]["error"]


@pytest.mark.distributed
def test_optimizer_built_before_init_process_group_binds_to_it_at_the_first_step(two_ranks):
    for rank, r in enumerate(two_ranks):
        assert r["order"]["comm"].startswith("LocalComm")
        assert r["order"]["bound"] == f"TorchComm(backend=gloo, rank={rank}, world_size=2)"
        assert r["order"]["same_as_built_after"]
    assert _same(two_ranks[0]["order"]["params"], two_ranks[1]["order"]["params"])
