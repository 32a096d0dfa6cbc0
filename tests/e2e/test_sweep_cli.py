"""Slow tier: the tiny CPU sweep for real — parallel trials, a failing trial, pruning, MLflow
parent/child runs, the report, resume to n_trials, and Ctrl-C or SIGTERM then resume."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from summarizer.sweep.storage import resolve_storage
from summarizer.sweep.study import retry_of
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def sweep_cmd(tmp_path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "summarizer",
        "--multirun",
        "sweep=tiny_cpu",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
        f"hydra.sweep.dir={tmp_path}/sweep",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        *overrides,
    ]


def env(tmp_path) -> dict:
    return {**os.environ, "SUMMARIZER_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}


def run_sweep(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        sweep_cmd(tmp_path, *overrides),
        cwd=ROOT,
        env=env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def study(tmp_path) -> optuna.Study:
    return optuna.load_study(study_name="tiny_cpu", storage=f"sqlite:///{tmp_path}/optuna.db")


def runs(tmp_path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return mlflow.search_runs(experiment_names=["summarizer"], output_format="list")


def test_demo_sweep_four_trials_two_at_a_time(tmp_path):
    # `make sweep` as shipped (pruning off here so that every trial reaches ROUGE).
    proc = run_sweep(tmp_path, "trial.pruner.name=none")
    trials = study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert {t.user_attrs["worker"] for t in trials} == {trials[0].user_attrs["worker"]}
    assert "2 in parallel" in proc.stdout + proc.stderr
    children = [r for r in runs(tmp_path) if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in runs(tmp_path) if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1 and len(children) == 4
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert {"rouge1", "rouge2", "rougeL", "rouge_sum"} <= set(child.data.metrics)
    # Two trials overlapped in time: the workers did not wait for each other. (The trials' own
    # spans: a child MLflow run covers only the last 2-4 s of a ~17 s trial, so two of them may
    # miss each other although their trials ran side by side; that failed CI once.)
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans))


def test_parallel_sweep_with_failure_pruning_report_and_resume(tmp_path):
    url = resolve_storage(f"sqlite:///{tmp_path}/optuna.db", tmp_path)
    s = optuna.create_study(study_name="tiny_cpu", storage=url, direction="maximize")
    # Queued first: a trial that fails (bad lr), a good one, and one whose tiny lr leaves its eval
    # loss above the good trial's, which the median pruner then stops.
    s.enqueue_trial({"lora.r": 8, "train.lr": -1.0, "prompt.fewshot.k": 0})
    s.enqueue_trial({"lora.r": 8, "train.lr": 5e-3, "prompt.fewshot.k": 0})
    s.enqueue_trial({"lora.r": 8, "train.lr": 1e-7, "prompt.fewshot.k": 0})
    space = "train.lr=choice(-1.0,5e-3,1e-7)"  # a command-line search space replaces the file's
    pruner = ["trial.pruner.n_startup_trials=1", "trial.pruner.n_warmup_steps=0"]
    run_sweep(tmp_path, "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1", space, *pruner)
    trials = study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[0].user_attrs["error"] == "train.lr=-1.0 must be > 0"  # why, from its job.log
    assert trials[2].intermediate_values  # reported -eval_loss before being pruned

    by_trial = {r.data.tags.get("optuna.trial"): r for r in runs(tmp_path)}
    parent = by_trial.pop(None)
    assert parent.data.tags["sweep.role"] == "parent" and parent.info.status == "FINISHED"
    # trial 0's bad value is rejected in preflight, before it opens an MLflow run (no litter of
    # FAILED runs from typos); its error is on the trial
    assert {k: (r.info.status, r.data.tags["state"]) for k, r in by_trial.items()} == {
        "1": ("FINISHED", "COMPLETE"),
        "2": ("KILLED", "PRUNED"),
    }
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in by_trial.values())
    assert parent.data.tags["best.trial"] == "1" and "best_rouge_sum" in parent.data.metrics
    assert "best_eval_loss" in parent.data.metrics  # the best run's own figures, not only ROUGE
    assert parent.data.params["space.train.lr"] == "choice(-1.0, 0.005, 1e-07)"
    assert parent.data.params["pruner.name"] == "median" and "sampler.name" in parent.data.params
    assert "Best: trial 1" in parent.data.tags["mlflow.note.content"]
    assert by_trial["1"].data.tags["sweep.best"] == "true"
    assert int(by_trial["2"].data.tags["pruned.step"]) > 0 and "pruned_eval_loss" in (
        by_trial["2"].data.metrics
    )
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for r in by_trial.values():  # comparing runs in the UI never meets one without artifacts
        assert {"config.yaml", "split.json"} <= {
            a.path for a in client.list_artifacts(r.info.run_id)
        }
    report = tmp_path / "sweep" / "report"
    assert (report / "summary.json").is_file() and (report / "report.html").is_file()
    assert by_trial["1"].info.run_id in (report / "report.html").read_text()

    # The same command with a larger target resumes the study: 2 more trials, 2 in parallel.
    run_sweep(tmp_path, "hydra.sweeper.n_trials=5", "hydra.sweeper.n_jobs=2", space, *pruner)
    trials = study(tmp_path).trials
    assert len(trials) == 5 and len({t.number for t in trials}) == 5
    assert all(t.state != TrialState.RUNNING for t in trials)
    parents = [r for r in runs(tmp_path) if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1  # the sweep's MLflow run is continued, not duplicated
    # Run once more at the target: nothing new.
    run_sweep(tmp_path, "hydra.sweeper.n_trials=5", space)
    assert len(study(tmp_path).trials) == 5


def _cut_off(tmp_path, sig: signal.Signals, trial: int, *overrides: str) -> None:
    """Run the sweep until trial `trial` has started training, then send the sweeper `sig`."""
    proc = subprocess.Popen(
        sweep_cmd(tmp_path, *overrides),
        cwd=ROOT,
        env=env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job (how CI may run) starts with SIGINT ignored, and Python then
        # installs no Ctrl-C handler: restore it, as in a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # The job writes its MLflow run id once the model is loaded, just before training starts.
    started = tmp_path / "sweep" / f"trial_{trial:04d}" / "mlflow_run_id"
    deadline = time.time() + 300
    while time.time() < deadline and not started.is_file():
        time.sleep(0.2)
    assert started.is_file(), f"trial {trial} never started"
    proc.send_signal(sig)
    proc.wait(timeout=120)


def test_ctrl_c_or_sigterm_leaves_the_study_resumable(tmp_path):
    """Ctrl-C, or SIGTERM (a scheduler's preemption): the cut-off trial is FAILED and re-queued.
    One study: Ctrl-C in its first trial; the rerun runs that trial again and SIGTERM cuts off the
    next one; a last rerun runs that one again, which completes the study."""
    args = ("hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1")
    _cut_off(tmp_path, signal.SIGINT, 0, *args)
    trials = study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert retry_of(trials[1]) == 0
    assert not [r for r in runs(tmp_path) if r.info.status == "RUNNING"]

    _cut_off(tmp_path, signal.SIGTERM, 2, *args)  # trial 1, trial 0 again, runs to its end first
    trials = study(tmp_path).trials
    assert [t.state for t in trials] == [
        TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING
    ]  # fmt: skip
    assert trials[1].params == trials[0].params  # the cut-off trial ran again, nothing lost
    assert retry_of(trials[3]) == 2
    assert not [r for r in runs(tmp_path) if r.info.status == "RUNNING"]

    run_sweep(tmp_path, *args)
    trials = study(tmp_path).trials
    assert [t.state for t in trials] == [
        TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE
    ]  # fmt: skip
    assert trials[3].params == trials[2].params
