r"""The baseline of ``bench/bandwidth.py``: plain DDP with ``torch.optim.Muon`` and ``torch.optim.AdamW``.

    python bench/_ddp_baseline.py RUN_CONFIG --out DIR     # starts train.nproc workers on 127.0.0.1

What users run instead of commlmo: the model wrapped in
``torch.nn.parallel.DistributedDataParallel`` as it comes (25 MB buckets, the
first 1 MB; each bucket's float32 all-reduce starts from backward's hooks and
overlaps the rest of backward), then two stock optimizers on the averaged
gradients:

* ``torch.optim.Muon`` on the hidden matrices (Jordan et al. 2024: EMA momentum
  with Nesterov look-ahead, 5 bf16 Newton--Schulz steps, ``lr * sqrt(max(1, A/B))``,
  which is commlmo's ``unit_gain`` rule for a 2-D weight).  It orthogonalises a
  fused QKV weight ``[3d, d]`` as one matrix, as users run it; commlmo's presets
  see three;
* ``torch.optim.AdamW`` on everything else: embeddings (the tied head), norms, biases.

The hyperparameters are read from the run config's ``optimizer``, a commlmo
Muon + AdamW recipe (e.g. ``{preset: muonserver}``): each parameter goes where
that config's routing sends it (its groups in order, roles from
:func:`commlmo.routing.parameter_roles`), so the baseline and ``muonserver``
train the same parameters with the same rules and differ only in the
implementation.  The task, seed, batches, steps and learning-rate schedule are
the run config's, built by :mod:`commlmo.tasks` exactly as ``commlmo train``
builds them, and the workers start through :func:`commlmo.launch.launch`, as
``commlmo train``'s do (one thread each, gloo).

Rank 0 writes ``metrics.jsonl`` and ``summary.json`` in ``commlmo train``'s
format (:mod:`commlmo.metrics`): ``time`` is the training time on rank 0,
evaluation excluded.  DDP keeps no byte count, so ``sent`` is the ring
all-reduce's ``2 (M-1)/M`` times the float32 gradient per worker per step,
marked ``"accounting": "ring formula"`` in the summary; ``bench/bandwidth.py``
holds it against the bytes the loopback really carried.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from commlmo.config import OptimizerConfig, load_config
from commlmo.errors import ConfigError
from commlmo.launch import launch
from commlmo.metrics import MetricsWriter
from commlmo.routing import parameter_roles
from commlmo.runconfig import load_run_config
from commlmo.tasks import build_task, prepare_task


def _check_muon(g: Any) -> None:
    """Refuse a hidden group that ``torch.optim.Muon`` does not compute."""
    rule = g.lr_rule.kind
    ok = (g.lmo.kind == "spectral" and g.momentum is not None and g.momentum.kind == "ema"
          and rule in ("unit_gain", "original") and g.uplink.kind == "identity" and g.aggregator.kind == "mean")
    if not ok:
        raise ConfigError(f"group {g.name!r}: the DDP baseline runs torch.optim.Muon (spectral LMO, EMA momentum, "
                          f"lr rule unit_gain/original, float32 mean); got lmo {g.lmo.kind!r}, lr rule {rule!r}, "
                          f"uplink {g.uplink.kind!r}, aggregator {g.aggregator.kind!r}")


def torch_optimizers(model: torch.nn.Module, recipe: OptimizerConfig) -> list[torch.optim.Optimizer]:
    """``torch.optim.Muon`` and ``torch.optim.AdamW`` over ``model``'s parameters, routed and set up as ``recipe``."""
    roles = parameter_roles(model)
    groups = recipe.all_groups()
    members: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}
    for name, p in model.named_parameters():
        g = next((g for g in recipe.groups if g.params.matches(name, p, roles[name])), recipe.fallback)
        members[g.name].append(p)
    muon, adamw = [], []
    for g in groups:
        if not members[g.name]:
            continue
        if g.lmo is not None:
            _check_muon(g)
            bad = [tuple(p.shape) for p in members[g.name] if p.ndim != 2]
            if bad:
                raise ConfigError(f"group {g.name!r}: torch.optim.Muon takes 2-D parameters only; got shapes {bad}")
            muon.append({"params": members[g.name], "lr": g.lr, "momentum": g.momentum.beta,
                         "nesterov": g.momentum.nesterov, "weight_decay": g.weight_decay})
        elif g.rule is not None and g.rule.kind == "adamw":
            adamw.append({"params": members[g.name], "lr": g.lr, "betas": tuple(g.rule.betas), "eps": g.rule.eps,
                          "weight_decay": g.weight_decay})
        else:
            raise ConfigError(f"group {g.name!r}: the DDP baseline runs Muon and AdamW only; this group has "
                              f"{'rule ' + g.rule.kind if g.rule is not None else 'no LMO and no rule'}")
    out: list[torch.optim.Optimizer] = []
    if muon:
        out.append(torch.optim.Muon(muon, adjust_lr_fn="original"))
    if adamw:
        out.append(torch.optim.AdamW(adamw))
    return out


def _ddp_buckets(ddp: Any) -> list[int] | None:
    """The bucket sizes DDP built, in bytes (a private API: ``None`` where this torch does not offer it)."""
    try:
        return [int(b) for b in ddp._get_ddp_logging_data().get("bucket_sizes", "").split(",") if b.strip()]
    except Exception:  # noqa: BLE001 - reporting only
        return None


def run_rank(rank: int, world_size: int, raw_config: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """One rank of the baseline; returns the summary on rank 0."""
    cfg = load_run_config(raw_config)
    tc = cfg.train
    if rank == 0:
        prepare_task(cfg.task)
    dist.barrier()
    task = build_task(cfg.task, rank=rank, world_size=world_size, seed=tc.seed, global_batch=tc.global_batch)
    module = task.model
    module.train()
    ddp = torch.nn.parallel.DistributedDataParallel(module)
    optimizers = torch_optimizers(module, load_config(cfg.optimizer))
    schedulers = [tc.schedule.scheduler(o, tc.steps) for o in optimizers]
    numel = sum(p.numel() for p in module.parameters() if p.requires_grad)
    ring = 2 * (world_size - 1) / world_size * 4 * numel  # float32 bytes each worker sends per step

    writer = MetricsWriter(Path(out_dir) / "metrics.jsonl") if rank == 0 else None
    last_eval: dict[str, float] = {}

    def evaluate() -> None:
        nonlocal last_eval
        if rank == 0:
            task.model = module  # held-out batches on rank 0 alone: no DDP forward, no collective
            last_eval = {f"eval_{k}": v for k, v in task.evaluate().items()}
            task.model = ddp

    task.model = ddp
    start = time.perf_counter()
    evaluate()
    if writer:
        writer.write({"step": 0, "sent_total": 0, "time": 0.0, **last_eval})
    train_time, losses = 0.0, []
    for step in range(1, tc.steps + 1):
        t0 = time.perf_counter()
        loss, metrics = task.loss(task.train_batch(step - 1))
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()  # DDP's all-reduces run here, overlapping backward; it returns once they are done
        t1 = time.perf_counter()
        for o in optimizers:
            o.step()
        for s in schedulers:
            s.step()
        step_time = time.perf_counter() - t0
        train_time += step_time
        losses.append(float(loss.detach()))
        evaluated = step == tc.steps or (tc.eval_every > 0 and step % tc.eval_every == 0)
        if evaluated:
            evaluate()
        if writer:
            writer.write({"step": step, "loss": losses[-1], **metrics, "sent": ring, "sent_total": ring * step,
                          "step_time": step_time, "opt_time": step_time - (t1 - t0), "time": train_time,
                          **(last_eval if evaluated else {})})
    wall = time.perf_counter() - start
    if rank != 0:
        return {"rank": rank}
    assert writer is not None
    writer.close()
    summary = {
        "name": cfg.label(), "world_size": world_size, "steps": tc.steps, "steps_run": tc.steps,
        "final": {"train_loss": losses[-1], **last_eval},
        "best_eval_loss": last_eval.get("eval_loss", math.inf), "wall_time": wall, "train_time": train_time,
        "bytes": {"accounting": "ring formula", "sent_per_worker": ring * tc.steps,
                  "received_per_worker": ring * tc.steps,
                  "by_rank": [{"rank": r, "sent": ring * tc.steps} for r in range(world_size)]},
        "ddp": {"bucket_bytes": _ddp_buckets(ddp), "optimizers": [type(o).__name__ for o in optimizers]},
        "task": task.info, "backend": dist.get_backend(), "torch": torch.__version__,
        "python": platform.python_version(), "cpus": os.cpu_count(),
    }
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="run config (optimizer: a Muon + AdamW recipe; task; train)")
    p.add_argument("--out", required=True, help="run directory (metrics.jsonl, summary.json)")
    args = p.parse_args(argv)
    cfg = load_run_config(args.config)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    raw = cfg.model_dump(mode="json")
    launch(run_rank, cfg.train.nproc, raw, args.out, backend="gloo", timeout_s=cfg.train.timeout_s,
           collective_timeout_s=cfg.train.collective_timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
