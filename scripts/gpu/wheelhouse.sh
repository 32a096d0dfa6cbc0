#!/usr/bin/env bash
# `make wheelhouse`, on a machine with network: every wheel the GPU machine installs, for its
# platform and Python, into WHEELHOUSE (then `make bundle`, or copy the folder as it is).
#   PLATFORM  pip platform tag of the GPU machine (default manylinux_2_28_x86_64; older
#             manylinux tags are accepted too)
#   PYTHON    its Python, major.minor (default 3.11, the tested one)
#   LOCK      constraints for the packages requirements.txt leaves open; default: this
#             machine's .venv as `make install` set it up (the tested set); LOCK=none: resolve fresh
#   TORCH_INDEX  an extra index for torch, e.g. https://download.pytorch.org/whl/cu130 (PyPI's
#             Linux torch is already a CUDA build)
#   ALLOW_CPU_TORCH=1  accept a CPU-only torch (a wheelhouse for a CPU machine)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
test -x "$PY" || PY=python3
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
PYTHON=${PYTHON:-3.11}
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
LOCK=${LOCK:-}
# Pure-Python packages PyPI has as sources only: built into wheels here, they install anywhere.
SDIST_ONLY=${SDIST_ONLY:-antlr4-python3-runtime==4.9.3 rouge_score==0.1.2}

[[ $PYTHON =~ ^3\.[0-9]+$ ]] || { echo "error: PYTHON=$PYTHON: expected a version like 3.11" >&2; exit 2; }
# pip takes the platform tags literally: list the older manylinux ones the machine also runs.
TAGS=(--platform "$PLATFORM")
if [[ $PLATFORM =~ ^manylinux_2_([0-9]+)_(.+)$ ]]; then
  glibc=${BASH_REMATCH[1]} arch=${BASH_REMATCH[2]}
  for ((n = glibc - 1; n >= 5; n--)); do TAGS+=(--platform "manylinux_2_${n}_$arch"); done
  ((glibc >= 17)) && TAGS+=(--platform "manylinux2014_$arch")
  ((glibc >= 12)) && TAGS+=(--platform "manylinux2010_$arch")
  TAGS+=(--platform "manylinux1_$arch")
fi
abi=cp${PYTHON/./}
TAGS+=(--python-version "$PYTHON" --implementation cp --abi "$abi" --abi abi3 --abi none)

mkdir -p "$WHEELHOUSE"
# shellcheck disable=SC2086
"$PY" -m pip wheel -q --no-deps -w "$WHEELHOUSE" $SDIST_ONLY

CONSTRAINTS=()
if [ "$LOCK" = none ]; then
  :
elif [ -n "$LOCK" ]; then
  CONSTRAINTS=(-c "$LOCK")
elif [ -x .venv/bin/python ]; then
  # Exact pins only; a local label (torch 2.13.0+cpu) dropped so the target's build matches.
  .venv/bin/python -m pip freeze --all --exclude-editable \
    | grep -E '^[A-Za-z0-9._-]+==' | sed -E 's/\+[A-Za-z0-9.]+$//' > "$WHEELHOUSE/constraints.txt"
  CONSTRAINTS=(-c "$WHEELHOUSE/constraints.txt")
fi

echo "wheels for Python $PYTHON on $PLATFORM into $WHEELHOUSE (the CUDA torch is a few GB)"
if ! "$PY" -m pip download -q --only-binary=:all: "${TAGS[@]}" -d "$WHEELHOUSE" \
    --find-links "$WHEELHOUSE" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "${CONSTRAINTS[@]}" \
    -r requirements.txt -r scripts/gpu/requirements-gpu.txt pip setuptools; then
  echo "error: pip download failed; a package with no wheel for this platform and Python that is" \
    "pure Python can be built here: SDIST_ONLY=\"$SDIST_ONLY <name>==<version>\"" >&2
  exit 1
fi
"$PY" -m pip download -q --no-deps --only-binary=:all: "${TAGS[@]}" -d "$WHEELHOUSE" \
  --find-links "$WHEELHOUSE" -r requirements-nodeps.txt

shopt -s nullglob
torch=("$WHEELHOUSE"/torch-*.whl)
if [ ${#torch[@]} -eq 0 ]; then
  echo "error: no torch wheel in $WHEELHOUSE" >&2; exit 1
fi
for w in "${torch[@]}"; do
  if [[ $(basename "$w") == *+cpu* ]] && [ "${ALLOW_CPU_TORCH:-}" != 1 ]; then
    echo "error: $(basename "$w") is a CPU-only build (from a find-links folder or index in your pip" \
      "configuration?); remove it and run again with PIP_CONFIG_FILE=/dev/null, or set" \
      "TORCH_INDEX=https://download.pytorch.org/whl/cu130; ALLOW_CPU_TORCH=1 keeps it" >&2
    exit 1
  fi
done
printf 'PYTHON=%s\nPLATFORM=%s\n' "$PYTHON" "$PLATFORM" > "$WHEELHOUSE/TARGET"  # read by setup.sh
echo "$WHEELHOUSE: $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
