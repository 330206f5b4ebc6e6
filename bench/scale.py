r"""Bytes and step time per rank as the world grows: M = 2..16 real gloo ranks, projected to M = 1024.

    python bench/scale.py                 # M = 2 4 8 16; writes docs/benchmarks/scale.md and docs/img/scale_bytes.png
    python bench/scale.py --world 2 4 --project 64 1024 --out /tmp/scale.md

The model is four 256x256 matrices (the ``hidden`` group) and a 512x64
``nn.Embedding`` (the ``embedding`` group), so every preset's default routing
runs: its method on the matrices and its element-wise recipe on the embedding.
1-bit Adam's float32 warm-up (in the EF21 presets' recipe) is cut to one step,
so after one warm-up step the measured step is every preset's steady state.
Every rank takes that one measured step of every preset; bytes are what the
optimizer handed to the collectives (``opt.bytes.step``), per rank, and the
time is the whole ``opt.step()``.  The baseline is a float32 all-reduce of every
parameter (what DDP sends): ``2(M-1)/M * 4 * parameters`` bytes per rank.

The projection uses the cost model, :func:`commlmo.transport.bytes_per_rank`, on
each group's declared wire sizes with the transports' padding, the transport
re-planned for each ``M`` (``GroupRuntime.plan``); the script checks that it gives
exactly the measured bytes at every measured ``M`` (and exits 1 if not).
Projected time is ``compute + bytes / bandwidth + latency * collectives``, with
compute the step time measured at the smallest ``M``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import commlmo  # noqa: E402
from _machine import describe_machine, provenance, timed_steps  # noqa: E402
from commlmo.metrics import human_bytes  # noqa: E402
from commlmo.launch import spawn  # noqa: E402
from commlmo.transport import bytes_per_rank  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LATENCY_S = 50e-6  # per collective, in the projection
LINKS = {"100 Gbit/s": 100e9, "1 Gbit/s": 1e9}
#: the issue's targets: (presets, least ratio vs a float32 all-reduce, at these M)
TARGETS = [
    (("ef21muon",), 8.0),
    (("ef21muonusign", "ef21muonsign"), 25.0),
    (("signmuon", "muonusign", "muonsign", "signsgd"), 31.0),
]
TARGET_WORLDS = (8, 16)


class ScaleModel(nn.Module):
    """``layers`` square matrices (hidden: plain 2-D parameters, so none is taken for the head) and an embedding."""

    def __init__(self, size: int = 256, layers: int = 4, vocab: int = 512, width: int = 64):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mats = nn.ParameterList([nn.Parameter(torch.randn(size, size) / size ** 0.5) for _ in range(layers)])


def steady_state(source) -> commlmo.OptimizerConfig:
    """The config with 1-bit Adam's float32 warm-up cut to one step (as bench/lm_bytes.py)."""
    return commlmo.load_config(source).with_rule_options("onebit_adam", warmup=1)


# ----------------------------------------------------------------------------- measured


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(rank: int, world: int, configs: dict, dims: dict, steps: int) -> dict:
    torch.manual_seed(0)
    model = ScaleModel(**dims)
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    tiny, flat = torch.zeros(1), torch.randn(numel)
    out = {"_loopback": {"latency": _median_time(lambda: dist.all_reduce(tiny), 7),
                         "allreduce": _median_time(lambda: dist.all_reduce(flat), 3)}}
    del flat
    g = torch.Generator().manual_seed(rank + 1)
    grads = [torch.randn(p.shape, generator=g) * 0.01 for p in params]
    snapshot = [p.detach().clone() for p in params]
    for name, cfg in configs.items():
        with torch.no_grad():
            for p, s in zip(params, snapshot):
                p.copy_(s)
        opt = commlmo.build_optimizer(model, steady_state(cfg))
        # a warm-up step (layout check, 1-bit Adam's float32 step), then the measured ones
        elapsed = timed_steps(opt, params, grads, 1 + steps)
        out[name] = {"book": {k: dict(v) for k, v in opt.bytes.step.items()}, "time": statistics.median(elapsed[1:]),
                     "transports": {gr["group"]: rt.transport for rt, gr in zip(opt._runtimes, opt.param_groups)}}
        del opt
    return out


# ----------------------------------------------------------------------------- the cost model


def _mean_cost(transport: str, pieces: list[tuple[torch.dtype, int]], m: int) -> tuple[int, int]:
    """(bytes, collectives) of a mean of wire tensors ``pieces`` = ``[(dtype, elements)]``."""
    if transport == "allgather":  # one uint8 buffer of every wire tensor
        return round(bytes_per_rank("allgather", payload_bytes=sum(d.itemsize * n for d, n in pieces),
                                    dense_entries=0, world_size=m)), 1
    by_dtype: dict[torch.dtype, int] = {}
    for d, n in pieces:
        by_dtype[d] = by_dtype.get(d, 0) + n
    sent = 0
    for d, n in by_dtype.items():
        if transport == "owner":  # owner_sum pads each dtype to a multiple of M elements
            n = -(-n // m) * m
        sent += round(bytes_per_rank(transport, payload_bytes=n * d.itemsize, dense_entries=0, world_size=m))
    return sent, len(by_dtype) * (2 if transport == "owner" else 1)


def _vote_cost(transport: str, packed: int, entries: int, m: int, abstain: bool) -> tuple[int, int]:
    """(bytes, collectives) of a majority vote of ``packed`` sign bytes over ``entries`` coordinates."""
    if transport == "int8":
        return round(bytes_per_rank("int8", payload_bytes=packed, dense_entries=entries, world_size=m)), 1
    if transport == "allgather":  # whole 64-bit words
        return round(bytes_per_rank("allgather", payload_bytes=-(-packed // 8) * 8, dense_entries=entries,
                                    world_size=m)), 1
    padded = -(-packed // (8 * m)) * 8 * m  # each owner shard whole 64-bit words
    sent = bytes_per_rank("owner", payload_bytes=padded, dense_entries=entries, world_size=m)
    if abstain and m % 2 == 0:  # the tie mask comes back with the result
        sent += (m - 1) * padded / m
    return round(sent), 2


def modelled(opt, m: int) -> dict[str, tuple[int, int, str]]:
    """``{group: (bytes, collectives, transport)}`` of a steady-state step on ``m`` ranks, plus the flags.

    ``opt`` may live on a world of one: each group's transport is planned again for ``m``.
    """
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    out = {"step_agreement": (round(bytes_per_rank("allreduce", payload_bytes=1 + n_params, dense_entries=0,
                                                   world_size=m)), 1, "allreduce")}
    for rt, group in zip(opt._runtimes, opt.param_groups):
        params = group["params"]
        transport = rt.plan(params, world_size=m)
        if rt.aggregator.kind == "majority_vote":
            packed = sum(rt.codec(p).wire_nbytes(p.shape, p.dtype) for p in params)
            sent, calls = _vote_cost(transport, packed, sum(p.numel() for p in params), m,
                                     rt.aggregator.config.ties == "abstain")
        elif rt.aggregator.kind in ("mean", "ef21", "error_feedback"):
            pieces = [(d, math.prod(s)) for p in params for s, d in rt.codec(p).wire_layout(p.shape, p.dtype)]
            sent, calls = _mean_cost(transport, pieces, m)
        else:
            raise SystemExit(f"no cost model here for aggregator {rt.aggregator.kind!r}")
        out[group["group"]] = (sent, calls, transport)
    return out


def per_rank_payload(opt) -> dict[str, int]:
    """One rank's declared wire bytes per group (what the cost model multiplies)."""
    return {g["group"]: sum(rt.codec(p).wire_nbytes(p.shape, p.dtype) for p in g["params"])
            for rt, g in zip(opt._runtimes, opt.param_groups)}


def measured_by_group(book: dict) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for label, row in book.items():
        head = label.split("/")[0]
        sent, calls = out.get(head, (0, 0))
        out[head] = (sent + row["sent"], calls + row["calls"])
    return out


# ----------------------------------------------------------------------------- report




def fmt_s(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def baseline_bytes(numel: int, m: int) -> float:
    return bytes_per_rank("allreduce", payload_bytes=4 * numel, dense_entries=numel, world_size=m)


def plot(path: Path, worlds: list[int], measured: dict, model: dict, numel: int) -> None:
    """Bytes per rank against M, log-log: one line per distinct curve (presets with equal bytes share one)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 5.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs = sorted(model[next(iter(model))])
    ax.plot(xs, [baseline_bytes(numel, m) for m in xs], "k--", lw=1.2, zorder=5, label="float32 all-reduce (DDP)")
    curves: dict[tuple, list[str]] = {}
    for name in measured:
        curves.setdefault(tuple(model[name][m] for m in xs), []).append(name)
    for i, (curve, names) in enumerate(curves.items()):
        color = f"C{i % 10}"
        ax.plot(xs, curve, "-", color=color, lw=1.4, label=", ".join(names))
        ax.plot(worlds, [measured[names[0]][m] for m in worlds], "o", color=color, ms=5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="ranks M", ylabel="bytes sent per rank per step",
           title="bytes per rank vs M: measured on gloo (dots) and the cost model (lines)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--project", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1, help="measured steps per preset (after the warm-up step)")
    ap.add_argument("--compute-steps", type=int, default=5,
                    help="measured steps at the smallest M, whose median step time is the compute term")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds for each world size's run")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/scale.md")
    ap.add_argument("--plot", type=Path, default=None, help="default: docs/img/scale_bytes.png beside --out's folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    dims = {"size": args.size, "layers": args.layers, "vocab": args.vocab, "width": args.width}
    configs = {name: name for name in commlmo.PRESETS}
    worlds, projected = sorted(args.world), sorted(args.project)
    plot_path = args.plot or args.out.resolve().parent.parent / "img" / "scale_bytes.png"

    # the cost model, from optimizers on a world of one (the transports are re-planned per M)
    torch.manual_seed(0)
    local_model = ScaleModel(**dims)
    numel = sum(p.numel() for p in local_model.parameters())
    local = {name: commlmo.build_optimizer(local_model, steady_state(cfg)) for name, cfg in configs.items()}
    model_at = {name: {m: modelled(opt, m) for m in sorted(set(worlds) | set(projected) | {2 ** k for k in range(1, 11)})}
                for name, opt in local.items()}
    model_bytes = {name: {m: sum(v[0] for v in per.values()) for m, per in by_m.items()} for name, by_m in model_at.items()}
    payloads = {name: per_rank_payload(opt) for name, opt in local.items()}

    # measured: one spawn per world size, every preset in it
    runs: dict[int, list[dict]] = {}
    for m in worlds:
        t0 = time.perf_counter()
        steps = args.compute_steps if m == worlds[0] else args.steps
        runs[m] = spawn(worker, m, configs, dims, steps, timeout_s=args.timeout, collective_timeout_s=args.timeout)
        print(f"M = {m}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    sent = {name: {m: sum(r["sent"] for r in runs[m][0][name]["book"].values()) for m in worlds} for name in configs}
    times = {name: {m: statistics.median(r[name]["time"] for r in runs[m]) for m in worlds} for name in configs}
    slowest = {name: {m: max(r[name]["time"] for r in runs[m]) for m in worlds} for name in configs}
    calls = {name: {m: sum(r["calls"] for r in runs[m][0][name]["book"].values()) for m in worlds} for name in configs}
    loop = {m: {k: statistics.median(r["_loopback"][k] for r in runs[m]) for k in ("latency", "allreduce")}
            for m in worlds}

    # the check: measured bytes (every rank, every group) == the model, at every measured M
    mismatches = []
    for m in worlds:
        for name in configs:
            want = {k: v[0] for k, v in model_at[name][m].items()}
            for rank, r in enumerate(runs[m]):
                got = {k: v[0] for k, v in measured_by_group(r[name]["book"]).items()}
                if got != want:
                    mismatches.append(f"M={m} rank {rank} {name}: measured {got} model {want}")
                wanted_calls = {k: v[1] for k, v in model_at[name][m].items()}
                got_calls = {k: v[1] for k, v in measured_by_group(r[name]["book"]).items()}
                if got_calls != wanted_calls:
                    mismatches.append(f"M={m} rank {rank} {name}: collectives {got_calls} model {wanted_calls}")
    print("measured vs modelled bytes per rank per step:", file=sys.stderr)
    for name in configs:
        print(f"  {name:15s} " + "  ".join(f"M={m}: {sent[name][m]} / {model_bytes[name][m]}" for m in worlds),
              file=sys.stderr)
    print("exact at every M" if not mismatches else "MISMATCH:\n" + "\n".join(mismatches), file=sys.stderr)

    base = {m: baseline_bytes(numel, m) for m in model_bytes[next(iter(configs))]}
    compute_m = worlds[0]
    loop_bw = {m: base[m] / max(loop[m]["allreduce"] - loop[m]["latency"], 1e-9) for m in worlds}
    # compute: the step time at the smallest M less its own (modelled) loopback communication
    compute = {name: max(times[name][compute_m] - sent[name][compute_m] / loop_bw[compute_m]
                         - loop[compute_m]["latency"] * calls[name][compute_m], 0.0) for name in configs}
    lines = [
        "# Scaling with the number of ranks: bytes and step time per rank, measured to M = "
        f"{worlds[-1]} and projected to M = {projected[-1]}",
        "",
        *provenance(started, describe_machine()),
        "",
        f"Model: {args.layers} matrices {args.size}x{args.size} (the `hidden` group) and a {args.vocab}x{args.width} "
        f"`nn.Embedding` (the `embedding` group), {numel:,} parameters; every preset with its default routing "
        "(its method on the matrices, its element-wise recipe on the embedding). M real gloo ranks on 127.0.0.1 "
        f"(all on this machine's {describe_machine().split(', ')[1]}), one warm-up step, then one measured step of "
        "every preset; 1-bit Adam's float32 warm-up (the EF21 presets' embedding recipe) is cut to that one step, so "
        "the measured step is the steady state. Bytes are per rank per step, from the optimizer's accounting of what it "
        "handed to each collective (`opt.bytes.step`); the ratio is a float32 all-reduce of every parameter (what DDP "
        "sends, 2(M−1)/M · 4 bytes per parameter) divided by the preset's bytes.",
        "",
        "## What the numbers show",
        "",
    ]
    grows = [n for n in configs if any(v[2] == "allgather" for v in model_at[n][worlds[-1]].values())]
    flat = [n for n in configs if n not in grows]
    voters = [n for n in flat if all(rt.aggregator.kind == "majority_vote" for rt in local[n]._runtimes)]
    server = [n for n, opt in local.items() if any(rt.config.lmo_at == "server" and rt.lmo is not None
                                                   for rt in opt._runtimes)]
    padding = ""
    if voters:
        top, v = projected[-1], voters[0]
        padded = {g: (b, -(-b // (8 * top)) * 8 * top) for g, b in payloads[v].items()}
        worst = [(g, b, p) for g, (b, p) in padded.items() if p > b * 1.01]
        if worst:
            padding = (" Majority vote's owner shards are whole 64-bit words, so a group's packed bits are padded to a "
                       f"multiple of 8·M bytes: nothing while each rank owns many words, but at M = {top} the "
                       + ", ".join(f"{g} group's {b:,} bytes of sign bits become {p:,}" for g, b, p in worst)
                       + f", and the 1-bit presets fall to {base[top] / model_bytes[v][top]:.1f}x.")
    lines += [
        f"* **Flat in M** ({', '.join(flat)}): every group goes over the *owner* transport (all-to-all of shards, "
        "the owner sums or votes, all-gather of the result), 2(M−1)/M · payload per rank, the same curve as the "
        "float32 all-reduce, so the ratio stays put: 1.0x for the float32 presets, 32x for the 1-bit "
        f"majority-vote presets ({', '.join(voters)}).{padding}",
        f"* **Growing with M** ({', '.join(grows)}): EF21 and error feedback send payloads that do not sum on the wire "
        "(scaled sign, top-k), so each rank all-gathers every rank's payload: (M−1) · payload per rank. The ratio "
        "to the all-reduce falls like 1/M: it halves every time M doubles, and at large M these presets send more "
        "than the float32 all-reduce. (The EF21 presets' embedding group, 1-bit Adam's error-compensated scaled "
        "sign, is all-gathered too.)",
        f"* **Time**: the server-side presets ({', '.join(server)}) run the server's LMO (Newton–Schulz, for the "
        "spectral LMO of the matrices) on every rank redundantly today — *replicated*: each rank computes the same "
        "LMO of the same aggregate, so the per-rank LMO work does not fall with M. There is no owner mode yet (each "
        "rank computing the LMO of only the matrices it owns and all-gathering the directions). The worker-side "
        "presets run it on each worker's own message, which is per-rank work by definition.",
        "",
    ]

    # targets
    lines += ["## Against the issue's targets", "",
              "Ratios vs a float32 all-reduce, at " + " and ".join(f"M = {m}" for m in TARGET_WORLDS) +
              " (measured where measured, else the cost model, which equals the measurement wherever both exist).", "",
              "| preset | target | " + " | ".join(f"M = {m}" for m in TARGET_WORLDS) + " | met |",
              "|---|---:|" + "---:|" * len(TARGET_WORLDS) + "---|"]
    verdicts = []
    for names, target in TARGETS:
        for name in names:
            cells, ok = [], True
            for m in TARGET_WORLDS:
                b = sent[name][m] if m in worlds else model_bytes[name][m]
                ratio = base[m] / b
                ok &= ratio >= target
                cells.append(f"{ratio:.1f}x" + ("" if m in worlds else " (model)"))
            verdicts.append((name, target, ok))
            lines.append(f"| {name} | ≥ {target:g}x | {' | '.join(cells)} | {'yes' if ok else '**no**'} |")
    met = [n for n, _, ok in verdicts if ok]
    missed = [n for n, _, ok in verdicts if not ok]
    lines += ["", f"Met: {', '.join(met) or 'none'}. Missed: {', '.join(missed) or 'none'}."]
    if missed:
        lines += ["", "The misses are the all-gathered payloads: at M ranks an all-gathered payload of b bytes per "
                  "rank costs (M−1)·b, so its ratio to the all-reduce is (2/M) · (32 bits / bits per entry). "
                  "EF21-Muon's top-5% payload (bf16 value + 16-bit index, 1.6 bits per entry) gives 40/M "
                  "(5x at M = 8, 2.5x at M = 16); a scaled sign (1 bit per entry) gives 64/M (8x, 4x). No "
                  "configuration of today's transports meets a fixed ratio for these presets at every M: it needs a "
                  "compressed payload that sums on the wire, or a reduce-scatter that re-compresses each owner's "
                  "shard (1-bit Adam's compressed all-reduce), neither of which is implemented."]
    lines.append("")

    # measured table: bytes and ratio
    head = "| preset | " + " | ".join(f"M = {m}" for m in worlds) + " |"
    rule = "|---|" + "---:|" * len(worlds)
    lines += ["## Measured: bytes per rank per step (ratio vs float32 all-reduce)", "",
              "Float32 all-reduce of every parameter: " +
              ", ".join(f"{human_bytes(base[m])} at M = {m}" for m in worlds) + ".", "", head, rule]
    for name in configs:
        lines.append(f"| {name} | " + " | ".join(f"{human_bytes(sent[name][m])} ({base[m] / sent[name][m]:.1f}x)"
                                                  for m in worlds) + " |")
    lines += ["", "Each rank's payload (declared wire bytes of one step, what the model multiplies) and the transport "
              f"of each group, at M = {worlds[-1]}:", "",
              "| preset | " + " | ".join(sorted({g for p in payloads.values() for g in p})) + " | collectives / step |",
              "|---|" + "---|" * len({g for p in payloads.values() for g in p}) + "---:|"]
    groups = sorted({g for p in payloads.values() for g in p})
    for name in configs:
        per = model_at[name][worlds[-1]]
        lines.append(f"| {name} | " + " | ".join(
            f"{human_bytes(payloads[name][g])}, {per[g][2]}" if g in payloads[name] else "—" for g in groups)
            + f" | {calls[name][worlds[-1]]} |")
    lines.append("")

    lines += ["## Measured against the cost model", "",
              "Bytes: the model (`bytes_per_rank` on the declared wire sizes, with the owner transport's padding to "
              "M elements per dtype and majority vote's to whole 64-bit words per shard, plus the step's agreement "
              "flags) against the measurement, every group of every rank:", ""]
    if mismatches:
        lines += ["**Mismatches:**", "", *[f"* {x}" for x in mismatches[:40]], ""]
    else:
        lines += [f"**Exact**, byte for byte, for every preset, every group and every rank at M = "
                  f"{', '.join(map(str, worlds))} (and the number of collectives per group too). "
                  "tests/test_cost_model.py pins the same equality for every transport at M = 2…8.", ""]
    lines += [
        "Time: step time per rank (median over ranks; the slowest rank in brackets), against a loopback model, "
        f"compute + bytes / loopback bandwidth + latency · collectives, with compute the median step time at "
        f"M = {compute_m} (over {args.compute_steps} steps; elsewhere {args.steps} step) less its own modelled "
        "loopback communication, "
        "with the loopback bandwidth and latency measured in the same run (a float32 all-reduce of every "
        "parameter, and of one float).",
        "",
        "Loopback, measured: " + "; ".join(
            f"M = {m}: latency {loop[m]['latency'] * 1e6:.0f} µs, all-reduce bandwidth "
            f"{loop_bw[m] * 8 / 1e9:.1f} Gbit/s" for m in worlds) + ".",
        "",
        "| preset | " + " | ".join(f"M = {m}: measured (slowest) / model" for m in worlds) + " |",
        "|---|" + "---:|" * len(worlds),
    ]
    for name in configs:
        cells = []
        for m in worlds:
            model_t = compute[name] + sent[name][m] / loop_bw[m] + loop[m]["latency"] * calls[name][m]
            cells.append(f"{fmt_s(times[name][m])} ({fmt_s(slowest[name][m])}) / {fmt_s(model_t)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The time model and the loopback measurement differ, and are expected to: all M ranks share this machine's "
        "cores, so from M above the core count the ranks' compute (the replicated Newton–Schulz above all) is "
        "time-sliced and the measured step grows roughly like M / cores, which the model, with a fixed compute "
        "term, does not contain; and loopback 'bandwidth' is memory copies on the same cores. On separate machines "
        "each rank has its own cores and the compute term stays what it is at small M; the bytes are what they are "
        "in either case. (At M = {0} the model equals the measurement by construction: that step is the "
        "compute term.)".format(compute_m),
        "",
    ]

    # projection
    lines += [f"## Projected to M = {', '.join(map(str, projected))}", "",
              "Bytes per rank per step from the cost model (the transports re-planned for each M), and the ratio "
              "vs a float32 all-reduce:", "",
              "| preset | " + " | ".join(f"M = {m}" for m in projected) + " |", "|---|" + "---:|" * len(projected),
              "| float32 all-reduce | " + " | ".join(human_bytes(base[m]) for m in projected) + " |"]
    for name in configs:
        lines.append(f"| {name} | " + " | ".join(f"{human_bytes(model_bytes[name][m])} ({base[m] / model_bytes[name][m]:.1f}x)"
                                                  for m in projected) + " |")
    lines += ["", f"Time per step, compute (the step time at M = {compute_m} less its loopback communication, as above; "
              "the replicated LMO does not shrink with M) "
              f"+ bytes / bandwidth + {LATENCY_S * 1e6:.0f} µs per collective (constant per collective: a ring or "
              "tree collective's latency grows with M, by (M−1) or log M steps, so the latency term here is a lower "
              "bound at large M):", ""]
    for link, bw in LINKS.items():
        lines += [f"**{link}**", "",
                  "| preset | compute | " + " | ".join(f"M = {m}" for m in projected) + " |",
                  "|---|---:|" + "---:|" * len(projected),
                  "| float32 all-reduce alone | — | " + " | ".join(
                      fmt_s(base[m] * 8 / bw + LATENCY_S) for m in projected) + " |"]
        for name in configs:
            tc = compute[name]
            lines.append(f"| {name} | {fmt_s(tc)} | " + " | ".join(
                fmt_s(tc + model_bytes[name][m] * 8 / bw + LATENCY_S * sum(v[1] for v in model_at[name][m].values()))
                for m in projected) + " |")
        lines.append("")
    top, slow = projected[-1], min(LINKS.values())
    wire = {n: model_bytes[n][top] * 8 / slow + LATENCY_S * sum(v[1] for v in model_at[n][top].values()) for n in configs}
    lines += [f"At {min(LINKS, key=LINKS.get)} and M = {top}, the wire time per step: "
              + "; ".join(f"{', '.join(ns)} {fmt_s(t)}" for t, ns in sorted(
                  {round(t, 4): [n for n in configs if round(wire[n], 4) == round(t, 4)] for t in wire.values()}.items()))
              + f" (float32 all-reduce alone: {fmt_s(base[top] * 8 / slow + LATENCY_S)}).", ""]
    rel = Path("..") / "img" / plot_path.name
    lines += ["## Bytes per rank against M", "",
              f"![bytes per rank per step against M, log-log, every preset: measured points and the cost model]({rel.as_posix()})",
              "", "Dots: measured on gloo; lines: the cost model; dashed black: the float32 all-reduce. The owner-"
              "transport presets run parallel to it (a constant ratio); the all-gathered ones climb with slope 1.",
              "", "[All benchmarks](index.md) · [Running on several machines](../multinode.md)", ""]
    plot(plot_path, worlds, sent, model_bytes, numel)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out} and {plot_path}", file=sys.stderr)
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
