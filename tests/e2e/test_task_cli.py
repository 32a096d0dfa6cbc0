"""Slow tier: task=question_decomposition on the real command line with the tiny model — trains,
generates numbered lists, scores ROUGE and sub-question count accuracy, logs them to MLflow; predict
rebuilds the run's prompts and stop rule from its saved config. (A 2-trial `sweep=tiny_cpu` on the
task takes about two minutes here, over this tier's budget; sweep trials run this same command.)"""

from __future__ import annotations

import csv
import json

import pytest

from summarizer import data
from summarizer.cli.predict import predict, run_config
from summarizer.lists import count_items
from summarizer.metrics import subq_count
from tests.conftest import ROOT
from tests.e2e.test_run import run_cli, runs

pytestmark = pytest.mark.slow

QD = [
    "task=question_decomposition",
    "model=tiny",
    "quant=none",
    "train=debug",
    "train.max_steps=3",
    "train.eval_steps=3",
    "train.save_steps=3",
    "train.max_length=384",
    "generate.max_new_tokens=12",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qd")
    proc = run_cli(tmp, "train", *QD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def test_question_decomposition_trains_scores_and_logs(trained):
    out = trained / "train"
    with open(out / "predictions.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # The Korean sample's 10 held-out questions; list-valued targets were numbered on load.
    assert len(rows) == 10 and all(r["fname"].startswith("qd_ko_") for r in rows)
    assert all(r["reference"].startswith("1. ") and count_items(r["reference"]) >= 2 for r in rows)
    expected = subq_count([r["prediction"] for r in rows], [r["reference"] for r in rows])

    (run,) = runs(trained)
    assert run.info.status == "FINISHED"
    for key in ("rouge1", "rouge2", "rougeL", "rouge_sum", "final", "eval_loss"):
        assert key in run.data.metrics, key
    for key, value in expected.items():
        assert run.data.metrics[key] == pytest.approx(value), key
    assert run.data.tags["choice.task"] == "question_decomposition"
    params = run.data.params
    assert params["task.name"] == "question_decomposition"
    assert (params["data.dialogue_column"], params["data.summary_column"]) == (
        "question",
        "sub_questions",
    )
    assert params["generate.stop_at_blank_line"] == "True"
    assert params["prompt.output_label.ko"] == "하위 질문:"
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert result["value"] == pytest.approx(run.data.metrics["rouge_sum"])
    assert result["metrics"]["subq_count_acc"] == pytest.approx(expected["subq_count_acc"])


def test_predict_rebuilds_the_task_from_the_run(trained, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SUMMARIZER_CACHE", str(trained / "cache"))
    out = trained / "train"
    cfg = run_config(out)
    assert cfg.task.name == "question_decomposition" and cfg.generate.stop_at_blank_line
    with open(out / "predictions.csv", encoding="utf-8") as f:
        saved = {r["fname"]: r["prediction"] for r in csv.DictReader(f)}
    rows = [ex for ex in data.load(cfg.data) if ex.id in saved]
    assert predict(out, rows) == [saved[ex.id] for ex in rows]
