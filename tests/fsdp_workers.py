"""Functions run inside spawned gloo ranks by tests/test_fsdp.py: FSDP2 and HSDP models under commlmo."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from commlmo import build_optimizer

STEPS = 3
#: votes abstain on ties (R = 2 replicas tie often): the tie-break draws from the shard's stream
ABSTAIN = {"kind": "majority_vote", "ties": "abstain"}
FP32_NS = {"kind": "spectral", "dtype": "float32"}  # no exact zeros, so no random sign of zero
CONFIGS = {
    "signmuon": {"preset": "signmuon", "groups": {"hidden": {"lmo": FP32_NS}}},
    "signmuon_abstain": {"preset": "signmuon", "groups": {
        "hidden": {"lmo": FP32_NS, "aggregator": ABSTAIN}, "embedding": {"aggregator": ABSTAIN},
        "head": {"aggregator": ABSTAIN}, "vector": {"aggregator": ABSTAIN}}, "fallback": {"aggregator": ABSTAIN}},
    "muonserver": "muonserver",
    "ef21muon": "ef21muon",
}


class Tiny(nn.Module):
    """Every kind of parameter, and dims 0 that 2 shards split unevenly (11, 9, 5)."""

    def __init__(self, seed: int = 0, blocks: dict | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(11, 8)
        self.body = nn.Linear(8, 12)
        self.norm = nn.LayerNorm(12)
        self.mid = nn.Linear(12, 9, bias=False)
        self.head = nn.Linear(9, 5)
        if blocks:
            self.commlmo_blocks = blocks

    def forward(self, x):
        return self.head(self.mid(self.norm(torch.relu(self.body(self.emb(x))))))


def batch(replica: int, shard: int, step: int):
    """16 tokens, every one of the 11 among them: no embedding row has an exact zero gradient (a sign
    compressor draws a random sign for an exact zero, from a stream as long as the shard)."""
    g = torch.Generator().manual_seed(1000 * step + 10 * replica + shard)
    x = torch.cat([torch.arange(11), torch.randint(0, 11, (5,), generator=g)])
    return x[torch.randperm(16, generator=g)], torch.randint(0, 5, (16,), generator=g)


def loss_of(model, replica, shard, step):
    x, y = batch(replica, shard, step)
    return F.cross_entropy(model(x), y)


def shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.body, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full(model: nn.Module, grads: bool = False) -> dict:
    """Every parameter (or gradient) whole: a collective of the shard group."""
    return {n: (p.grad if grads else p).full_tensor().detach().clone() for n, p in model.named_parameters()}


def book(opt) -> dict:
    return {k: dict(v) for k, v in opt.bytes.step.items()}


def meshes(world: int, shards: int):
    """``(mesh passed to build_optimizer or None, the mesh fully_shard uses, replica, shard index)``."""
    from torch.distributed.device_mesh import init_device_mesh

    rank = dist.get_rank()
    if shards == world:
        mesh = init_device_mesh("cpu", (world,))
        return None, mesh, 0, rank
    mesh = init_device_mesh("cpu", (world // shards, shards), mesh_dim_names=("replicate", "shard"))
    return mesh, mesh["shard"], rank // shards, rank % shards


def _dcp_round_trip(name, cfg, model, opt, mesh, shard_mesh, r, s, tmp: Path, replicas: int) -> dict:
    """Save model and optimizer with torch.distributed.checkpoint after step STEPS-1, load them into a fresh
    model, and take the last step there: returns the parameters after it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    where = str(tmp / f"{name}-replica{r}")
    group = shard_mesh.get_group() if replicas > 1 else None  # one checkpoint per replica (docs/fsdp.md)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=where, process_group=group)
    fresh = shard(Tiny(seed=7), shard_mesh)
    opt2 = build_optimizer(fresh, cfg, **({"mesh": mesh} if mesh is not None else {}))
    state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, opt2)}
    dcp.load(state, checkpoint_id=where, process_group=group)
    set_model_state_dict(fresh, state["model"])
    set_optimizer_state_dict(fresh, opt2, state["optim"])
    steps_after_load = opt2.steps
    loss_of(fresh, r, s, STEPS - 1).backward()
    opt2.step()
    return {"params": full(fresh), "steps_after_load": steps_after_load}


def train(rank: int, world: int, shards: int, configs: dict, tmp: str, dcp_for: tuple = ()) -> dict:
    """Every config on an FSDP2 (``shards == world``) or R x S HSDP model; params, gradients and bytes per step."""
    from commlmo.sharding import sent_by_link

    torch.set_num_threads(1)
    mesh, shard_mesh, r, s = meshes(world, shards)
    out: dict = {"replica": r, "shard": s}
    for name, cfg in configs.items():
        blocks = cfg.get("blocks") if isinstance(cfg, dict) else None
        cfg = {k: v for k, v in cfg.items() if k != "blocks"} if isinstance(cfg, dict) else cfg
        model = shard(Tiny(blocks=blocks), shard_mesh)
        opt = build_optimizer(model, cfg, **({"mesh": mesh} if mesh is not None else {}))
        history, grads, books, links = [], [], [], []
        dcp_result = None
        for step in range(STEPS):
            loss_of(model, r, s, step).backward()
            grads.append(full(model, grads=True))
            if step == STEPS - 1 and name in dcp_for:
                dcp_result = _dcp_round_trip(name, cfg, model, opt, mesh, shard_mesh, r, s, Path(tmp), world // shards)
            opt.step()
            books.append(book(opt))
            links.append(sent_by_link(opt.bytes.step))
            opt.zero_grad()
            history.append(full(model))
        out[name] = {"history": history, "grads": grads, "bytes": books, "links": links,
                     "transport": [rt.transport for rt in opt._runtimes], "server": [rt.server for rt in opt._runtimes]}
        if dcp_result is not None:
            out[name]["dcp"] = dcp_result
    return out


def _error(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test reads the type and the message
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def refusals(rank: int, world: int) -> dict:
    """What commlmo refuses at build time, each as ``"ErrorType: message"``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    hsdp = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    out = {}

    native = fully_shard(Tiny(), mesh=hsdp)  # FSDP's own HSDP: (Replicate(), Shard(0)) on the 2-D mesh
    out["native_hsdp"] = _error(lambda: build_optimizer(native, "signmuon"))
    out["native_hsdp_mesh"] = _error(lambda: build_optimizer(native, "signmuon", mesh=hsdp))
    native.set_requires_all_reduce(False)  # what would turn its all-reduce off: the gradient never reaches .grad
    loss_of(native, 0, rank, 0).backward()
    out["native_hsdp_no_all_reduce_grads"] = [p.grad is None for p in native.parameters()]

    model = Tiny()
    fully_shard(model.body, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 else None)
    fully_shard(model, mesh=mesh)
    out["shard1"] = _error(lambda: build_optimizer(model, "signmuon"))

    tp = nn.Parameter(distribute_tensor(torch.zeros(4, 4), hsdp, [Shard(0), Shard(1)]))
    out["tensor_parallel"] = _error(lambda: build_optimizer([("w", tp)], "signmuon"))

    partly = Tiny()
    fully_shard(partly.body, mesh=mesh)  # the root's parameters stay plain tensors
    out["mixed"] = _error(lambda: build_optimizer(partly, "signmuon"))

    sharded = shard(Tiny(), mesh)
    everyone = dist.group.WORLD
    out["world_as_replicate_group"] = _error(lambda: build_optimizer(sharded, "signmuon", process_group=everyone))
    out["blocks_cut"] = _error(lambda: build_optimizer(shard(Tiny(blocks={"mid.weight": 3}), mesh), "muonserver"))
    out["gluon"] = _error(lambda: build_optimizer(sharded, "gluon"))
    out["overlap"] = _error(lambda: build_optimizer(sharded, {"preset": "signmuon", "overlap": True}))
    out["plain_with_mesh"] = _error(lambda: build_optimizer(Tiny(), "signmuon", mesh=mesh))

    class OneRow(nn.Module):
        def __init__(self):
            super().__init__()
            self.row = nn.Parameter(torch.zeros(1, 4))

    out["empty_shard"] = _error(lambda: build_optimizer(fully_shard(OneRow(), mesh=mesh), "signmuon"))
    opt = build_optimizer(sharded, "signmuon")
    out["add_param_group"] = _error(lambda: opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]}))
    return out


def nonfinite_skips(rank: int, world: int) -> dict:
    """A NaN in rank 0's rows of one gradient: every rank skips the step (``nonfinite: skip``), nothing moves."""
    from torch.distributed.device_mesh import init_device_mesh

    model = shard(Tiny(), init_device_mesh("cpu", (world,)))
    opt = build_optimizer(model, {"preset": "signmuon", "nonfinite": "skip"})
    loss_of(model, 0, rank, 0).backward()
    opt.step()
    opt.zero_grad()
    before = full(model)
    loss_of(model, 0, rank, 1).backward()
    if rank == 0:
        model.mid.weight.grad.to_local().view(-1)[0] = float("nan")
    opt.step()
    after = full(model)
    return {"skipped": opt.skipped_steps, "unchanged": all(torch.equal(before[n], after[n]) for n in before)}


def fsdp_and_refusals(rank: int, world: int, configs: dict, tmp: str, dcp_for: tuple) -> dict:
    """The 1-D mesh run (every rank one shard), the refusals and a non-finite gradient, in one launch."""
    return {"train": train(rank, world, world, configs, tmp, dcp_for), "refusals": refusals(rank, world),
            "nonfinite": nonfinite_skips(rank, world)}
