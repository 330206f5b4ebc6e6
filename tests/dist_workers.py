"""Functions run inside spawned gloo ranks by the distributed tests (importable, hence a module)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from commlmo import build_optimizer

# Sizes that divide neither by the world sizes tested (2, 3, 4) nor by 8.
SHAPES = {"w1": (7, 13), "conv": (5, 3, 3, 3), "w2": (11, 7), "bias": (7,)}
STEPS = 3


def initial_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def grads_for(rank: int, step: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 10_000 + step * 100 + rank)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def train(config, rank: int, comm=None, steps: int = STEPS):
    """Run ``steps`` steps of ``config`` as ``rank``; return params after every step and the bytes."""
    params = {n: torch.nn.Parameter(t.clone()) for n, t in initial_params().items()}
    opt = build_optimizer(list(params.items()), config, process_group=comm)
    history, step_bytes = [], []
    for step in range(steps):
        for n, g in grads_for(rank, step).items():
            params[n].grad = g
        opt.step()
        history.append({n: p.detach().clone() for n, p in params.items()})
        step_bytes.append({k: dict(v) for k, v in opt.bytes.step.items()})
    return {"history": history, "bytes": step_bytes}


def run_configs(rank: int, world_size: int, configs: dict):
    """Spawned entry point: every config in turn on the real process group."""
    assert dist.is_initialized() and dist.get_world_size() == world_size
    return {name: train(cfg, rank) for name, cfg in configs.items()}


def run_bfloat16(rank: int, world_size: int, configs: dict):
    """Spawned entry point: every config on bfloat16 parameters and gradients; the parameters after
    ``STEPS`` steps and the dtypes of the floating-point state."""
    out = {}
    for name, cfg in configs.items():
        params = {n: torch.nn.Parameter(t.to(torch.bfloat16)) for n, t in initial_params().items()}
        opt = build_optimizer(list(params.items()), cfg)
        for step in range(STEPS):
            for n, g in grads_for(rank, step).items():
                params[n].grad = g.to(torch.bfloat16)
            opt.step()
        out[name] = {"params": {n: p.detach().clone() for n, p in params.items()},
                     "state": sorted({str(v.dtype) for s in opt.state.values() for v in s.values()
                                      if torch.is_tensor(v) and v.is_floating_point()})}
    return out
