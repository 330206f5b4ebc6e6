"""The optimizer on one process: torch.optim.Muon equivalence and torch.optim conventions."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import commlmo
from commlmo import ConfigError, DistributedError, build_optimizer

ROOT = Path(__file__).resolve().parents[1]


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 10, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def loss_of(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def test_torch_muon_yaml_reproduces_torch_optim_muon():
    ours, theirs = mlp(), mlp()
    opt = build_optimizer(ours, ROOT / "examples/torch_muon.yaml")
    weights = [p for p in theirs.parameters() if p.ndim == 2]
    biases = [p for p in theirs.parameters() if p.ndim != 2]
    ref = [torch.optim.Muon(weights, lr=0.02), torch.optim.AdamW(biases, lr=1e-3)]
    for batch in batches(10):
        for model, opts in ((ours, [opt]), (theirs, ref)):
            for o in opts:
                o.zero_grad()
            loss_of(model, batch).backward()
            for o in opts:
                o.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert (a - b).abs().max().item() <= 1e-6, name
    assert opt.routing() == {"muon": ["0.weight", "2.weight", "4.weight"], "fallback": ["0.bias", "2.bias", "4.bias"]}


def test_one_process_calls_no_collective():
    model = mlp()
    opt = build_optimizer(model, "signmuon")
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    assert isinstance(opt.comm, commlmo.LocalComm)
    assert opt.bytes.total_sent == 0 and dict(opt.bytes.total) == {}


def _train(model, opt, data, scheduler=None):
    for batch in data:
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("preset", ["muon", "signmuon", "ef21muonsign", "ef21muon", "gluon"])
def test_state_dict_round_trip_resumes_exactly(preset):
    data = batches(6)
    a = mlp()
    opt_a = build_optimizer(a, preset)
    _train(a, opt_a, data)

    b = mlp()
    opt_b = build_optimizer(b, preset)
    _train(b, opt_b, data[:3])
    saved_model, saved_opt = copy.deepcopy(b.state_dict()), copy.deepcopy(opt_b.state_dict())
    c = mlp(seed=5)
    c.load_state_dict(saved_model)
    opt_c = build_optimizer(c, preset)
    opt_c.load_state_dict(saved_opt)
    _train(c, opt_c, data[3:])
    for (name, x), y in zip(a.named_parameters(), c.parameters()):
        assert torch.equal(x, y), name


def test_lr_scheduler_reaches_every_group():
    model = mlp()
    opt = build_optimizer(model, "muon")
    assert [g["group"] for g in opt.param_groups] == ["hidden", "head", "vector"]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, batches(2), sched)
    assert [g["lr"] for g in opt.param_groups] == [0.02 * 0.25, 1e-3 * 0.25, 1e-3 * 0.25]
    # a scheduler is restored with the optimizer
    state = opt.state_dict()
    opt2 = build_optimizer(mlp(), "muon")
    opt2.load_state_dict(state)
    assert [g["lr"] for g in opt2.param_groups] == [0.02 * 0.25, 1e-3 * 0.25, 1e-3 * 0.25]


def test_closure_and_lr_zero_leaves_params():
    model = mlp()
    zero = {"lr": 0.0}
    opt = build_optimizer(model, {"preset": "muon", "groups": {"hidden": zero, "head": zero, "vector": zero}})
    before = [p.detach().clone() for p in model.parameters()]
    batch = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_named_params_and_plain_tensors():
    w = torch.nn.Parameter(torch.randn(6, 4))
    b = torch.nn.Parameter(torch.zeros(6))
    opt = build_optimizer([w, b], "muonserver")  # no module tree: roles by ndim (and a *bias name)
    assert opt.routing() == {"hidden": ["params.0"], "vector": ["params.1"]}
    opt = build_optimizer([("w", w), ("b", b)], "muonserver")
    assert opt.routing() == {"hidden": ["w"], "vector": ["b"]}


def test_conv_kernels_are_routed_as_matrices():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3)
    opt = build_optimizer(conv, "muonusign")
    conv(torch.randn(2, 3, 8, 8)).square().mean().backward()
    before = conv.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, conv.weight)


@pytest.mark.parametrize(
    "params,match",
    [
        ([], "empty parameter list"),
        ([torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.complex64))], "complex"),
        ([torch.zeros(3, 3, dtype=torch.int64)], "floating-point"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(ConfigError, match=match):
        build_optimizer(params, "muon")


def test_lmo_that_cannot_take_a_shape_names_the_parameter():
    model = torch.nn.Linear(4, 3)
    cfg = {"groups": [{"name": "vec", "params": {"ndim": [1]}, "lmo": {"kind": "spectral"}}]}
    with pytest.raises(ConfigError, match=r"groups.vec: lmo 'spectral' does not accept parameter 'bias' of shape \(3,\)"):
        build_optimizer(model, cfg)


def test_ddp_wrapped_model_is_refused(monkeypatch):
    class DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # skip DDP's process-group checks; only the type matters
            torch.nn.Module.__init__(self)
            self.module = module

    with pytest.raises(DistributedError, match=r"DistributedDataParallel.*model.module"):
        build_optimizer(DistributedDataParallel(mlp()), "signmuon")


def test_sparse_gradient_is_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = build_optimizer(emb, "muon")
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ConfigError, match="sparse gradient"):
        opt.step()


def test_lr_rule_that_cannot_take_a_shape_fails_when_the_optimizer_is_built():
    model = torch.nn.Linear(4, 3)
    cfg = {"groups": [{"name": "all", "params": {"ndim": [1, 2]}, "lmo": {"kind": "sign"},
                       "lr_rule": {"kind": "original"}}]}
    with pytest.raises(ConfigError, match=r"groups.all: parameter 'bias': lr_rule 'original' needs a matrix shape"):
        build_optimizer(model, cfg)
