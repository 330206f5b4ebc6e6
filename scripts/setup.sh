#!/usr/bin/env bash
# Install commlmo and everything its tests, benchmarks and docs need, on a fresh machine.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU build of torch first: anything that depends on torch would otherwise pull a CUDA build.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
# The optimizer alone needs torch, numpy, pydantic and PyYAML; the extras add the training harness
# (train), the plugin contract kit (testing), the test runner (test), the docs (docs) and the
# frameworks of commlmo.integrations (integrations: HF transformers, accelerate, Lightning, torchtitan).
"$PY" -m pip install --quiet -e ".[train,testing,test,docs,integrations]"
