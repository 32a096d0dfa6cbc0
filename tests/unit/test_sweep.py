"""Trial bookkeeping of the sweeper and the job's pruning hook, on real Optuna studies (sqlite)."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from summarizer.config import PrunerConfig, TrialConfig
from summarizer.errors import UserError
from summarizer.sweep.pruners import build_pruner
from summarizer.sweep.sweeper import (
    INTERRUPTED,
    RETRY_OF,
    open_study,
    requeue,
    resolve_storage,
    tally,
)
from summarizer.sweep.trial import attach
from summarizer.train.callbacks import ReportToTrial


@pytest.fixture
def study(tmp_path):
    url = resolve_storage(f"sqlite:///{tmp_path}/o.db", tmp_path)
    return open_study(url, "s", "maximize", None)


def test_relative_sqlite_storage_is_resolved_and_created(tmp_path):
    url = resolve_storage("sqlite:///multirun/optuna.db", tmp_path)
    assert url == f"sqlite:///{tmp_path}/multirun/optuna.db" and (tmp_path / "multirun").is_dir()
    assert resolve_storage("postgresql+psycopg://h/db", tmp_path) == "postgresql+psycopg://h/db"


def test_tally_counts_finished_and_skips_requeued_interruptions(study):
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.tell(study.ask(x), 0.5)
    study.tell(study.ask(x), state=TrialState.FAIL)  # a genuine failure counts as done
    cut = study.ask(x)
    cut.set_user_attr(INTERRUPTED, True)
    study.tell(cut, state=TrialState.FAIL)
    assert requeue(study, study.trials[2], max_retries=1)
    assert tally(study) == (2, 0, 1)  # the interrupted trial waits to run again
    retry = study.ask(x)
    assert retry.params["x"] == cut.params["x"] and retry.user_attrs[RETRY_OF] == 2
    assert tally(study) == (2, 1, 0)
    # Interrupted again: retries used up, so it counts as done instead of looping forever.
    study.tell(retry, state=TrialState.FAIL)
    assert not requeue(study, study.trials[-1], max_retries=1)
    assert tally(study) == (3, 0, 0)


def test_job_attaches_reports_and_is_pruned(tmp_path):
    url = resolve_storage(f"sqlite:///{tmp_path}/o.db", tmp_path)
    study = open_study(url, "p", "maximize", None)
    for value in (1.0, 2.0):  # two finished trials with intermediate values at steps 2 and 4
        t = study.ask()
        t.report(value, step=2)
        t.report(value, step=4)
        study.tell(t, value)
    pruner = PrunerConfig(name="median", n_startup_trials=1, n_warmup_steps=0)

    def hook_for(number: int) -> ReportToTrial:
        trial = attach(TrialConfig(storage=url, study="p", number=number, pruner=pruner))
        assert trial.number == number
        return ReportToTrial(trial)

    good, bad = study.ask(), study.ask()
    hook_for(good.number).on_evaluate(
        None, SimpleNamespace(global_step=2), None, metrics={"eval_loss": -5.0}
    )
    with pytest.raises(optuna.TrialPruned, match=f"trial {bad.number} pruned at step 2"):
        hook_for(bad.number).on_evaluate(
            None, SimpleNamespace(global_step=2), None, metrics={"eval_loss": 9.0}
        )
    assert study.trials[good.number].intermediate_values == {2: 5.0}  # -eval_loss: higher is better
    assert study.trials[bad.number].intermediate_values == {2: -9.0}


def test_no_trial_outside_a_sweep():
    assert attach(TrialConfig()) is None


@pytest.mark.parametrize("name", ["none", "median", "percentile", "hyperband"])
def test_pruners(name):
    assert isinstance(build_pruner(PrunerConfig(name=name)), optuna.pruners.BasePruner)


def test_unknown_pruner():
    with pytest.raises(UserError, match="trial.pruner.name='sometimes'"):
        build_pruner(PrunerConfig(name="sometimes"))


def test_failure_line_says_why_a_trial_failed(tmp_path):
    from summarizer.sweep.sweeper import failure_line

    log = tmp_path / "job.log"
    log.write_text("step 1\r step 2\nerror: train.lr=-1.0 must be > 0\n")
    assert failure_line(log) == "train.lr=-1.0 must be > 0"
    tb = "Traceback (most recent call last):\n  File 'x.py', line 1\n"
    log.write_text("x" * 70000 + "\n" + tb + "torch.AcceleratorError: CUDA error: bad\n\nbye\n")
    assert failure_line(log) == "torch.AcceleratorError: CUDA error: bad"
    log.write_text("killed\n")
    assert failure_line(log) is None
    assert failure_line(tmp_path / "missing.log") is None
