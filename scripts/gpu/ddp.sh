#!/usr/bin/env bash
# On a host with 2+ GPUs after `make install` (or scripts/gpu/setup.sh offline): benchmarks/ddp.py
# on a random-weight ~250M Llama shape (model=tiny made bigger: no model to download or carry) and
# the shipped English sample, without MLflow.
#   bash scripts/gpu/ddp.sh [ddp.py args...]          results: $OUT/ddp (or benchmarks/out/ddp-<time>)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
test -x "$PY" || { echo "error: no $PY: run make install (or scripts/gpu/setup.sh BUNDLE) first" >&2; exit 2; }
PATH=$(cd "$(dirname "$PY")" && pwd):$PATH  # the runs' python and torchrun: the venv's
export PATH
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
SHAPE=(model=tiny model.tiny.hidden_size=1024 model.tiny.intermediate_size=4096
       model.tiny.num_hidden_layers=16 model.tiny.num_attention_heads=16
       model.tiny.num_key_value_heads=4 model.tiny.vocab_size=8192
       model.tiny.train_text=data/samples/dialogsum_en.jsonl data=dialogsum_en
       model.dtype=float32 train.lr=1e-4 model.attn_implementation=eager)
# (sdpa: a NaN loss at step 50 in bf16 and in fp32 alike, data-dependent: left-padded rows)
"$PY" benchmarks/ddp.py ${OUT:+--out "$OUT/ddp"} --no-mlflow "$@" -- "${SHAPE[@]}"
