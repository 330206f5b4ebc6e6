r"""Time per step and time to the DDP baseline's loss on a shaped link: real DDP + torch.optim.Muon against commlmo.

    python bench/bandwidth.py                      # gpt task, 100mbit and 1gbit, DDP + every default method
    python bench/bandwidth.py --rates 100mbit --methods ddp signmuon signmuon+overlap --steps 20
    python bench/bandwidth.py --task mnist1d --methods ddp muonserver signmuon ef21muon   # the 0.8 M MLP

What it does
------------
Creates a Linux network namespace, brings its loopback up and shapes it with
``tc`` (a token bucket at each ``--rate``), then runs every method inside it
with ``ip netns exec``.  The workers rendezvous on 127.0.0.1 of that
namespace, so every byte of every collective crosses the shaped loopback.  The
link is *shared*: all workers' traffic together is limited to the rate, like
workers behind one shared uplink.

Methods, all on the same task, seed (same initial model, same batches), batch,
steps and learning-rate schedule:

* ``ddp``: what users run without commlmo (``bench/_ddp_baseline.py``): the
  model in plain ``torch.nn.parallel.DistributedDataParallel`` (25 MB buckets,
  all-reduce overlapping backward), ``torch.optim.Muon`` on the hidden matrices
  and ``torch.optim.AdamW`` on the embeddings, head, norms and biases, with the
  DDP recipe's hyperparameters (``DDP_RECIPE``: Muon lr 0.02, AdamW lr 3e-3,
  as in bench/lm_quality.py);
* ``muonserver``: the same recipe in commlmo (float32 means; the Newton--Schulz
  of each matrix on one owner rank);
* any other preset as it is (``signmuon``, ``ef21muon``, ``ef21muonsign``...);
* ``+overlap`` after a name: the config's ``overlap: true`` (each bucket's
  uplink starts from a gradient hook while backward runs); ``--bucket-mb``
  sets ``bucket_mb``;
* ``+fp32`` / ``+bf16`` after a name: Newton--Schulz forced to float32 /
  bfloat16.  Without either, the presets' ``dtype: auto`` runs it in bfloat16
  where the hardware multiplies bfloat16 fast (GPUs, CPUs with AVX512-BF16 or
  AMX) and in float32 elsewhere; ``torch.optim.Muon`` (the ``ddp`` baseline)
  always uses bfloat16.

``ddp`` runs first at each rate; its final evaluated loss is the target of that
rate, and "to DDP loss" is the training time (rank 0, evaluation excluded) at
the first evaluation at or below it.  Ratios are DDP's time over the method's,
measured in the same run.  "ms/step" is rank 0's mean training time per step
(forward, backward, optimizer step); "in step()" the part of it after
``backward()`` returned: the optimizer's step with whatever communication it
still waits for (DDP's all-reduce finishes inside ``backward()``).

Honesty check: the script reads ``/sys/class/net/lo/statistics/tx_bytes``
inside the namespace before and after each run and prints it next to the
bytes the method accounted for, summed over the workers: commlmo's own count
of what it handed to the collectives, and for DDP (which counts nothing) a
ring all-reduce's ``2 (M-1)/M`` times the float32 gradient per worker per
step.  Loopback bytes include TCP/IP headers, gloo's framing, the rendezvous
and each run's start-up and bookkeeping collectives (DDP's broadcast of the
initial model, commlmo's initial-weights check, the final gather of the byte
totals), so they exceed the accounting by a little; a large gap would mean the
accounting is wrong.

Needs root, ``ip`` and ``tc`` (Debian: ``apt-get install iproute2``); where
any is missing, or namespaces are not permitted (many containers), it explains
why and exits 0 without running anything.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe_machine  # noqa: E402
from lm_quality import CONFIGS as LM_CONFIGS  # noqa: E402
from lm_quality import DDP as LM_DDP  # noqa: E402

from commlmo.config import load_config  # noqa: E402
from commlmo.metrics import RunResult, human_bytes, load_run, reach  # noqa: E402
from commlmo.runconfig import TASKS  # noqa: E402

HERE = Path(__file__).resolve().parent
NS = "commlmo-bw"
DDP = "ddp"
#: the DDP recipe: Muon (lr 0.02) on the hidden matrices, AdamW (lr 3e-3) on the rest, float32 means
DDP_RECIPE: dict[str, Any] = LM_CONFIGS[LM_DDP]
METHODS = (DDP, "muonserver", "muonserver+overlap", "signmuon", "signmuon+overlap", "ef21muon", "ef21muon+overlap",
           "ef21muonsign", "ef21muonsign+overlap", "signmuon+bf16")
FLAGS = ("overlap", "fp32", "bf16")
#: the tasks: the named ``gpt`` task of ``commlmo compare``, and the MNIST-1D MLP of the first version of this page
TASK_SETUPS: dict[str, dict[str, Any]] = {
    "gpt": {"task": TASKS["gpt"]["task"], "global_batch": 32, "schedule": TASKS["gpt"]["train"]["schedule"],
            "warmup_fraction": TASKS["gpt"]["train"]["schedule"]["warmup"] / TASKS["gpt"]["train"]["steps"]},
    "mnist1d": {"task": {"kind": "mnist1d", "model": "mlp", "hidden": [16384]}, "global_batch": 256,
                "schedule": {"kind": "constant"}},
}


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def why_not() -> str | None:
    """Why this machine cannot run the benchmark, or ``None``."""
    if sys.platform != "linux":
        return f"network namespaces are Linux-only (this is {sys.platform})"
    if os.geteuid() != 0:
        return "creating a network namespace needs root (run with sudo)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (Debian/Ubuntu: apt-get install iproute2)"
    return None


def make_namespace() -> str | None:
    sh("ip", "netns", "del", NS, check=False)
    for cmd in (("ip", "netns", "add", NS), ("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up")):
        r = sh(*cmd, check=False)
        if r.returncode:
            return f"`{' '.join(cmd)}` failed: {r.stderr.strip() or r.returncode}"
    return None


def shape(rate: str) -> None:
    """Token bucket on the namespace's loopback; burst holds a few 64 KiB loopback segments."""
    sh("ip", "netns", "exec", NS, "tc", "qdisc", "del", "dev", "lo", "root", check=False)
    if rate != "unlimited":
        sh("ip", "netns", "exec", NS, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
           "rate", rate, "burst", "256kb", "latency", "100ms")


def lo_tx_bytes() -> int:
    return int(sh("ip", "netns", "exec", NS, "cat", "/sys/class/net/lo/statistics/tx_bytes").stdout)


def measure_link(seconds: float = 2.0) -> float:
    """Achieved TCP throughput on the shaped loopback, in Mbit/s (checks that the shaping works)."""
    code = (
        "import socket,threading,time\n"
        "s=socket.socket();s.bind(('127.0.0.1',0));s.listen(1);port=s.getsockname()[1]\n"
        "def sink():\n c,_=s.accept()\n while c.recv(1<<20): pass\n"
        "threading.Thread(target=sink,daemon=True).start()\n"
        "c=socket.create_connection(('127.0.0.1',port));buf=b'x'*(1<<16);n=0;t=time.time()\n"
        f"while time.time()-t<{seconds}: c.sendall(buf); n+=len(buf)\n"
        "print(8*n/(time.time()-t)/1e6)\n"
    )
    return float(sh("ip", "netns", "exec", NS, sys.executable, "-c", code).stdout)


# --------------------------------------------------------------------------- methods


def optimizer_of(method: str, bucket_mb: float | None) -> dict[str, Any]:
    """The optimizer config of ``NAME[+overlap][+fp32|+bf16]`` (``ddp``: the recipe the baseline reads)."""
    name, *flags = method.split("+")
    unknown = [f for f in flags if f not in FLAGS]
    if unknown:
        raise SystemExit(f"method {method!r}: unknown flag(s) {unknown}; allowed: {', '.join(FLAGS)}")
    if name == DDP:
        if flags:
            raise SystemExit(f"method {method!r}: ddp is plain DDP + torch.optim.Muon (which runs Newton-Schulz in "
                             "bfloat16 only); it takes no flags")
        return copy.deepcopy(DDP_RECIPE)
    cfg = copy.deepcopy(DDP_RECIPE) if name == "muonserver" else {"preset": name}
    if "overlap" in flags:
        cfg["overlap"] = True
    if bucket_mb is not None:
        cfg["bucket_mb"] = bucket_mb
    dtype = {"fp32": "float32", "bf16": "bfloat16"}
    forced = [dtype[f] for f in flags if f in dtype]
    if len(forced) > 1:
        raise SystemExit(f"method {method!r}: +fp32 and +bf16 exclude each other")
    if forced:
        groups = cfg.setdefault("groups", {})
        for g in load_config(cfg).groups:
            if g.lmo is not None and g.lmo.kind == "spectral":
                groups.setdefault(g.name, {})["lmo"] = {"kind": "spectral", "dtype": forced[0]}
    load_config(cfg)  # a typo fails here, before any namespace is made
    return cfg


def run_config(method: str, args: argparse.Namespace) -> dict[str, Any]:
    setup = TASK_SETUPS[args.task]
    schedule = dict(setup["schedule"])
    if "warmup_fraction" in setup:  # the named task's warm-up share of the steps (20 of 300)
        schedule["warmup"] = max(1, round(setup["warmup_fraction"] * args.steps))
    return {
        "name": method.replace("+", "-"),
        "optimizer": optimizer_of(method, args.bucket_mb),
        "task": setup["task"],
        "train": {"steps": args.steps, "global_batch": setup["global_batch"], "nproc": args.nproc,
                  "eval_every": args.eval_every, "seed": args.seed, "schedule": schedule,
                  "timeout_s": 3600},
    }


def run_one(method: str, rate: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Train ``method`` in the namespace; the run and what the loopback carried."""
    cfg = run_config(method, args)
    cfg_path = workdir / f"{cfg['name']}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = workdir / f"{rate}-{cfg['name']}"
    cmd = ([str(HERE / "_ddp_baseline.py"), str(cfg_path)] if method == DDP
           else ["-m", "commlmo", "train", str(cfg_path), "--no-progress"])
    before = lo_tx_bytes()
    proc = subprocess.run(["ip", "netns", "exec", NS, sys.executable, *cmd, "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lo = lo_tx_bytes() - before
    if proc.returncode:
        raise SystemExit(f"{method} at {rate} failed:\n{proc.stderr[-3000:]}")
    run = load_run(out, method)
    steps = max(run.summary["steps_run"], 1)
    by_rank = run.summary["bytes"]["by_rank"]
    opt_times = [r["opt_time"] for r in run.records if "opt_time" in r]
    return {
        "method": method, "rate": rate, "steps": steps, "run": run,
        "ms_per_step": 1000 * run.summary["train_time"] / steps,
        "ms_in_step": 1000 * sum(opt_times) / len(opt_times) if opt_times else None,
        "final_eval_loss": run.evals[-1]["eval_loss"],
        "sent_per_worker_step": run.summary["bytes"]["sent_per_worker"] / steps,
        "accounting": run.summary["bytes"].get("accounting", "optimizer"),
        "accounted_all_workers": sum(r["sent"] for r in by_rank),
        "loopback_tx_bytes": lo, "workers": len(by_rank),
    }


def time_to(row: dict[str, Any], target: float | None) -> float | None:
    """Training time at the first evaluation at or below ``target``."""
    hit = reach(row["run"], target) if target is not None else None
    return hit.time if hit else None


# --------------------------------------------------------------------------- report


def _ratio(ref: float | None, x: float | None) -> str:
    return f"{ref / x:.1f}×" if ref and x else "-"


def table(rows: list[dict[str, Any]], targets: dict[str, float | None]) -> str:
    head = ["rate", "method", "ms/step", "in step()", "DDP / method (step)", "final eval loss", "to DDP loss",
            "DDP / method (to loss)", "sent/worker/step", "loopback/worker/step", "loopback / accounted"]
    ref = {r["rate"]: r for r in rows if r["method"] == DDP}
    lines = [head, ["---"] * len(head)]
    for r in rows:
        base, target = ref.get(r["rate"]), targets.get(r["rate"])
        t = time_to(r, target)
        t_ref = time_to(base, target) if base else None
        lines.append([
            r["rate"], f"`{r['method']}`", f"{r['ms_per_step']:.0f}", f"{r['ms_in_step']:.0f}",
            _ratio(base["ms_per_step"], r["ms_per_step"]) if base else "-", f"{r['final_eval_loss']:.4f}",
            f"{t:.1f} s (step {reach(r['run'], target).step})" if t is not None else "not reached",
            _ratio(t_ref, t), human_bytes(r["sent_per_worker_step"]) + (" (formula)" if r["method"] == DDP else ""),
            human_bytes(r["loopback_tx_bytes"] / r["workers"] / r["steps"]),
            f"{r['loopback_tx_bytes'] / max(r['accounted_all_workers'], 1):.3f}",
        ])
    return "\n".join("| " + " | ".join(x) + " |" for x in lines)


def plot(rows: list[dict[str, Any]], targets: dict[str, float | None], path: Path, title: str) -> None:
    """ms/step per method at each rate (left); eval loss against training time at each rate (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(dict.fromkeys(r["rate"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 1 + len(rates), figsize=(5 + 4.5 * len(rates), 4.2))
    ax = axes[0]
    width = 0.8 / len(rates)
    for k, rate in enumerate(rates):
        ms = {r["method"]: r["ms_per_step"] for r in rows if r["rate"] == rate}
        ax.barh([i + k * width for i in range(len(methods))], [ms.get(m, math.nan) for m in methods], height=width,
                label=rate)
    ax.set_yticks([i + width * (len(rates) - 1) / 2 for i in range(len(methods))], methods)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms per step (log)")
    ax.legend()
    bases = list(dict.fromkeys(m.replace("+overlap", "") for m in methods if m != DDP))
    for ax, rate in zip(axes[1:], rates):
        for r in (x for x in rows if x["rate"] == rate):
            ev = [e for e in r["run"].evals if e["time"] > 0]  # step 0 (time 0) has no place on a log axis
            base = r["method"].replace("+overlap", "")
            ax.plot([e["time"] for e in ev], [e["eval_loss"] for e in ev], marker=".",
                    lw=2.2 if base == DDP else 1.2, color="k" if base == DDP else f"C{bases.index(base) % 10}",
                    ls="--" if "overlap" in r["method"] else "-", label=r["method"])
        if targets.get(rate) is not None:
            ax.axhline(targets[rate], color="k", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("training time, s (log)")
        ax.set_ylabel("eval loss")
        ax.set_title(rate)
    axes[-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASK_SETUPS), default="gpt")
    p.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"], help="tc rates, or 'unlimited'")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help="ddp, or a preset with optional +overlap and +fp32 or +bf16 (e.g. signmuon+overlap)")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bucket-mb", type=float, help="bucket_mb of the commlmo methods (default: the config's, 25)")
    p.add_argument("--target", type=float, help="eval loss to time (default: the ddp run's final eval loss)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--plot", help="also draw the plot here (PNG)")
    args = p.parse_args(argv)
    methods = sorted(args.methods, key=lambda m: m != DDP)  # the baseline first: it sets the target
    for m in methods:
        optimizer_of(m, args.bucket_mb)

    reason = why_not() or make_namespace()
    if reason:
        print(f"bench/bandwidth.py: skipped: {reason}")
        return 0
    rows: list[dict[str, Any]] = []
    targets: dict[str, float | None] = {}
    loads: list[str] = []
    started = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="commlmo-bw-") as tmp:
            for rate in args.rates:
                shape(rate)
                link = measure_link()
                print(f"# {rate}: measured TCP throughput on the shaped loopback {link:.0f} Mbit/s", flush=True)
                targets[rate] = args.target
                for method in methods:
                    load_before = _load()
                    row = run_one(method, rate, args, Path(tmp))
                    row["link_mbit"] = link
                    loads.append(f"{rate} {method}: {load_before} -> {_load()}")
                    rows.append(row)
                    if method == DDP and args.target is None:
                        targets[rate] = row["final_eval_loss"]
                    t = time_to(row, targets[rate])
                    print(f"  {method:<22} {row['ms_per_step']:7.0f} ms/step, final eval loss "
                          f"{row['final_eval_loss']:.4f}, to loss {targets[rate] or math.nan:.4f}: "
                          f"{'not reached' if t is None else f'{t:.1f} s'}  (load {loads[-1].split(': ')[1]})",
                          flush=True)
    finally:
        sh("ip", "netns", "del", NS, check=False)
    first = rows[0]["run"].summary
    params = first.get("task", {}).get("parameters")
    title = (f"{args.task} task ({params:,} parameters), {args.nproc} workers, global batch "
             f"{TASK_SETUPS[args.task]['global_batch']}, {args.steps} steps, seed {args.seed}")
    print(f"\n{title}; {describe_machine()}; {time.strftime('%Y-%m-%d')}, {time.time() - started:.0f} s; "
          f"target: the ddp run's final eval loss at each rate\n")
    print(table(rows, targets))
    print("\nload average (1 / 5 / 15 min) before -> after each run:\n  " + "\n  ".join(loads))
    if args.plot:
        plot(rows, targets, Path(args.plot), title)
        print(f"\nplot: {args.plot}")
    if args.json:
        keep = [{k: v for k, v in r.items() if k != "run"} | {"evals": r["run"].evals, "time_to_target":
                time_to(r, targets[r["rate"]]), "target": targets[r["rate"]]} for r in rows]
        Path(args.json).write_text(json.dumps(keep, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
