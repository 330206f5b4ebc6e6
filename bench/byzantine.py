"""Byzantine workers: 2 of 5 send flipped, amplified, random or zero messages; what each method loses.

    python bench/byzantine.py                   # both regimes (about 5 min on 2 cores); writes docs/benchmarks/byzantine.md
    python bench/byzantine.py --regime exact    # only the quadratic (about 1 min); prints, writes nothing

Every run is a ``commlmo train`` run on 5 gloo workers, clean or with
``train.adversaries: {ranks: [0, 1], mode: MODE}``: ``flip`` sends ``-v``,
``amplify`` ``-10 v``, ``random`` Gaussian noise of the norm of ``v``, ``zero``
zeros (a sign uplink turns them into random bits): the corruption of
``commlmo.pipeline.corrupt``.  Only ``amplify`` changes the size of what is
sent, and only size can outshout honest workers in a mean; a vote counts one
bit per worker whatever its size.  Two regimes:

* **exact gradients**: SignMuon's quadratic F(X) = 1/2 <X, A X B> (32 x 32,
  uniform spectrum) with ``noise: 0``, so every honest worker sends the same
  message (the paper's synthetic setting); 200 steps, linear decay.
* **noisy gradients**: MNIST-1D, MLP 40-100-100-10, global batch 100 (20 per
  worker), 300 steps, 20 warm-up steps then cosine decay.

Methods: the presets unchanged.  ``signmuon`` and ``signsgd`` take a majority
vote of one-bit messages; ``muonserver`` (DDP Muon) averages the float32
momenta, then orthogonalizes; ``muon`` orthogonalizes on each worker, then
averages.  "x clean" is the final evaluated loss over the clean run's; "reaches
target" gives the first evaluation at or below the clean run's final loss
plus 10 %.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _machine import describe_machine, provenance

from commlmo.metrics import RunResult
from commlmo.train import compare

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "byzantine.md"
METHODS = ["signmuon", "signsgd", "muonserver", "muon"]
MODES = ["clean", "flip", "amplify", "random", "zero"]
REGIMES = {
    "exact": ("Exact gradients: SignMuon's quadratic, 32 x 32, noise 0, 200 steps",
              {"task": {"kind": "matrix", "m": 32, "n": 32, "noise": 0.0},
               "train": {"steps": 200, "global_batch": 5, "nproc": 5, "eval_every": 10,
                         "schedule": {"kind": "linear"}}}),
    "noisy": ("Noisy gradients: MNIST-1D MLP, global batch 100, 300 steps",
              {"task": {"kind": "mnist1d", "model": "mlp"},
               "train": {"steps": 300, "global_batch": 100, "nproc": 5, "eval_every": 25,
                         "schedule": {"kind": "cosine", "warmup": 20}}}),
}
SLACK = 1.10  # "reaches target": within 10 % of the clean run's final loss


def configs(template: dict) -> list[dict]:
    out = []
    for method in METHODS:
        for mode in MODES:
            train = dict(template["train"])
            if mode != "clean":
                train["adversaries"] = {"ranks": [0, 1], "mode": mode}
            out.append({"name": f"{method}-{mode}", "optimizer": method, "task": template["task"], "train": train})
    return out


def _reach(run: RunResult, target: float) -> str:
    hit = next((e["step"] for e in run.evals if e["eval_loss"] <= target), None)
    return f"step {hit}" if hit is not None else "**no**"


def table(runs: dict[str, RunResult]) -> list[str]:
    acc = any(r.has_accuracy for r in runs.values())
    head = ["method", "attack", "final eval loss", "x clean"] + (["eval acc"] if acc else []) + ["reaches target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in METHODS:
        clean = runs[f"{method}-clean"].evals[-1]["eval_loss"]
        for mode in MODES:
            run = runs[f"{method}-{mode}"]
            final = run.evals[-1]
            cells = [f"`{method}`" if mode == "clean" else "", mode, f"{final['eval_loss']:.4g}",
                     f"{final['eval_loss'] / clean:.2f}"]
            if acc:
                cells.append(f"{100 * final.get('eval_acc', float('nan')):.1f} %")
            cells.append(_reach(run, SLACK * clean))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _machine() -> str:
    return describe_machine() + "; 5 gloo workers, one thread each"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", choices=[*REGIMES, "all"], default="all")
    parser.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    regimes = list(REGIMES) if args.regime == "all" else [args.regime]
    started = time.perf_counter()
    sections, raw = [], {}
    with tempfile.TemporaryDirectory(prefix="commlmo-byzantine-") as tmp:
        base = Path(args.out or tmp)
        for regime in regimes:
            title, template = REGIMES[regime]
            t0 = time.perf_counter()
            results = compare(configs(template), out=base / regime, progress=False, report=False)
            runs = {r.name: r for r in results or []}
            sections += [f"## {title}", "", *table(runs), "",
                         f"{len(runs)} runs, one start of the workers: {time.perf_counter() - t0:.0f} s.", ""]
            raw[regime] = {n: [[e["step"], e["eval_loss"]] for e in r.evals] for n, r in runs.items()}
    header = [
        "# Byzantine workers: 2 of 5 adversarial",
        "",
        *provenance(started, _machine()),
        "",
        (__doc__ or "").split("\n\n", 2)[2].strip(),
        "",
        "What the numbers mean, and what they do not show, is discussed in",
        "[Reliability](../reliability.md#byzantine-workers).",
        "",
    ]
    text = "\n".join(header + sections)
    print(text)
    if args.regime == "all":
        raw_text = json.dumps(raw)
        text += ("\n<details><summary>Every evaluation (step, eval loss), as JSON</summary>\n\n```json\n"
                 + raw_text + "\n```\n\n</details>\n")
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(text, encoding="utf-8")
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
