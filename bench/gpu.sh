#!/usr/bin/env bash
# commlmo on one NVIDIA GPU, in one command of at most 8 minutes, offline:
#
#   bash bench/gpu.sh                        # results under $OUT if set, else runs/gpu/
#   COMMLMO_GPU_DRYRUN=1 bash bench/gpu.sh   # the same stages on the CPU with tiny sizes (checks this script)
#
# Stages, each under its own `timeout` so that one hang cannot eat the others' time:
#   1. the CUDA kernels bit for bit against the CPU kernels: pytest tests/test_cuda_kernels.py
#      (torch paths and, where triton imports, the fused Triton kernels), test_custom_ops.py, test_compile.py;
#   2. the distributed path on NCCL: a few optimizer steps of signmuon, muonserver and ef21muon on CUDA
#      tensors at world size 1 (torchrun), then 2 ranks (NCCL refuses two ranks on one GPU: recorded, and
#      the 2 ranks run again on gloo with CUDA tensors);
#   3. bench/compressors.py --device cuda (torch ops, then COMMLMO_TRITON=1) and bench/lmo.py --device cuda.
# Everything lands as text/markdown in the results folder: summary.md (paste into docs/benchmarks/gpu.md),
# gpu.log (the whole output) and one file per stage.
#
# Needs torch with CUDA.  commlmo is used from this checkout (no install; its entry points are
# registered by a generated .dist-info on PYTHONPATH); pydantic and PyYAML must import, or be wheels
# in ./.whl (or $COMMLMO_WHEELS) -- this script never reaches the network.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEST=${OUT:-$ROOT/runs/gpu}
mkdir -p "$DEST"
DRY=${COMMLMO_GPU_DRYRUN:-0}
PY=${PYTHON:-python3}
SUMMARY=$DEST/summary.md
STARTED=$SECONDS
export PYTHONUNBUFFERED=1

main() {

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; SIDE=256; BACKEND=gloo; WIDTH=64; LMO_ARGS=(--small); REPS=(--quick)
  echo "== DRY RUN: the stages of bench/gpu.sh on the CPU with tiny sizes (on the GPU: --device cuda, 4096x4096, nccl)"
else
  DEVICE=cuda; SIDE=4096; BACKEND=nccl; WIDTH=1024; LMO_ARGS=(); REPS=(--reps 15)
fi

# status NAME SECONDS RC: one line of the summary per stage
status() {
  local what=PASS
  if [ "$3" = 124 ] || [ "$3" = 137 ]; then what="TIMEOUT after $2 s"; elif [ "$3" != 0 ]; then what="FAIL (exit $3)"; fi
  printf -- '- %s: %s (%d s)\n' "$1" "$what" "$4" >>"$SUMMARY"
  echo "== $1: $what"
}

# ---------------------------------------------------------------- 0. environment (no network)
echo "== environment"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "ERROR: $PY cannot import torch. This script needs PyTorch with CUDA installed on this machine" \
       "(it never downloads anything); set PYTHON=/path/to/python if another interpreter has it."
  exit 2
fi
if [ "$DRY" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "$PY" -c "import torch; print('torch', torch.__version__, 'built with CUDA', torch.version.cuda)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L 2>&1 | head -3; else echo "(no nvidia-smi on the PATH)"; fi
  echo "ERROR: torch sees no CUDA device (torch.cuda.is_available() is False). Run on the GPU machine, with a" \
       "CUDA build of torch, or try the script here with COMMLMO_GPU_DRYRUN=1."
  exit 2
fi
if ! "$PY" -c "import pydantic, yaml, numpy" 2>/dev/null; then
  WHEELS=${COMMLMO_WHEELS:-$ROOT/.whl}
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "installing commlmo's dependencies from $WHEELS (offline)"
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/commlmo-deps "$WHEELS"/*.whl || exit 2
    export PYTHONPATH=/tmp/commlmo-deps${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "ERROR: pydantic, PyYAML or numpy does not import, and there are no wheels in $WHEELS." \
         "On a machine with internet, in this checkout: python3 -m pip download --no-deps --only-binary=:all:" \
         "--python-version 3.12 --platform manylinux2014_x86_64 -d .whl pydantic pydantic-core annotated-types" \
         "typing-inspection typing-extensions pyyaml; then copy .whl/ along and run again."
    exit 2
  fi
fi
# commlmo from this checkout: the packages' folders on the path, entry points from pyproject.toml
META=$(mktemp -d)
"$PY" - "$ROOT" "$META" <<'EOF' || exit 2
import sys, pathlib
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
root, meta = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
info = meta / f"commlmo-{project['version']}.dist-info"  # the built-ins' distribution must be named commlmo
info.mkdir()
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: commlmo\nVersion: {project['version']}\n")
lines = []
for group, points in project["entry-points"].items():
    lines += [f"[{group}]"] + [f"{name} = {target}" for name, target in points.items()] + [""]
(info / "entry_points.txt").write_text("\n".join(lines))
EOF
# (the dry run takes this path too, installed or not, so that it checks what the GPU machine will do)
if [ "$DRY" = 1 ] || ! "$PY" -c "import commlmo_compressors" 2>/dev/null; then
  export PYTHONPATH=$ROOT:$ROOT/compressors:$ROOT/lmos:$ROOT/aggregators:$META${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" - "$DEVICE" <<'EOF' | tee "$DEST/environment.txt" || exit 2
import importlib.util, os, platform, sys, torch
from commlmo.registry import build_plugin
from commlmo_compressors import _native
build_plugin("compressor", "sign")  # the entry points resolve
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{os.cpu_count()} CPUs, triton {'yes' if importlib.util.find_spec('triton') else 'no'}, "
      f"C kernels {'built' if _native.kernels() is not None else 'unavailable'}")
if sys.argv[1] == "cuda":
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, "
          f"compute capability {p.major}.{p.minor}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
EOF
label=""
[ "$DRY" = 1 ] && label=" (DRY RUN on the CPU: tiny sizes, gloo; not a measurement)"
{
  echo "# bench/gpu.sh -- $(date -u '+%Y-%m-%d %H:%M UTC')$label"
  echo
  sed 's/^/    /' "$DEST/environment.txt"
  echo
  echo "## Stages"
  echo
} >"$SUMMARY"

# ---------------------------------------------------------------- 1. kernels, bit for bit (<= 150 s)
echo "== 1. CUDA kernels against the CPU kernels (pytest)"
t=$SECONDS
timeout -k 5 150 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda_kernels.py tests/test_custom_ops.py \
  tests/test_compile.py 2>&1 | tee "$DEST/tests.txt"
status "kernels bit for bit (tests/test_cuda_kernels.py, test_custom_ops.py, test_compile.py)" 150 "$?" $((SECONDS - t))
tail -n 1 "$DEST/tests.txt" | sed 's/^/  - pytest: /' >>"$SUMMARY"

# ---------------------------------------------------------------- 2. distributed steps (<= 100 s)
echo "== 2. optimizer steps over $BACKEND on $DEVICE tensors"
DIST=$(mktemp -d)/dist_steps.py
cat >"$DIST" <<'EOF'
"""A few optimizer steps of each preset on one rank per process: step time, bytes, replicas agree."""
import statistics, sys, time
import torch
import torch.distributed as dist
import commlmo

backend, device_kind, presets, width = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])
dist.init_process_group(backend)
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", 0) if device_kind == "cuda" else torch.device("cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def run_preset(preset: str) -> str:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.GELU(), torch.nn.Linear(width, width),
                                torch.nn.GELU(), torch.nn.Linear(width, 10)).to(device)
    opt = commlmo.build_optimizer(model, preset)
    gen = torch.Generator(device=device).manual_seed(1 + rank)
    times, losses = [], []
    for _ in range(6):
        x = torch.randn(64, 256, generator=gen, device=device)
        y = torch.randint(0, 10, (64,), generator=gen, device=device)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    low, high = flat.clone(), flat.clone()
    dist.all_reduce(low, dist.ReduceOp.MIN)
    dist.all_reduce(high, dist.ReduceOp.MAX)
    agree = bool((high - low).abs().max() == 0)
    on_device = all(p.device == device for p in model.parameters()) and all(
        t.device == device for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    return (f"{times[0] * 1e3:.1f} | {statistics.median(times[1:]) * 1e3:.1f} | {opt.bytes.step_sent} | "
            f"{losses[0]:.3f} -> {losses[-1]:.3f} | {'yes' if agree else '**no**'} | "
            f"{'yes' if on_device else '**no**'} |")


for preset in presets:
    try:
        row = run_preset(preset)
    except Exception as exc:  # noqa: BLE001 -- a refusal is a result: record it, try the next preset
        row = f"**{type(exc).__name__}**: {str(exc).splitlines()[0][:100]} | | | | | |"
    if rank == 0:
        print(f"| {backend} | {world} | {preset} | {row}", flush=True)

# every collective commlmo issues, in the dtypes its payloads use, on this backend (at one rank the presets
# above skip their collectives: these still run through the backend)
from commlmo.comm import TorchComm

comm = TorchComm()
for dtype in (torch.uint8, torch.int8, torch.int64, torch.float32, torch.bfloat16):
    t = (torch.arange(8 * world, device=device) % 7).to(dtype)
    share = [t.numel() // world] * world
    calls = {"all_reduce_sum_": lambda: comm.all_reduce_sum_(t.clone(), label="check"),
             "all_max_": lambda: comm.all_max_(t.clone(), label="check"),
             "all_gather": lambda: comm.all_gather(t, label="check"),
             "all_to_all": lambda: comm.all_to_all(t, label="check"),
             "all_to_all_v": lambda: comm.all_to_all_v(t, share, share, label="check")}
    row = []
    for name, call in calls.items():
        try:
            call()
            sync()
            row.append("ok")
        except Exception as exc:  # noqa: BLE001 -- the table records what the backend refuses
            row.append(f"**{type(exc).__name__}**: {str(exc).splitlines()[0][:60]}")
    if rank == 0:  # row by row: a backend that hangs after a refusal still leaves the rows before it
        print(f"|c {backend} | {world} | {str(dtype).removeprefix('torch.')} | " + " | ".join(row) + " |",
              flush=True)
dist.destroy_process_group()
EOF
PRESETS=signmuon,muonserver,ef21muon
{
  echo "MLP 256 -> $WIDTH -> $WIDTH -> 10, batch 64 per rank, 6 steps."
  echo
  echo "| backend | ranks | preset | first step (ms) | median step (ms) | bytes sent per step (rank 0) | loss, 6 steps | replicas agree | state on device |"
  echo "|---|---:|---|---:|---:|---:|---|---|---|"
} >"$DEST/dist.md"
run_dist() {  # backend nproc timeout
  timeout -k 5 "$3" "$PY" -m torch.distributed.run --standalone --nproc-per-node "$2" "$DIST" "$1" "$DEVICE" \
    "$PRESETS" "$WIDTH" >"$DEST/.dist_out" 2>&1
  local rc=$?
  grep '^| ' "$DEST/.dist_out" >>"$DEST/dist.md"
  grep '^|c ' "$DEST/.dist_out" | sed 's/^|c /| /' >>"$DEST/.collectives"
  cat "$DEST/.dist_out"
  return $rc
}
t=$SECONDS
run_dist "$BACKEND" 1 40
status "$BACKEND, 1 rank, $DEVICE tensors ($PRESETS)" 40 "$?" $((SECONDS - t))
t=$SECONDS
run_dist "$BACKEND" 2 30
rc=$?
status "$BACKEND, 2 ranks on one device" 30 "$rc" $((SECONDS - t))
if [ "$rc" != 0 ]; then
  reason=$(grep -m1 -o -i -E 'duplicate gpu[^"]*|invalid usage[^"]*|ncclInvalidUsage[^"]*' "$DEST/.dist_out" | head -c 200)
  echo "  - $BACKEND refused 2 ranks on one device: ${reason:-see gpu.log}" >>"$SUMMARY"
  if [ "$BACKEND" = nccl ]; then
    t=$SECONDS
    run_dist gloo 2 30
    status "fallback: gloo, 2 ranks, $DEVICE tensors" 30 "$?" $((SECONDS - t))
  fi
fi
{
  echo
  echo "Collectives through commlmo.comm.TorchComm, by dtype:"
  echo
  echo "| backend | ranks | dtype | all_reduce_sum_ | all_max_ | all_gather | all_to_all | all_to_all_v |"
  echo "|---|---:|---|---|---|---|---|---|"
  cat "$DEST/.collectives" 2>/dev/null
} >>"$DEST/dist.md"
rm -f "$DEST/.dist_out" "$DEST/.collectives"
{ echo; cat "$DEST/dist.md"; echo; } >>"$SUMMARY"

# ---------------------------------------------------------------- 3. benchmarks (<= 190 s)
echo "== 3. benchmarks on $DEVICE"
t=$SECONDS
timeout -k 5 60 "$PY" bench/compressors.py --device "$DEVICE" --side "$SIDE" "${REPS[@]}" \
  --out "$DEST/compressors_torch.md"
status "bench/compressors.py --device $DEVICE (torch ops)" 60 "$?" $((SECONDS - t))
if "$PY" -c "import triton" 2>/dev/null; then
  t=$SECONDS
  COMMLMO_TRITON=1 timeout -k 5 70 "$PY" bench/compressors.py --device "$DEVICE" --side "$SIDE" "${REPS[@]}" \
    --out "$DEST/compressors_triton.md"
  status "bench/compressors.py --device $DEVICE, COMMLMO_TRITON=1" 70 "$?" $((SECONDS - t))
else
  echo "- triton does not import: the fused kernels were not timed" >>"$SUMMARY"
fi
t=$SECONDS
timeout -k 5 60 "$PY" bench/lmo.py --device "$DEVICE" ${LMO_ARGS[@]+"${LMO_ARGS[@]}"} --out "$DEST/lmo.md"
status "bench/lmo.py --device $DEVICE" 60 "$?" $((SECONDS - t))
for f in compressors_torch compressors_triton lmo; do
  if [ -f "$DEST/$f.md" ]; then { echo; sed 's/^# /### /; s/^## /### /' "$DEST/$f.md"; } >>"$SUMMARY"; fi
done

echo "== done in $((SECONDS - STARTED)) s; results in $DEST:"
ls -1 "$DEST"
echo "paste $SUMMARY into docs/benchmarks/gpu.md"
}

main 2>&1 | tee "$DEST/gpu.log"
