"""The owner server role against the replicated one: bytes and step time per rank, real gloo ranks.

    python bench/owner.py          # prints the table recorded in docs/benchmarks/scale.md

Eight 512x512 matrices, M = 2 and 4 ranks on this machine, five steps (the first dropped).
Under ``server: owner`` each matrix's Newton-Schulz runs on one rank, so the per-rank LMO work
is about 1/M of the replicated role's at the same bytes.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import commlmo  # noqa: E402
from _machine import timed_steps  # noqa: E402
from commlmo.launch import spawn  # noqa: E402

CONFIGS = {
    "muonserver": "muonserver",
    "muonserver, server: owner": {"preset": "muonserver", "groups": {"hidden": {"server": "owner"}}},
    "muonsign": "muonsign",
    "muonsign, server: owner": {"preset": "muonsign", "groups": {"hidden": {"server": "owner"}}},
}


def worker(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    out = {}
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(512, 512)) for _ in range(8)]
        opt = commlmo.build_optimizer([(f"w{i}", p) for i, p in enumerate(params)], cfg)
        g = torch.Generator().manual_seed(rank)
        grads = [torch.randn(512, 512, generator=g) for _ in params]
        times = timed_steps(opt, params, grads, 5)
        out[name] = (statistics.median(times[1:]), opt.bytes.step_sent)
    return out


def main() -> None:
    print("| M | method | step time per rank (ms) | bytes sent per rank |")
    print("|---|---|---:|---:|")
    for m in (2, 4):
        for name, (t, sent) in spawn(worker, m, timeout_s=600)[0].items():
            print(f"| {m} | {name} | {t * 1e3:.0f} | {sent:,} |")


if __name__ == "__main__":
    main()
