"""Slow tier: the real command line with augmentation on the tiny model — the enlarged training set
is trained on and counted in MLflow; paraphrase through a real local chat-completions server, a
rerun that sends nothing, and a planted API key that reaches no param, tag, artifact, log or file."""

from __future__ import annotations

import json
import os
import subprocess

import mlflow
import pytest

from summarizer import data
from tests.conftest import SAMPLE_KO
from tests.e2e import test_run as e2e
from tests.e2e.test_run import runs
from tests.unit.test_augment_api import ChatServer, reverse_words
from tests.unit.test_data import cfg as data_cfg

pytestmark = pytest.mark.slow

PLANTED = "sk-test-PLANTED-7f3a9c"
TINY = [
    "model=tiny",
    "quant=none",
    "train=debug",  # 50 training rows, 10 validation rows
    "train.max_steps=3",
    "train.max_length=1024",
    "stages.evaluate=false",  # generation and ROUGE are tests/e2e/test_run.py's business
    "tracking.log_adapter=false",
]
AUGMENT_ONLY = ["stages.train=false"]  # reruns: augmentation and MLflow only


def run_cli(tmp_path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {"NO_PROXY": "127.0.0.1,localhost", "UPSTAGE_API_KEY": PLANTED}
    return e2e.run_cli(tmp_path, name, *TINY, *overrides, env=env)


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.close()


def test_speaker_swap_and_instruction_variants_train_on_the_enlarged_set(tmp_path):
    # Epoch-based length: the number of optimizer steps shows how many rows the trainer got
    # (ceil(0.05 x 50 rows / batch 2) = 2 steps without augmentation).
    epochs = ["train.max_steps=-1", "train.epochs=0.05", "train.eval_strategy=no"]
    epochs += ["train.early_stopping_patience=0", "train.save_steps=1000"]
    proc = run_cli(tmp_path, "aug", *epochs, "augmentation=[speaker_swap,instruction_variants]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "augmentation speaker_swap+instruction_variants: 50 training rows + 150 generated" in (
        proc.stderr + proc.stdout
    )
    (aug,) = runs(tmp_path)
    m = aug.data.metrics
    assert (m["aug_rows_before"], m["aug_rows_generated"], m["aug_rows_kept"]) == (50, 150, 150)
    assert m["aug_rows_after"] == 200 and m["aug_kept_speaker_swap"] == 50
    assert m["final_train_steps"] >= 5  # ceil(0.05 x 200 rows / batch 2)
    assert aug.data.params["augmentation.speaker_swap.enabled"] == "True"
    assert aug.data.params["augmentation.paraphrase.enabled"] == "False"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(aug.info.run_id)}
    assert "augmentation_sample.csv" in artifacts
    split = json.loads((tmp_path / "aug" / "split.json").read_text())
    assert len(split["train"]) == 50 and not set(split["train"]) & set(split["validation"])


def test_paraphrase_through_a_local_server_rerun_sends_nothing_and_the_key_stays_secret(
    tmp_path, server
):
    api = [f"augmentation.api.base_url={server.url}", "augmentation.api.retry_wait=0.01"]
    api += ["augmentation.api.requests_per_minute=0"]  # the default 60/min would take 50 s
    proc = run_cli(tmp_path, "para", "augmentation=paraphrase", *api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(server.requests) == 50
    assert {r["auth"] for r in server.requests} == {f"Bearer {PLANTED}"}

    # Only training dialogues were sent; none of validation.
    split = json.loads((tmp_path / "para" / "split.json").read_text())
    by_id = {ex.id: ex for ex in data.load(data_cfg(SAMPLE_KO))}
    sent = set(server.texts())
    assert sent == {by_id[i].dialogue for i in split["train"]}
    assert not sent & {by_id[i].dialogue for i in split["validation"]}

    (run,) = runs(tmp_path)
    m = run.data.metrics
    assert m["aug_api_requests"] == 50 and m["aug_rows_generated"] == 50
    assert m["aug_rows_kept"] >= 45 and m["aug_rows_after"] == 50 + m["aug_rows_kept"]
    assert run.data.params["augmentation.api.key_env"] == "UPSTAGE_API_KEY"
    sample = (tmp_path / "para" / "augmentation_sample.csv").read_text("utf-8")
    first = by_id[split["train"][0]]
    assert reverse_words(first.dialogue).split("\n")[0] in sample

    # The same config again: the set is reused, zero requests. Another config that shares the
    # paraphrases (speaker swap added): a new set, still zero requests (the reply cache).
    proc = run_cli(tmp_path, "again", "augmentation=paraphrase", *api, *AUGMENT_ONLY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc2 = run_cli(
        tmp_path, "combo", "augmentation=[paraphrase,speaker_swap]", *api, *AUGMENT_ONLY
    )
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert len(server.requests) == 50
    _, again, combo = runs(tmp_path)
    assert again.data.metrics["aug_set_reused"] == 1 and again.data.metrics["aug_api_requests"] == 0
    assert combo.data.metrics["aug_set_reused"] == 0 and combo.data.metrics["aug_api_requests"] == 0
    assert combo.data.metrics["aug_replies_cached"] == 50

    # The planted key: in no MLflow param, tag, metric name or artifact, no file of the runs or
    # the caches, no output of the processes, not even in the tracking database's bytes.
    client = mlflow.MlflowClient()
    for r in runs(tmp_path):
        assert PLANTED not in json.dumps(
            [r.data.params, r.data.tags, list(r.data.metrics)], ensure_ascii=False
        )
        folder = client.download_artifacts(r.info.run_id, "", str(tmp_path / f"dl-{r.info.run_id}"))
        assert os.listdir(folder)
    for p in [proc, proc2]:
        assert PLANTED not in p.stdout + p.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(".hydra" in str(p) for p in files)
    for path in files:
        assert PLANTED.encode() not in path.read_bytes(), path


def test_a_rejected_key_is_one_line_without_the_key(tmp_path, server):
    server.default = 401
    proc = run_cli(
        tmp_path, "bad", "augmentation=paraphrase", f"augmentation.api.base_url={server.url}"
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: augmentation.api: ") and "rejected the API key (HTTP 401" in last
    assert "UPSTAGE_API_KEY" in last and "replies are cached" in last
    assert PLANTED not in proc.stdout + proc.stderr
