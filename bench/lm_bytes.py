"""Bytes per worker per step of every preset with its default routing, on real language models.

    python bench/lm_bytes.py                  # (a) GPT-2-small shapes on 2 ranks, (b) the gpt task on 4
    python bench/lm_bytes.py --only gpt2      # one of them

(a) GPT-2-small shapes (124 M parameters, vocabulary 50257, width 768, 12 layers,
tied head): 2 real gloo ranks, random gradients (no training).
(b) the ``gpt`` task's model (``commlmo compare --task gpt``): 4 ranks.
Each preset takes two steps and the second is measured; 1-bit Adam's float32
warm-up (100 steps in the presets) is cut to one step so that step is its steady
state (during the warm-up its groups send float32 like AdamW).

Every preset runs with its default routing: the hidden matrices by the preset's
method, the embeddings, the head and the vectors by its element-wise recipe
(``commlmo presets``).  The baseline is measured in the same processes: a float32
all-reduce of every parameter, which is what DDP sends.  Bytes are what the
optimizer handed to the collectives, per worker; the ratio is baseline / preset.
The ``elementwise: adamw`` rows show the recipe of the first release (and of the
SignMuon code): non-matrix parameters on a float32 mean.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import commlmo  # noqa: E402
from _machine import describe_machine, provenance, timed_steps  # noqa: E402
from commlmo.metrics import human_bytes  # noqa: E402
from commlmo.launch import spawn  # noqa: E402
from commlmo.tasks.gpt import GPT  # noqa: E402

MODELS = {
    "gpt2": dict(vocab=50257, block=1024, layers=12, heads=12, width=768, tie_head=True),
    "gpt": dict(vocab=4096, block=64, layers=4, heads=4, width=128, tie_head=True),
}
WORLD = {"gpt2": 2, "gpt": 4}
EXTRA = {"signmuon+adamw": {"preset": "signmuon", "elementwise": "adamw"},
         "muonusign+adamw": {"preset": "muonusign", "elementwise": "adamw"},
         "ef21muon+lion": {"preset": "ef21muon", "elementwise": "lion"}}


def steady_state(source) -> commlmo.OptimizerConfig:
    """The config with 1-bit Adam's float32 warm-up cut to one step, so step 2 shows its steady state."""
    return commlmo.load_config(source).with_rule_options("onebit_adam", warmup=1)


def worker(rank: int, world: int, model_name: str, configs: dict) -> dict:
    torch.manual_seed(0)
    model = GPT(**MODELS[model_name])
    params = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    flat = torch.randn(numel)
    dist.barrier()
    t0 = time.perf_counter()
    dist.all_reduce(flat)
    base_time = time.perf_counter() - t0
    del flat
    out = {"_baseline": {"sent": 2 * (world - 1) / world * 4 * numel, "time": base_time, "numel": numel}}
    g = torch.Generator().manual_seed(rank + 1)
    grads = [torch.randn(p.shape, generator=g) * 0.01 for p in params]
    snapshot = [p.detach().clone() for p in params]
    for name, cfg in configs.items():
        with torch.no_grad():
            for p, s in zip(params, snapshot):
                p.copy_(s)
        opt = commlmo.build_optimizer(model, steady_state(cfg))
        elapsed = timed_steps(opt, params, grads, 2)[-1]  # the second step: past 1-bit Adam's (shortened) warm-up
        by_group: dict[str, int] = {}
        for label, row in opt.bytes.step.items():
            by_group[label.split("/")[0]] = by_group.get(label.split("/")[0], 0) + row["sent"]
        out[name] = {"sent": opt.bytes.step_sent, "time": elapsed, "groups": by_group,
                     "numel": {gr["group"]: sum(p.numel() for p in gr["params"]) for gr in opt.param_groups}}
        del opt
    return out


def fmt(n: float) -> str:
    return human_bytes(n, digits=2)


def table(model_name: str, world: int, res: dict) -> list[str]:
    base = res.pop("_baseline")
    numel = base["numel"]
    any_row = next(iter(res.values()))
    shares = ", ".join(f"{g} {n / numel:.1%}" for g, n in any_row["numel"].items())
    lines = [
        f"## {model_name}: {numel:,} parameters, {world} ranks",
        "",
        f"Parameter shares by group (signmuon's routing): {shares}.  ",
        f"Baseline float32 all-reduce of every parameter: {fmt(base['sent'])} sent per worker.",
        "",
        "| preset | sent / worker / step | fewer bytes than fp32 all-reduce | hidden | embedding | head | vector | step time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res.items():
        ratio = base["sent"] / r["sent"] if r["sent"] else float("inf")
        cells = [fmt(r["groups"].get(g, 0)) for g in ("hidden", "embedding", "head", "vector")]
        lines.append(f"| {name} | {fmt(r['sent'])} | {ratio:.1f}x | {' | '.join(cells)} | {r['time']:.2f} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(MODELS), nargs="+", default=list(MODELS))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/benchmarks/lm_bytes.md")
    args = ap.parse_args()
    configs = {name: name for name in commlmo.PRESETS} | EXTRA
    started = time.perf_counter()
    lines = ["# Bytes per step on real language models, every parameter routed", "",
             "PROVENANCE", "",
             "Bytes are per worker per step, from the optimizer's accounting of what it handed to each "
             "collective; the group columns split them by pipeline group (the agreement flags are the rest).", ""]
    for model_name in args.only:
        world = WORLD[model_name]
        t0 = time.perf_counter()
        res = spawn(worker, world, model_name, configs, timeout_s=3000)[0]
        lines += table(model_name, world, res)
        print("\n".join(lines[-len(configs) - 8:]), flush=True)
        print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    i = lines.index("PROVENANCE")
    lines[i:i + 1] = provenance(started, describe_machine())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
