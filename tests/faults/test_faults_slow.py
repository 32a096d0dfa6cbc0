"""Fault suite, slow tier: the real command line on the tiny model, killed with SIGKILL in the middle
of training and resumed (the same figures as a run never interrupted, one MLflow run), a corrupt
checkpoint refused by name, an API key planted in `.env` found nowhere afterwards."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import time

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, SAMPLE_KO
from tests.faults.helpers import assert_kept, digest, last_error, popen_cli, run_cli, runs

pytestmark = pytest.mark.slow

# Ten steps with an evaluation and a checkpoint every two; early stopping armed (its state must
# survive the resume too); dataloader in-process and greedy generation: deterministic on CPU.
RUN = [
    "model=tiny",
    "quant=none",
    "train=debug",
    "train.max_steps=10",
    "train.eval_steps=2",
    "train.save_steps=2",
    "train.logging_steps=1",
    "train.dataloader_workers=0",
    "train.max_length=384",
    "generate.max_new_tokens=8",
    "stages.predict_test=true",
]
COMPARED = [
    "eval_loss",
    "final_eval_loss",
    "final_train_loss_avg",
    "final_train_steps",
    "rouge1",
    "rouge2",
    "rougeL",
    "rouge_sum",
]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """An uninterrupted run ('full') and the same run SIGKILLed mid-training once it has saved a
    checkpoint ('killed'); 'damaged' is a copy of the killed folder, for the corrupt-checkpoint case."""
    tmp = tmp_path_factory.mktemp("kill")
    full = run_cli(tmp, "full", *RUN)
    assert full.returncode == 0, full.stderr[-3000:]
    proc = popen_cli(tmp, "killed", *RUN)
    marker = tmp / "killed" / "checkpoints" / "checkpoint-4" / "checksums.json"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp / "killed" / "result.json").exists()
    assert not (tmp / "killed" / "checkpoints" / "checkpoint-10").exists()  # cut mid-training
    shutil.copytree(tmp / "killed", tmp / "damaged")
    (tmp / "damaged" / "mlflow_run_id").unlink()  # the copy must not touch the killed run
    return tmp


def by_dir(tmp) -> dict:
    return {os.path.basename(r.data.tags["output_dir"]): r for r in runs(tmp)}


def test_a_corrupt_checkpoint_is_refused_by_name(killed):
    ckpts = sorted(
        (killed / "damaged" / "checkpoints").glob("checkpoint-*"),
        key=lambda p: int(p.name.split("-")[1]),
    )
    last = [c for c in ckpts if (c / "checksums.json").exists()][-1]
    optimizer = last / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 3] ^= 0x01
    optimizer.write_bytes(bytes(data))
    before = digest(killed / "damaged")
    log = (killed / "damaged" / "__main__.log").read_bytes()
    proc = run_cli(killed, "damaged", *RUN, "train.resume=true")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_error(proc.stderr)
    assert line.startswith(f"error: train.resume=true: checkpoint {last} is corrupt: ")
    assert "optimizer.pt differs from the saved file (checksum)" in line
    assert "delete it to resume from checkpoint-" in line
    assert_kept(killed / "damaged", before)  # nothing deleted or rewritten
    assert (killed / "damaged" / "__main__.log").read_bytes().startswith(log)  # appended to
    assert len(list((killed / "damaged").glob(".hydra-*"))) == 1  # this attempt's own record
    assert set(by_dir(killed)) == {"full", "killed"}  # no MLflow run for the refused resume


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(killed):
    runs_before = by_dir(killed)
    assert runs_before["killed"].info.status == "RUNNING"  # SIGKILL: no chance to end it
    config = (killed / "killed" / "config.yaml").read_bytes()

    proc = run_cli(killed, "killed", *RUN, "train.resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming the run in" in proc.stdout + proc.stderr

    after = by_dir(killed)
    assert len(runs(killed)) == 2  # the killed run was continued, not duplicated
    full, resumed = after["full"], after["killed"]
    assert resumed.info.run_id == runs_before["killed"].info.run_id
    assert resumed.info.status == "FINISHED" and resumed.data.tags["state"] == "COMPLETE"
    assert resumed.data.tags["resumed_from"].startswith("checkpoint-")
    assert resumed.data.params["train.resume"] == "False"  # params kept as first logged
    for key in COMPARED:
        assert resumed.data.metrics[key] == pytest.approx(full.data.metrics[key], rel=1e-4), key
    assert full.data.metrics["final_train_steps"] == 10
    for name in ("predictions.csv", "submission.csv"):
        assert (killed / "killed" / name).read_text("utf-8") == (killed / "full" / name).read_text(
            "utf-8"
        )
    a = load_file(killed / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert (killed / "killed" / "config.yaml").read_bytes() == config  # kept as it started
    # The loss curve in MLflow has every step; the steps after the checkpoint logged twice at most.
    client = mlflow.MlflowClient()
    steps = {m.step for m in client.get_metric_history(resumed.info.run_id, "train_loss")}
    assert steps == set(range(1, 11))


def test_cli_names_the_row_of_bad_data(tmp_path):
    text = SAMPLE_KO.read_text(encoding="utf-8")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    buf = io.StringIO()
    csv.writer(buf).writerows([*rows, [rows[4][0], *rows[5][1:]]])  # dev_3 again, as row 161
    (tmp_path / "dup.csv").write_text(buf.getvalue(), encoding="utf-8")
    proc = run_cli(tmp_path, "dup", "model=tiny", f"data.path={tmp_path / 'dup.csv'}")
    assert proc.returncode == 2
    assert last_error(proc.stderr) == (
        f"error: {tmp_path / 'dup.csv'}: duplicate id 'dev_3' in rows 4 and 161"
    )


PLANTED = "sk-fault-suite-PLANTED-93c1d7"


def test_a_key_in_dotenv_reaches_no_param_tag_artifact_log_or_file(tmp_path):
    """The key is used (the server sees it), then searched for in every MLflow param, tag, metric
    name and artifact, every file of the run, the caches and the store, and the process output."""
    from tests.unit.test_augment_api import ChatServer

    launch = tmp_path / "launch"
    launch.mkdir()
    (launch / ".env").write_text(f"# secrets\nUPSTAGE_API_KEY={PLANTED}\n", encoding="utf-8")
    server = ChatServer()
    try:
        proc = popen_cli(
            tmp_path,
            "run",
            "model=tiny",
            "quant=none",
            "train=debug",
            "train.train_rows=8",
            "train.max_steps=2",
            "train.save_steps=2",
            "train.eval_steps=2",
            "train.max_length=384",
            "generate.max_new_tokens=8",
            "stages.predict_test=true",
            "augmentation=paraphrase",
            f"augmentation.api.base_url={server.url}",
            "augmentation.api.requests_per_minute=0",
            f"data.path={SAMPLE_KO}",
            f"data.test_path={ROOT / 'data' / 'samples' / 'dialogsum_ko_test.csv'}",
            f"model.tiny.train_text={SAMPLE_KO}",
            cwd=launch,  # where .env is read from
            env={"UPSTAGE_API_KEY": "", "NO_PROXY": "127.0.0.1,localhost"},
        )
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        server.close()
    assert proc.returncode == 0, stderr[-3000:]
    assert server.requests and {r["auth"] for r in server.requests} == {f"Bearer {PLANTED}"}

    (run,) = runs(tmp_path)
    assert run.data.params["augmentation.api.key_env"] == "UPSTAGE_API_KEY"
    everything = json.dumps(
        [run.data.params, run.data.tags, list(run.data.metrics), run.info.run_name],
        ensure_ascii=False,
    )
    assert PLANTED not in everything
    folder = mlflow.MlflowClient().download_artifacts(run.info.run_id, "", str(tmp_path / "dl"))
    artifacts = [p for p in (tmp_path / "dl").rglob("*") if p.is_file()]
    assert {"config.yaml", "predictions.csv", "submission.csv"} <= {p.name for p in artifacts}
    assert os.path.isdir(folder)
    assert PLANTED not in stdout + stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p != launch / ".env"]
    assert any(p.name == "__main__.log" for p in files) and any(
        p.name == "mlflow.db" for p in files
    )
    for path in files:
        assert PLANTED.encode() not in path.read_bytes(), path
