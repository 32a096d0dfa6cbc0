"""An asynchronous Optuna sweeper for Hydra (`hydra/sweeper: summarizer`).

Why not hydra-optuna-sweeper as is: it asks for a batch of trials, launches them and waits for the
slowest before asking again (idle workers / GPUs); it has no pruning; rerunning a sweep adds n_trials
more instead of resuming to n_trials. This sweeper reuses its search-space syntax
(`choice(...)`, `interval(...)`, `tag(log, interval(...))`, `range(...)`) and changes the loop:

- `n_jobs` worker threads each ask one trial, run it as its own `python -m summarizer` process (own
  memory and CUDA context; `CUDA_VISIBLE_DEVICES` pins one GPU per worker when `gpus` is set) and tell
  the result as soon as it ends, then ask the next — nobody waits for a batch.
- The job attaches to its trial through the shared storage (summarizer/sweep.py): it reports
  -eval_loss at each evaluation and the study's pruner stops it (PRUNED in Optuna and in MLflow).
- The study lives in an RDB (sqlite in multirun/ by default) under the sweep's name. A rerun resumes
  it to n_trials: COMPLETE, PRUNED and genuinely FAILED trials count; trials cut off by Ctrl-C, a
  killed sweeper (same host, dead pid) or a stale heartbeat (another host) are FAILED and re-queued
  with the same parameters, once per `max_retries`.
- MLflow: one parent run per sweep (found again on resume); each trial's run nests under it across
  processes; at the end the parent gets the best-trial summary and Optuna's plots (summarizer/report.py).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

log = logging.getLogger(__name__)

RETRY_OF = "retry_of"  # user attr of a re-queued trial: the number of the trial it repeats
WORKER = "worker"  # user attr: host:pid of the sweeper process running the trial
INTERRUPTED = "interrupted"  # user attr of a trial cut off by Ctrl-C or a dead worker


@dataclass
class SamplerConf:
    name: str = "tpe"  # tpe | random
    seed: int | None = 42
    n_startup_trials: int = 4  # tpe: random trials before the model kicks in
    multivariate: bool = True  # tpe: model parameters jointly (rank x lr interact)


@dataclass
class SummarizerSweeperConf:
    _target_: str = "summarizer.sweeper.SummarizerSweeper"
    study_name: str = "sweep"
    storage: str = (
        "sqlite:///multirun/optuna.db"  # relative sqlite paths: against the launch folder
    )
    direction: str = "maximize"
    n_trials: int = 8  # total for the study, across reruns and workers
    n_jobs: int = 1  # trials in flight in this process (when gpus is empty)
    gpus: list[int] = field(default_factory=list)  # one worker per entry, pinned to that GPU
    sampler: SamplerConf = field(default_factory=SamplerConf)
    params: dict[str, str] = field(default_factory=dict)  # key: optuna sweep syntax
    enqueue: list[dict[str, Any]] = field(default_factory=list)  # trials to run first (new study)
    heartbeat_interval: int = 20  # seconds between heartbeats of a running trial
    grace_period: int = 120  # a trial silent this long is stale (its worker died)
    max_retries: int = 1  # re-runs of a trial cut off by an interruption
    report: bool = True  # plots + best-trial summary at the end (also: make sweep-report)


def resolve_storage(url: str, base: Path) -> str:
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path = (base / url[len("sqlite:///") :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return url


def open_study(
    url: str, name: str, direction: str, sampler: SamplerConf | None, **heartbeat
) -> optuna.Study:
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat
    storage = optuna.storages.RDBStorage(
        url,
        engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {},
        **heartbeat,
    )
    if sampler is None:
        sampler_obj = None
    elif sampler.name == "random":
        sampler_obj = optuna.samplers.RandomSampler(seed=sampler.seed)
    elif sampler.name == "tpe":
        sampler_obj = optuna.samplers.TPESampler(
            seed=sampler.seed,
            n_startup_trials=sampler.n_startup_trials,
            multivariate=sampler.multivariate,
        )
    else:
        raise ValueError(f"hydra.sweeper.sampler.name={sampler.name!r}: expected tpe or random")
    return optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler_obj,
        direction=direction,
        load_if_exists=True,
    )


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial, max_retries: int) -> bool:
    """Queue a cut-off trial's parameters again, so that a rerun loses nothing. The new trial's
    RETRY_OF names the trial it repeats; a chain longer than max_retries is not extended."""
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    depth, cur = 0, trial
    while RETRY_OF in cur.user_attrs and cur.user_attrs[RETRY_OF] in by_number:
        depth, cur = depth + 1, by_number[cur.user_attrs[RETRY_OF]]
    if depth >= max_retries or not trial.params:
        return False
    study.enqueue_trial(dict(trial.params), user_attrs={RETRY_OF: trial.number})
    return True


def tally(study: optuna.Study) -> tuple[int, int, int]:
    """(done, running, waiting). Done: COMPLETE, PRUNED, and FAIL unless re-queued (a retry names it)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_OF) for t in trials}
    done = running = waiting = 0
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            done += 1
        elif t.state == TrialState.FAIL:
            done += t.number not in retried
        elif t.state == TrialState.RUNNING:
            running += 1
        elif t.state == TrialState.WAITING:
            waiting += 1
    return done, running, waiting


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SummarizerSweeper(Sweeper):
    def __init__(self, **conf: Any):
        self.conf: SummarizerSweeperConf = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(SummarizerSweeperConf), conf)
        )
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.procs: dict[int, subprocess.Popen] = {}
        self.told: set[int] = set()  # trials whose outcome was told
        self.errors: list[Exception] = []
        self.me = f"{socket.gethostname()}:{os.getpid()}"

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launch_dir = Path.cwd()
        self.sweep_dir = Path(config.hydra.sweep.dir)

    # --- the loop -------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> list:
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

        c = self.conf
        self.url = resolve_storage(c.storage, self.launch_dir)
        self.study = open_study(
            self.url,
            c.study_name,
            c.direction,
            c.sampler,
            heartbeat_interval=c.heartbeat_interval,
            grace_period=c.grace_period,
            failed_trial_callback=self._on_stale,
        )
        declared = [f"{k}={v}" for k, v in c.params.items()]
        with (
            warnings.catch_warnings()
        ):  # it builds Optuna's deprecated (still working) distributions
            warnings.simplefilter("ignore", FutureWarning)
            self.space, fixed = create_params_from_overrides(declared + list(arguments))
        self.fixed = [f"{k}={v}" for k, v in fixed.items()]
        if not self.study.get_trials(deepcopy=False):
            for params in c.enqueue:
                self.study.enqueue_trial(dict(params), skip_if_exists=True)
        self._recover_own_dead_trials()
        self.parent_run = self._mlflow_parent()
        # One worker per listed GPU (a GPU listed twice runs two trials), else n_jobs workers.
        slots = list(c.gpus) or [None] * max(1, c.n_jobs)
        done, running, waiting = tally(self.study)
        log.info(
            "study %r in %s: %d done, %d running elsewhere, %d queued; target %d trials, %d in parallel",
            c.study_name, self.url, done, running, waiting, c.n_trials, len(slots),
        )  # fmt: skip
        workers = [threading.Thread(target=self._worker, args=(s,), daemon=True) for s in slots]
        for w in workers:
            w.start()
        interrupted = False
        try:
            while any(w.is_alive() for w in workers):
                for w in workers:
                    w.join(timeout=0.5)
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted: stopping running trials; rerun the same command to resume")
            self.stop.set()
            self._terminate_all()
            for w in workers:
                w.join(timeout=60)
        self._finish(interrupted)
        if interrupted:
            raise KeyboardInterrupt
        if self.errors:
            raise self.errors[0]
        return []

    def _worker(self, gpu: int | None) -> None:
        while not self.stop.is_set():
            trial = None
            try:
                with self.lock, warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(self.study)
                    done, running, _ = tally(self.study)
                    if done + running >= self.conf.n_trials:
                        return
                    trial = self.study.ask()
                    for name, dist in self.space.items():
                        trial._suggest(name, dist)  # fixed values for re-queued trials
                    trial.set_user_attr(WORKER, self.me)
                self._run_trial(trial, gpu)
            except Exception as e:  # a sweeper bug or a storage error: stop, leave nothing RUNNING
                log.error("worker stopped: %s: %s", type(e).__name__, e)
                self.errors.append(e)
                self.stop.set()
                if trial is not None and trial.number not in self.told:
                    with self.lock:
                        self.study.tell(trial, state=TrialState.FAIL)
                return

    def _run_trial(self, trial: optuna.Trial, gpu: int | None) -> None:
        overrides = [f"{k}={v}" for k, v in trial.params.items()]
        out = self.sweep_dir / f"trial_{trial.number:04d}"
        if out.exists():  # a study recreated under the same folder: never overwrite old trials
            out = out.with_name(f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        out.mkdir(parents=True)
        cmd = [
            sys.executable,
            "-m",
            "summarizer",
            *self.fixed,
            *overrides,
            f"hydra.run.dir={out}",
            f"trial.storage={self.url}",
            f"trial.study={self.conf.study_name}",
            f"trial.number={trial.number}",
        ]
        if self.parent_run:
            cmd.append(f"trial.parent_run_id={self.parent_run}")
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        elif (
            not self.conf.gpus and self.conf.n_jobs > 1
        ):  # share the cores instead of oversubscribing
            env.setdefault(
                "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.conf.n_jobs))
            )
        trial.set_user_attr("overrides", " ".join(overrides))
        trial.set_user_attr("output_dir", str(out.resolve()))
        log.info(
            "trial %d started%s: %s",
            trial.number,
            f" on GPU {gpu}" if gpu is not None else "",
            " ".join(overrides),
        )
        with open(out / "job.log", "w", encoding="utf-8") as job_log:
            proc = subprocess.Popen(
                cmd,
                cwd=self.launch_dir,
                env=env,
                stdout=job_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.procs[trial.number] = proc
            while proc.poll() is None:
                try:
                    proc.wait(timeout=self.conf.heartbeat_interval)
                except subprocess.TimeoutExpired:
                    self.study._storage.record_heartbeat(trial._trial_id)
            self.procs.pop(trial.number, None)
        self._tell(trial, proc.returncode, out)

    def _tell(self, trial: optuna.Trial, returncode: int, out: Path) -> None:
        from summarizer.sweep import read_result

        result = read_result(out) if returncode == 0 else None
        with self.lock:
            self.told.add(trial.number)
            if self.stop.is_set() and result is None:
                trial.set_user_attr(INTERRUPTED, True)
                self.study.tell(trial, state=TrialState.FAIL)
                self._requeue(trial.number)
                self._mlflow_fail(out, status="KILLED")
                log.info("trial %d interrupted; re-queued for the next run", trial.number)
            elif result and result.get("state") == "PRUNED":
                self.study.tell(trial, state=TrialState.PRUNED)
                log.info("trial %d pruned", trial.number)
            elif result and result.get("state") == "COMPLETE" and result.get("value") is not None:
                self.study.tell(trial, float(result["value"]))
                log.info("trial %d finished: %.4f", trial.number, result["value"])
            else:
                self.study.tell(trial, state=TrialState.FAIL)
                self._mlflow_fail(out)
                log.warning(
                    "trial %d FAILED (exit code %s); see %s",
                    trial.number,
                    returncode,
                    out / "job.log",
                )

    def _requeue(self, number: int) -> None:
        storage = self.study._storage
        trial_id = storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)
        requeue(self.study, storage.get_trial(trial_id), self.conf.max_retries)

    def _on_stale(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna's failed-trial callback for a stale heartbeat: the worker died; run it again."""
        requeue(study, trial, self.conf.max_retries)
        log.warning("trial %d lost its worker (no heartbeat); re-queued", trial.number)

    def _recover_own_dead_trials(self) -> None:
        """RUNNING trials of a sweeper on this host that no longer exists: fail and re-queue now,
        instead of waiting for the heartbeat grace period."""
        host = socket.gethostname()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get(WORKER, "")
            w_host, _, pid = worker.rpartition(":")
            if w_host == host and pid.isdigit() and not _pid_alive(int(pid)):
                self.study._storage.set_trial_user_attr(t._trial_id, INTERRUPTED, True)
                try:
                    self.study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue
                self._requeue(t.number)
                out = Path(t.user_attrs.get("output_dir", ""))
                if out.name:
                    self._mlflow_fail(out, status="KILLED")
                log.warning("trial %d was left running by a dead sweeper; re-queued", t.number)

    def _terminate_all(self) -> None:
        for proc in list(self.procs.values()):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        for proc in list(self.procs.values()):
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    # --- MLflow ---------------------------------------------------------------------------------

    def _tracking_uri(self) -> str | None:
        from summarizer.tracking import resolve_uri

        t = self.config.get("tracking")
        if t is None or not t.enabled:
            return None
        return resolve_uri(t.uri, self.launch_dir)

    def _mlflow_parent(self) -> str | None:
        """The sweep's parent run: found again by tag on resume, else created."""
        uri = self._tracking_uri()
        if not uri:
            return None
        from summarizer.tracking import parent_run

        return parent_run(uri, self.config.tracking.experiment, self.conf.study_name, self.url)

    def _mlflow_fail(self, out: Path, status: str = "FAILED") -> None:
        uri = self._tracking_uri()
        run_file = out / "mlflow_run_id"
        if uri and run_file.is_file():
            from summarizer.tracking import end_run_if_running

            end_run_if_running(uri, run_file.read_text().strip(), status, "FAIL")

    def _finish(self, interrupted: bool) -> None:
        done, _running, waiting = tally(self.study)
        log.info(
            "study %r: %d of %d trials done, %d queued",
            self.conf.study_name,
            done,
            self.conf.n_trials,
            waiting,
        )
        if self.conf.report:
            from summarizer.report import report

            try:
                report(
                    self.study,
                    self.sweep_dir / "report",
                    self._tracking_uri(),
                    self.parent_run,
                    finished=not interrupted and done >= self.conf.n_trials,
                )
            except Exception as e:  # a report must not lose a finished sweep
                log.warning("sweep report failed: %s (rerun: make sweep-report)", e)
