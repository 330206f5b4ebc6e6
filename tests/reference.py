"""Plain dense reference implementations of the SignMuon-family methods (the SignMuon paper, Smirnova, Kravatskiy, Kovalev).

Written the obvious way -- a list of per-worker tensors, dense signs, a dense
vote -- with no packing, no collectives and no plugins except the spectral LMO
itself (tested on its own), so the optimizer's composition of plugins is pinned
against an independent statement of each method.  Use an odd worker count and
a float32 LMO so no sign is ever zero and no vote ties.
"""

from __future__ import annotations

import math

import torch

from commlmo import build_plugin

POLAR = build_plugin("lmo", {"kind": "spectral", "dtype": "float32"})


def polar(x):
    return POLAR.direction(x)


def sign(x):
    assert bool((x != 0).all()), "reference inputs must have no exact zeros"
    return torch.sign(x)


def vote(xs):
    total = sum(sign(x) for x in xs)
    assert bool((total != 0).all()), "use an odd worker count"
    return torch.sign(total)


def mean(xs):
    acc = xs[0].clone()
    for x in xs[1:]:
        acc += x
    return acc / len(xs)


def scaled_sign(x):
    return x.abs().mean() * sign(x)


def lmo_gain(shape):
    m, n = shape[0], math.prod(shape[1:])
    return math.sqrt(max(1.0, m / n))


def sign_gain(shape):
    return 1.0 / math.sqrt(math.prod(shape[1:]))


class Reference:
    """One matrix parameter ``X`` trained by ``method`` on ``M`` workers' gradients."""

    def __init__(self, method: str, x: torch.Tensor, workers: int, *, lr: float, beta: float = 0.95):
        self.method, self.x, self.lr, self.beta = method, x.clone(), lr, beta
        self.w = x.clone()  # EF21-P broadcast model
        self.m = [torch.zeros_like(x) for _ in range(workers)]
        self.g_local = [torch.zeros_like(x) for _ in range(workers)]
        self.g = torch.zeros_like(x)

    def params(self):
        return self.w if self.method == "ef21muonsign" else self.x

    def _ef21(self, vs):
        cs = [scaled_sign(v - gi) for v, gi in zip(vs, self.g_local)]
        for gi, c in zip(self.g_local, cs):
            gi += c
        self.g += mean(cs)
        return self.g

    def step(self, grads):
        b = self.beta
        vs = []
        for i, g in enumerate(grads):
            self.m[i] = self.m[i] * b + (1 - b) * g
            vs.append((1 - b) * g + b * self.m[i])
        shape, lr = self.x.shape, self.lr
        meth = self.method
        if meth == "muon":
            self.x -= lr * lmo_gain(shape) * mean([polar(v) for v in vs])
        elif meth == "muonserver":
            self.x -= lr * lmo_gain(shape) * polar(mean(vs))
        elif meth == "signmuon":
            self.x -= lr * sign_gain(shape) * vote([polar(v) for v in vs])
        elif meth == "muonusign":
            self.x -= lr * lmo_gain(shape) * polar(vote(vs))
        elif meth == "muonsign":
            self.x -= lr * sign_gain(shape) * sign(polar(vote(vs)))
        elif meth == "signsgd":
            self.x -= lr * sign_gain(shape) * vote(vs)
        elif meth == "ef21signmuon":
            self.x -= lr * lmo_gain(shape) * self._ef21([polar(v) for v in vs])
        elif meth == "ef21muonusign":
            self.x -= lr * lmo_gain(shape) * polar(self._ef21(vs))
        elif meth == "ef21muonsign":
            self.x -= lr * lmo_gain(shape) * polar(self._ef21(vs))
            self.w += scaled_sign(self.x - self.w)
        else:
            raise ValueError(meth)
