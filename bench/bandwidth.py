r"""Wall-clock time to a target loss when the network is slow.

    python bench/bandwidth.py                                # 100mbit and 1gbit, three methods
    python bench/bandwidth.py --rates 100mbit --methods muonserver signmuon --nproc 4

What it does
------------
Creates a Linux network namespace, brings its loopback up and shapes it with
``tc`` (a token bucket at each ``--rate``), then runs ``commlmo train`` inside
it with ``ip netns exec``.  The workers rendezvous on 127.0.0.1 of that
namespace, so every byte of every collective crosses the shaped loopback.  The
link is *shared*: all workers' traffic together is limited to the rate, like
workers behind one shared uplink.

Each method trains the same model (by default an MNIST-1D MLP with one hidden
layer of 16384 units, 0.8 M parameters in two matrices whose Newton--Schulz
iteration is cheap) until its evaluated loss reaches ``--target``, and the
table reports the wall-clock training time to get there, the steps, and the
bytes.  Communication dominates float32 Muon (``muonserver``: 2(M-1)/M x 32 bits
per coordinate per worker); SignMuon sends 1 bit each way, EF21-Muon a top-5 %
sparsified difference.

Honesty check: the script reads ``/sys/class/net/lo/statistics/tx_bytes``
inside the namespace before and after each run and prints it next to the
optimizer's own accounting summed over the workers.  Loopback bytes include
TCP/IP headers, gloo's framing, the rendezvous and the run's few bookkeeping
collectives (start-up checks, stop-at-target flags), so they exceed the
optimizer's count by a little; a large gap would mean the accounting is wrong.

Needs root, ``ip`` and ``tc`` (Debian: ``apt-get install iproute2``); where
any is missing, or namespaces are not permitted (many containers), it explains
why and exits 0 without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

NS = "commlmo-bw"
METHODS = ("muonserver", "signmuon", "ef21muon")


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


def run_config(method: str, args: argparse.Namespace) -> dict:
    return {
        "name": method,
        "optimizer": method,
        "task": {"kind": "mnist1d", "model": "mlp", "hidden": [args.hidden]},
        "train": {"steps": args.max_steps, "global_batch": args.global_batch, "nproc": args.nproc,
                  "eval_every": args.eval_every, "target_loss": args.target, "stop_at_target": True,
                  "seed": 0, "timeout_s": 1800},
    }


def run_one(method: str, rate: str, args: argparse.Namespace, workdir: Path) -> dict:
    cfg_path = workdir / f"{method}.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config(method, args)))
    out = workdir / f"{rate}-{method}"
    before = lo_tx_bytes()
    t0 = time.time()
    proc = subprocess.run(
        ["ip", "netns", "exec", NS, sys.executable, "-m", "commlmo", "train", str(cfg_path),
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    elapsed = time.time() - t0
    lo = lo_tx_bytes() - before
    if proc.returncode:
        raise SystemExit(f"{method} at {rate} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    hit = next((r for r in records if r.get("eval_loss", float("inf")) <= args.target), None)
    return {
        "method": method, "rate": rate, "reached": hit is not None,
        "time_to_target": hit["time"] if hit else None, "steps": hit["step"] if hit else summary["steps_run"],
        "step_time": summary["train_time"] / max(summary["steps_run"], 1),
        "sent_per_worker": summary["bytes"]["sent_per_worker"],
        "optimizer_sent_all_workers": sum(r["sent"] for r in summary["bytes"]["by_rank"]),
        "loopback_tx_bytes": lo, "process_wall": elapsed, "final_eval_loss": summary["final"].get("eval_loss"),
    }


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def table(rows: list[dict]) -> str:
    head = ["rate", "method", "time to target", "steps", "s/step", "sent/worker",
            "optimizer bytes (all workers)", "loopback tx bytes", "lo / optimizer", "speed-up vs muonserver"]
    base = {r["rate"]: r["time_to_target"] for r in rows if r["method"] == "muonserver" and r["reached"]}
    lines = []
    for r in rows:
        t = r["time_to_target"]
        ref = base.get(r["rate"])
        lines.append([
            r["rate"], r["method"], f"{t:.1f} s" if t is not None else "not reached", str(r["steps"]),
            f"{r['step_time']:.3f}", mib(r["sent_per_worker"]), mib(r["optimizer_sent_all_workers"]),
            mib(r["loopback_tx_bytes"]), f"{r['loopback_tx_bytes'] / max(r['optimizer_sent_all_workers'], 1):.2f}",
            f"{ref / t:.1f}x" if (ref and t) else "-",
        ])
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    fmt = lambda row: " | ".join(c.ljust(w) for c, w in zip(row, widths))  # noqa: E731
    return "\n".join(["| " + fmt(head) + " |", "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *("| " + fmt(x) + " |" for x in lines)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"], help="tc rates, or 'unlimited'")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--hidden", type=int, default=16384, help="width of the MLP's hidden layer")
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--target", type=float, default=1.5, help="evaluated (test) loss to reach")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)

    reason = why_not() or make_namespace()
    if reason:
        print(f"bench/bandwidth.py: skipped: {reason}")
        return 0
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="commlmo-bw-") as tmp:
            for rate in args.rates:
                shape(rate)
                link = measure_link()
                print(f"# {rate}: measured TCP throughput on the shaped loopback {link:.0f} Mbit/s", flush=True)
                for method in args.methods:
                    row = run_one(method, rate, args, Path(tmp))
                    row["link_mbit"] = link
                    rows.append(row)
                    print(f"  {method:<11} time to loss {args.target}: "
                          f"{row['time_to_target'] if row['time_to_target'] is not None else float('nan'):.1f} s "
                          f"({row['steps']} steps, {row['step_time']:.3f} s/step)", flush=True)
    finally:
        sh("ip", "netns", "del", NS, check=False)
    print(f"\n{args.nproc} workers, MNIST-1D MLP 40-{args.hidden}-10, global batch {args.global_batch}, "
          f"target eval loss {args.target}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
