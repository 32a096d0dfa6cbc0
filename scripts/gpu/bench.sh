#!/usr/bin/env bash
# On a GPU machine after `make install` (or scripts/gpu/setup.sh offline): one benchmarks/bench.py
# run, with the GPU's name beside it. Random-weight shapes: nothing to download.
#   bash scripts/gpu/bench.sh [bench.py args...]     results: $OUT/results (or benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
test -x "$PY" || { echo "error: no $PY: run make install (or scripts/gpu/setup.sh BUNDLE) first" >&2; exit 2; }
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
RESULTS=${OUT:-benchmarks}/results
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" benchmarks/bench.py --out "$RESULTS" "$@"
