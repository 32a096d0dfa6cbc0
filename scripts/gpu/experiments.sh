#!/usr/bin/env bash
# The seed experiments on a GPU machine after `make install` (or scripts/gpu/setup.sh offline):
#   bash scripts/gpu/experiments.sh ko|en baselines|sweep N [seconds]|submit|collect
# Data: KO_DEV, KO_TEST, EN_DEV (default: DATA_DIR/dev.csv, test.csv, dev.jsonl; DATA_DIR defaults
# to the unpacked bundle's data folder). Runs go to RUNS (default outputs/gpu-experiments);
# `collect` packs their small files into ${OUT:-.}/results.tgz. GPUS: the sweep's workers.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
lang=$1; what=$2
DATA_DIR=${DATA_DIR:-bundle/unpacked/data}
RUNS=$(mkdir -p "${RUNS:-outputs/gpu-experiments}" && cd "${RUNS:-outputs/gpu-experiments}" && pwd)
if [ "$lang" = ko ]; then
  DATA=(data=dialogsum_ko "data.path=${KO_DEV:-$DATA_DIR/dev.csv}" "data.test_path=${KO_TEST:-$DATA_DIR/test.csv}")
else
  DATA=(data=dialogsum_en "data.path=${EN_DEV:-$DATA_DIR/dev.jsonl}")
fi
COMMON=(quant=none tracking.enabled=false generate.batch_size=32 generate.max_new_tokens=96)
STORE=sqlite:///$RUNS/optuna.db
case $what in
  baselines)  # the base model without training: zero-shot, 1-shot and 3-shot (most similar examples)
    for k in 0 1 3; do
      "$PY" -m summarizer "${COMMON[@]}" "${DATA[@]}" stages.train=false train.max_length=4096 \
        prompt.fewshot.k=$k prompt.fewshot.selection=similar prompt.fewshot.max_chars=1024 \
        hydra.run.dir=$RUNS/base_${lang}_k$k 2>&1 | grep -E "ROUGE|error|Error" ;
    done ;;
  sweep)
    timeout -s INT "${4:-540}" "$PY" -m summarizer --multirun sweep=gemma "${COMMON[@]}" "${DATA[@]}" \
      hydra.sweeper.storage=$STORE hydra.sweep.dir=$RUNS/gemma_$lang hydra.sweeper.n_trials=$3 \
      "hydra.sweeper.gpus=${GPUS:-[0,0,0]}" 2>&1 | grep -E "HYDRA\]|rror" ;;
  submit)  # the best trial's adapter and prompt settings, through the pipeline, on test.csv
    best=$("$PY" - <<PYEOF
import optuna
s = optuna.load_study(study_name="gemma_dialogsum_$lang", storage="$STORE")
b = s.best_trial
print(b.user_attrs["overrides"], "adapter=" + b.user_attrs["output_dir"] + "/adapter")
PYEOF
)
    echo "best: $best"
    # shellcheck disable=SC2086
    "$PY" -m summarizer "${COMMON[@]}" "${DATA[@]}" $best stages.train=false stages.predict_test=true \
      train.max_length=2048 hydra.run.dir=$RUNS/submit_$lang 2>&1 | grep -E "ROUGE|submission|rror" ;;
  collect)
    out=$(cd "${OUT:-.}" && pwd)
    cd "$RUNS" && tar czf "$out/results.tgz" --exclude='adapter' --exclude='checkpoints' \
      --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' . && ls -la "$out/results.tgz" ;;
esac
