"""What MLflow's UI shows of a run: the experiment opens on its runs (model training), with a shared
view pinning the headline settings and ROUGE; each run has a description and short-named params."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import mlflow.server
import pytest
from mlflow.tracking import MlflowClient

from summarizer import tracking
from summarizer.config import TrackingConfig


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


PARAMS = {
    "model": {"name": "gemma3_270m"},
    "data": {"name": "dialogsum_ko", "path": "x.csv"},
    "lora": {"r": 16, "alpha": 32},
    "train": {"lr": 2e-4},
    "prompt": {"fewshot": {"k": 1, "selection": "similar"}},
    "augmentation": {"speaker_swap": {"enabled": True}, "back_translation": {"enabled": False}},
}


def test_experiment_opens_on_its_runs_with_pinned_columns(uri):
    url = tracking.runs_url(uri, "exp", "http://127.0.0.1:5000/")
    exp = MlflowClient(uri).get_experiment_by_name("exp")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags[tracking.VIEW_TAG])
    assert "params.`lora.r`" in view["selectedColumns"]
    assert "metrics.`rouge_sum`" in view["selectedColumns"]
    assert url == (
        f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs"
        f"?viewStateShareKey={tracking.VIEW_KEY}"
    )
    # The kind's value is one the installed UI knows.
    js = Path(mlflow.server.__file__).parent / "js" / "build" / "static" / "js"
    assert any('"custom_model_development"' in f.read_text() for f in js.glob("main*.js"))


def test_a_run_has_a_description_and_headline_params(uri, tmp_path):
    cfg = TrackingConfig(uri=uri, experiment="exp")
    tags = {"output_dir": str(tmp_path), "optuna.study": "s", "optuna.trial": "3"}
    with tracking.run(cfg, uri, "r", PARAMS, tags) as active:
        tracking.log_metrics({"rouge_sum": 12.5})
    run = MlflowClient(uri).get_run(active.info.run_id)
    p = run.data.params
    assert p["model"] == "gemma3_270m" and p["data"] == "dialogsum_ko"
    assert p["lora.r"] == "16" and p["lora.alpha"] == "32" and p["train.lr"] == "0.0002"
    assert p["prompt.fewshot.k"] == "1" and p["selection"] == "similar"
    assert p["augmentation"] == "speaker_swap"
    assert p["data.path"] == "x.csv"  # the full config stays
    note = run.data.tags["mlflow.note.content"]
    assert "gemma3_270m on dialogsum_ko" in note and "r=16" in note and "trial 3" in note
    assert run.data.metrics["rouge_sum"] == 12.5


def test_a_sweep_has_a_view_of_its_parent_and_trials(uri):
    parent = tracking.parent_run(uri, "exp", "s", "sqlite:///o.db", "id1")
    exp = MlflowClient(uri).get_experiment_by_name("exp")
    view = json.loads(exp.tags["mlflow.sharedViewState.sweep-s"])
    assert view["searchFilter"] == "attributes.run_name LIKE '%s%'"
    assert "metrics.`rouge_sum`" in view["selectedColumns"]
    tags = MlflowClient(uri).get_run(parent).data.tags
    assert tags["sweep.view"] == f"#/experiments/{exp.experiment_id}/runs?viewStateShareKey=sweep-s"
    assert tracking.parent_run(uri, "exp", "s", "sqlite:///o.db", "id1") == parent
    mlflow.end_run()
