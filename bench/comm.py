"""Bytes and time per step of every preset on real gloo workers, against a float32 all-reduce.

    python bench/comm.py                       # M = 2 and 4, writes docs/benchmarks/comm.md
    python bench/comm.py --world 2 4 8 --size 1024 --layers 4 --steps 5

Each worker owns the same model (``layers`` square matrices of side ``size``
plus a bias), feeds random gradients and steps the optimizer.  The baseline is
measured in the same processes: a float32 ``all_reduce`` of all the
parameters, i.e. what DDP would send.  Bytes come from the optimizer's own
accounting of what it handed to the collectives; the ratio column is
``baseline bytes / preset bytes`` (the limit for 1-bit methods is 32x).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import commlmo
from commlmo.launch import spawn
from commlmo.metrics import human_bytes

EXTRA = {
    "ef21muon_topk_fp32": {"preset": "ef21muon", "groups": {"hidden": {"uplink": {
        "kind": "topk", "k": 0.05, "selection": "threshold", "value_dtype": "same"}}}},
    "ef21muon_natural": {"preset": "ef21muon", "groups": {"hidden": {"uplink": {"kind": "natural"}}}},
    "ef21muon_topk+natural": {"preset": "ef21muon", "groups": {"hidden": {"uplink": {
        "kind": "chain", "stages": [{"kind": "topk", "k": 0.05, "selection": "blocked", "blocks": "auto"},
                                   {"kind": "natural"}]}}}},
    "ef21muon_rankk": {"preset": "ef21muon", "groups": {"hidden": {"uplink": {"kind": "rankk", "rank": 8}}}},
}


def worker(rank: int, world: int, size: int, layers: int, steps: int, configs: dict) -> dict:
    torch.manual_seed(0)
    shapes = [(size, size)] * layers + [(size,)]
    d = sum(torch.Size(s).numel() for s in shapes)
    # baseline: what DDP sends, a float32 all-reduce of every parameter
    flat = torch.randn(d)
    times = []
    for _ in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        times.append(time.perf_counter() - t0)
    out = {"_baseline": {"sent": 2 * (world - 1) / world * 4 * d, "received": 2 * (world - 1) / world * 4 * d,
                         "time": statistics.median(times[1:])}}
    g = torch.Generator().manual_seed(rank + 1)
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(2)]
    for name, cfg in configs.items():
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
                  for i, s in enumerate(shapes)]
        opt = commlmo.build_optimizer([(f"p{i}", p) for i, p in enumerate(params)], cfg)
        times, sent, received = [], [], []
        for step in range(steps + 1):
            for p, gr in zip(params, grads[step % 2]):
                p.grad = gr
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
            sent.append(opt.bytes.step_sent)
            received.append(opt.bytes.step_received)
        out[name] = {"sent": statistics.mean(sent[1:]), "received": statistics.mean(received[1:]),
                     "time": statistics.median(times[1:])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/benchmarks/comm.md")
    args = ap.parse_args()
    configs = {name: name for name in commlmo.PRESETS} | EXTRA
    lines = [
        "# Bytes on the wire per step: every preset against a float32 all-reduce",
        "",
        f"Command: `python bench/comm.py --world {' '.join(map(str, args.world))} --size {args.size} "
        f"--layers {args.layers} --steps {args.steps}`  ",
        f"Date: {datetime.date.today()}; machine: {platform.machine()} {platform.processor() or ''} "
        f"({torch.get_num_threads()} threads here, 1 per worker), torch {torch.__version__}, gloo on 127.0.0.1.  ",
        f"Model: {args.layers} matrices {args.size}x{args.size} + one bias "
        f"({args.layers * args.size ** 2 + args.size:,} parameters); bytes are per worker per step, from the "
        "optimizer's accounting of what it handed to each collective.",
        "",
    ]
    for m in args.world:
        res = spawn(worker, m, args.size, args.layers, args.steps, configs, timeout_s=1200)[0]
        base = res.pop("_baseline")
        lines += [
            f"## M = {m} workers",
            "",
            f"Baseline float32 all-reduce: {human_bytes(base['sent'])} sent per worker, {base['time'] * 1e3:.1f} ms.",
            "",
            "| method | sent / step | received / step | fewer bytes than fp32 all-reduce | time / step (ms) | time vs all-reduce |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in res.items():
            ratio = base["sent"] / r["sent"] if r["sent"] else float("inf")
            lines.append(f"| {name} | {human_bytes(r['sent'])} | {human_bytes(r['received'])} | {ratio:.1f}x | "
                         f"{r['time'] * 1e3:.1f} | {r['time'] / base['time']:.2f}x |")
        lines.append("")
        print("\n".join(lines[-len(res) - 6:]), flush=True)
    lines += [
        "Time per step includes the whole optimizer step (momentum, Newton-Schulz, compression, collectives,",
        "update) while the baseline is the all-reduce alone, so the time ratio over-states the cost of",
        "compressed methods on a network this fast (loopback); see bench/bandwidth.py for shaped links.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
