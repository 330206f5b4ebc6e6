"""Step time of one process configured as torch.optim.Muon, against torch.optim.Muon itself.

    python bench/step.py                 # writes docs/benchmarks/step.md

The same parameters and gradients go to ``torch.optim.Muon(lr=0.02)`` and to the
commlmo config that reproduces it (``examples/torch_muon.yaml``'s group: spectral LMO at the
server role, identity uplink, mean, ``original`` lr rule, weight decay 0.1) on one process
(no process group).  The two steps are interleaved in one loop so drift on a shared machine
hits both; the ratio of medians is the figure.  commlmo's step also agrees on finite
gradients (one sum per gradient), checks the layout on its first step, and keeps every
state change out of place until the step succeeded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import commlmo  # noqa: E402
from _machine import describe_machine, provenance  # noqa: E402

SHAPES = {"small": [(256, 256)] * 8, "medium": [(512, 512)] * 6 + [(512, 2048), (2048, 512)],
          "large": [(1024, 1024)] * 4 + [(1024, 4096), (4096, 1024)]}
CONFIG = {"groups": [{"name": "muon", "params": {"ndim": [2]}, "lmo": {"kind": "spectral", "batch": False, "dtype": "bfloat16"},
                      "lmo_at": "server", "lr": 0.02, "lr_rule": {"kind": "original"}, "weight_decay": 0.1}]}


def measure(shapes, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    ours_p = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    ours = commlmo.build_optimizer([(str(i), p) for i, p in enumerate(ours_p)], CONFIG)
    theirs = torch.optim.Muon(theirs_p, lr=0.02)
    for a, b in zip(ours_p, theirs_p):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    times: dict[str, list[float]] = {"ours": [], "torch": []}
    for _ in range(steps + 2):
        for name, opt in (("ours", ours), ("torch", theirs)):
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times["ours"][2:]), statistics.median(times["torch"][2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/benchmarks/step.md")
    args = ap.parse_args()
    started = time.perf_counter()
    rows = []
    for name, shapes in SHAPES.items():
        ours, theirs = measure(shapes, args.steps)
        numel = sum(torch.Size(s).numel() for s in shapes)
        rows.append(f"| {name} ({len(shapes)} matrices, {numel / 1e6:.1f} M entries) | {theirs * 1e3:.1f} | "
                    f"{ours * 1e3:.1f} | {ours / theirs:.2f}x |")
        print(rows[-1], flush=True)
    lines = ["# Step time: one process configured as torch.optim.Muon", "",
             *provenance(started, describe_machine()), "", (__doc__ or "").split("\n\n", 2)[2].strip(), "",
             "| parameters | torch.optim.Muon (ms) | commlmo (ms) | commlmo / torch |", "|---|---:|---:|---:|",
             *rows, ""]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
