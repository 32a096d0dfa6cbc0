#!/usr/bin/env bash
# On the GPU machine (make bench runs it there): install the carried wheels, then the benchmark.
#   bash scripts/gpu/bench.sh [bench.py args...]     results: $OUT/results (or benchmarks/results)
# Wheels: `bash ../shared/tools/gpu-wheels.sh .bench/whl transformers==5.23.0 tokenizers==0.23.3 \
#   huggingface_hub==1.33.0 hydra-core==1.3.8 omegaconf==2.3.0 xxhash==4.1.0` + antlr4 (make bench-wheels)
set -euo pipefail
if [ -d .bench/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .bench/whl/*.whl 2>&1 | grep -v "^WARNING: Target directory" || true
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
RESULTS=${OUT:-benchmarks}/results
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/bench.py --out "$RESULTS" "$@"
