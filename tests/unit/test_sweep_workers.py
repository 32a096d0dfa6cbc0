"""Several sweeper processes on one study (summarizer/sweep/): the locked claim, stale-trial
retries, storage errors in one line, results kept in the study; and sweep/services.py's pure
parts. Real Optuna studies on sqlite; the PostgreSQL side runs in tests/e2e/test_scaleout.py."""

from __future__ import annotations

import multiprocessing
import socket
import sys
import time
from types import SimpleNamespace

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from summarizer.errors import UserError
from summarizer.sweep import services
from summarizer.sweep.jobs import submitit_executor
from summarizer.sweep.report import summary
from summarizer.sweep.storage import check_storage, resolve_storage, shown, storage_lock
from summarizer.sweep.study import WORKER, claim, open_study, requeue, retry_of, tally
from summarizer.sweep.sweeper import SummarizerSweeper
from summarizer.tracking import redact

SPACE = {"x": optuna.distributions.FloatDistribution(0, 1)}


def _claim_until_done(url: str, n_trials: int, me: str, queue) -> None:
    """One worker process: claim, 'run' (tell at once), until the study is done."""
    study = open_study(url, "w", "maximize", None, heartbeat_interval=60)
    mine = []
    while True:
        with storage_lock(url, "w"):
            trial, running = claim(study, SPACE, n_trials, me)
        if trial is None:
            if running == 0:
                break
            time.sleep(0.01)
            continue
        mine.append(trial.number)
        study.tell(trial, trial.params["x"])
    queue.put((me, mine))


def test_worker_processes_claim_each_trial_once_and_stop_at_n_trials(tmp_path):
    url = resolve_storage(f"sqlite:///{tmp_path}/o.db", tmp_path)
    open_study(url, "w", "maximize", None)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_claim_until_done, args=(url, 24, f"w{i}", queue)) for i in range(4)
    ]
    for p in procs:
        p.start()
    claimed = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    numbers = [n for mine in claimed.values() for n in mine]
    assert sorted(numbers) == list(range(24))  # none twice, none past n_trials
    trials = optuna.load_study(study_name="w", storage=url).trials
    assert len(trials) == 24 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.user_attrs[WORKER] for t in trials} <= set(claimed)


def test_a_trial_whose_worker_went_silent_is_failed_and_retried(tmp_path):
    url = resolve_storage(f"sqlite:///{tmp_path}/o.db", tmp_path)
    study = open_study(
        url,
        "s",
        "maximize",
        None,
        heartbeat_interval=1,
        grace_period=1,
        heartbeat_stale_trial_callback=lambda s, t: requeue(s, t, max_retries=1),
    )
    lost, _ = claim(study, SPACE, 2, "host-a:1")  # its worker never beats again
    time.sleep(2.5)
    retry, running = claim(study, SPACE, 2, "host-b:2")
    frozen = study.trials
    assert frozen[lost.number].state == TrialState.FAIL
    assert retry_of(frozen[retry.number]) == lost.number and retry.params == lost.params
    assert retry.user_attrs[WORKER] == "host-b:2" and running == 0
    assert tally(study) == (0, 1, 0)  # the failed trial does not count: its retry runs


def test_the_study_waits_for_trials_running_elsewhere(tmp_path):
    url = resolve_storage(f"sqlite:///{tmp_path}/o.db", tmp_path)
    study = open_study(url, "s", "maximize", None, heartbeat_interval=60)
    first, _ = claim(study, SPACE, 2, "a:1")
    second, _ = claim(study, SPACE, 2, "b:2")
    assert first.number == 0 and second.number == 1
    study.tell(first, 1.0)
    assert claim(study, SPACE, 2, "a:1") == (None, 1)  # not done: trial 1 may still fail
    study.tell(second, 2.0)
    assert claim(study, SPACE, 2, "a:1") == (None, 0)


def test_storage_errors_are_one_line_naming_the_key(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://summarizer:hunter2@127.0.0.1:{port}/optuna"
    with pytest.raises(UserError) as e:
        check_storage(url)
    message = str(e.value)
    assert message.startswith("hydra.sweeper.storage=postgresql+psycopg://summarizer:***@")
    assert f"cannot connect to 127.0.0.1:{port}" in message and "hunter2" not in message
    assert "\n" not in message
    with pytest.raises(UserError, match="not a database URL"):
        check_storage("postgres-ish:/nowhere")
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if psycopg were not installed
    with pytest.raises(UserError, match=r"driver psycopg is not installed.*psycopg\[binary\]"):
        check_storage(url)
    check_storage("sqlite:////tmp/any.db")  # sqlite needs no server


def test_urls_are_logged_without_their_password():
    assert shown("postgresql+psycopg://u:pw@h:5/db") == "postgresql+psycopg://u:***@h:5/db"
    assert redact("trial.storage=postgresql+psycopg://u:s3cret@db.lan:5432/optuna") == (
        "trial.storage=postgresql+psycopg://u:***@db.lan:5432/optuna"
    )
    assert redact("http://127.0.0.1:5050/a@b") == "http://127.0.0.1:5050/a@b"  # no password


def test_report_reads_the_best_trial_from_the_study_not_a_worker_folder(tmp_path):
    url = resolve_storage(f"sqlite:///{tmp_path}/o.db", tmp_path)
    study = open_study(url, "s", "maximize", None)
    for value in (1.0, 3.0):
        t = study.ask(SPACE)
        t.set_user_attr("output_dir", "/on/another/machine/trial")  # not readable here
        t.set_user_attr(WORKER, "machine-b:42")
        t.set_user_attr("metrics", {"rouge1": value * 10, "rouge_sum": value})
        t.set_user_attr("adapter", f"/on/another/machine/adapter{value}")
        study.tell(t, value)
    best = summary(study)["best"]
    assert best["number"] == 1 and best["metrics"] == {"rouge1": 30.0, "rouge_sum": 3.0}
    assert best["adapter"] == "/on/another/machine/adapter3.0" and best["worker"] == "machine-b:42"


def test_only_local_and_submitit_launchers_are_accepted():
    sweeper = SummarizerSweeper()
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": "x"}, "launcher": {"_target_": "h.JoblibLauncher"}}}
    )
    with pytest.raises(UserError, match=r"hydra/launcher \(h.JoblibLauncher\).*submitit_slurm"):
        sweeper.setup(hydra_context=None, task_function=None, config=config)
    basic = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    sweeper.setup(
        hydra_context=None,
        task_function=None,
        config=OmegaConf.create(
            {"hydra": {"sweep": {"dir": "x"}, "launcher": {"_target_": basic}}}
        ),
    )
    assert sweeper.launcher is None  # trials run as local processes


def test_submitit_executor_takes_the_launcher_settings(tmp_path):
    launcher = SimpleNamespace(
        _EXECUTOR="local",
        params={
            "submitit_folder": str(tmp_path / ".submitit/%j"),
            "timeout_min": 7,
            "cpus_per_task": 1,
            "gpus_per_node": None,
            "tasks_per_node": 1,
            "mem_gb": None,
            "nodes": 1,
            "name": "summarizer",
            "stderr_to_stdout": True,
        },
    )
    executor = submitit_executor(launcher)
    assert executor.cluster == "local"
    assert executor._executor.parameters["timeout_min"] == 7


def test_services_find_debian_postgres_and_the_address_to_advertise(monkeypatch, tmp_path):
    for tool in services.PG_TOOLS:
        (tmp_path / tool).write_text("#!/bin/sh\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PG_BIN", str(tmp_path))
    assert services.pg_bin_dir() == tmp_path
    assert services.advertised_host("127.0.0.1") == "127.0.0.1"
    assert services.advertised_host("0.0.0.0") not in ("0.0.0.0", "")
    storage, tracking = services.urls("10.1.2.3", 5433, 5050)
    assert storage == "postgresql+psycopg://summarizer@10.1.2.3:5433/optuna"  # no password
    assert tracking == "http://10.1.2.3:5050"


def test_the_slurm_preset_extends_hydras_submitit_launcher():
    from hydra import compose, initialize_config_dir

    from tests.conftest import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "sweep=tiny_cpu",
                "hydra/launcher=slurm_gpu",
                "hydra.launcher.partition=gpu",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("hydra_submitit_launcher.submitit_launcher.SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)
    assert launcher.timeout_min == 240 and launcher.mem_gb == 64 and launcher.partition == "gpu"
    assert launcher.max_num_timeout == 0  # the sweep re-queues a trial; SLURM does not resubmit
