"""Spectral LMO: speed against torch.optim.Muon's Newton--Schulz, and accuracy of the methods.

    python bench/lmo.py            # prints the tables and writes docs/benchmarks/lmo.md
    python bench/lmo.py --device cuda --out runs/gpu/lmo.md     # on a GPU (bench/gpu.sh)

Speed: our ``spectral`` LMO (``jordan``; bfloat16 and float32 working dtypes) and
``torch.optim._muon._zeropower_via_newtonschulz`` on the same float32 matrices,
measured interleaved in one run (warmup, then the median of repeats); the
ratio ``ours / torch`` compares like with like only for bfloat16 (torch has no
float32 path).  Ours includes the cast back to float32 that the LMO contract
asks for.  Accuracy: relative Frobenius error to the exact ``U V^T`` and the
range of the result's singular values, 5 steps.  Absolute times drift between
runs on a shared machine; the interleaved ratio is the number to compare.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _machine import describe_machine, provenance
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

from commlmo.registry import build_plugin

SHAPES = [(256, 256), (1024, 1024), (1024, 4096), (4096, 1024)]
BATCHES = [(8, 512, 512), (32, 128, 128)]
ACCURACY_SIDES = (256, 512)
OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "lmo.md"
DEVICE = torch.device("cpu")  # --device; every input is made there, and CUDA work is synchronised before timing


def _spectral(**fields):
    return build_plugin("lmo", {"kind": "spectral", **fields})


def _torch_ns(g: torch.Tensor) -> torch.Tensor:
    return _zeropower_via_newtonschulz(g, (DEFAULT_A, DEFAULT_B, DEFAULT_C), 5, EPS)


def _interleaved_medians(fns: dict[str, Callable[[], object]], *, min_reps: int = 9, min_seconds: float = 2.0):
    """Median seconds per call of each function, calling them in turn so load drifts hit all alike."""
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    for fn in fns.values():  # warmup: oneDNN builds its kernels on the first call per shape
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while len(times[next(iter(fns))]) < min_reps or time.perf_counter() - start < min_seconds:
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def speed_table() -> list[str]:
    rows = [
        "| input | torch bf16 (ms) | ours bf16 (ms) | ours / torch | ours fp32 (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    bf16, fp32 = _spectral(dtype="bfloat16"), _spectral(dtype="float32")
    for m, n in SHAPES:
        g = torch.randn(m, n, device=DEVICE)
        t = _interleaved_medians({
            "torch": lambda: _torch_ns(g), "bf16": lambda: bf16.direction(g), "fp32": lambda: fp32.direction(g),
        })
        rows.append(f"| {m}x{n} | {t['torch'] * 1e3:.1f} | {t['bf16'] * 1e3:.1f} | "
                    f"{t['bf16'] / t['torch']:.3f} | {t['fp32'] * 1e3:.1f} |")
    unbatched = _spectral(batch=False)
    for batch in BATCHES:
        gs = list(torch.randn(batch, device=DEVICE))
        t = _interleaved_medians({
            "torch": lambda: [_torch_ns(g) for g in gs],
            "batched": lambda: bf16.directions(gs),
            "loop": lambda: unbatched.directions(gs),
        })
        label = "x".join(map(str, batch))
        for name, flag in [("batched", True), ("loop", False)]:
            rows.append(f"| {label}, batch={flag} | {t['torch'] * 1e3:.1f} | {t[name] * 1e3:.1f} | "
                        f"{t[name] / t['torch']:.3f} | |")
    return rows


def _decaying(m: int, n: int) -> torch.Tensor:
    """A gradient-like matrix: random singular vectors, singular values 1/i."""
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), dtype=torch.float64, device=DEVICE))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), dtype=torch.float64, device=DEVICE))
    s = 1.0 / torch.arange(1, min(m, n) + 1, dtype=torch.float64, device=DEVICE)
    return ((u * s) @ v.T).float()


def accuracy_table() -> list[str]:
    rows = [
        "| input | method | working dtype | rel. Frobenius error to U V^T | singular values | ms |",
        "|---|---|---|---:|---|---:|",
    ]
    a, b = ACCURACY_SIDES
    inputs = {
        f"gaussian {b}x{b}": torch.randn(b, b, device=DEVICE),
        f"gaussian {a}x{2 * b}": torch.randn(a, 2 * b, device=DEVICE),
        f"1/i spectrum {b}x{b}": _decaying(b, b),
    }
    methods = [("jordan", "bfloat16"), ("jordan", "float32"), ("polar_express", "bfloat16"),
               ("polar_express", "float32"), ("svd", "float32")]
    for label, g in inputs.items():
        exact = _spectral(method="svd").direction(g.double())
        for method, dtype in methods:
            lmo = _spectral(method=method, dtype=dtype)
            seconds = _interleaved_medians({"d": lambda: lmo.direction(g)}, min_reps=3, min_seconds=0.2)["d"]
            d = lmo.direction(g).double()
            err = ((d - exact).norm() / exact.norm()).item()
            s = torch.linalg.svdvals(d)
            rows.append(f"| {label} | {method} | {dtype if method != 'svd' else 'float32 (LAPACK)'} | "
                        f"{err:.4f} | [{s.min().item():.3f}, {s.max().item():.3f}] | {seconds * 1e3:.1f} |")
    return rows


def _machine() -> str:
    text = f"{describe_machine()}, {torch.get_num_threads()} threads"
    return text + (f"; device {torch.cuda.get_device_name(DEVICE)}" if DEVICE.type == "cuda" else "")


def main() -> None:
    global DEVICE, SHAPES, BATCHES, ACCURACY_SIDES
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    parser.add_argument("--out", type=Path, default=OUT, help=f"markdown report (default {OUT})")
    parser.add_argument("--small", action="store_true", help="small shapes only (a dry run)")
    args = parser.parse_args()
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)")
    if args.small:
        SHAPES, BATCHES, ACCURACY_SIDES = [(64, 64), (64, 128)], [(4, 32, 32)], (32, 64)
    torch.manual_seed(0)
    started = time.perf_counter()
    speed, accuracy = speed_table(), accuracy_table()
    header = [
        "# Spectral LMO benchmark",
        "",
        *provenance(started, _machine()),
        "",
        (__doc__ or "").split("\n\n", 2)[2].strip(),
        "",
        "## Speed (5 Newton-Schulz steps, float32 inputs)",
        "",
    ]
    text = "\n".join(header + speed + ["", "## Accuracy (5 steps)", ""] + accuracy) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
