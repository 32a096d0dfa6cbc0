#!/usr/bin/env bash
# On the GPU machine, once per arriving piece: `bash scripts/gpu/setup.sh .gpu/pN [last]`.
# Wheels go to /tmp/site, data to /tmp/data, GGUF pieces to /tmp/gguf; `last` assembles
# gemma-3-270m-q4_k_m.gguf and checks its sha256.
set -euo pipefail
piece=$1
mkdir -p /tmp/gguf /tmp/data
if [ -d "$piece/whl" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$piece"/whl/*.whl
fi
if [ -d "$piece/data" ]; then cp "$piece"/data/* /tmp/data/; fi
if [ -f "$piece/gguf.sha256" ]; then cp "$piece/gguf.sha256" /tmp/gguf/; fi
if [ -d "$piece/tok" ]; then
  gunzip -c "$piece/tok/tokenizer.json.gz" > /tmp/gguf/tokenizer.json
  cp "$piece/tok/tokenizer_config.json" /tmp/gguf/
fi
cp "$piece"/gguf.[0-9]* /tmp/gguf/
ls /tmp/gguf
if [ "${2:-}" = "last" ]; then
  cat /tmp/gguf/gguf.[0-9]* > /tmp/gguf/gemma-3-270m-q4_k_m.gguf
  echo "$(cat /tmp/gguf/gguf.sha256)  /tmp/gguf/gemma-3-270m-q4_k_m.gguf" | sha256sum -c
  rm /tmp/gguf/gguf.[0-9]*
fi
