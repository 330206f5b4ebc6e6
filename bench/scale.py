r"""Bytes and server time per rank as the world grows: M = 2..16 real gloo ranks, projected to M = 1024.

    python bench/scale.py                 # M = 2 4 8 16; writes docs/benchmarks/scale.md and docs/img/scale_bytes.png
    python bench/scale.py --world 2 4 --project 64 1024 --out /tmp/scale.md

The model is four 256x256 matrices (the ``hidden`` group) and a 512x64
``nn.Embedding`` (the ``embedding`` group), so every preset's default routing
runs: its method on the matrices and its element-wise recipe on the embedding.
1-bit Adam's float32 warm-up (in the EF21 presets' recipe) is cut to one step,
so after one warm-up step the measured step is every preset's steady state.

Every preset runs with its server role as ``server: auto`` picks it, and every
preset with a server step runs twice more, forced ``replicated`` and ``owner``:
bytes are what the optimizer handed to the collectives (``opt.bytes.step``) on
every rank (mean and largest over the ranks), the baseline a float32 all-reduce
of every parameter (what DDP sends, ``2(M-1)/M * 4 * parameters`` bytes per
rank), and the *server time* the seconds each rank spends in the server stage
(:meth:`commlmo.pipeline.GroupRuntime.server_step`: the LMO after aggregation).

The projection uses the cost model, :func:`commlmo.cost.step_bytes`, on the
declared wire sizes with the server role, owners and transports re-planned for
each ``M``; the script checks that it gives exactly the measured bytes of every
rank at every measured ``M`` (and exits 1 if not).  Projected time is
``worker compute + server compute + bytes / bandwidth + latency * collectives``,
the compute terms measured at the smallest ``M`` (the owner role's server compute
being the largest share any rank owns).
"""

from __future__ import annotations

import argparse
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
from commlmo.cost import every_rank, server_role  # noqa: E402
from commlmo.launch import spawn  # noqa: E402
from commlmo.metrics import human_bytes  # noqa: E402
from commlmo.owner import _cost  # noqa: E402
from commlmo.pipeline import GroupRuntime  # noqa: E402
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


#: EF21-Muon with the paper's bidirectional compression: an EF21-P top-5 % downlink
BIDIRECTIONAL = {"preset": "ef21muon", "groups": {"hidden": {"downlink": {
    "kind": "ef21p", "compressor": {"kind": "topk", "k": 0.05, "selection": "blocked", "blocks": "auto",
                                    "value_dtype": "bfloat16"}}}}}


def configs_of(presets) -> dict[str, dict]:
    """Every preset as ``auto`` picks its server role, and the presets with a server step forced either way."""
    out: dict[str, dict] = {name: {"preset": name} for name in presets}
    for name in presets:
        if name in SERVER:
            for role in ("replicated", "owner"):
                out[f"{name}/{role}"] = {"preset": name, "groups": {"hidden": {"server": role}}}
    if "ef21muon" in presets:
        out["ef21muon+ef21p-topk"] = BIDIRECTIONAL
    return out


# presets whose hidden group can run the owner role (a server step to own)
SERVER = [n for n in commlmo.PRESETS
          if commlmo.load_config(n).groups[0].lmo_at == "server" or commlmo.load_config(n).groups[0].aggregator.kind == "ef21"]


# ----------------------------------------------------------------------------- measured


class _ServerClock:
    """Seconds this process spends in ``GroupRuntime.server_step`` (the LMO after aggregation)."""

    def __init__(self):
        self.seconds = 0.0
        self._inner = GroupRuntime.server_step
        clock = self

        def timed(rt, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return clock._inner(rt, *args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - t0

        GroupRuntime.server_step = timed  # type: ignore[method-assign]


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
    clock = _ServerClock()
    for name, cfg in configs.items():
        with torch.no_grad():
            for p, s in zip(params, snapshot):
                p.copy_(s)
        opt = commlmo.build_optimizer(model, steady_state(cfg))
        timed_steps(opt, params, grads, 1)  # the warm-up step (layout check, 1-bit Adam's float32 step)
        clock.seconds = 0.0
        elapsed = timed_steps(opt, params, grads, steps)
        out[name] = {"book": {k: dict(v) for k, v in opt.bytes.step.items()}, "time": statistics.median(elapsed),
                     "server": clock.seconds / steps, "role": opt._runtimes[0].server}
        del opt
    return out


# ----------------------------------------------------------------------------- the model


def modelled(opt, m: int) -> list[dict[str, tuple[int, int]]]:
    """Per rank, ``{label: (bytes, collectives)}`` of a steady-state step on ``m`` ranks (the cost model)."""
    return every_rank(opt, step=1, world_size=m)


def totals(per_rank: list[dict[str, tuple[int, int]]]) -> tuple[float, int, int]:
    """(mean bytes over ranks, largest bytes, collectives per step) of :func:`modelled`'s per-rank books."""
    sent = [sum(b for b, _ in book.values()) for book in per_rank]
    return sum(sent) / len(sent), max(sent), max(sum(c for _, c in book.values()) for book in per_rank)


def owner_share(opt, m: int) -> float:
    """The largest fraction of the hidden group's LMO cost any rank owns on ``m`` ranks (1: replicated)."""
    rt = opt._runtimes[0]
    role, _, owners = server_role(rt, m, world_size=opt.comm.world_size)
    if role != "owner":
        return 1.0
    costs = [_cost(p) for p in rt.members]
    return max(sum(c for c, o in zip(costs, owners) if o == r) for r in range(m)) / sum(costs)


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


def plot(path: Path, worlds: list[int], measured: dict, model: dict, numel: int, names: list[str]) -> None:
    """Mean bytes per rank against M, log-log: one line per distinct curve (configs with equal bytes share one)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 5.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs = sorted(model[names[0]])
    ax.plot(xs, [baseline_bytes(numel, m) for m in xs], "k--", lw=1.2, zorder=5, label="float32 all-reduce (DDP)")
    curves: dict[tuple, list[str]] = {}
    for name in names:
        curves.setdefault(tuple(round(model[name][m]) for m in xs), []).append(name)
    for i, (curve, group) in enumerate(curves.items()):
        color = f"C{i % 10}"
        ax.plot(xs, curve, "-", color=color, lw=1.4, label=", ".join(group))
        ax.plot(worlds, [measured[group[0]][m] for m in worlds], "o", color=color, ms=5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="ranks M", ylabel="bytes sent per rank per step (mean over ranks)",
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
    ap.add_argument("--steps", type=int, default=1, help="measured steps per config (after the warm-up step)")
    ap.add_argument("--compute-steps", type=int, default=5,
                    help="measured steps at the smallest M, whose median step time gives the compute terms")
    ap.add_argument("--presets", nargs="+", default=list(commlmo.PRESETS))
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds for each world size's run")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/scale.md")
    ap.add_argument("--plot", type=Path, default=None, help="default: docs/img/scale_bytes.png beside --out's folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    dims = {"size": args.size, "layers": args.layers, "vocab": args.vocab, "width": args.width}
    configs = configs_of(args.presets)
    worlds, projected = sorted(args.world), sorted(args.project)
    every_m = sorted(set(worlds) | set(projected) | {2 ** k for k in range(1, 11)})
    plot_path = args.plot or args.out.resolve().parent.parent / "img" / "scale_bytes.png"

    # the cost model, from optimizers on a world of one (roles, owners and transports re-planned per M)
    torch.manual_seed(0)
    local_model = ScaleModel(**dims)
    numel = sum(p.numel() for p in local_model.parameters())
    local = {name: commlmo.build_optimizer(local_model, steady_state(cfg)) for name, cfg in configs.items()}
    books = {name: {m: modelled(opt, m) for m in every_m} for name, opt in local.items()}
    model_mean = {name: {m: totals(b)[0] for m, b in by_m.items()} for name, by_m in books.items()}
    model_max = {name: {m: totals(b)[1] for m, b in by_m.items()} for name, by_m in books.items()}
    model_calls = {name: {m: totals(b)[2] for m, b in by_m.items()} for name, by_m in books.items()}
    roles = {name: {m: server_role(opt._runtimes[0], m, world_size=1)[0] for m in every_m}
             for name, opt in local.items()}

    # measured: one spawn per world size, every config in it
    runs: dict[int, list[dict]] = {}
    for m in worlds:
        t0 = time.perf_counter()
        steps = args.compute_steps if m == worlds[0] else args.steps
        runs[m] = spawn(worker, m, configs, dims, steps, timeout_s=args.timeout, collective_timeout_s=args.timeout)
        print(f"M = {m}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    sent = {n: {m: [sum(r["sent"] for r in run[n]["book"].values()) for run in runs[m]] for m in worlds} for n in configs}
    mean_sent = {n: {m: sum(v) / len(v) for m, v in by_m.items()} for n, by_m in sent.items()}
    max_sent = {n: {m: max(v) for m, v in by_m.items()} for n, by_m in sent.items()}
    times = {n: {m: statistics.median(r[n]["time"] for r in runs[m]) for m in worlds} for n in configs}
    server_t = {n: {m: max(r[n]["server"] for r in runs[m]) for m in worlds} for n in configs}
    loop = {m: {k: statistics.median(r["_loopback"][k] for r in runs[m]) for k in ("latency", "allreduce")}
            for m in worlds}
    measured_role = {n: {m: runs[m][0][n]["role"] for m in worlds} for n in configs}

    # the check: measured bytes (every rank, every group) == the model, at every measured M
    mismatches = []
    for m in worlds:
        for name in configs:
            for rank, r in enumerate(runs[m]):
                got = measured_by_group(r[name]["book"])
                want = books[name][m][rank]
                if got != want:
                    mismatches.append(f"M={m} rank {rank} {name}: measured {got} model {want}")
            if measured_role[name][m] != roles[name][m]:
                mismatches.append(f"M={m} {name}: ran {measured_role[name][m]}, the model assumed {roles[name][m]}")
    print("exact at every M" if not mismatches else "MISMATCH:\n" + "\n".join(mismatches[:20]), file=sys.stderr)

    base = {m: baseline_bytes(numel, m) for m in every_m}
    cm = worlds[0]
    loop_bw = {m: base[m] / max(loop[m]["allreduce"] - loop[m]["latency"], 1e-9) for m in worlds}
    # compute at the smallest M: the step less its (modelled) loopback communication; server compute as measured
    server_c = {n: server_t[n][cm] / owner_share(local[n], cm) for n in configs}  # the whole server step's work
    worker_c = {n: max(times[n][cm] - mean_sent[n][cm] / loop_bw[cm] - loop[cm]["latency"] * model_calls[n][cm]
                       - server_t[n][cm], 0.0) for n in configs}

    def projected_time(n: str, m: int, bw: float) -> float:
        return (worker_c[n] + server_c[n] * owner_share(local[n], m) + model_max[n][m] * 8 / bw
                + LATENCY_S * model_calls[n][m])

    presets = [n for n in configs if "/" not in n]
    lines = [
        "# Scaling with the number of ranks: bytes and server time per rank, measured to M = "
        f"{worlds[-1]} and projected to M = {projected[-1]}",
        "",
        *provenance(started, describe_machine()),
        "",
        f"Model: {args.layers} matrices {args.size}x{args.size} (the `hidden` group) and a {args.vocab}x{args.width} "
        f"`nn.Embedding` (the `embedding` group), {numel:,} parameters; every preset with its default routing "
        "(its method on the matrices, its element-wise recipe on the embedding) and its server role as "
        "`server: auto` picks it; the presets with a server step also forced `replicated` and `owner` "
        "(`preset/role`). M real gloo ranks on 127.0.0.1 "
        f"(all on this machine's {describe_machine().split(', ')[1]}), one warm-up step, then the measured "
        "step(s); 1-bit Adam's float32 warm-up (the EF21 presets' embedding recipe) is cut to that one step, so "
        "the measured step is the steady state. Bytes are per rank per step, from the optimizer's accounting of "
        "what it handed to each collective (`opt.bytes.step`): the mean over the ranks, and the largest where "
        "they differ (under the owner role each rank sends the payloads of the parameters it does not own and "
        "the steps of those it owns); the ratio is a float32 all-reduce of every parameter (what DDP sends, "
        "2(M−1)/M · 4 bytes per parameter) divided by the preset's mean bytes.",
        "",
    ]

    # targets
    lines += ["## Against the issue's targets", "",
              "Ratios vs a float32 all-reduce (mean bytes over the ranks; the largest rank's in brackets), at "
              + " and ".join(f"M = {m}" for m in TARGET_WORLDS) +
              " (measured where measured, else the cost model, which equals the measurement wherever both exist).",
              "", "| preset | target | " + " | ".join(f"M = {m}" for m in TARGET_WORLDS) + " | server role | met |",
              "|---|---:|" + "---:|" * len(TARGET_WORLDS) + "---|---|"]
    verdicts = []
    for names, target in TARGETS:
        for name in [n for n in names if n in configs]:
            cells, ok = [], True
            for m in TARGET_WORLDS:
                mean = mean_sent[name][m] if m in worlds else model_mean[name][m]
                top = max_sent[name][m] if m in worlds else model_max[name][m]
                ok &= base[m] / mean >= target
                cells.append(f"{base[m] / mean:.1f}x ({base[m] / top:.1f}x)" + ("" if m in worlds else " (model)"))
            verdicts.append((name, target, ok))
            role = ", ".join(sorted({roles[name][m] for m in TARGET_WORLDS}))
            lines.append(f"| {name} | ≥ {target:g}x | {' | '.join(cells)} | {role} | {'yes' if ok else '**no**'} |")
    missed = [n for n, _, ok in verdicts if not ok]
    lines += ["", f"Met: {', '.join(n for n, _, ok in verdicts if ok) or 'none'}. "
              f"Missed: {', '.join(missed) or 'none'}.", ""]
    if missed:
        lines += [
            "What bounds the misses: these presets send their server step through an *identity* downlink "
            "(ef21muon: EF21-Muon with a float32 downlink; ef21muonusign: polar(g) uncompressed). EF21's "
            "aggregate g = mean c_i of scaled signs or top-k is not a 1-bit or sparse message, and every rank "
            "needs the step exactly, so there are only two exact ways to get it there: every rank receives every "
            "rank's payload ((M−1) payloads per rank: the ratio falls like 64/M for a 1-bit payload, 40/M for "
            "top-5 %) or one owner computes the step and sends it uncompressed ((M−1)/M · (payload + 32 bits) "
            "per entry: about 1.9x at any M). `server: auto` takes the cheaper of the two at each M. Compressing "
            "the downlink is what makes an EF21 preset flat in M *and* cheap: ef21muonsign (EF21-P scaled-sign "
            "downlink) meets its target under the owner role, and so does EF21-Muon with an EF21-P top-k "
            "downlink (the paper's bidirectional variant; `ef21muon` + `downlink: {kind: ef21p, compressor: topk}`,"
            " below).",
            ""]

    # measured table
    head = "| config | " + " | ".join(f"M = {m}" for m in worlds) + " |"
    rule = "|---|" + "---:|" * len(worlds)
    lines += ["## Measured: bytes per rank per step (ratio vs float32 all-reduce)", "",
              "Float32 all-reduce of every parameter: " +
              ", ".join(f"{human_bytes(base[m])} at M = {m}" for m in worlds) + ". Mean over the ranks; the largest "
              "rank's in brackets where it differs.", "", head, rule]
    for name in configs:
        cells = []
        for m in worlds:
            cell = f"{human_bytes(mean_sent[name][m])} ({base[m] / mean_sent[name][m]:.1f}x)"
            if max_sent[name][m] > mean_sent[name][m] * 1.001:
                cell += f" [{human_bytes(max_sent[name][m])}]"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "The server role `auto` picked, per M: " + "; ".join(
        f"{n}: " + ", ".join(f"{roles[n][m]}" for m in worlds) for n in presets if n in SERVER) + ".", ""]

    # server time
    lines += ["## Server time per rank: replicated against owner", "",
              "Seconds per step each rank spends in the server stage (the LMO after aggregation: Newton–Schulz "
              "for the spectral LMO), the slowest rank; under `owner` each matrix's LMO runs on one rank only.",
              "", "| preset | " + " | ".join(f"M = {m}: replicated / owner (ratio)" for m in worlds) + " |",
              "|---|" + "---:|" * len(worlds)]
    for name in [n for n in presets if n in SERVER]:
        rep, own = f"{name}/replicated", f"{name}/owner"
        lines.append(f"| {name} | " + " | ".join(
            f"{fmt_s(server_t[rep][m])} / {fmt_s(server_t[own][m])} ({server_t[own][m] / max(server_t[rep][m], 1e-12):.2f})"
            for m in worlds) + " |")
    lines += ["", "With four equal matrices, one rank owns at most ⌈4/M⌉ of them: the owner's share is 1/M of the "
              "work while M ≤ 4 and one matrix (1/4) beyond; a real model's dozens of matrices keep the share near "
              "1/M. All ranks share this machine's cores, so from M above the core count every rank's time is "
              "time-sliced and the absolute numbers grow; the ratio is the figure to read.", ""]

    lines += ["## Measured against the cost model", ""]
    if mismatches:
        lines += ["**Mismatches:**", "", *[f"* {x}" for x in mismatches[:40]], ""]
    else:
        lines += [f"**Exact**, byte for byte, for every config, every group and every rank at M = "
                  f"{', '.join(map(str, worlds))} (and the number of collectives too): `commlmo.cost.step_bytes`. "
                  "tests/test_cost_model.py pins the same equality for every transport and server role at M = 2…8.",
                  ""]
    lines += ["Loopback, measured: " + "; ".join(
        f"M = {m}: latency {loop[m]['latency'] * 1e6:.0f} µs, all-reduce bandwidth {loop_bw[m] * 8 / 1e9:.1f} Gbit/s"
        for m in worlds) + ".", "",
        "Step time per rank (median over ranks) at each M: " + "; ".join(
            f"{n}: " + ", ".join(fmt_s(times[n][m]) for m in worlds) for n in presets) + ".", ""]

    # projection
    lines += [f"## Projected to M = {', '.join(map(str, projected))}", "",
              "Bytes per rank per step from the cost model (server roles, owners and transports re-planned for each "
              "M as `auto` would), mean over the ranks and the ratio vs a float32 all-reduce:", "",
              "| config | " + " | ".join(f"M = {m}" for m in projected) + " |", "|---|" + "---:|" * len(projected),
              "| float32 all-reduce | " + " | ".join(human_bytes(base[m]) for m in projected) + " |"]
    for name in configs:
        lines.append(f"| {name} | " + " | ".join(
            f"{human_bytes(model_mean[name][m])} ({base[m] / model_mean[name][m]:.1f}x)" for m in projected) + " |")
    lines += ["", f"Time per step: worker compute + server compute (measured at M = {cm}; the owner role's is the "
              "largest share of the LMO work any rank owns) + the largest rank's bytes / bandwidth + "
              f"{LATENCY_S * 1e6:.0f} µs per collective (a ring or tree collective's latency grows with M, so this "
              "term is a lower bound at large M):", ""]
    for link, bw in LINKS.items():
        lines += [f"**{link}**", "",
                  "| config | " + " | ".join(f"M = {m}" for m in projected) + " |",
                  "|---|" + "---:|" * len(projected),
                  "| float32 all-reduce alone | " + " | ".join(
                      fmt_s(base[m] * 8 / bw + LATENCY_S) for m in projected) + " |"]
        for name in configs:
            lines.append(f"| {name} | " + " | ".join(fmt_s(projected_time(name, m, bw)) for m in projected) + " |")
        lines.append("")
    rel = Path("..") / "img" / plot_path.name
    lines += ["## Bytes per rank against M", "",
              f"![bytes per rank per step against M, log-log, every preset: measured points and the cost model]({rel.as_posix()})",
              "", "Dots: measured on gloo; lines: the cost model (mean over ranks); dashed black: the float32 "
              "all-reduce. A line parallel to it is a constant ratio at any M.",
              "", "[All benchmarks](index.md) · [Running on several machines](../multinode.md)", ""]
    plot(plot_path, worlds, mean_sent, model_mean, numel, presets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out} and {plot_path}", file=sys.stderr)
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
