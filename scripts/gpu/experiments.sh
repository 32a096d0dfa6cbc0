#!/usr/bin/env bash
# On the GPU machine after setup.sh: `bash scripts/gpu/experiments.sh ko|en baselines|sweep N|submit|collect`.
# Runs go to /tmp/runs; `collect` packs them (small files) into $OUT/results.tgz.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SUMMARIZER_CACHE=/tmp/cache HF_HUB_OFFLINE=1
lang=$1; what=$2
if [ "$lang" = ko ]; then
  DATA=(data=dialogsum_ko data.path=/tmp/data/ko_dev.csv data.test_path=/tmp/data/ko_test.csv)
else
  DATA=(data=dialogsum_en data.path=/tmp/data/en_dev.jsonl)
fi
COMMON=(model.gguf_path=/tmp/gguf/gemma-3-270m-q4_k_m.gguf quant=none tracking.enabled=false
        generate.batch_size=32 generate.max_new_tokens=96)
STORE=sqlite:////tmp/runs/optuna.db
mkdir -p /tmp/runs
case $what in
  baselines)  # the base model without training: zero-shot, 1-shot and 3-shot (most similar examples)
    for k in 0 1 3; do
      python3 -m summarizer "${COMMON[@]}" "${DATA[@]}" stages.train=false train.max_length=4096 \
        prompt.fewshot.k=$k prompt.fewshot.selection=similar prompt.fewshot.max_chars=1024 \
        hydra.run.dir=/tmp/runs/base_${lang}_k$k 2>&1 | grep -E "ROUGE|error|Error" ;
    done ;;
  sweep)
    timeout -s INT "${4:-540}" python3 -m summarizer --multirun sweep=gemma "${COMMON[@]}" "${DATA[@]}" \
      hydra.sweeper.storage=$STORE hydra.sweep.dir=/tmp/runs/gemma_$lang hydra.sweeper.n_trials=$3 \
      "hydra.sweeper.gpus=[0,0,0]" 2>&1 | grep -E "HYDRA\]|rror" ;;
  submit)  # the best trial's adapter and prompt settings, through the pipeline, on test.csv
    best=$(python3 - <<PYEOF
import optuna
s = optuna.load_study(study_name="gemma_dialogsum_$lang", storage="$STORE")
b = s.best_trial
print(b.user_attrs["overrides"], "adapter=" + b.user_attrs["output_dir"] + "/adapter")
PYEOF
)
    echo "best: $best"
    # shellcheck disable=SC2086
    python3 -m summarizer "${COMMON[@]}" "${DATA[@]}" $best stages.train=false stages.predict_test=true \
      train.max_length=2048 hydra.run.dir=/tmp/runs/submit_$lang 2>&1 | grep -E "ROUGE|submission|rror" ;;
  collect)
    cd /tmp/runs && tar czf "$OUT/results.tgz" --exclude='adapter' --exclude='checkpoints' \
      --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' . && ls -la "$OUT" ;;
esac
