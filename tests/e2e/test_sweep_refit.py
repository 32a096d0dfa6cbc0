"""Slow tier: a tiny CPU sweep that ends in a refit of its best trial on every labelled row and
`submission.csv`; rerunning it does nothing new; a refit cut off before its result resumes in its
folder from its checkpoint. One sweep serves both."""

from __future__ import annotations

import json
import socket

import pytest
from mlflow.tracking import MlflowClient

from summarizer.sweep.study import REFIT
from tests.e2e.test_sweep_cli import run_sweep, runs, study
from tests.unit.test_refit import _dead_pid

pytestmark = pytest.mark.slow

# Both tests' sweep; k=0: prompts without examples, shorter rows: seconds less a step on two cores
SWEEP = ("hydra.sweeper.n_trials=2", "hydra.sweeper.refit=true", "trial.pruner.name=none",
         "prompt.fewshot.k=0")  # fmt: skip


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """(folder, sweeper's output) of a two-trial sweep that ended in its refit. Both tests hold
    in either order: a rerun changes nothing, and the cut-off refit resumes to the same end."""
    tmp = tmp_path_factory.mktemp("refit")
    return tmp, run_sweep(tmp, *SWEEP)


def test_a_sweep_ends_in_a_refit_and_submission_and_a_rerun_adds_nothing(swept):
    tmp_path, proc = swept
    sweep = tmp_path / "sweep"
    best = study(tmp_path).best_trial.number
    folder = sweep / f"refit_trial_{best:04d}"
    result = json.loads((folder / "result.json").read_text())
    assert result["state"] == "COMPLETE"
    split = json.loads((folder / "split.json").read_text())
    assert split["validation"] == [] and len(split["train"]) == 24  # train.train_rows of tiny_cpu
    submission = sweep / "submission.csv"
    assert submission.read_text() == (folder / "submission.csv").read_text()
    assert submission.read_text().startswith(",fname,summary\n0,test_0,")
    log = proc.stdout + proc.stderr
    assert f"refit: trial {best}'s settings on every labelled row, train.epochs=0.5" in log
    record = study(tmp_path).user_attrs[REFIT]
    assert (record["trial"], record["state"]) == (best, "COMPLETE")
    # each trial kept its validation rows' objective, in the split's order
    trial_dir = sweep / f"trial_{best:04d}"
    rows = json.loads((trial_dir / "result.json").read_text())["row_scores"]
    assert rows["ids"] == json.loads((trial_dir / "split.json").read_text())["validation"]
    assert len(rows["values"]) == 6 and rows["key"] == "rouge_sum"
    summary = json.loads((sweep / "report" / "summary.json").read_text())
    assert summary["comparison"]["validation_rows"] == 6
    assert "bootstrap" in summary["comparison"] and summary["refit"]["state"] == "COMPLETE"

    parent = next(r for r in runs(tmp_path) if r.data.tags.get("sweep.role") == "parent")
    refit_runs = [r for r in runs(tmp_path) if r.info.run_name == "tiny_cpu-refit"]
    assert len(refit_runs) == 1
    child = refit_runs[0]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["refit.of_trial"] == str(best) and child.info.status == "FINISHED"
    assert "optuna.trial" not in child.data.tags  # not one of the trials
    assert parent.data.tags["refit.run_id"] == child.info.run_id
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert "submission.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    before = sorted(p.name for p in sweep.iterdir()), submission.stat().st_mtime_ns
    proc = run_sweep(tmp_path, *SWEEP)
    assert f"refit done: {submission}" in proc.stdout + proc.stderr
    assert (sorted(p.name for p in sweep.iterdir()), submission.stat().st_mtime_ns) == before
    assert len([r for r in runs(tmp_path) if r.info.run_name == "tiny_cpu-refit"]) == 1


def test_a_cut_off_refit_resumes_in_its_folder(swept):
    tmp_path, _ = swept
    sweep = tmp_path / "sweep"
    best = study(tmp_path).best_trial.number
    folder = sweep / f"refit_trial_{best:04d}"
    run_id = (folder / "mlflow_run_id").read_text()
    # What a refit killed after its last checkpoint leaves: no result, adapter nor submission, and
    # the study's record RUNNING by a sweeper that is gone.
    for name in ("result.json", "submission.csv", "train_metrics.json"):
        (folder / name).unlink()
    (sweep / "submission.csv").unlink()
    s = study(tmp_path)
    dead = f"{socket.gethostname()}:{_dead_pid()}"
    s.set_user_attr(REFIT, {**s.user_attrs[REFIT], "state": "RUNNING", "worker": dead})

    proc = run_sweep(tmp_path, *SWEEP)
    assert f"refit resumed: trial {best}'s settings" in proc.stdout + proc.stderr
    assert "resuming the run in" in (folder / "job.log").read_text()
    assert len(list(folder.glob("job-*.log"))) == 1  # the first attempt's log is kept
    assert json.loads((folder / "result.json").read_text())["state"] == "COMPLETE"
    assert (sweep / "submission.csv").read_text() == (folder / "submission.csv").read_text()
    assert (folder / "mlflow_run_id").read_text() == run_id  # the same MLflow run, continued
    refit_runs = [r for r in runs(tmp_path) if r.info.run_name == "tiny_cpu-refit"]
    assert [r.info.run_id for r in refit_runs] == [run_id]
    assert refit_runs[0].info.status == "FINISHED"
    assert study(tmp_path).user_attrs[REFIT]["state"] == "COMPLETE"
    assert sorted(p.name for p in sweep.iterdir() if p.name.startswith("refit")) == [folder.name]
