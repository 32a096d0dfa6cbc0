"""Slow tier: sweeps that report ROUGE during training (trial.intermediate=rouge), a config group
searched as a parameter, and a trial the Wilcoxon pruner stops on its per-row ROUGE."""

from __future__ import annotations

import csv
import json

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import ROOT
from tests.e2e.test_sweep_cli import run_sweep, study

pytestmark = pytest.mark.slow

FAST = [  # short rows, no examples in the prompt: seconds a trial on two cores
    "prompt.fewshot.k=0",
    "train.max_length=384",
    "hydra.sweeper.n_jobs=1",
    "hydra.sweeper.report=false",
    "tracking.log_adapter=false",
]


def _queue(tmp_path, *params: dict) -> None:
    url = f"sqlite:///{tmp_path}/optuna.db"
    s = optuna.create_study(study_name="tiny_cpu", storage=url, direction="maximize")
    for p in params:
        s.enqueue_trial(p)


def test_trials_report_rouge_at_each_evaluation_and_search_a_config_group(tmp_path):
    _queue(tmp_path, {"augmentation": "speaker_swap", "lora.r": 8})
    run_sweep(
        tmp_path, *FAST, "hydra.sweeper.n_trials=1", "augmentation=choice(none,speaker_swap)",
        "train.eval_rouge_rows=4", "trial.intermediate=rouge", "trial.pruner.name=median",
    )  # fmt: skip
    (trial,) = study(tmp_path).trials
    assert trial.state == TrialState.COMPLETE
    out = tmp_path / "sweep" / "trial_0000"
    config = (out / "config.yaml").read_text()
    assert "speaker_swap:\n    enabled: true" in config  # the group option this trial drew
    # each evaluation (train.eval_steps=2 of 6 steps) reported the mean rouge_sum of the 4 rows,
    # the very values logged to MLflow by step
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = [r for r in mlflow.search_runs(experiment_names=["summarizer"], output_format="list")
              if r.data.tags.get("optuna.trial") == "0"]  # fmt: skip
    client = mlflow.MlflowClient()
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval_rouge_sum")}
    assert set(trial.intermediate_values) == {2, 4, 6}
    assert trial.intermediate_values == pytest.approx(logged)
    assert len(client.get_metric_history(run.info.run_id, "eval_rouge_seconds")) == 3
    figures = json.loads((out / "train_metrics.json").read_text())
    assert 0 < figures["eval_rouge_seconds_total"] < figures["train_seconds"]
    assert run.data.metrics["aug_rows_generated"] > 0  # speaker_swap really ran


def _constant_summaries(path) -> str:
    """The sample's shortest dialogues, all with one summary: the tiny model learns to write it in
    a few steps, so a trial's per-row ROUGE depends on its settings, not on noise."""
    with open(ROOT / "data" / "samples" / "dialogsum_ko.csv", encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: len(r["dialogue"]))[:40]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "summary": "#Person1# 은 #Person2# 에게 말합니다."} for r in rows)
    return str(path)


def test_the_wilcoxon_pruner_stops_a_trial_worse_row_by_row(tmp_path):
    # Trial 0 writes whole summaries; trial 1 trains the same (same seed, lr, rows) but writes one
    # token, so each of its rows scores below trial 0's at the same evaluation: pruned.
    _queue(tmp_path, {"generate.max_new_tokens": 12}, {"generate.max_new_tokens": 1})
    data = _constant_summaries(tmp_path / "const.csv")
    run_sweep(
        tmp_path, *FAST, "hydra.sweeper.n_trials=2", "generate.max_new_tokens=choice(1,12)",
        f"data.path={data}", "lora.r=32", "train.lr=1e-2", "train.warmup_ratio=0",
        "train.max_steps=8", "train.eval_steps=4", "train.train_rows=32", "train.eval_rows=8",
        "train.eval_rouge_rows=8", "trial.intermediate=rouge", "trial.pruner.name=wilcoxon",
        "trial.pruner.p_threshold=0.1", "trial.pruner.n_startup_steps=8",
        "hydra.sweeper.warm_start=true",  # trial 1 runs in the process started during trial 0
    )  # fmt: skip
    good, bad = study(tmp_path).trials
    assert (good.state, bad.state) == (TrialState.COMPLETE, TrialState.PRUNED)
    # one value per row and evaluation: steps e x 8 + i
    assert set(good.intermediate_values) == set(range(16))
    steps = sorted(bad.intermediate_values)
    assert steps == list(range(len(steps))) and len(steps) % 8 == 0
    last = slice(len(steps) - 8, len(steps))
    assert all(bad.intermediate_values[s] < good.intermediate_values[s] for s in range(16)[last])
    said = (tmp_path / "sweep" / "trial_0001" / "job.log").read_text()
    assert "trial 1 pruned at step" in said and "(eval_rouge_sum " in said
    assert "warm start: libraries imported ahead" in said
    assert "warm start" not in (tmp_path / "sweep" / "trial_0000" / "job.log").read_text()
