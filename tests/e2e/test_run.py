"""Slow tier: the real command line on the tiny model — train, generate, score, MLflow, submission."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import mlflow
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

TINY = [
    "model=tiny",
    "quant=none",
    "train=debug",
    "train.max_steps=3",
    "train.eval_steps=3",
    "train.save_steps=3",
    "train.max_length=384",
    "generate.max_new_tokens=8",
    "stages.predict_test=true",
]


def run_cli(tmp_path, name: str, *overrides: str, env: dict | None = None):
    """`python -m summarizer` in a subprocess: output in tmp_path/name, MLflow in tmp_path."""
    full_env = {
        k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")
    }
    full_env.update(SUMMARIZER_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", **(env or {}))
    cmd = [
        sys.executable,
        "-m",
        "summarizer",
        *overrides,
        f"hydra.run.dir={tmp_path / name}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)


def runs(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow.search_runs(
        experiment_names=["summarizer"], output_format="list", order_by=["start_time ASC"]
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    proc = run_cli(tmp, "train", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def test_train_generate_score_and_log(trained):
    out = trained / "train"
    assert (out / "adapter" / "adapter_config.json").is_file()
    preds = list(csv.DictReader(open(out / "predictions.csv", encoding="utf-8")))
    assert len(preds) == 10 and set(preds[0]) == {"fname", "prediction", "reference"}
    with open(out / "submission.csv", encoding="utf-8") as f:
        sub = list(csv.reader(f))
    assert sub[0] == ["", "fname", "summary"] and len(sub) == 21 and sub[1][:2] == ["0", "test_0"]
    (run,) = runs(trained)
    assert run.info.status == "FINISHED"
    for key in (
        "rouge1",
        "rouge2",
        "rougeL",
        "rouge_sum",
        "final",
        "final_train_loss_avg",
        "eval_loss",
    ):
        assert key in run.data.metrics, key
    assert run.data.params["lora.r"] == "16" and run.data.params["model.name"] == "tiny"
    # the same training figures beside the run, for tools without MLflow (benchmarks/ddp.py)
    figures = json.loads((out / "train_metrics.json").read_text())
    assert figures["train_loss_avg"] == run.data.metrics["final_train_loss_avg"]
    assert run.data.tags["choice.model"] == "tiny"
    client = mlflow.MlflowClient()
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "predictions.csv", "submission.csv", "config.yaml", "split.json"} <= top
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_config.json" in adapter


def test_evaluate_a_saved_adapter_reproduces_the_scores(trained):
    proc = run_cli(
        trained,
        "eval",
        *TINY,
        "stages.train=false",
        f"adapter={trained / 'train' / 'adapter'}",
        "stages.predict_test=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = runs(trained)[:2]
    assert second.data.metrics["rouge_sum"] == pytest.approx(first.data.metrics["rouge_sum"])
    assert (trained / "train" / "predictions.csv").read_text() == (
        trained / "eval" / "predictions.csv"
    ).read_text()


def test_user_errors_are_one_line_and_fail_the_run(tmp_path):
    proc = run_cli(tmp_path, "missing", *TINY, "data.path=nowhere.csv")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: data file not found: nowhere.csv"

    proc = run_cli(tmp_path, "badlr", *TINY, "train.lr=-0.1")
    assert (
        proc.returncode == 2 and "train.lr=-0.1 must be > 0" in proc.stderr.strip().splitlines()[-1]
    )
    # rejected in preflight, before anything was made: no MLflow run, no run folder left
    assert runs(tmp_path) == [] and not (tmp_path / "badlr").exists()


def test_gpu_preset_on_cpu_fails_fast(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = run_cli(tmp_path, "solar", "model=solar", "lora.r=32")
    assert proc.returncode == 2
    assert "model=solar needs a CUDA GPU" in proc.stderr.strip().splitlines()[-1]


def test_merge_gives_the_same_model(trained, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from summarizer.cli.merge import merge
    from summarizer.errors import UserError
    from summarizer.model import build_model, load_adapter

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SUMMARIZER_CACHE", str(trained / "cache"))
    adapter = trained / "train" / "adapter"
    out = merge(adapter, trained / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out)
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(trained / "train" / "config.yaml")
    from summarizer.config import ModelConfig, QuantConfig

    base, tok = build_model(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model),
        QuantConfig(),
        str(trained / "cache"),
    )
    peft = load_adapter(base, str(adapter))
    ids = tok("#Person1#: 안녕하세요", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-4)
        with peft.disable_adapter():  # training moved the weights: merging is not a no-op
            assert not torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-6)
    with pytest.raises(UserError, match="already exists"):
        merge(adapter, out)


@pytest.fixture
def predict_main(trained, monkeypatch, capsys):
    """`python -m summarizer.cli.predict <argv>` in this process (its main, as the command runs
    it; the model loads in a second instead of a new interpreter's imports): (exit code, stdout,
    stderr). `stdin` is what the command reads for `--input -`."""
    from summarizer.cli.predict import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SUMMARIZER_CACHE", str(trained / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_predict_cli_matches_the_pipeline_submission(trained, predict_main):
    out = trained / "predict.csv"
    env = {**os.environ, "SUMMARIZER_CACHE": str(trained / "cache"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "summarizer.cli.predict", str(trained / "train")]
    sample = ROOT / "data" / "samples" / "dialogsum_ko_test.csv"
    proc = subprocess.run(
        [*cmd, "--input", str(sample), "--output", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Same adapter, same prompts, greedy: the same summaries as the run's own submission.
    assert out.read_text(encoding="utf-8") == (trained / "train" / "submission.csv").read_text(
        encoding="utf-8"
    )
    run = str(trained / "train")
    code, _, err = predict_main(run, "--input", str(sample), "--output", str(out))
    assert code == 2 and "already exists" in err.strip().splitlines()[-1]
    code, said, err = predict_main(
        run, "--input", "-", stdin="#Person1#: 안녕하세요.\n#Person2#: 네, 안녕하세요."
    )
    assert code == 0 and len(said.strip().splitlines()) <= 1, err[-2000:]


def test_mbr_in_the_pipeline_and_in_predict(trained, predict_main):
    """generate.strategy=mbr end to end (the static sampler, run on CPU without a graph): the run
    scores and submits, and predict with the run's config writes the same summaries (seeded)."""
    adapter = trained / "train" / "adapter"
    proc = run_cli(
        trained,
        "mbr",
        *TINY,
        "stages.train=false",
        f"adapter={adapter}",
        "generate.strategy=mbr",
        "generate.mbr.candidates=3",
        "generate.static_decode=true",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "candidates per dialogue" in proc.stdout + proc.stderr
    run = next(r for r in runs(trained) if r.data.tags.get("output_dir", "").endswith("mbr"))
    assert run.data.params["generate.strategy"] == "mbr"
    assert run.data.metrics["generate_seconds_per_row"] > 0 and "rouge_sum" in run.data.metrics
    preds = list(csv.DictReader(open(trained / "mbr" / "predictions.csv", encoding="utf-8")))
    assert len(preds) == 10
    out = trained / "mbr_predict.csv"
    sample = ROOT / "data" / "samples" / "dialogsum_ko_test.csv"
    cmd = [str(trained / "mbr"), "--adapter", str(adapter), "--input", str(sample)]
    code, _, err = predict_main(*cmd, "--output", str(out))
    assert code == 0, err[-2000:]
    assert out.read_text(encoding="utf-8") == (trained / "mbr" / "submission.csv").read_text(
        encoding="utf-8"
    )
    code, _, err = predict_main(*cmd, "--output", f"{out}2", "--mbr-candidates", "1")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: generate.mbr.candidates=1")
