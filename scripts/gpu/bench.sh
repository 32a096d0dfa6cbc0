#!/usr/bin/env bash
# On a GPU machine after `make install` (or scripts/gpu/setup.sh offline): benchmarks/bench.py for
# the 1B and 4B shapes against every peer (TRL at its best with and without checkpointing, unsloth
# where installed, transformers' compiled static-cache generate), 3 repeats of 200 steps each, with
# the GPU's name beside them. Random-weight shapes: nothing to download.
#   bash scripts/gpu/bench.sh [bench.py args...]     results: $OUT/results (or benchmarks/results)
#   SHAPES="llama-1b"     the shapes to run (default "llama-1b qwen3-4b"), one after the other
#   REPEATS=3             runs of each variant (min / median / max)
# e.g. SHAPES=qwen3-4b bash scripts/gpu/bench.sh --steps 100 --variants trl_best,ours_batch_ckpt
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
test -x "$PY" || { echo "error: no $PY: run make install (or scripts/gpu/setup.sh BUNDLE) first" >&2; exit 2; }
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 UNSLOTH_DISABLE_STATISTICS=1
RESULTS=${OUT:-benchmarks}/results
SHAPES=${SHAPES:-llama-1b qwen3-4b}
REPEATS=${REPEATS:-3}
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PYEOF' || true
import importlib.util
for pkg in ("liger_kernel", "flash_attn", "unsloth"):
    print(f"{pkg}: {'installed' if importlib.util.find_spec(pkg) else 'not installed'}")
PYEOF
for shape in $SHAPES; do
  echo "== $shape"
  "$PY" benchmarks/bench.py --shape "$shape" --repeats "$REPEATS" --out "$RESULTS" "$@" 2>&1 \
    | tee "$RESULTS/$shape.log"
done
