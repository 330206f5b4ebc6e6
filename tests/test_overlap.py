"""Overlap: buckets whose uplink starts from gradient hooks inside backward() give bitwise the same steps.

Without overlap every bucket is launched and finished in ``step()``; with it, each bucket
is prepared and its first collectives put in flight by a ``register_post_accumulate_grad_hook``
as soon as backward() produced its last gradient.  Both must give the same parameters, bit
for bit, for every preset, on simulated ranks and on real gloo ranks, with and without
gradient accumulation (``no_sync``), and when something changes the gradients after
their bucket was sent (gradient clipping, accumulation outside ``no_sync``): those are
sent again from ``step()``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import commlmo
from commlmo import simulate
from commlmo.launch import spawn

STEPS = 3
PRESETS = ["signmuon", "muonserver", "muonsign", "ef21muon", "ef21muonsign", "signsgd"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(17, 12)
        self.l1, self.l2, self.l3 = nn.Linear(12, 24), nn.Linear(24, 24), nn.Linear(24, 24)
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        h = self.emb(x).mean(1)
        h = torch.relu(self.l1(h))
        h = torch.relu(self.l2(h)) + h
        return self.head(self.norm(self.l3(h)))


def _batch(rank: int, step: int, micro: int):
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randint(0, 17, (8, 4), generator=g), torch.randint(0, 5, (8,), generator=g)


def train(config: dict, rank: int, comm=None, *, micro: int = 1, no_sync: bool = True, clip: bool = False):
    model = Net()
    init = torch.Generator().manual_seed(0)  # not torch.manual_seed: simulated ranks are threads sharing it
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=init) * 0.3)
    opt = commlmo.build_optimizer(model, commlmo.load_config(config).with_rule_options("onebit_adam", warmup=1),
                                  process_group=comm)
    hooked, resent, books = [], [], []
    for step in range(STEPS):
        opt.zero_grad()
        for k in range(micro):
            quiet = opt.no_sync() if no_sync and k < micro - 1 else contextlib.nullcontext()
            with quiet:
                x, y = _batch(rank, step, k)
                nn.functional.cross_entropy(model(x), y).backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        if opt._overlap is not None:
            hooked.append(opt._overlap.last_hooked)
            resent.append(opt._overlap.last_resent)
        books.append(opt.bytes.step_sent)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "hooked": hooked,
            "resent": resent, "buckets": len(opt._buckets), "bytes": books}


def _configs(preset: str) -> tuple[dict, dict]:
    base = {"preset": preset, "bucket_mb": 1e-3}  # ~1 KiB buckets: several per group
    return base, {**base, "overlap": True}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])


@pytest.mark.parametrize("preset", PRESETS)
def test_overlap_is_bitwise_the_step_without_it_on_simulated_ranks(preset):
    plain, overlapped = _configs(preset)
    for m in (1, 3):
        runs = simulate(m, lambda rank, comm: (train(plain, rank, comm), train(overlapped, rank, comm)))
        for rank, (a, b) in enumerate(runs):
            assert _same(a, b), (preset, m, rank)
            assert b["hooked"][0] == 0 and all(h == b["buckets"] for h in b["hooked"][1:]), b["hooked"]
            assert not any(b["resent"])
            assert a["bytes"] == b["bytes"]  # the same collectives, only earlier


@pytest.mark.filterwarnings("ignore:commlmo overlap")
@pytest.mark.parametrize("preset", ["signmuon", "ef21muonsign"])
def test_gradient_accumulation_with_no_sync_and_without(preset):
    plain, overlapped = _configs(preset)

    def worker(rank, comm):
        careless = train(overlapped, rank, comm, micro=3, no_sync=False)
        return train(plain, rank, comm, micro=3), train(overlapped, rank, comm, micro=3), careless

    for a, b, c in simulate(2, worker):
        assert _same(a, b) and _same(a, c)
        assert all(h == b["buckets"] for h in b["hooked"][1:]) and not any(b["resent"])
        assert all(c["resent"][1:])  # sent again from step(): exact, without the overlap
    with pytest.warns(UserWarning, match="gradients changed after their bucket was sent.*no_sync"):
        train(overlapped, 0, micro=2, no_sync=False)


@pytest.mark.filterwarnings("ignore:commlmo overlap")
def test_gradient_clipping_after_backward_is_caught_and_sent_again():
    plain, overlapped = _configs("muonsign")

    def worker(rank, comm):
        return train(plain, rank, comm, clip=True), train(overlapped, rank, comm, clip=True)

    for a, b in simulate(2, worker):
        assert _same(a, b) and all(b["resent"][1:])


def _real(rank: int, world_size: int) -> dict:
    out = {}
    for preset in ("signmuon", "muonserver", "ef21muonsign"):
        plain, overlapped = _configs(preset)
        out[preset] = (train(plain, rank), train(overlapped, rank), train(overlapped, rank, micro=2))
        out[preset + "_acc"] = train(plain, rank, micro=2)
    return out


@pytest.mark.distributed
def test_overlap_on_real_gloo_ranks_is_bitwise_and_launches_from_hooks():
    runs = spawn(_real, 3, timeout_s=240)
    for preset in ("signmuon", "muonserver", "ef21muonsign"):
        for rank in range(3):
            a, b, acc = runs[rank][preset]
            assert _same(a, b) and _same(acc, runs[rank][preset + "_acc"]), (preset, rank)
            assert _same(a, runs[0][preset][0])
            assert all(h == b["buckets"] > 1 for h in b["hooked"][1:]), b["hooked"]


@pytest.mark.filterwarnings("ignore:commlmo overlap")
def test_grad_scaler_with_overlap_unscales_once_and_equals_the_step_without_it():
    """GradScaler.step hands the optimizer scaled gradients: buckets sent from hooks are sent again, unscaled once."""
    plain, overlapped = _configs("signmuon")

    def run(config, rank, comm):
        model = Net()
        init = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=init) * 0.3)
        opt = commlmo.build_optimizer(model, config, process_group=comm)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        resent = []
        for step in range(STEPS):
            opt.zero_grad()
            x, y = _batch(rank, step, 0)
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
            resent.append(opt._overlap.last_resent if opt._overlap is not None else False)
        return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "resent": resent}

    for a, b in simulate(2, lambda rank, comm: (run(plain, rank, comm), run(overlapped, rank, comm))):
        assert _same(a, b)
        assert all(b["resent"][1:])
