"""Element-wise rules against their references at world size 1, and the paper presets with their head on AdamW.

References: torch.optim.AdamW; a ten-line Lion (Chen et al. 2023); 1-bit Adam as published
(Tang et al. 2021, Algorithm 1: Adam warm-up, then frozen variance and an error-compensated
scaled-sign momentum).  N ranks = one process fed N gradients is pinned in test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch

import commlmo
from commlmo import build_optimizer, simulate
from reference import Reference

SHAPES = [(6, 5), (5,), (3, 4, 2)]
STEPS = 8


def grads(seed=0, workers=1):
    g = torch.Generator().manual_seed(seed)
    return [[[torch.randn(s, generator=g) for s in SHAPES] for _ in range(workers)] for _ in range(STEPS)]


def params():
    g = torch.Generator().manual_seed(7)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def one_group(rule, **fields):
    return {"groups": [{"name": "all", "params": {"ndim": None}, "rule": rule, **fields}]}


def run(config, gs, rank=0, comm=None):
    ps = params()
    opt = build_optimizer(list(zip("abc", ps)), config, process_group=comm)
    for step in gs:
        for p, g in zip(ps, step[rank]):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps], opt


def test_adamw_rule_matches_torch_adamw():
    gs = grads()
    ours, _ = run(one_group({"kind": "adamw", "betas": [0.8, 0.99], "eps": 1e-6}, lr=3e-2, weight_decay=0.1), gs)
    ps = params()
    ref = torch.optim.AdamW(ps, lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    for step in gs:
        for p, g in zip(ps, step[0]):
            p.grad = g.clone()
        ref.step()
    for a, b in zip(ours, ps):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)


def lion_reference(gs, lr, wd, b1, b2):
    ps = [p.detach().clone() for p in params()]
    ms = [torch.zeros_like(p) for p in ps]
    for step in gs:
        for p, m, g in zip(ps, ms, step[0]):
            update = torch.sign(b1 * m + (1 - b1) * g)
            p.mul_(1 - lr * wd).add_(update, alpha=-lr)
            m.mul_(b2).add_(g, alpha=1 - b2)
    return ps


@pytest.mark.parametrize("aggregator", [{"kind": "majority_vote"}, {"kind": "mean"}])
def test_lion_rule_matches_a_ten_line_lion(aggregator):
    gs = grads(1)
    uplink = {"kind": "sign"} if aggregator["kind"] == "majority_vote" else {"kind": "identity"}
    cfg = one_group({"kind": "lion", "betas": [0.9, 0.99]}, lr=1e-2, weight_decay=0.5, uplink=uplink,
                    aggregator=aggregator)
    ours, opt = run(cfg, gs)
    for a, b in zip(ours, lion_reference(gs, 1e-2, 0.5, 0.9, 0.99)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert opt.routing() == {"all": ["a", "b", "c"]}


def onebit_adam_reference(gs, workers, lr, b1, b2, eps, warmup, server=False):
    """Tang et al. 2021 as published: warm-up Adam (no bias correction), then 1-bit momentum with error feedback
    on the workers and (``server``) on the server's compressed mean too (their Algorithm 1, DeepSpeed)."""
    ps = [p.detach().clone() for p in params()]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    err = [[torch.zeros_like(p) for p in ps] for _ in range(workers)]
    server_err = [torch.zeros_like(p) for p in ps]
    for t, step in enumerate(gs):
        for j, p in enumerate(ps):
            if t < warmup:
                g = sum(step[i][j] for i in range(workers)) / workers
                m[j] = b1 * m[j] + (1 - b1) * g
                v[j] = b2 * v[j] + (1 - b2) * g * g
            else:
                sent = []
                for i in range(workers):
                    x = b1 * m[j] + (1 - b1) * step[i][j] + err[i][j]
                    c = x.abs().mean() * torch.sign(x)
                    err[i][j] = x - c
                    sent.append(c)
                m[j] = sum(sent) / workers
                if server:
                    x = m[j] + server_err[j]
                    m[j] = x.abs().mean() * torch.sign(x)
                    server_err[j] = x - m[j]
            p -= lr * m[j] / (v[j].sqrt() + eps)
    return ps


@pytest.mark.parametrize("server", [False, True])
@pytest.mark.parametrize("workers", [1, 3])
def test_onebit_adam_matches_the_published_algorithm(workers, server):
    gs = grads(2, workers)
    cfg = one_group({"kind": "onebit_adam", "betas": [0.9, 0.999], "eps": 1e-8, "warmup": 3}, lr=1e-2,
                    uplink={"kind": "sign", "scale": "mean"},
                    aggregator={"kind": "error_feedback", "server_compression": server})
    if workers == 1:
        ours, _ = run(cfg, gs)
    else:
        results = simulate(workers, lambda rank, comm: run(cfg, gs, rank, comm)[0])
        for r in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(r, results[0]))
        ours = results[0]
    ref = onebit_adam_reference(gs, workers, 1e-2, 0.9, 0.999, 1e-8, 3, server)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_onebit_adam_warm_up_sends_float32_then_one_bit():
    gs = grads(3, 2)
    cfg = one_group({"kind": "onebit_adam", "warmup": 2}, uplink={"kind": "sign", "scale": "mean"},
                    aggregator={"kind": "error_feedback"})

    def worker(rank, comm):
        ps = params()
        opt = build_optimizer(list(zip("abc", ps)), cfg, process_group=comm)
        sent = []
        for step in gs[:4]:
            for p, g in zip(ps, step[rank]):
                p.grad = g.clone()
            opt.step()
            sent.append({k: v["sent"] for k, v in opt.bytes.step.items() if k.startswith("all/")})
        return sent

    sent = simulate(2, worker)[0]
    assert all("all/warmup/all_to_all" in s for s in sent[:2]) and not any("all/error_feedback" in k for k in sent[0])
    assert all("all/error_feedback/all_gather" in s and not any("warmup" in k for k in s) for s in sent[2:])
    assert sum(sent[2].values()) < sum(sent[0].values()) / 8


@pytest.mark.parametrize("method", ["muon", "muonserver", "signmuon", "muonusign", "muonsign",
                                    "ef21signmuon", "ef21muonusign", "ef21muonsign", "signsgd"])
def test_paper_presets_with_their_head_on_adamw_equal_the_dense_reference(method):
    """SignMuon code routing: hidden matrices by the method, the head (and its bias) by AdamW on the mean."""
    workers = 3
    g = torch.Generator().manual_seed(11)
    steps = [[(torch.randn(12, 7, generator=g), torch.randn(3, 12, generator=g), torch.randn(3, generator=g))
              for _ in range(workers)] for _ in range(4)]
    cfg = {"preset": method, "elementwise": "adamw", "groups": {"hidden": {"lr": 0.05}}}
    if commlmo.PRESETS[method].lmo is not None:
        cfg["groups"]["hidden"]["lmo"] = {"kind": "spectral", "dtype": "float32"}

    torch.manual_seed(5)  # once, here: worker threads share torch's global generator
    init = torch.nn.Sequential(torch.nn.Linear(7, 12, bias=False), torch.nn.Linear(12, 3)).state_dict()

    def worker(rank, comm):
        model = torch.nn.Sequential(torch.nn.Linear(7, 12, bias=False), torch.nn.Linear(12, 3))
        model.load_state_dict(init)
        opt = build_optimizer(model, cfg, process_group=comm)
        assert opt.routing() == {"hidden": ["0.weight"], "head": ["1.weight"], "vector": ["1.bias"]}
        for step in steps:
            for p, gr in zip(model.parameters(), step[rank]):
                p.grad = gr.clone()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    results = simulate(workers, worker)
    model = torch.nn.Sequential(torch.nn.Linear(7, 12, bias=False), torch.nn.Linear(12, 3))
    model.load_state_dict(init)
    ref = Reference(method, model[0].weight.detach(), workers, lr=0.05)
    head = [model[1].weight, model[1].bias]
    adamw = torch.optim.AdamW(head, lr=1e-3, weight_decay=0.0)
    for step in steps:
        ref.step([s[0] for s in step])
        for j, p in enumerate(head):
            p.grad = sum(s[1 + j] for s in step) / workers
        adamw.step()
    torch.testing.assert_close(results[0][0], ref.params(), rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(results[0][1:], head):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)
