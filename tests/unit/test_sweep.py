"""Trial bookkeeping of the sweeper and the job's pruning hook, on real Optuna studies (sqlite)."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from summarizer.config import PrunerConfig, TrialConfig
from summarizer.errors import UserError
from summarizer.sweep.jobs import failure_line
from summarizer.sweep.pruners import build_pruner
from summarizer.sweep.storage import resolve_storage
from summarizer.sweep.study import (
    INTERRUPTED,
    claim,
    open_study,
    requeue,
    retry_of,
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
    assert retry.params["x"] == cut.params["x"] and retry_of(study.trials[retry.number]) == 2
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
    log = tmp_path / "job.log"
    log.write_text("step 1\r step 2\nerror: train.lr=-1.0 must be > 0\n")
    assert failure_line(log) == "train.lr=-1.0 must be > 0"
    tb = "Traceback (most recent call last):\n  File 'x.py', line 1\n"
    log.write_text("x" * 70000 + "\n" + tb + "torch.AcceleratorError: CUDA error: bad\n\nbye\n")
    assert failure_line(log) == "torch.AcceleratorError: CUDA error: bad"
    log.write_text("killed\n")
    assert failure_line(log) is None
    assert failure_line(tmp_path / "missing.log") is None


def _cut_off(study, trial) -> None:
    """What the sweeper does to a trial it interrupts: mark it, fail it."""
    trial.set_user_attr(INTERRUPTED, True)
    study.tell(trial, state=TrialState.FAIL)


def test_a_chain_of_retries_stops_at_max_retries_and_each_retry_is_clean(study):
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    first, _ = claim(study, x, 1, "a:1")
    chain = [first]
    for worker in ("b:2", "c:3"):  # max_retries=2: two retries of the same parameters
        _cut_off(study, chain[-1])
        assert requeue(study, study.trials[chain[-1].number], max_retries=2)
        retry, _ = claim(study, x, 1, worker)
        assert retry.params == first.params and retry_of(study.trials[-1]) == chain[-1].number
        # The retry callback copies the original's user attrs: this worker's own replace them.
        assert retry.user_attrs["worker"] == worker and not retry.user_attrs[INTERRUPTED]
        chain.append(retry)
        assert tally(study) == (0, 1, 0)
    _cut_off(study, chain[-1])
    assert not requeue(study, study.trials[-1], max_retries=2)
    assert tally(study) == (1, 0, 0) and claim(study, x, 1, "d:4") == (None, 0)
    assert len(study.trials) == 3


def test_no_retry_with_max_retries_0(study):
    cut = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    _cut_off(study, cut)
    assert not requeue(study, study.trials[0], max_retries=0)
    assert tally(study) == (1, 0, 0) and len(study.trials) == 1


def test_a_retry_keeps_its_parameters_when_the_search_space_changed(study):
    old = {"r": optuna.distributions.CategoricalDistribution([8, 16])}
    cut, _ = claim(study, old, 2, "a:1")
    _cut_off(study, cut)
    assert requeue(study, study.trials[0], max_retries=1)
    # A rerun widens the choices and adds a parameter: the retry runs its own value again.
    new = {
        "r": optuna.distributions.CategoricalDistribution([8, 16, 32]),
        "lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True),
    }
    retry, _ = claim(study, new, 2, "b:2")
    assert retry_of(study.trials[-1]) == cut.number and retry.params["r"] == cut.params["r"]
    assert 1e-5 <= retry.params["lr"] <= 1e-3


def test_parent_run_shows_the_best_trial_its_figures_and_adapter(tmp_path):
    from mlflow.tracking import MlflowClient

    from summarizer.sweep.report import report
    from summarizer.sweep.study import keep_result
    from summarizer.sweep.sweeper import _shown_distribution
    from summarizer.tracking import log_new_params, parent_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    s = open_study(resolve_storage(f"sqlite:///{tmp_path}/o.db", tmp_path), "s", "maximize", None)
    parent = parent_run(uri, "exp", "s", "sqlite:///o.db", "id1")
    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    x = {"x": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)}
    log_new_params(uri, parent, {"space.x": _shown_distribution(x["x"])})
    log_new_params(uri, parent, {"space.x": "changed"})  # a rerun keeps the first
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    runs = {}
    for value in (1.0, 3.0):
        t = s.ask(x)
        tags = {"mlflow.parentRunId": parent, "optuna.trial": str(t.number)}
        runs[t.number] = client.create_run(exp, tags=tags).info.run_id
        client.log_metric(runs[t.number], "eval_loss", 2.5 + value)
        keep_result(s, t, {"metrics": {"rouge_sum": value}, "adapter": str(adapter)})
        t.set_user_attr("overrides", f"x={t.params['x']}")
        s.tell(t, value)
    report(s, tmp_path / "report", uri, parent)
    p = client.get_run(parent)
    assert p.data.params["space.x"] == "log interval(1e-05, 0.001)"
    assert p.data.metrics["best_value"] == 3.0 and p.data.metrics["best_rouge_sum"] == 3.0
    assert p.data.metrics["best_eval_loss"] == 5.5  # from the best trial's own run
    assert p.data.tags["best.run_id"] == runs[1]
    assert "Best: trial 1" in p.data.tags["mlflow.note.content"]
    assert str(tmp_path / "report") in p.data.tags["mlflow.note.content"]
    assert client.get_run(runs[1]).data.tags["sweep.best"] == "true"
    assert "sweep.best" not in client.get_run(runs[0]).data.tags
    logged = [a.path for a in client.list_artifacts(parent, "best_adapter")]
    assert logged == ["best_adapter/adapter_config.json"]


def test_a_pruned_trial_logs_where_it_was_pruned(tmp_path):
    from mlflow.tracking import MlflowClient

    from summarizer import pipeline, tracking
    from summarizer.config import TrackingConfig

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    s = open_study(resolve_storage(f"sqlite:///{tmp_path}/o.db", tmp_path), "s", "maximize", None)
    report = ReportToTrial(s.ask())
    for step, loss in ((2, 4.25), (4, 4.5)):
        report.on_evaluate(None, SimpleNamespace(global_step=step), None, {"eval_loss": loss})
    with pytest.raises(optuna.TrialPruned):
        with tracking.run(TrackingConfig(uri=uri), uri, "t", {}, {}, None, (optuna.TrialPruned,)):
            pipeline._log_pruned(report)
            raise optuna.TrialPruned("pruned")
    run = MlflowClient(uri).search_runs(["1"])[0]
    assert run.info.status == "KILLED" and run.data.tags["state"] == "PRUNED"
    assert run.data.tags["pruned.step"] == "4" and run.data.tags["pruned.eval_loss"] == "4.5000"
    assert run.data.metrics["pruned_step"] == 4 and run.data.metrics["pruned_eval_loss"] == 4.5


def test_the_report_is_one_page_that_renders_offline(tmp_path):
    import plotly

    from summarizer.sweep.report import report

    s = open_study(resolve_storage(f"sqlite:///{tmp_path}/o.db", tmp_path), "s", "maximize", None)
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for value in (1.0, 2.0, 3.0):
        t = s.ask(x)
        t.report(value, step=1)
        s.tell(t, value)
    t = s.ask(x)  # pruned on per-row reports: its row's 9.0 is not what it scored
    t.report(9.0, step=7)
    t.set_user_attr("pruned_at", {"step": 4, "name": "eval_rouge_sum", "value": 1.5})
    s.tell(t, state=optuna.trial.TrialState.PRUNED)
    report(s, tmp_path / "report", None, None)
    text = (tmp_path / "report" / "report.html").read_text()
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "report.html",
        "summary.json",
    ]
    js = plotly.offline.get_plotlyjs()
    assert text.count(js[:200]) == 1 and js[-200:] in text  # plotly.js inlined, once
    assert "<script src=" not in text and text.count('class="plotly-graph-div"') >= 4
    assert "<td>2</td><td>COMPLETE</td><td>3.0000</td>" in text
    assert "<td>3</td><td>PRUNED</td><td>1.5000 (eval_rouge_sum at step 4)</td>" in text
