"""Failing loudly and losing nothing: non-finite gradients, mismatched ranks, diverged parameters."""

from __future__ import annotations

import copy

import pytest
import torch

from commlmo import DistributedError, NonFiniteGradientError, build_optimizer, simulate
from commlmo.launch import spawn
from resume_runs import flat


def _model(seed=0, hidden=6):
    # explicit generator: simulated ranks are threads, and the global RNG is shared between them
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return model


def _backward(model, seed=0, poison=False, batch=4):
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(batch, 5, generator=g)).square().mean().backward()
    if poison:
        next(model.parameters()).grad[0, 0] = float("nan")


def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _assert_same(a, b):
    fa, fb = dict(flat(a)), dict(flat(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        if torch.is_tensor(fa[k]):
            assert torch.equal(fa[k], fb[k]), k
        else:
            assert fa[k] == fb[k], k


@pytest.mark.parametrize("preset", ["signmuon", "ef21muonsign", "ef21muon", "muon"])
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_gradient_changes_nothing(preset, policy):
    model = _model()
    opt = build_optimizer(model, {"preset": preset, "nonfinite": policy})
    for step in range(2):  # build up momentum, EF21 and generator state first
        opt.zero_grad()
        _backward(model, step)
        opt.step()
    before = _snapshot(model, opt)
    opt.zero_grad()
    _backward(model, 5, poison=True)
    if policy == "raise":
        with pytest.raises(NonFiniteGradientError, match="nothing was sent and no state changed"):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1
    after = _snapshot(model, opt)
    before[1]["commlmo"].pop("skipped_steps"), after[1]["commlmo"].pop("skipped_steps")
    _assert_same(before, after)


def test_one_rank_with_nan_makes_every_rank_skip_and_nothing_is_voted():
    def run(rank, comm):
        model = _model()
        opt = build_optimizer(model, {"preset": "signmuon", "nonfinite": "skip"}, process_group=comm)
        _backward(model, rank, poison=(rank == 1))
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        sent = {k: v for k, v in opt.bytes.step.items() if not k.startswith(("step_agreement", "layout_check"))}
        return opt.skipped_steps, all(torch.equal(a, b) for a, b in zip(before, model.parameters())), sent

    for skipped, unchanged, sent in simulate(3, run):
        assert skipped == 1 and unchanged and sent == {}


def test_one_rank_with_nan_makes_every_rank_raise():
    def run(rank, comm):
        model = _model()
        opt = build_optimizer(model, "signmuon", process_group=comm)
        _backward(model, rank, poison=(rank == 2))
        with pytest.raises(NonFiniteGradientError):
            opt.step()
        return True

    assert simulate(3, run) == [True, True, True]


def test_ranks_with_different_shapes_fail_on_the_first_step_naming_the_parameter():
    def run(rank, comm):
        model = _model(hidden=6 if rank == 0 else 7)
        opt = build_optimizer(model, "signmuon", process_group=comm)
        _backward(model)
        opt.step()

    with pytest.raises(DistributedError, match=r"parameter '0.weight' differs across ranks \(rank 0: shape \(6, 5\)"):
        simulate(2, run)


def test_ranks_with_different_configs_fail_on_the_first_step():
    def run(rank, comm):
        model = _model()
        opt = build_optimizer(model, "signmuon" if rank == 0 else "muonsign", process_group=comm)
        _backward(model)
        opt.step()

    with pytest.raises(DistributedError, match="different optimizer configs"):
        simulate(2, run)


def test_parameter_whose_gradient_is_missing_on_one_rank_gets_zeros_there():
    def run(rank, comm):
        model = _model()
        opt = build_optimizer(model, "muonserver", process_group=comm)
        _backward(model, rank)
        if rank == 1:
            model[2].weight.grad = None
        opt.step()
        return [p.detach().clone() for p in model.parameters()]

    a, b = simulate(2, run)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_verify_every_detects_diverged_parameters():
    def run(rank, comm):
        model = _model()
        opt = build_optimizer(model, {"preset": "signmuon", "verify_every": 1}, process_group=comm)
        _backward(model, rank)
        opt.step()  # consistent: passes
        if rank == 1:
            with torch.no_grad():
                model[0].weight[0, 0] += 1e-3
        _backward(model, rank)
        opt.step()

    with pytest.raises(DistributedError, match=r"parameters diverged across ranks after step: '0.weight'"):
        simulate(2, run)


def _mismatched_worker(rank, world):
    model = _model(hidden=6 + rank)
    opt = build_optimizer(model, "signmuon")
    _backward(model)
    opt.step()


@pytest.mark.distributed
def test_mismatched_ranks_on_real_processes_error_instead_of_hanging():
    with pytest.raises(DistributedError, match="differs across ranks"):
        spawn(_mismatched_worker, 2, timeout_s=60)


@pytest.mark.parametrize("mode", ["flip", "amplify", "random", "zero"])
def test_a_minority_of_byzantine_workers_cannot_turn_the_vote(mode):
    """5 workers with the same gradient, 2 adversaries: the vote still steps along -sign(grad)."""

    def run(rank, comm):
        model = _model()
        opt = build_optimizer(model, "signsgd", process_group=comm, adversary=mode if rank < 2 else None)
        _backward(model, 0)
        before = model[0].weight.detach().clone()
        opt.step()
        return torch.sign(before - model[0].weight.detach()), torch.sign(model[0].weight.grad)

    for moved, grad_sign in simulate(5, run):
        assert torch.equal(moved, grad_sign)


def test_byzantine_workers_do_hurt_the_mean():
    def run(rank, comm):
        model = _model()
        opt = build_optimizer(model, "muonserver", process_group=comm, adversary="flip" if rank < 3 else None)
        _backward(model, 0)
        before = model[0].weight.detach().clone()
        opt.step()
        return (before - model[0].weight.detach()).mul(model[0].weight.grad).sum()

    # 3 of 5 flip: the mean now climbs the loss
    assert all(progress < 0 for progress in simulate(5, run))


def test_two_amplifying_workers_of_five_reverse_the_mean_but_not_the_vote():
    """Honest workers with different stochastic gradients (own batches of 256); 2 of 5 send -10x theirs."""

    def run(preset):
        def worker(rank, comm):
            model = _model()
            opt = build_optimizer(model, preset, process_group=comm, adversary="amplify" if rank < 2 else None)
            _backward(model, rank, batch=256)  # each rank its own batch
            before = model[0].weight.detach().clone()
            opt.step()
            return before - model[0].weight.detach()

        return simulate(5, worker)[0]

    def honest_direction(preset):
        return simulate(5, lambda rank, comm: _honest_step(preset, rank, comm))[0]

    for preset, robust in (("signsgd", True), ("muonserver", False)):
        attacked, clean = run(preset), honest_direction(preset)
        agreement = torch.nn.functional.cosine_similarity(attacked.flatten(), clean.flatten(), dim=0)
        if robust:
            assert agreement > 0.5, (preset, float(agreement))
        else:
            assert agreement < -0.5, (preset, float(agreement))


def _honest_step(preset, rank, comm):
    model = _model()
    opt = build_optimizer(model, preset, process_group=comm)
    _backward(model, rank, batch=256)
    before = model[0].weight.detach().clone()
    opt.step()
    return before - model[0].weight.detach()
