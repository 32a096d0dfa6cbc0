"""Fault suite, sweeps: a sweep never loses or mixes results.

- a new study under an old name (storage deleted, or another storage) gets its own MLflow parent run
  and its own report; a resumed study finds its own again;
- a rerun whose fixed settings (data, model, any override that is not searched) differ from the
  study's stops with one line naming the key and both values, and how to start a new study;
- a sweep whose trials all fail exits 2 with one line naming the first failure and its log, and a
  corrected rerun with hydra.sweeper.retry_failed=true runs the failed trials again.

The sweeper runs in-process on real sqlite studies and MLflow stores, with a fake job in place of
each trial's `python -m summarizer` process (as tests/unit/test_sweep_workers.py does); one slow
case runs the real command line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from optuna.trial import TrialState

from summarizer.errors import UserError
from summarizer.sweep import jobs
from summarizer.sweep.storage import resolve_storage
from summarizer.sweep.study import (
    INTERRUPTED,
    SETTINGS,
    STUDY_ID,
    claim,
    open_study,
    requeue,
    retry_failed,
    retry_of,
    tally,
)
from summarizer.sweep.sweeper import SummarizerSweeper
from summarizer.sweep.trial import write_result
from summarizer.tracking import parent_run
from tests.conftest import ROOT, SAMPLE_EN, SAMPLE_KO
from tests.faults.helpers import cli_env, digest, last_error

MISSING = "/nowhere/dev.csv"


class Sweep:
    """`python -m summarizer --multirun sweep=tiny_cpu <overrides>` in this process: the config
    composed as Hydra composes it, the sweeper's own loop, and a fake job per trial that fails
    (an `error:` line in its job.log, exit 2) when its data file is missing, else finishes."""

    def __init__(self, tmp: Path, monkeypatch):
        self.tmp = tmp
        self.db = tmp / "optuna.db"
        self.jobs: list[dict] = []
        monkeypatch.setattr(jobs, "run_process", self._job)

    def _job(self, args: list[str], out: Path, **_) -> int:
        overrides = dict(a.split("=", 1) for a in args)
        self.jobs.append(overrides)
        path = overrides.get("data.path", str(SAMPLE_KO))
        if not Path(path).is_file():
            (out / "job.log").write_text(f"loading data\nerror: data file not found: {path}\n")
            return 2
        (out / "job.log").write_text("trained\n")
        value = float(overrides.get("lora.r", 1))
        write_result(out, "COMPLETE", value, metrics={"rouge_sum": value})
        return 0

    def run(self, *overrides: str, storage: Path | None = None) -> None:
        base = [
            "sweep=tiny_cpu",
            f"hydra.sweeper.storage=sqlite:///{storage or self.db}",
            f"hydra.sweep.dir={self.tmp / 'sweep'}",
            f"tracking.uri={self.uri}",
            "hydra.sweeper.n_jobs=1",
        ]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            # A search-space override (choice(...)) is the sweeper's, not part of the config.
            plain = [o for o in [*base, *overrides] if "(" not in o]
            cfg = compose("config", overrides=plain, return_hydra_config=True)
        sweeper = SummarizerSweeper(**OmegaConf.to_container(cfg.hydra.sweeper, resolve=True))
        sweeper.setup(hydra_context=None, task_function=None, config=cfg)
        # Hydra hands the sweeper the task overrides (not hydra.*), as on the command line.
        sweeper.sweep([o for o in [*base, *overrides] if not o.startswith(("hydra.", "sweep="))])

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.tmp / 'mlflow.db'}"

    def study(self, storage: Path | None = None) -> optuna.Study:
        return optuna.load_study(study_name="tiny_cpu", storage=f"sqlite:///{storage or self.db}")

    def parents(self) -> list:
        mlflow.set_tracking_uri(self.uri)
        runs = mlflow.search_runs(experiment_names=["summarizer"], output_format="list")
        return [r for r in runs if r.data.tags.get("sweep.role") == "parent"]

    def runs(self) -> dict:
        mlflow.set_tracking_uri(self.uri)
        runs = mlflow.search_runs(experiment_names=["summarizer"], output_format="list")
        return {r.info.run_id: (r.info.status, dict(r.data.tags)) for r in runs}


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    return Sweep(tmp_path, monkeypatch)


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


# --- a new study under an old name ----------------------------------------------------------------


def test_a_new_study_under_an_old_name_gets_its_own_parent_run_and_report(sweep, tmp_path):
    sweep.run("hydra.sweeper.n_trials=1")
    first = sweep.study()
    (a,) = sweep.parents()
    assert a.data.tags["sweep.study_id"] == first.user_attrs[STUDY_ID]
    report = tmp_path / "sweep" / "report"
    kept = digest(report)
    runs_before = sweep.runs()

    # The storage is deleted: the same command makes a new study of the same name.
    shutil.move(sweep.db, tmp_path / "old-optuna.db")
    sweep.run("hydra.sweeper.n_trials=1")
    second = sweep.study()
    assert second.user_attrs[STUDY_ID] != first.user_attrs[STUDY_ID]
    parents = {p.data.tags["sweep.study_id"]: p for p in sweep.parents()}
    assert set(parents) == {first.user_attrs[STUDY_ID], second.user_attrs[STUDY_ID]}
    assert sweep.runs()[a.info.run_id] == runs_before[a.info.run_id]  # the first one untouched
    assert digest(report) == kept  # and its report
    beside = tmp_path / "sweep" / "report-tiny_cpu"
    assert _summary(beside)["study_id"] == second.user_attrs[STUDY_ID]

    # Another storage, the same name: a third study, a third parent, a third report.
    sweep.run("hydra.sweeper.n_trials=1", storage=tmp_path / "other.db")
    third = sweep.study(tmp_path / "other.db")
    assert len(sweep.parents()) == 3 and digest(report) == kept
    third_report = tmp_path / "sweep" / f"report-tiny_cpu-{third.user_attrs[STUDY_ID][:8]}"
    assert _summary(third_report)["study_id"] == third.user_attrs[STUDY_ID]

    # Resumed, the second study finds its own parent run and report again.
    sweep.run("hydra.sweeper.n_trials=2")
    assert len(sweep.parents()) == 3
    b = parents[second.user_attrs[STUDY_ID]].info.run_id
    assert sweep.runs()[b][1]["best.trial"] in ("0", "1") and sweep.runs()[b][0] == "FINISHED"
    assert _summary(beside)["done"] == 2 and digest(report) == kept
    assert sweep.runs()[a.info.run_id] == runs_before[a.info.run_id]


def test_a_study_from_before_identities_keeps_its_parent_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment("summarizer")
    client = mlflow.tracking.MlflowClient(uri)
    old_tags = {"sweep.study": "s", "sweep.role": "parent", "sweep.storage": "sqlite:///a.db"}
    old = client.create_run(exp.experiment_id, tags=old_tags).info.run_id
    # A new study under the same name does not take it; the old study, given its id now, does.
    assert parent_run(uri, "summarizer", "s", "sqlite:///a.db", "new-study") != old
    assert parent_run(uri, "summarizer", "s", "sqlite:///b.db", "other", adopt=True) != old
    assert parent_run(uri, "summarizer", "s", "sqlite:///a.db", "old-study", adopt=True) == old
    assert client.get_run(old).data.tags["sweep.study_id"] == "old-study"
    assert parent_run(uri, "summarizer", "s", "sqlite:///a.db", "old-study") == old


# --- a rerun with other fixed settings ------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "before", "now"),
    [
        (f"data.path={SAMPLE_EN}", "data.path", str(SAMPLE_KO), str(SAMPLE_EN)),
        ("model=smollm2_135m", "model", "tiny", "smollm2_135m"),
        ("train.max_steps=12", "train.max_steps", "6", "12"),
    ],
    ids=["data", "model", "train-setting"],
)
def test_a_rerun_with_other_fixed_settings_stops_and_adds_nothing(
    sweep, tmp_path, override, key, before, now
):
    sweep.run("hydra.sweeper.n_trials=1", f"data.path={SAMPLE_KO}")
    folders, runs = sorted((tmp_path / "sweep").iterdir()), sweep.runs()
    with pytest.raises(UserError) as e:
        sweep.run("hydra.sweeper.n_trials=3", f"data.path={SAMPLE_KO}", override)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"hydra.sweeper.study_name=tiny_cpu: {key}={now} here, ")
    assert f"ran with {key}={before}" in message
    assert message.endswith("start a new study: hydra.sweeper.study_name=tiny_cpu_2")
    # Nothing created or changed: no trial, no folder, no MLflow run, the stored settings as were.
    study = sweep.study()
    assert len(study.trials) == 1 and len(sweep.jobs) == 1
    assert sorted((tmp_path / "sweep").iterdir()) == folders and sweep.runs() == runs
    assert study.user_attrs[SETTINGS][key] == before
    # The suggested new study runs (its own parent run, its own report beside the first).
    sweep.run("hydra.sweeper.n_trials=1", f"data.path={SAMPLE_KO}", override,
              "hydra.sweeper.study_name=tiny_cpu_2")  # fmt: skip
    assert len(sweep.parents()) == 2 and (tmp_path / "sweep" / "report-tiny_cpu_2").is_dir()


def test_settings_that_may_differ_between_workers_and_reruns_do_not_stop_it(sweep):
    sweep.run("hydra.sweeper.n_trials=1", "tracking.run_name=first")
    sweep.run(
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.max_retries=3",
        "tracking.run_name=second",
        "tracking.log_adapter=true",
        "trial.pruner.n_startup_trials=1",  # how to search, like the sampler
        "prompt.fewshot.k=0",  # searched before, fixed now: a change of the search space
        "train.lr=tag(log, interval(1e-4, 3e-4))",  # a narrower space
    )
    assert tally(sweep.study()) == (3, 0, 0)
    assert [j["prompt.fewshot.k"] for j in sweep.jobs[1:]] == ["0", "0"]


# --- every trial fails ----------------------------------------------------------------------------


def test_a_sweep_whose_trials_all_fail_exits_2_and_a_fixed_rerun_retries_them(sweep, tmp_path):
    with pytest.raises(UserError) as e:
        sweep.run("hydra.sweeper.n_trials=2", f"data.path={MISSING}")
    log = tmp_path / "sweep" / "trial_0000" / "job.log"
    assert str(e.value) == (
        f"all 2 trial(s) of this sweep failed; the first, trial 0: data file not found: "
        f"{MISSING} (see {log}); fix the cause and rerun with hydra.sweeper.retry_failed=true to "
        "run them again"
    )
    assert (tmp_path / "sweep" / "report" / "summary.json").is_file()  # the report is still made
    first = sweep.study().trials

    # The same command again: it says why nothing runs, and how to run them again.
    with pytest.raises(UserError, match=r"^study 'tiny_cpu': all 2 trial\(s\) FAILED and count "):
        sweep.run("hydra.sweeper.n_trials=2", f"data.path={MISSING}")
    assert len(sweep.study().trials) == 2 and len(sweep.jobs) == 2

    # Fixed (another data file: the study has no result yet, so it takes the new one) and rerun
    # with retry_failed: the failed trials run again with their own parameters.
    sweep.run(
        "hydra.sweeper.n_trials=2", f"data.path={SAMPLE_KO}", "hydra.sweeper.retry_failed=true"
    )
    trials = sweep.study().trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    assert [retry_of(t) for t in trials[2:]] == [0, 1]
    assert [t.params for t in trials[2:]] == [t.params for t in first]
    assert tally(sweep.study()) == (2, 0, 0)
    assert sweep.study().user_attrs[SETTINGS]["data.path"] == str(SAMPLE_KO)
    # Once the study has results, another data file is refused as in any study.
    with pytest.raises(UserError, match="data.path="):
        sweep.run("hydra.sweeper.n_trials=3", f"data.path={SAMPLE_EN}")
    # Nothing left to retry: a rerun with retry_failed adds nothing.
    sweep.run(
        "hydra.sweeper.n_trials=2", f"data.path={SAMPLE_KO}", "hydra.sweeper.retry_failed=true"
    )
    assert len(sweep.study().trials) == 4


def test_some_failures_among_results_are_not_an_error(sweep, monkeypatch):
    real = sweep._job
    monkeypatch.setattr(
        jobs, "run_process", lambda args, out, **kw: 3 if "trial.number=0" in args else real(
            args, out, **kw)
    )  # fmt: skip
    sweep.run("hydra.sweeper.n_trials=2")  # trial 0 fails, trial 1 finishes: exit 0
    assert [t.state for t in sweep.study().trials] == [TrialState.FAIL, TrialState.COMPLETE]
    sweep.run("hydra.sweeper.n_trials=2")  # nothing to run: a warning, not an error
    assert len(sweep.study().trials) == 2


def test_a_retried_failure_keeps_its_retries_for_interruptions(tmp_path):
    url = resolve_storage(f"sqlite:///{tmp_path}/o.db", tmp_path)
    study = open_study(url, "s", "maximize", None)
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    bad, _ = claim(study, space, 1, "a:1")
    study.tell(bad, state=TrialState.FAIL)
    assert tally(study) == (1, 0, 0) and claim(study, space, 1, "a:1") == (None, 0)
    assert retry_failed(study) == [0]
    assert tally(study) == (0, 0, 1)
    again, _ = claim(study, space, 1, "b:2")
    assert again.params == bad.params and retry_of(study.trials[again.number]) == 0
    # Cut off by Ctrl-C: re-queued by the chain as any trial (max_retries=1 still whole).
    again.set_user_attr(INTERRUPTED, True)
    study.tell(again, state=TrialState.FAIL)
    assert requeue(study, study.trials[again.number], max_retries=1)
    third, _ = claim(study, space, 1, "c:3")
    assert third.params == bad.params and tally(study) == (0, 1, 0)
    study.tell(third, 0.5)
    assert retry_failed(study) == [] and tally(study) == (1, 0, 0)


# --- the command line ------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_all_trials_failed_is_one_line_exit_2_and_retry_failed_runs_them(tmp_path):
    def run(*overrides: str) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable, "-m", "summarizer", "--multirun", "sweep=tiny_cpu",
            f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
            f"hydra.sweep.dir={tmp_path}/sweep", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "hydra.sweeper.n_trials=2", "trial.pruner.name=none", *overrides,
        ]  # fmt: skip
        return subprocess.run(
            cmd, cwd=ROOT, env=cli_env(tmp_path), capture_output=True, text=True, timeout=900
        )

    proc = run(f"data.path={tmp_path}/missing.csv")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last_error(proc.stderr).startswith(
        f"error: all 2 trial(s) of this sweep failed; the first, trial 0: data file not found: "
        f"{tmp_path}/missing.csv (see {tmp_path}/sweep/trial_0000/job.log);"
    )
    proc = run(f"data.path={SAMPLE_KO}", "hydra.sweeper.retry_failed=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = optuna.load_study(study_name="tiny_cpu", storage=f"sqlite:///{tmp_path}/optuna.db")
    states = [t.state for t in trials.trials]
    assert states == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
