#!/usr/bin/env bash
# Validate and measure dctkd_ext on a GPU machine in under 8 minutes; everything goes under one folder.
#   bash bench/gpu_check.sh [OUT_DIR]      (or OUT=DIR bash bench/gpu_check.sh)
#   bash bench/gpu_check.sh --dry-run DIR  (the plan only)
# Steps, their time limits and outputs: bench/gpu_check.py. Needs torch, triton, nvcc and ninja installed;
# no network.
set -u
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python}"
exec "$PY" bench/gpu_check.py "$@"
