"""The owner server role against the replicated one: bytes and step time per rank, real gloo ranks.

    python bench/owner.py          # prints the table recorded in docs/benchmarks/scale.md

Eight 512x512 matrices, M = 2 and 4 ranks on this machine, five steps (the first dropped).
Under ``server: owner`` each matrix's Newton-Schulz runs on one rank, so the per-rank LMO work
is about 1/M of the replicated role's at the same bytes.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

import commlmo
from commlmo.launch import spawn

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
        times = []
        for _ in range(5):
            for p, gr in zip(params, grads):
                p.grad = gr
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
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
