"""The end of a sweep: the refit's claim and resume decisions on a real sqlite study, its training
budget and overrides, the submission's backup, and the report's paired bootstrap of best minus
runner-up."""

from __future__ import annotations

import json
import os
import socket
import threading

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from summarizer.sweep import refit
from summarizer.sweep.report import compare_best, comparison_line, paired_bootstrap
from summarizer.sweep.storage import storage_lock
from summarizer.sweep.study import REFIT, ROW_SCORES, keep_result
from summarizer.sweep.trial import ids_hash, row_scores, write_result

DIST = {"train.lr": FloatDistribution(1e-5, 1e-2, log=True)}
ME = f"{socket.gethostname()}:{os.getpid()}"


def _study(tmp_path, name="s", direction="maximize") -> tuple[optuna.Study, str]:
    url = f"sqlite:///{tmp_path}/optuna.db"
    return optuna.create_study(study_name=name, storage=url, direction=direction), url


def _add(study, value, lr=1e-3, state=TrialState.COMPLETE, folder=None, rows=None):
    attrs = {"output_dir": str(folder)} if folder else {}
    if rows is not None:
        attrs[ROW_SCORES] = rows
    study.add_trial(
        create_trial(
            state=state,
            value=value if state == TrialState.COMPLETE else None,
            params={"train.lr": lr},
            distributions=DIST,
            user_attrs=attrs,
        )
    )


def _dead_pid() -> int:
    pid = 2**22 + 12345
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


# --- claim and resume ---------------------------------------------------------------------------


def test_no_refit_before_the_trials_are_done_or_without_a_complete_one(tmp_path):
    study, _ = _study(tmp_path)
    _add(study, 1.0)
    assert refit.decide(study, 2, tmp_path, ME, 120).action == "wait"
    study2, _ = _study(tmp_path, "all_failed")
    _add(study2, None, state=TrialState.FAIL)
    _add(study2, None, state=TrialState.PRUNED)
    assert refit.decide(study2, 2, tmp_path, ME, 120).action == "none"
    assert REFIT not in study2.user_attrs


def test_the_first_worker_claims_the_refit_of_the_best_trial(tmp_path):
    study, _ = _study(tmp_path)
    _add(study, 1.0)
    _add(study, 3.0, lr=5e-3)
    _add(study, None, state=TrialState.PRUNED)
    d = refit.decide(study, 3, tmp_path, ME, 120, now=100.0)
    assert (d.action, d.trial.number, d.resume) == ("run", 1, False)
    assert d.folder == tmp_path / "refit_trial_0001"
    assert study.user_attrs[REFIT] == {
        "trial": 1,
        "output_dir": str((tmp_path / "refit_trial_0001").resolve()),
        "state": "RUNNING",
        "worker": ME,
        "beat": 100.0,
    }
    # another worker, while this (live) one runs it: nothing to do
    other = refit.decide(study, 3, tmp_path, "elsewhere:1", 120, now=110.0)
    assert other.action == "elsewhere" and ME in other.why


def test_exactly_one_of_several_workers_claims_it(tmp_path):
    study, url = _study(tmp_path)
    _add(study, 1.0)
    actions, start = [], threading.Barrier(4)

    def worker(k):
        own = optuna.load_study(study_name="s", storage=url)  # each its own connection
        start.wait()
        with storage_lock(url, "s"):
            actions.append(refit.decide(own, 1, tmp_path, ME, 120).action)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(actions) == ["elsewhere"] * 3 + ["run"]


def test_a_dead_or_silent_worker_s_refit_is_taken_over(tmp_path):
    study, _ = _study(tmp_path)
    _add(study, 1.0)
    dead = f"{socket.gethostname()}:{_dead_pid()}"
    refit.decide(study, 1, tmp_path, dead, 120, now=100.0)
    assert refit.decide(study, 1, tmp_path, ME, 120, now=101.0).action == "run"
    assert study.user_attrs[REFIT]["worker"] == ME
    # another host: by its heartbeat
    study.set_user_attr(REFIT, {**study.user_attrs[REFIT], "worker": "far-away:1", "beat": 200.0})
    assert refit.decide(study, 1, tmp_path, ME, 120, now=250.0).action == "elsewhere"
    assert refit.decide(study, 1, tmp_path, ME, 120, now=400.0).action == "run"


def test_a_finished_refit_is_done_and_a_cut_off_one_resumes_in_its_folder(tmp_path):
    study, _ = _study(tmp_path)
    _add(study, 1.0)
    d = refit.decide(study, 1, tmp_path, ME, 120)
    d.folder.mkdir()
    (d.folder / "config.yaml").write_text("x: 1\n")
    refit.record(study, "FAIL", error="interrupted")
    again = refit.decide(study, 1, tmp_path, ME, 120)
    assert again.action == "run" and not again.resume  # no checkpoint: nothing to resume from
    ckpt = d.folder / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    refit.record(study, "FAIL", error="interrupted")
    again = refit.decide(study, 1, tmp_path, ME, 120)
    assert (again.action, again.folder, again.resume) == ("run", d.folder, True)
    write_result(d.folder, "COMPLETE", None)
    done = refit.decide(study, 1, tmp_path, ME, 120)
    assert (done.action, done.folder) == ("done", d.folder)
    assert study.user_attrs[REFIT]["state"] == "COMPLETE"  # its worker died before recording it


def test_a_new_best_trial_gets_its_own_refit(tmp_path):
    study, _ = _study(tmp_path)
    _add(study, 1.0)
    d = refit.decide(study, 1, tmp_path, ME, 120)
    d.folder.mkdir()
    write_result(d.folder, "COMPLETE", None)
    refit.record(study, "COMPLETE")
    assert refit.decide(study, 1, tmp_path, ME, 120).action == "done"
    _add(study, 2.0, lr=5e-3)  # the study went on (a larger n_trials) and found a better one
    d2 = refit.decide(study, 2, tmp_path, ME, 120)
    assert (d2.action, d2.trial.number, d2.folder.name) == ("run", 1, "refit_trial_0001")
    assert d.folder.name == "refit_trial_0000" and (d.folder / "result.json").is_file()


def test_prepare_keeps_what_an_earlier_attempt_left(tmp_path):
    folder = tmp_path / "refit_trial_0003"
    assert refit.prepare(folder, resume=False) is None and folder.is_dir()
    (folder / "config.yaml").write_text("x: 1\n")
    (folder / "job.log").write_text("first attempt\n")
    assert refit.prepare(folder, resume=True) is None
    assert [p.read_text() for p in folder.glob("job-*.log")] == ["first attempt\n"]
    aside = refit.prepare(folder, resume=False)  # no checkpoint: a new start beside the old one
    assert aside.name.startswith("refit_trial_0003-") and (aside / "config.yaml").is_file()
    assert folder.is_dir() and not any(folder.iterdir())


# --- what the refit runs ------------------------------------------------------------------------


def test_budget_is_the_epochs_behind_the_kept_weights(tmp_path):
    study, _ = _study(tmp_path)
    folder = tmp_path / "trial_0000"
    folder.mkdir()
    _add(study, 1.0, folder=folder)
    t = study.trials[0]
    figures = {"train_epochs": 2.0, "kept_epoch": 1.25}
    (folder / "train_metrics.json").write_text(json.dumps(figures))
    args, why = refit.budget(t, {"train.epochs": "2.0"})
    assert args == ["train.epochs=1.25", "train.max_steps=-1"]
    assert why == "train.epochs=1.25: trial 0 kept its checkpoint of epoch 1.25 (2 trained)"
    (folder / "train_metrics.json").write_text(json.dumps({"train_epochs": 2, "kept_epoch": 2}))
    assert refit.budget(t, {})[1] == "train.epochs=2: trial 0 trained 2 epoch(s)"
    (folder / "train_metrics.json").unlink()  # another machine's folder: the trial's settings
    args, why = refit.budget(t, {"train.epochs": "3.0", "train.max_steps": "-1"})
    assert args == ["train.epochs=3.0", "train.max_steps=-1"] and "no train_metrics.json" in why
    assert refit.budget(t, {"train.max_steps": "40"})[0] == ["train.max_steps=40"]


def test_overrides_name_each_key_once():
    fixed = ["model=tiny", "data.val_size=0.2", "train.epochs=9", "lora.r=8"]
    params = {"lora.r": 16, "train.lr": 0.001}
    args = refit.overrides(fixed, params, ["train.epochs=1.5", "train.max_steps=-1"])
    keys = [a.split("=")[0] for a in args]
    assert len(keys) == len(set(keys))
    assert {"model=tiny", "lora.r=8", "train.lr=0.001", "data.val_size=0"} <= set(args)
    assert "train.epochs=1.5" in args and "stages.predict_test=true" in args


def test_publish_never_overwrites_an_older_submission(tmp_path):
    target = tmp_path / "submission.csv"
    a, b, c = (tmp_path / f"{n}.csv" for n in "abc")
    a.write_text(",fname,summary\n0,x,first\n")
    b.write_text(",fname,summary\n0,x,second\n")
    c.write_text(",fname,summary\n0,x,third\n")
    assert refit.publish(a, target) is None and target.read_text() == a.read_text()
    assert refit.publish(a, target) is None  # the same again: nothing new
    assert list(tmp_path.glob("submission-*.csv")) == []
    first = refit.publish(b, target)
    second = refit.publish(c, target)  # within the same second: another name
    assert first != second
    assert first.read_text() == a.read_text() and second.read_text() == b.read_text()
    assert target.read_text() == c.read_text()


# --- rows kept for the comparison ---------------------------------------------------------------


def test_keep_result_keeps_the_row_scores_without_the_ids(tmp_path):
    study, _ = _study(tmp_path)
    t = study.ask()
    rows = row_scores("rouge_sum", ["a", "b"], [{"rouge_sum": 1.0}, {"rouge_sum": 2.5}])
    keep_result(study, t, {"metrics": {"rouge_sum": 1.75}, "row_scores": rows})
    kept = study.trials[0].user_attrs[ROW_SCORES]
    assert kept == {"key": "rouge_sum", "ids_hash": ids_hash(["a", "b"]), "values": [1.0, 2.5]}
    assert ids_hash(["b", "a"]) != kept["ids_hash"]


# --- the paired bootstrap -----------------------------------------------------------------------


def test_identical_trials_give_an_interval_around_zero():
    rng = np.random.default_rng(1)
    base = rng.normal(30, 8, size=200)
    same = paired_bootstrap(base, base)
    assert same["mean_diff"] == 0 and same["low"] == same["high"] == 0
    # two equally good trials, row noise only: the interval straddles 0
    other = base + rng.normal(0, 3, size=200)
    other -= other.mean() - base.mean()
    b = paired_bootstrap(base, other)
    assert b["low"] < 0 < b["high"] and 0.3 < b["share_ahead"] < 0.7
    assert b == paired_bootstrap(base, other)  # seeded


def test_a_dominant_trial_gives_an_interval_above_zero():
    rng = np.random.default_rng(2)
    worse = rng.normal(30, 8, size=100)
    better = worse + 2 + rng.normal(0, 1, size=100)
    b = paired_bootstrap(better, worse)
    assert 0 < b["low"] < b["mean_diff"] < b["high"] and b["share_ahead"] == 1.0
    # minimize: the lower values are ahead
    m = paired_bootstrap(worse, better, maximize=False)
    assert m["high"] < 0 and m["share_ahead"] == 1.0
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_compare_best_pairs_only_the_same_rows(tmp_path):
    study, _ = _study(tmp_path)
    rows = lambda values, ids=("a", "b", "c"): {  # noqa: E731
        "key": "rouge_sum",
        "ids_hash": ids_hash(list(ids)),
        "values": values,
    }
    _add(study, 20.0, rows=rows([20.0, 25.0, 15.0]))
    c = compare_best(study)
    assert c["validation_rows"] == 3 and "no runner-up" in c["note"] and "bootstrap" not in c
    _add(study, 10.0, rows=rows([10.0, 12.0, 8.0], ids=("a", "b", "d")))
    c = compare_best(study)
    assert (c["best"], c["runner_up"]) == (0, 1) and "different validation rows" in c["note"]
    _add(study, 15.0, rows=rows([14.0, 16.0, 15.0]))
    c = compare_best(study)
    assert c["runner_up"] == 2 and c["bootstrap"]["mean_diff"] == pytest.approx(5.0)
    line = comparison_line(c)
    assert line.startswith("validation rows: 3; trial 0 minus runner-up trial 2 (rouge_sum")
    assert "95 % interval" in line
    _add(study, 30.0)  # a new best from before row scores were kept
    assert "trial 3 kept no per-row scores" in compare_best(study)["note"]


def test_kept_epoch_is_the_best_checkpoint_s_when_early_stopping_loaded_it():
    from types import SimpleNamespace

    from summarizer.train.fit import _kept_epoch

    history = [
        {"eval_loss": 2.0, "epoch": 0.5, "step": 10},
        {"eval_loss": 1.0, "epoch": 1.0, "step": 20},
        {"eval_loss": 1.5, "epoch": 1.5, "step": 30},
    ]
    state = SimpleNamespace(
        epoch=1.5, log_history=history, best_model_checkpoint="/x/checkpoints/checkpoint-20"
    )
    trainer = SimpleNamespace(state=state, args=SimpleNamespace(load_best_model_at_end=True))
    assert _kept_epoch(trainer) == 1.0
    trainer.args.load_best_model_at_end = False  # the last weights are kept
    assert _kept_epoch(trainer) == 1.5
