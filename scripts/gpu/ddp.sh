#!/usr/bin/env bash
# On a GPU host with 2+ GPUs and no network (issue #9): install the carried wheels (.bench/whl, from
# `make bench-wheels`), then benchmarks/ddp.py on a random-weight ~250M Llama shape (model=tiny made
# bigger: nothing to carry but the repo) and the shipped English sample, without MLflow.
#   bash scripts/gpu/ddp.sh [ddp.py args...]          results: $OUT/ddp (or benchmarks/out/ddp-<time>)
set -euo pipefail
if [ -d .bench/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .bench/whl/*.whl 2>&1 | grep -v "^WARNING: Target directory" || true
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 SUMMARIZER_CACHE=/tmp/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
SHAPE=(model=tiny model.tiny.hidden_size=1024 model.tiny.intermediate_size=4096
       model.tiny.num_hidden_layers=16 model.tiny.num_attention_heads=16
       model.tiny.num_key_value_heads=4 model.tiny.vocab_size=8192
       model.tiny.train_text=data/samples/dialogsum_en.jsonl data=dialogsum_en
       model.dtype=float32 train.lr=1e-4 model.attn_implementation=eager)
# (sdpa: a NaN loss at step 50 in bf16 and in fp32 alike, data-dependent: left-padded rows)
python3 benchmarks/ddp.py ${OUT:+--out "$OUT/ddp"} --no-mlflow "$@" -- "${SHAPE[@]}"
