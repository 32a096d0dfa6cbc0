"""Slow tier: a sweep over real shared services — PostgreSQL (Optuna's study, MLflow's store) and an
MLflow tracking server on 127.0.0.1, started for the session by summarizer/sweep/services.py, as
`make services-up` does. Three worker processes share the tiny CPU sweep and one is SIGKILLed
mid-trial; then the same sweep runs through Hydra's submitit launcher (submitit_local)."""

from __future__ import annotations

import collections
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from summarizer.sweep import report as sweep_report
from summarizer.sweep import services
from summarizer.sweep.study import WORKER, retry_of, tally
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# The tiny model, few and short steps, no examples in the prompt (short sequences); no pruning, so
# that every trial that runs to its end is COMPLETE.
TINY = [
    "sweep=tiny_cpu",
    "prompt.fewshot.k=0",  # a fixed value: out of the search space
    "train.max_steps=2",
    "train.eval_steps=2",
    "train.train_rows=8",
    "train.eval_rows=2",
    "train.max_length=512",
    "generate.max_new_tokens=4",
    "trial.pruner.name=none",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shared():
    """PostgreSQL and an MLflow server on free ports, in a folder the `postgres` user can reach
    (pytest's own tmp folders are private to root), torn down at the end of the session."""
    if services.pg_bin_dir() is None:
        reason = (
            "PostgreSQL server not found (initdb, pg_ctl, postgres): apt-get install postgresql, "
            "or set PG_BIN"
        )
        if os.environ.get("SUMMARIZER_REQUIRE_POSTGRES"):
            pytest.fail(reason + " (SUMMARIZER_REQUIRE_POSTGRES is set, as in CI)")
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="summarizer-services-"))
    root.chmod(0o755)
    password = os.environ.get("PGPASSWORD")
    try:
        s = services.up(root, "127.0.0.1", _free_port(), _free_port())
        os.environ["PGPASSWORD"] = s.password  # for this process's own look into the study
        yield s
    finally:
        services.down(root)
        shutil.rmtree(root, ignore_errors=True)
        if password is None:
            os.environ.pop("PGPASSWORD", None)
        else:
            os.environ["PGPASSWORD"] = password


def worker_cmd(s: services.Services, study: str, sweep_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "summarizer",
        "--multirun",
        *TINY,
        f"hydra.sweeper.storage={s.storage}",
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweep.dir={sweep_dir}",
        f"tracking.uri={s.tracking}",
        *overrides,
    ]


def worker_env(s: services.Services, cache_dir: str) -> dict:
    return {
        **os.environ,
        "PGPASSWORD": s.password,
        "SUMMARIZER_CACHE": cache_dir,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # three workers on two cores
    }


def mlflow_runs(s: services.Services, study: str) -> tuple:
    """(the study's parent runs, their child runs) on the MLflow server."""
    client = MlflowClient(s.tracking)
    experiment = client.get_experiment_by_name("summarizer")
    parents = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`sweep.study` = '{study}'"
    )
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`optuna.study` = '{study}'"
    )
    return parents, children


def test_three_workers_share_one_study_and_a_killed_workers_trial_is_retried(
    shared, cache_dir, tmp_path
):
    study_name, n_trials = "scaleout_workers", 3
    heartbeat = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=5"]
    logs, workers = [], []
    for w in range(3):
        log_file = open(tmp_path / f"w{w}.log", "w")  # closed below
        logs.append(log_file)
        cmd = worker_cmd(
            shared,
            study_name,
            tmp_path / f"w{w}",  # its own folder, as on its own machine
            f"hydra.sweeper.n_trials={n_trials}",
            "hydra.sweeper.n_jobs=1",
            *heartbeat,
        )
        workers.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=worker_env(shared, cache_dir),
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        # Worker 0's trial is mid-way once its job has written its MLflow run id (model loaded,
        # training about to start): kill the worker, as a machine that goes away.
        deadline = time.time() + 300
        while time.time() < deadline and not list((tmp_path / "w0").glob("trial_*/mlflow_run_id")):
            assert workers[0].poll() is None, (tmp_path / "w0.log").read_text()[-3000:]
            time.sleep(0.2)
        started = list((tmp_path / "w0").glob("trial_*/mlflow_run_id"))
        assert started, "worker 0 never started a trial"
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(timeout=30)
        for w in (1, 2):
            assert workers[w].wait(timeout=420) == 0, (tmp_path / f"w{w}.log").read_text()[-3000:]
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
        for log_file in logs:
            log_file.close()

    study = optuna.load_study(study_name=study_name, storage=shared.storage)
    trials = study.trials
    me = {w: f"{socket.gethostname()}:{proc.pid}" for w, proc in enumerate(workers)}
    # Every trial number once, claimed by exactly one worker, in one trial folder of that worker.
    assert [t.number for t in trials] == list(range(n_trials + 1))
    assert {t.user_attrs[WORKER] for t in trials} <= set(me.values())
    folders = collections.Counter(p.name for p in tmp_path.glob("w*/trial_*"))
    assert folders == {f"trial_{t.number:04d}": 1 for t in trials}
    # The killed worker's trial is FAILED and its parameters ran again on a surviving worker.
    killed = [t for t in trials if t.user_attrs[WORKER] == me[0]]
    assert [t.state for t in killed] == [TrialState.FAIL]
    assert not (Path(killed[0].user_attrs["output_dir"]) / "result.json").exists()  # died with it
    retry = [t for t in trials if retry_of(t) == killed[0].number]
    assert len(retry) == 1 and retry[0].params == killed[0].params
    # Each worker sampled with its own seed (the study's seed + its rank in joining the study).
    assert len({t.params["train.lr"] for t in trials if t is not retry[0]}) == n_trials
    assert retry[0].state == TrialState.COMPLETE and retry[0].user_attrs[WORKER] != me[0]
    # The study reached n_trials: the others COMPLETE, the failed one not counted (it was retried).
    assert tally(study) == (n_trials, 0, 0)
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * n_trials + ["FAIL"]
    assert {t.user_attrs[WORKER] for t in trials if t.state == TrialState.COMPLETE} == {
        me[1],
        me[2],
    }

    # MLflow: one parent run for all three workers, one child run per trial, none left RUNNING.
    parents, children = mlflow_runs(shared, study_name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    by_trial = {int(c.data.tags["optuna.trial"]): c for c in children}
    assert len(children) == len(by_trial) == n_trials + 1
    assert by_trial[killed[0].number].info.status == "KILLED"
    assert {c.info.status for n, c in by_trial.items() if n != killed[0].number} == {"FINISHED"}
    best = study.best_trial
    assert parents[0].data.tags["best.trial"] == str(best.number)

    # The report needs only the shared stores: no worker folder is left to read from.
    for w in range(3):
        shutil.rmtree(tmp_path / f"w{w}")
    # `python -m summarizer.sweep.report`'s main, in this process (no new interpreter to import)
    report = [study_name, "--storage", shared.storage, "--tracking-uri", shared.tracking]
    assert sweep_report.main([*report, "--out", str(tmp_path / "report")]) == 0
    summary = (tmp_path / "report" / "summary.json").read_text()
    assert f'"number": {best.number}' in summary and '"rouge_sum"' in summary


def test_the_same_sweep_through_hydras_submitit_launcher(shared, cache_dir, tmp_path):
    study_name = "scaleout_submitit"
    proc = subprocess.run(
        worker_cmd(
            shared,
            study_name,
            tmp_path / "sweep",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
        ),
        cwd=ROOT,
        env=worker_env(shared, cache_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 in parallel (submitit local jobs)" in proc.stdout + proc.stderr
    trials = optuna.load_study(study_name=study_name, storage=shared.storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        # Each trial was a submitit job (its pickles and logs) writing the usual trial folder.
        out = tmp_path / "sweep" / f"trial_{t.number:04d}"
        assert (out / "result.json").is_file() and t.user_attrs["metrics"]
        assert (tmp_path / "sweep" / ".submitit" / t.user_attrs["job_id"]).is_dir()
    parents, children = mlflow_runs(shared, study_name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["optuna.trial"] for c in children) == ["0", "1"]
    assert {c.info.status for c in children} == {"FINISHED"}
