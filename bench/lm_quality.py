"""LM quality: all-compressed SignMuon against the DDP recipe, SignSGD and Distributed Lion on the ``gpt`` task.

    python bench/lm_quality.py                        # seeds 0 1 2 (about 35 min on 2 cores); writes docs/benchmarks/lm.md
    python bench/lm_quality.py --seeds 0 --steps 20 --out /tmp/lm.md    # a smoke test of the whole script
    python bench/lm_quality.py --runs runs/lm_quality-X   # aggregate (and finish) the runs already there

Each seed is one ``commlmo compare`` of four optimizer configs, each a YAML file,
on the named task ``gpt`` (a nanoGPT on BPE tokens of the Python standard
library's sources, 4 workers, 300 steps, global batch 32, 20 warm-up steps then
cosine decay, held-out loss every 50 steps):

* ``signmuon``: the preset as it is, every byte compressed: the hidden matrices
  send sign(polar(M_i)) to a majority vote; the embeddings (tied with the head),
  norms and biases run Distributed Lion (one-bit vote) at lr 1e-3.
* ``ddp_muon_adamw``: the DDP recipe: ``muonserver`` (Muon on the float32 mean
  of the momenta) for the matrices, AdamW at lr 3e-3 on the float32 mean
  gradient for everything else.
* ``signsgd``: the preset as it is (Signum with a majority vote everywhere).
* ``lion``: Distributed Lion alone on every parameter (one-bit vote).  On the
  first seed it runs at every ``--lion-lrs`` (1e-3 and 3e-4); the lr with the
  lower final eval loss is kept for the other seeds and the tables.

"Bytes to the DDP final loss" is, per seed, the first evaluation at which a
method's eval loss is at or below the DDP recipe's final eval loss of that
seed, and the bytes rank 0 had sent by then (cumulative, per worker, as the
optimizer counted them); the ratio is the DDP recipe's own bytes to that loss
over the method's.  The runs stay under ``--runs`` (default
``runs/lm_quality-<time>``); a seed whose comparison is already there is read
back instead of trained again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe_machine, provenance  # noqa: E402

from commlmo.metrics import RunResult, best_eval, human_bytes, load_run, reach  # noqa: E402
from commlmo.runconfig import TASKS  # noqa: E402
from commlmo.tasks.gpt import Config as GPTConfig  # noqa: E402
from commlmo.tasks.gpt import parameter_counts  # noqa: E402
from commlmo.train import compare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks" / "lm.md"
TASK = "gpt"
DDP = "ddp_muon_adamw"
SIGNMUON = "signmuon"
METHODS = [SIGNMUON, DDP, "signsgd", "lion"]
CONFIGS: dict[str, dict[str, Any]] = {
    SIGNMUON: {"preset": "signmuon"},
    DDP: {"preset": "muonserver", "groups": {"embedding": {"lr": 0.003}, "head": {"lr": 0.003},
                                             "vector": {"lr": 0.003}}},
    "signsgd": {"preset": "signsgd"},
}
LION_LRS = [1e-3, 3e-4]
GAP_TARGET = 0.02  # (a) signmuon's final eval loss within 2 % of the DDP recipe's
RATIO_TARGET = 20.0  # (b) at least 20x fewer bytes to the DDP recipe's final loss
COLORS = {SIGNMUON: "C3", DDP: "C0", "signsgd": "C2", "lion": "C1"}


def lion_config(lr: float) -> dict[str, Any]:
    return {"groups": [{"name": "all", "params": {"ndim": None}, "rule": {"kind": "lion"}, "uplink": {"kind": "sign"},
                        "aggregator": {"kind": "majority_vote"}, "lr": lr}]}


def lion_name(lr: float, lrs: list[float]) -> str:
    """``lion`` for the first lr of the sweep, ``lion_lr0.0003`` for the others."""
    return "lion" if lr == lrs[0] else f"lion_lr{lr:g}"


# --------------------------------------------------------------------------- running


def run_seed(seed: int, configs: dict[str, dict[str, Any]], out: Path, overrides: dict[str, Any],
             nproc: int) -> tuple[dict[str, RunResult], float, bool]:
    """``({name: run}, seconds, trained)`` of one comparison; read back if ``out`` already holds it."""
    done = out / "compare.json"
    if done.exists():
        names = [r["name"] for r in json.loads(done.read_text())["runs"]]
        if set(configs) <= set(names):
            runs = {n: load_run(out / n, n) for n in configs}
            wall = sum(r.summary["wall_time"] for r in runs.values())
            print(f"seed {seed}: read back the comparison in {out}", flush=True)
            return runs, wall, False
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="commlmo-lm-quality-") as tmp:
        paths = []
        for name, cfg in configs.items():
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            paths.append(str(path))
        print(f"seed {seed}: commlmo compare {' '.join(configs)} --task {TASK} --nproc {nproc} --seed {seed} "
              f"(into {out})", flush=True)
        results = compare(paths, task=TASK, nproc=nproc, out=out, overrides={**overrides, "train.seed": seed},
                          progress=False, report=True, overwrite=True)
    if results is None:
        raise SystemExit(f"seed {seed}: the comparison was interrupted; rerun with --runs {out.parent} to finish it")
    wall = time.perf_counter() - t0
    print(f"seed {seed}: {wall:.0f} s", flush=True)
    return {r.name: r for r in results}, wall, True


def final_loss(run: RunResult) -> float:
    return run.evals[-1]["eval_loss"] if run.evals else math.nan


# --------------------------------------------------------------------------- aggregation


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _pm(xs: list[float], digits: int = 4) -> str:
    m, s = _mean_std(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if math.isfinite(m) else "-"


def aggregate(by_seed: dict[int, dict[str, RunResult]]) -> dict[str, Any]:
    """Per method and seed: final and best eval loss, bytes, and bytes to the DDP recipe's final loss."""
    stats: dict[str, Any] = {}
    for m in METHODS:
        rows = []
        for seed, runs in by_seed.items():
            run, ddp = runs[m], runs[DDP]
            target = final_loss(ddp)
            steps = max(run.summary["steps_run"], 1)
            best, best_at = best_eval(run)
            row = {"seed": seed, "final": final_loss(run), "best": best, "best_at": best_at,
                   "sent": run.summary["bytes"]["sent_per_worker"],
                   "per_step": run.summary["bytes"]["sent_per_worker"] / steps, "target": target,
                   "gap": (final_loss(run) - target) / target}
            for key, level in (("to_ddp", target), ("to_ddp_2pc", (1 + GAP_TARGET) * target)):
                hit, ref = reach(run, level), reach(ddp, level)
                row[key] = None if hit is None else {
                    "step": hit.step, "sent": hit.sent,
                    "ratio": (ref.sent / hit.sent) if ref is not None and hit.sent > 0 else math.nan}
            rows.append(row)
        stats[m] = rows
    return stats


def _reached(rows: list[dict[str, Any]], key: str) -> str:
    n = sum(r[key] is not None for r in rows)
    return f"{n}/{len(rows)}"


def _hit_cell(hit: dict[str, Any] | None) -> str:
    return "not reached" if hit is None else f"step {hit['step']}, {human_bytes(hit['sent'])}"


def _ratio_cell(hit: dict[str, Any] | None) -> str:
    return "-" if hit is None or not math.isfinite(hit["ratio"]) else f"{hit['ratio']:.1f}×"


def _mean_ratio(rows: list[dict[str, Any]], key: str) -> str:
    ratios = [r[key]["ratio"] for r in rows if r[key] is not None and math.isfinite(r[key]["ratio"])]
    if not ratios:
        return "not reached"
    text = f"{statistics.fmean(ratios):.1f}×"
    return text if len(ratios) == len(rows) else f"{text} ({len(ratios)}/{len(rows)} seeds)"


def _md(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def tables(stats: dict[str, Any], seeds: list[int], lion_lr: float) -> list[str]:
    label = {m: (f"`{m}` (lr {lion_lr:g})" if m == "lion" else f"`{m}`") for m in METHODS}
    loss_rows = []
    for m in METHODS:
        rows = stats[m]
        loss_rows.append([label[m], _pm([r["final"] for r in rows]), " / ".join(f"{r['final']:.4f}" for r in rows),
                          _pm([r["best"] for r in rows]),
                          " / ".join(f"{r['best']:.4f} ({r['best_at']})" for r in rows),
                          f"{100 * statistics.fmean(r['gap'] for r in rows):+.2f} %"])
    seeds_txt = " / ".join(map(str, seeds))
    out = ["### Eval loss", "",
           *_md(["method", "final (mean ± std)", f"final, seed {seeds_txt}", "best (mean ± std)",
                 f"best (step), seed {seeds_txt}", "final vs DDP"], loss_rows), ""]
    ddp_step = statistics.fmean(r["per_step"] for r in stats[DDP])
    byte_rows = []
    for m in METHODS:
        rows = stats[m]
        per_step = statistics.fmean(r["per_step"] for r in rows)
        byte_rows.append([label[m], human_bytes(per_step), human_bytes(statistics.fmean(r["sent"] for r in rows)),
                          f"{ddp_step / per_step:.1f}×" if per_step > 0 else "-"])
    out += ["### Bytes sent per worker", "",
            *_md(["method", "per step", "in total", "DDP / method, per step"], byte_rows), ""]
    for key, title in (("to_ddp", "To the DDP recipe's final eval loss"),
                       ("to_ddp_2pc", f"To within {100 * GAP_TARGET:g} % of the DDP recipe's final eval loss "
                                      "(supplementary)")):
        reach_rows = []
        for m in METHODS:
            rows = stats[m]
            reach_rows.append([label[m], _reached(rows, key), " / ".join(_hit_cell(r[key]) for r in rows),
                               " / ".join(_ratio_cell(r[key]) for r in rows), _mean_ratio(rows, key)])
        out += [f"### {title}", "",
                *_md(["method", "reached", f"first eval at or below it, seed {seeds_txt}",
                      f"DDP bytes / method bytes, seed {seeds_txt}", "ratio (mean)"], reach_rows), ""]
    return out


def checks(stats: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    rows = stats[SIGNMUON]
    gaps = [r["gap"] for r in rows]
    gap = statistics.fmean(gaps)
    ok_a = gap <= GAP_TARGET
    ratios = [r["to_ddp"]["ratio"] if r["to_ddp"] is not None else math.nan for r in rows]
    missed = [r["seed"] for r in rows if r["to_ddp"] is None]
    ok_b = not missed and all(x >= RATIO_TARGET for x in ratios)
    seeds = " / ".join(str(r["seed"]) for r in rows)
    lines = [
        f"* **(a) final eval loss within {100 * GAP_TARGET:g} % of the DDP recipe's: "
        f"{'met' if ok_a else 'missed'}.** Relative gap (signmuon − DDP) / DDP, mean over seeds: "
        f"**{100 * gap:+.2f} %** (seed {seeds}: {' / '.join(f'{100 * g:+.2f} %' for g in gaps)}).",
    ]
    if missed:
        got = [f"{x:.1f}×" for x in ratios if math.isfinite(x)]
        lines.append(
            f"* **(b) at least {RATIO_TARGET:g}× fewer bytes to the DDP recipe's final eval loss: missed.** "
            f"SignMuon's eval loss did not reach the DDP recipe's final loss on seed(s) "
            f"{', '.join(map(str, missed))}" + (f"; on the others the ratio is {', '.join(got)}" if got else "") + ".")
    else:
        lines.append(
            f"* **(b) at least {RATIO_TARGET:g}× fewer bytes to the DDP recipe's final eval loss: "
            f"{'met' if ok_b else 'missed'}.** DDP bytes / signmuon bytes, seed {seeds}: "
            f"{' / '.join(f'{x:.1f}×' for x in ratios)} (mean {statistics.fmean(ratios):.1f}×).")
    relaxed = [r["to_ddp_2pc"]["ratio"] if r["to_ddp_2pc"] is not None else math.nan for r in rows]
    lines.append(f"  To within {100 * GAP_TARGET:g} % of the DDP final loss the ratio is "
                 + " / ".join("not reached" if not math.isfinite(x) else f"{x:.1f}×" for x in relaxed) + ".")
    return lines, {"a": {"met": ok_a, "gap_mean": gap, "gaps": gaps},
                   "b": {"met": ok_b, "ratios": ratios, "not_reached": missed, "ratios_2pc": relaxed}}


# --------------------------------------------------------------------------- plot


def _curve(runs: list[RunResult]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Eval steps, mean and std of the eval loss over seeds, and mean cumulative bytes sent (rank 0)."""
    steps = sorted(set.intersection(*({e["step"] for e in r.evals} for r in runs)))
    at = [{e["step"]: e for e in r.evals} for r in runs]
    mean = [statistics.fmean(a[s]["eval_loss"] for a in at) for s in steps]
    std = [statistics.stdev([a[s]["eval_loss"] for a in at]) if len(at) > 1 else 0.0 for s in steps]
    sent = [statistics.fmean(a[s]["sent_total"] for a in at) for s in steps]
    return steps, mean, std, sent


def plot(by_seed: dict[int, dict[str, RunResult]], path: Path, title: str, lion_lr: float) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.4, 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_step, ax_bytes = fig.subplots(1, 2)
    ddp_final = statistics.fmean(final_loss(runs[DDP]) for runs in by_seed.values())
    for m in METHODS:
        steps, mean, std, sent = _curve([runs[m] for runs in by_seed.values()])
        label = f"{m} (lr {lion_lr:g})" if m == "lion" else m
        ax_step.plot(steps, mean, "o-", ms=3, color=COLORS[m], label=label)
        ax_step.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                             color=COLORS[m], alpha=0.15, lw=0)
        pts = [(b / 2**20, y) for b, y in zip(sent, mean) if b > 0]
        ax_bytes.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, color=COLORS[m], label=label)
    for ax in (ax_step, ax_bytes):
        ax.axhline(ddp_final, color="gray", ls="--", lw=0.8, label=f"DDP final {ddp_final:.3f}")
        ax.grid(alpha=0.3)
    ax_bytes.set_xscale("log")
    ax_step.set(xlabel="step", ylabel="eval loss", title="eval loss vs steps")
    ax_bytes.set(xlabel="MiB sent per worker (cumulative)", ylabel="eval loss", title="eval loss vs bytes sent")
    ax_step.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------- the page


def model_lines(run: RunResult) -> list[str]:
    info = run.summary["task"]
    cfg = GPTConfig(**TASKS[TASK]["task"])
    counts = parameter_counts(cfg, info["vocab"])
    hidden = counts["blocks"]
    return [
        f"* Model: nanoGPT (GPT-2 architecture), width {cfg.width}, {cfg.layers} layers, {cfg.heads} heads, "
        f"context {cfg.block} tokens, head tied to the token embedding: **{info['parameters']:,} parameters**, "
        f"{counts['embeddings']:,} of them ({100 * counts['embedding_share']:.0f} %) in the embeddings "
        f"(`wte` {info['vocab']} × {cfg.width} + `wpe` {cfg.block} × {cfg.width}), {hidden:,} in the "
        f"{cfg.layers} blocks (matrices, LayerNorms and biases; `commlmo.tasks.gpt.parameter_counts`).",
        f"* Data: byte-level BPE with {info['vocab']} tokens trained offline on {info['characters']:,} characters "
        f"of {info['corpus'].split(' (')[0]} ({info['tokens']:,} tokens, {info['chars_per_token']:.2f} characters per token); "
        f"the last 10 % held out. A uniform prediction scores ln {info['vocab']} = {info['uniform_loss']:.3f}.",
    ]


def raw_json(by_seed: dict[int, dict[str, RunResult]]) -> str:
    return json.dumps({str(seed): {n: [[e["step"], round(e["eval_loss"], 5), e["sent_total"]] for e in r.evals]
                                   for n, r in runs.items()} for seed, runs in by_seed.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, help="override train.steps (a smoke test); default: the task's 300")
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--lion-lrs", type=float, nargs="+", default=LION_LRS,
                        help="Lion lrs tried on the first seed; the best final eval loss is kept")
    parser.add_argument("--runs", type=Path, help="where the runs go (default: runs/lm_quality-<time>); "
                        "a seed whose comparison is already there is read back")
    parser.add_argument("--out", type=Path, default=OUT, help="the page to write (default: %(default)s)")
    parser.add_argument("--png", type=Path, help="the figure (default: docs/img/lm_quality.png next to the "
                        "default page, else <out>.png)")
    args = parser.parse_args()
    out = args.out.resolve()
    png = (args.png or (ROOT / "docs" / "img" / "lm_quality.png" if out == OUT else out.with_suffix(".png"))).resolve()
    runs_dir = args.runs or Path("runs") / f"lm_quality-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = {"train.steps": args.steps} if args.steps else {}
    started = time.perf_counter()

    by_seed: dict[int, dict[str, RunResult]] = {}
    walls: dict[int, float] = {}
    lion_lr = args.lion_lrs[0]
    sweep: dict[float, float] = {}
    for i, seed in enumerate(args.seeds):
        configs = dict(CONFIGS)
        lrs = args.lion_lrs if i == 0 else [lion_lr]
        for lr in lrs:
            configs[lion_name(lr, args.lion_lrs) if i == 0 else "lion"] = lion_config(lr)
        runs, walls[seed], _ = run_seed(seed, configs, runs_dir / f"seed{seed}", overrides, args.nproc)
        if i == 0:
            sweep = {lr: final_loss(runs[lion_name(lr, args.lion_lrs)]) for lr in args.lion_lrs}
            lion_lr = min(sweep, key=lambda lr: sweep[lr] if math.isfinite(sweep[lr]) else math.inf)
            runs["lion"] = runs[lion_name(lion_lr, args.lion_lrs)]
            print("lion lr sweep (seed {}): {}; kept lr {:g}".format(
                seed, ", ".join(f"lr {lr:g}: {v:.4f}" for lr, v in sweep.items()), lion_lr), flush=True)
        else:
            got = runs["lion"].summary["optimizer"]["groups"][0]["lr"]
            if not math.isclose(got, lion_lr):
                raise SystemExit(f"{runs_dir / f'seed{seed}'} holds lion at lr {got:g}, not the lr {lion_lr:g} "
                                 "the first seed chose; use another --runs")
        by_seed[seed] = {m: runs[m] for m in METHODS}

    stats = aggregate(by_seed)
    first = by_seed[args.seeds[0]][DDP]
    steps = first.summary["steps_run"]
    train = TASKS[TASK]["train"]
    title = (f"gpt task, {first.summary['world_size']} workers, {steps} steps, global batch {train['global_batch']}, "
             f"mean over seeds {', '.join(map(str, args.seeds))}")
    plot(by_seed, png, title, lion_lr)
    check_lines, check_data = checks(stats)
    table_lines = tables(stats, args.seeds, lion_lr)
    sweep_line = (f"Lion's lr on seed {args.seeds[0]}: " + ", ".join(f"lr {lr:g} → final eval loss {v:.4f}"
                                                                     for lr, v in sweep.items())
                  + f"; **lr {lion_lr:g}** is kept for the other seeds and the tables.")
    cmd_flags = " ".join([f"--seed {s}" for s in args.seeds[:1]])
    configs_yaml = {**CONFIGS, "lion": lion_config(lion_lr)}
    doc = (__doc__ or "").split("\n\n", 2)
    text = "\n".join([
        "# LM quality: SignMuon against DDP on a small GPT",
        "",
        *provenance(started, describe_machine() + f"; {args.nproc} gloo workers, one thread each"),
        "",
        doc[2].rsplit("\n\n", 1)[0].strip(),
        "",
        "The same by hand, one seed (each optimizer a YAML file holding the mapping below):",
        "",
        "```bash",
        f"commlmo compare signmuon.yaml ddp_muon_adamw.yaml signsgd.yaml lion.yaml --task gpt --nproc {args.nproc} "
        f"{cmd_flags}" + (f" --steps {args.steps}" if args.steps else ""),
        "```",
        "",
        "```yaml",
        *(f"# {name}.yaml\n" + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=True, width=10_000).strip()
          for name, cfg in configs_yaml.items()),
        "```",
        "",
        "## Setup",
        "",
        *model_lines(first),
        f"* Training: {first.summary['world_size']} worker processes (gloo), global batch {train['global_batch']} "
        f"({train['global_batch'] // first.summary['world_size']} windows per worker), {steps} steps, "
        f"{train['schedule']['warmup']} warm-up steps then cosine decay to 0, held-out loss over 8 fixed batches "
        f"every {train['eval_every']} steps; seeds {', '.join(map(str, args.seeds))} (the seed sets the initial "
        "model and the batches).",
        f"* Wall time: " + ", ".join(f"seed {s}: {walls[s] / 60:.1f} min" for s in args.seeds)
        + f" ({sum(walls.values()) / 60:.1f} min in all; seed {args.seeds[0]} ran "
        f"{len(CONFIGS) + len(args.lion_lrs)} configs, the Lion lr sweep included).",
        f"* {sweep_line}",
        "",
        "## Targets",
        "",
        *check_lines,
        "",
        "## Results",
        "",
        "Mean ± sample standard deviation over the seeds, then each seed. \"final vs DDP\" is "
        "(final − DDP final) / DDP final, mean over seeds. Bytes are per worker, as the optimizer counted them "
        "(the totals are the largest of any rank; the cumulative bytes at an evaluation are rank 0's).",
        "",
        *table_lines,
        f"![eval loss against steps and against bytes sent per worker, mean over seeds]"
        f"({os.path.relpath(png, out.parent)})",
        "",
        "Mean over the seeds; the band on the left is ± one standard deviation. The dashed line is the DDP "
        "recipe's final eval loss (mean over seeds).",
        "",
        "## Caveats",
        "",
        f"* Evaluations are {train['eval_every']} steps apart, so \"bytes to a loss\" is the bytes at the first "
        "evaluation at or below it, not at the step the loss was first crossed.",
        "* Bytes are what each worker hands to the collectives; on loopback they cost almost no time, "
        "so the wall times here do not show the saving ([Limited bandwidth](bandwidth.md) shapes the link).",
        "* One small model, one corpus, 300 steps on CPU: the learning rates are the presets' (AdamW's 3e-3 "
        "and Lion's lr picked on one seed), not a sweep per method.",
        "",
        "<details><summary>Every evaluation (step, eval loss, bytes rank 0 had sent), as JSON</summary>",
        "",
        "```json",
        raw_json(by_seed),
        "```",
        "",
        "</details>",
        "",
    ])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    (runs_dir / "lm_quality.json").write_text(json.dumps(
        {"seeds": args.seeds, "lion_lr": lion_lr, "lion_sweep": {str(k): v for k, v in sweep.items()},
         "walls": walls, "checks": check_data, "stats": stats}, indent=2, default=str))
    print("\n".join(["", *table_lines, *check_lines, "", sweep_line, "",
                     f"wrote {out}\nfigure {png}\nruns {runs_dir} ({time.perf_counter() - started:.0f} s)"]))


if __name__ == "__main__":
    main()
