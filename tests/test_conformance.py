"""torch.optim conformance, one test body per property over every preset.

In the spirit of torch's ``OptimizerInfo`` table (``torch/testing/_internal/common_optimizers.py``):
learning-rate schedulers, closures, ``zero_grad``, state-dict round trips (plain and through
``torch.distributed.checkpoint.state_dict``), ``add_param_group``, torch-style param-group
lists and bfloat16 parameters, on a tiny GPT-like model in which every role exists
(an embedding, hidden matrices, biases, a LayerNorm, a free vector and an untied head).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler

import commlmo
from commlmo import ConfigError, build_optimizer

PRESETS = list(commlmo.PRESETS)
VOCAB, WIDTH = 32, 16


class TinyGPT(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.fc = nn.Linear(WIDTH, 2 * WIDTH)
        self.proj = nn.Linear(2 * WIDTH, WIDTH)
        self.gain = nn.Parameter(torch.ones(WIDTH))
        self.ln = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        x = x + self.proj(F.gelu(self.fc(x))) * self.gain
        return self.head(self.ln(x))


def loss_of(model: nn.Module, seed: int, extra: nn.Module | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (4, 9), generator=g)
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
    if extra is not None:
        loss = loss + extra(model.wte(idx)).float().square().mean()
    return loss


def train(model, opt, seeds, *, scheduler=None, extra=None):
    for s in seeds:
        opt.zero_grad()
        loss_of(model, s, extra).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_every_role_group_exists():
    for preset in PRESETS:
        groups = [g["group"] for g in build_optimizer(TinyGPT(), preset).param_groups]
        assert {"hidden", "embedding", "head"} <= set(groups), (preset, groups)


# ---------------------------------------------------------------------------- schedulers

SCHEDULERS = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + 2 * s)),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=4),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.01, total_steps=10),  # cycle_momentum=True
}
MIRRORED = ("lr", "momentum", "betas")


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("preset", PRESETS)
def test_scheduler_moves_every_group_lr_and_the_step_uses_it(preset, sched):
    a, b, c = TinyGPT(), TinyGPT(), TinyGPT()
    opt_a, opt_b, opt_c = (build_optimizer(m, preset) for m in (a, b, c))
    scheduler = SCHEDULERS[sched](opt_a)
    start = [g["lr"] for g in opt_a.param_groups]
    for s in range(3):
        for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):  # b: the same values written by hand
            gb.update({k: copy.deepcopy(ga[k]) for k in MIRRORED if k in ga})
        train(a, opt_a, [s], scheduler=scheduler)
        train(b, opt_b, [s])
        train(c, opt_c, [s])
        assert same(a.parameters(), b.parameters()), s
    assert [g["lr"] for g in opt_a.param_groups] == scheduler.get_last_lr()
    assert all(g["lr"] != lr0 for g, lr0 in zip(opt_a.param_groups, start))
    # ... and what the scheduler wrote is what the step used: c kept the config's values
    for ga, gc in zip(opt_a.param_groups, opt_c.param_groups):
        assert not same(ga["params"], gc["params"]), (ga["group"], "the scheduled lr was not used")


@pytest.mark.parametrize("preset", PRESETS)
def test_one_cycle_momentum_is_read_at_every_step(preset):
    a, b = TinyGPT(), TinyGPT()
    opt_a, opt_b = build_optimizer(a, preset), build_optimizer(b, preset)
    scheduler = lr_scheduler.OneCycleLR(opt_a, max_lr=0.01, total_steps=10, base_momentum=0.5, max_momentum=0.9)
    hidden = opt_a.param_groups[0]
    assert hidden["group"] == "hidden" and hidden["momentum"] == 0.9
    for s in range(4):
        for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):  # b: the scheduler's lr only
            gb["lr"] = ga["lr"]
        train(a, opt_a, [s], scheduler=scheduler)
        train(b, opt_b, [s])
    assert hidden["momentum"] < 0.9
    assert not same(hidden["params"], opt_b.param_groups[0]["params"])
    # rule groups keep their betas (defaults has "momentum": OneCycleLR cycles the momentum groups)
    for g, b0 in zip(opt_a.param_groups, build_optimizer(TinyGPT(), preset).param_groups):
        assert g.get("betas") == b0.get("betas")


def test_one_cycle_cycles_betas_of_an_optimizer_made_of_rules():
    cfg = {"groups": [{"name": "all", "params": {"ndim": None}, "rule": {"kind": "lion"}}]}
    a, b = TinyGPT(), TinyGPT()
    opt_a, opt_b = build_optimizer(a, cfg), build_optimizer(b, cfg)
    assert opt_a.defaults["betas"] == (0.9, 0.99)
    scheduler = lr_scheduler.OneCycleLR(opt_a, max_lr=0.01, total_steps=10, base_momentum=0.5, max_momentum=0.9)
    for s in range(4):
        opt_b.param_groups[0]["lr"] = opt_a.param_groups[0]["lr"]
        train(a, opt_a, [s], scheduler=scheduler)
        train(b, opt_b, [s])
    assert opt_a.param_groups[0]["betas"][0] < 0.9 and opt_a.param_groups[0]["betas"][1] == 0.99
    assert not same(a.parameters(), b.parameters())  # the step used the cycled beta1
    opt_a.param_groups[0]["betas"] = (1.5, 0.99)
    loss_of(a, 9).backward()
    before = params(a)
    with pytest.raises(ConfigError, match=r"param group 'all': betas = \(1.5, 0.99\)"):
        opt_a.step()
    assert same(before, a.parameters())


def test_a_momentum_out_of_range_is_refused_before_anything_changes():
    model = TinyGPT()
    opt = build_optimizer(model, "signmuon")
    opt.param_groups[0]["momentum"] = 1.0
    loss_of(model, 0).backward()
    before = params(model)
    with pytest.raises(ConfigError, match=r"param group 'hidden': momentum = 1.0"):
        opt.step()
    assert same(before, model.parameters()) and opt.steps == 0


# ---------------------------------------------------------------------------- closures, zero_grad


@pytest.mark.parametrize("preset", PRESETS)
def test_closure_is_called_once_and_its_loss_returned(preset):
    model = TinyGPT()
    opt = build_optimizer(model, preset)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, 0)
        loss.backward()
        return loss

    before = params(model)
    loss = opt.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss)
    assert torch.equal(loss.detach(), loss_of(TinyGPT(), 0).detach())
    assert not same(before, model.parameters())


@pytest.mark.parametrize("preset", PRESETS)
def test_zero_grad(preset):
    model = TinyGPT()
    opt = build_optimizer(model, preset)
    train(model, opt, [0])
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()  # set_to_none=True, torch's default
    assert all(p.grad is None for p in model.parameters())
    before = params(model)
    opt.step()  # no gradient anywhere: nothing to do
    assert same(before, model.parameters())


# ---------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("via", ["torch", "dcp"])
@pytest.mark.parametrize("preset", PRESETS)
def test_state_dict_round_trip_takes_the_next_step_bitwise(preset, via):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    a = TinyGPT()
    opt_a = build_optimizer(a, preset)
    train(a, opt_a, [0, 1])
    if via == "torch":
        saved_model, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(opt_a.state_dict())
    else:  # what torchtitan & co. save: no process group needed on one process
        saved_model, saved_opt = (copy.deepcopy(x) for x in get_state_dict(a, opt_a))
        assert "commlmo" not in saved_opt  # DCP keeps only state and param_groups
    b = TinyGPT(seed=7)
    opt_b = build_optimizer(b, preset)
    if via == "torch":
        b.load_state_dict(saved_model)
        opt_b.load_state_dict(saved_opt)
    else:
        set_state_dict(b, opt_b, model_state_dict=saved_model, optim_state_dict=saved_opt)
    assert opt_b.steps == opt_a.steps == 2
    train(a, opt_a, [2, 3])
    train(b, opt_b, [2, 3])
    assert same(a.parameters(), b.parameters())


def test_a_dcp_state_of_another_config_is_refused_and_changes_nothing():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    a = TinyGPT()
    opt_a = build_optimizer(a, "signmuon")
    train(a, opt_a, [0])
    saved = get_optimizer_state_dict(a, opt_a)
    b = TinyGPT()
    opt_b = build_optimizer(b, "muon")
    train(b, opt_b, [0])
    before = copy.deepcopy(opt_b.state_dict())
    with pytest.raises(ConfigError, match="different optimizer config.*nothing was changed"):
        opt_b.load_state_dict(saved)
    after = opt_b.state_dict()
    assert after["commlmo"]["config"] == before["commlmo"]["config"] and after["commlmo"]["steps"] == 1
    assert all(torch.equal(v, after["state"][k][key]) for k, s in before["state"].items() for key, v in s.items())


# ---------------------------------------------------------------------------- add_param_group


@pytest.mark.parametrize("preset", PRESETS)
def test_add_param_group_routes_the_parameters_and_updates_them(preset):
    def build():
        model, extra = TinyGPT(), nn.Linear(WIDTH, 4)
        opt = build_optimizer(model, preset)
        opt.add_param_group({"params": extra.parameters()})  # routed by the rules: shape and name
        return model, extra, opt

    model, extra, opt = build()
    groups = {n: g["group"] for g in opt.param_groups for n in g["param_names"]}
    added = [n for n in groups if n.startswith("params.")]
    assert len(added) == 2 and groups[added[0]] == "hidden"  # a 2-D weight: a matrix of the body
    before = params(extra)
    train(model, opt, [0, 1], extra=extra)
    assert all(not torch.equal(x, y) for x, y in zip(before, extra.parameters()))  # never silently ignored
    # the same build resumes from the state dict
    saved = copy.deepcopy(opt.state_dict())
    m2, e2, o2 = build()
    m2.load_state_dict(model.state_dict())
    e2.load_state_dict(extra.state_dict())
    o2.load_state_dict(saved)
    train(model, opt, [2], extra=extra)
    train(m2, o2, [2], extra=e2)
    assert same(extra.parameters(), e2.parameters()) and same(model.parameters(), m2.parameters())


def test_add_param_group_into_a_named_group_with_overrides_and_its_refusals():
    model, extra = TinyGPT(), nn.Linear(WIDTH, 4)
    opt = build_optimizer(model, "signmuon")
    n = len(opt.param_groups)
    opt.add_param_group({"params": [("extra.weight", extra.weight)], "group": "head", "lr": 0.5})
    added = opt.param_groups[-1]
    assert added["group"] == "head" and added["param_names"] == ["extra.weight"] and added["lr"] == 0.5
    assert opt._runtimes[-1] is next(rt for rt, g in zip(opt._runtimes, opt.param_groups) if g["group"] == "head")
    # a config group no parameter took so far is built when a parameter is added to it
    muon = build_optimizer([("w", nn.Parameter(torch.randn(4, 4)))], "muon")
    muon.add_param_group({"params": [extra.bias]})
    assert [g["group"] for g in muon.param_groups] == ["hidden", "vector"]
    extra.bias.grad = torch.ones(4)
    before = extra.bias.detach().clone()
    muon.step()
    assert not torch.equal(before, extra.bias)

    count = len(opt.param_groups)
    bad = [
        ({"params": [extra.bias], "group": "heads"}, r"group = 'heads' is not a group of this config \(did you mean "
                                                      r"'head'\?\); its groups are: hidden, embedding, head, vector"),
        ({"params": [model.fc.weight]}, r"parameter 'params.\d+' is already optimized \(as 'fc.weight'\)"),
        ({"params": [extra.bias], "momentum": 0.9}, "unknown key.*'momentum'"),
        ({"params": [extra.bias], "lr": -1.0}, r"lr = -1.0; allowed: a finite number >= 0"),
        ({"params": []}, "no parameters"),
        ({"params": [("extra.weight", nn.Parameter(torch.zeros(3)))]}, "already named 'extra.weight'"),
        ({"params": [nn.Parameter(torch.zeros(3, dtype=torch.complex64))]}, "complex"),
        ({"params": {extra.bias}}, "is a set"),
    ]
    for group, match in bad:
        with pytest.raises(ConfigError, match=match):
            opt.add_param_group(group)
        assert len(opt.param_groups) == count == n + 1 and len(opt._runtimes) == count


# ---------------------------------------------------------------------------- torch-style param-group lists


def test_torch_style_param_group_lists():
    model = TinyGPT()
    groups = [
        {"params": model.wte.parameters(), "lr": 1e-3, "group": "embedding"},
        {"params": model.head.parameters(), "group": "head"},
        {"params": [p for n, p in model.named_parameters() if not n.startswith(("wte", "head"))]},
        {"params": [], "weight_decay": 0.1},  # an empty group (HF's no-decay list may be empty)
    ]
    opt = build_optimizer(groups, "signmuon")
    routing = {g["group"]: len(g["params"]) for g in opt.param_groups}
    assert routing == {"hidden": 2, "embedding": 1, "head": 1, "vector": 5}
    assert next(g for g in opt.param_groups if g["group"] == "embedding")["lr"] == 1e-3
    before = params(model)
    train(model, opt, [0])
    assert all(not torch.equal(x, y) for x, y in zip(before[:2], list(model.parameters())[:2]))

    # HF-style decay / no-decay split: one param_groups entry per (config group, weight decay)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = build_optimizer([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], "muon")
    assert [(g["group"], g["weight_decay"]) for g in opt.param_groups] == [("hidden", 0.1), ("vector", 0.0)]

    for bad, match in [
        ([{"params": decay, "betas": (0.9, 0.9)}], r"param group 0: unknown key\(s\) 'betas'.*belong to the config group"),
        ([{"params": decay, "group": "nope"}], "param group 0: group = 'nope' is not a group of this config"),
        ([{"params": decay}, {"params": decay}], "is the same tensor as"),
        ([{"params": decay}, decay[0]], "mixed with tensors"),
        ([{"lr": 0.1}], "param group 0 has no 'params'"),
        ([{"params": decay, "weight_decay": True}], "weight_decay = True"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_optimizer(bad, "muon")


# ---------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("preset", PRESETS)
def test_bfloat16_parameters_step_and_keep_their_dtype(preset):
    model = TinyGPT().to(torch.bfloat16)
    opt = build_optimizer(model, preset)
    before = params(model)
    train(model, opt, [0, 1])
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    hidden = opt.param_groups[0]
    assert hidden["group"] == "hidden"
    ids = {id(p): i for i, p in enumerate(model.parameters())}
    assert all(not torch.equal(before[ids[id(p)]], p) for p in hidden["params"])
    # and the state round-trips bitwise (torch would cast an AdamW step count to bfloat16)
    saved = copy.deepcopy(opt.state_dict())
    twin = TinyGPT().to(torch.bfloat16)
    twin.load_state_dict(model.state_dict())
    opt2 = build_optimizer(twin, preset)
    opt2.load_state_dict(saved)
    for p, q in zip(model.parameters(), twin.parameters()):
        for k, v in opt.state[p].items():
            assert v.dtype == opt2.state[q][k].dtype, k
    train(model, opt, [2])
    train(twin, opt2, [2])
    assert same(model.parameters(), twin.parameters())


def _float32_state(preset: str) -> dict:
    return {"preset": preset, "groups": {g.name: {"state_dtype": "float32"} for g in commlmo.load_config(preset).groups}}


@pytest.mark.parametrize("preset", PRESETS)
def test_bfloat16_parameters_with_float32_state(preset):
    """``state_dtype: float32``: every state tensor of a bfloat16 model is float32, the parameters stay
    bfloat16, and the state round-trips bitwise."""
    model = TinyGPT().to(torch.bfloat16)
    opt = build_optimizer(model, _float32_state(preset))
    train(model, opt, [0, 1])
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    floats = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)
    twin = TinyGPT().to(torch.bfloat16)
    twin.load_state_dict(model.state_dict())
    opt2 = build_optimizer(twin, _float32_state(preset))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, [2])
    train(twin, opt2, [2])
    assert same(model.parameters(), twin.parameters())


def test_float32_momentum_of_bfloat16_parameters_is_the_float32_average_of_their_gradients():
    model = TinyGPT().to(torch.bfloat16)
    opt = build_optimizer(model, _float32_state("muon"))
    p = opt.param_groups[0]["params"][0]
    beta, want = opt.param_groups[0]["momentum"], torch.zeros(p.shape)
    for step in range(3):
        train(model, opt, [step])
        # train() leaves the step's gradients in .grad: EMA of them in float32, as torch.optim.Muon's lerp
        want = want.lerp(p.grad.float(), 1 - beta)
        assert torch.equal(opt.state[p]["momentum_buffer"], want)


@pytest.mark.parametrize("preset", ["signmuon", "muonserver", "ef21muon"])
def test_float32_state_of_bfloat16_parameters_keeps_simulated_ranks_bitwise_equal(preset):
    torch.manual_seed(0)
    base = TinyGPT().to(torch.bfloat16)

    def rank(r, comm):
        model = copy.deepcopy(base)
        opt = build_optimizer(model, _float32_state(preset), process_group=comm)
        train(model, opt, [10 * r, 10 * r + 1])
        return params(model)

    first, *others = commlmo.simulate(3, rank)
    assert all(same(first, o) for o in others)
