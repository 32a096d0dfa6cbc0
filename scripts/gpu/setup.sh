#!/usr/bin/env bash
# On a GPU machine without network, in a copy of the repository (or `make install-offline`):
#   bash scripts/gpu/setup.sh BUNDLE [-- command ...]
# BUNDLE: the folder `make bundle` wrote (pieces + MANIFEST.sha256: checked, joined and unpacked
# into BUNDLE/unpacked, or UNPACK=<folder>), an unpacked one, or a plain wheelhouse folder.
# Installs .venv from those wheels only (pinned requirements + GPU extras, pip --no-index), puts
# the model copies into the caches, and marks the install done for `make`, so `make bench`,
# `make sweep` ... run without reinstalling. A command after `--` runs next, offline.
#   PYTHON_BIN  the interpreter for .venv (default python3; its version must be the wheels')
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { sed -n 2,9p "$0"; exit 2; }
src=${1%/}
shift
[ "${1:-}" = "--" ] && shift
PYTHON_BIN=${PYTHON_BIN:-python3}
VENV=${VENV:-.venv}
CACHE=${SUMMARIZER_CACHE:-$HOME/.cache/summarizer}
HUB=${HF_HUB_CACHE:-${HF_HOME:-$HOME/.cache/huggingface}/hub}

if [ -f "$src/MANIFEST.sha256" ]; then
  root=${UNPACK:-$src/unpacked}
  "$PYTHON_BIN" scripts/gpu/bundle.py unpack "$src" --to "$root"
  wheels=$root/wheelhouse
elif [ -d "$src/wheelhouse" ]; then
  root=$src wheels=$src/wheelhouse
elif compgen -G "$src/*.whl" >/dev/null; then
  root="" wheels=$src
else
  echo "error: $src: neither bundle pieces (MANIFEST.sha256) nor a wheelhouse" >&2
  exit 2
fi

want=$(sed -n 's/^PYTHON=//p' "$wheels/TARGET" 2>/dev/null || true)
have=$("$PYTHON_BIN" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ -n "$want" ] && [ "$want" != "$have" ]; then
  echo "error: the wheels are for Python $want and $PYTHON_BIN is $have: PYTHON_BIN=python$want," \
    "or on the connected machine make wheelhouse PYTHON=$have" >&2
  exit 2
fi

test -x "$VENV/bin/python" || "$PYTHON_BIN" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --no-index --find-links "$wheels")
"${PIP[@]}" --upgrade pip
"${PIP[@]}" -r requirements.txt -r scripts/gpu/requirements-gpu.txt
"${PIP[@]}" --no-deps -r requirements-nodeps.txt
"${PIP[@]}" --no-deps -e .
# The Makefile's STAMP and GPU_STAMP names: `make` then sees this install as its own.
hash8() { cat "$@" | sha1sum | cut -c1-8; }
rm -f "$VENV"/.installed-*
touch "$VENV/.installed-$(hash8 requirements.txt requirements-nodeps.txt)"
touch "$VENV/.installed-gpu-$(hash8 requirements.txt requirements-nodeps.txt scripts/gpu/requirements-gpu.txt)"

# Model copies: an existing one is kept (same name, same source file).
place() {
  shopt -s nullglob
  mkdir -p "$2"
  for d in "$1"/*/; do
    [ -e "$2/$(basename "$d")" ] || cp -a "${d%/}" "$2/"
    echo "model: $2/$(basename "$d")"
  done
}
[ -z "$root" ] || root=$(cd "$root" && pwd)  # absolute: runs may change directory
if [ -n "$root" ] && [ -d "$root/models" ]; then place "$root/models" "$CACHE/models"; fi
if [ -n "$root" ] && [ -d "$root/hub" ]; then place "$root/hub" "$HUB"; fi
if [ -n "$root" ] && [ -d "$root/data" ]; then
  echo "data: $root/data ($(ls "$root/data" | tr '\n' ' ')), e.g. data.path=$root/data/$(ls "$root/data" | head -1)"
fi

"$VENV/bin/python" - <<'PYEOF'
import importlib.util

import torch

n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {n} GPU(s) visible")
if not n:
    print("warning: torch sees no CUDA GPU (driver, CUDA_VISIBLE_DEVICES, or a CPU-only wheel)")
for pkg in ("bitsandbytes", "liger_kernel"):
    if importlib.util.find_spec(pkg) is None:
        print(f"warning: {pkg} is not installed")
PYEOF
export HF_HUB_OFFLINE=1
echo "installed into $VENV; in a new shell: export HF_HUB_OFFLINE=1 (nothing to download from)"
if [ $# -gt 0 ]; then
  PATH=$PWD/$VENV/bin:$PATH exec "$@"
fi
