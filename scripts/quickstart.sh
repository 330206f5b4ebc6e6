#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up, then compare SignMuon (1-bit
# majority vote), Muon (float32 mean) and SignSGD on MNIST-1D with 4 local workers.
# About 2.5 minutes on 2 CPU cores; prints the table and where the plots are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m commlmo compare signmuon muon signsgd --task mnist1d-cnn --nproc 4 "$@"
