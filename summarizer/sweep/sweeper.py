"""An asynchronous Optuna sweeper for Hydra (`hydra/sweeper: summarizer`), for one process or many.

Why not hydra-optuna-sweeper as is: it asks for a batch of trials, launches them and waits for the
slowest before asking again (idle workers / GPUs); it has no pruning; rerunning a sweep adds n_trials
more instead of resuming to n_trials. This sweeper reuses its search-space syntax
(`choice(...)`, `interval(...)`, `tag(log, interval(...))`, `range(...)`) and changes the loop:

- `n_jobs` worker threads each claim one trial, run it, tell the result as soon as it ends, then
  claim the next — nobody waits for a batch. How a trial runs follows `hydra/launcher`
  (sweep/jobs.py):
  - `basic` (the default): its own `python -m summarizer` process on this machine (own memory and
    CUDA context; `CUDA_VISIBLE_DEVICES` pins one GPU per worker when `gpus` is set). The process
    dies with its sweeper, so a killed worker leaves no trial running unseen.
  - `submitit_local`, `submitit_slurm` or a preset extending them (conf/hydra/launcher/): one
    submitit job per trial, built from the launcher plugin's own settings (partition, GPUs, time,
    memory) and running the plugin's own job body (Hydra composes the trial's config in the job).
    The thread holds the job's future, records the trial's heartbeat while it is queued or running,
    and cancels it on Ctrl-C. Trade-offs: one scheduler job per trial (no job arrays: arrays are
    submitted as a batch, which is the wait-for-the-slowest loop again); `n_jobs` bounds the jobs
    in the queue at once; the sweeper must outlive its jobs (a login node in tmux, or its own
    small job), and it and the jobs share a filesystem (submitit's pickles, `result.json`). Any
    other launcher is refused rather than half supported.
- The job attaches to its trial through the shared storage (sweep/trial.py): it reports -eval_loss
  (or ROUGE on some validation rows: trial.intermediate=rouge) at each evaluation and the study's
  pruner stops it (PRUNED in Optuna and in MLflow).
- The study lives in an RDB (sqlite in multirun/ by default; PostgreSQL for several machines;
  sweep/storage.py) under the sweep's name. A rerun resumes it to n_trials: COMPLETE, PRUNED and
  genuinely FAILED trials count; trials cut off by Ctrl-C, a killed sweeper (same host, dead pid)
  or a stale heartbeat (any host) are FAILED and run again with the same parameters by Optuna's
  RetryHeartbeatStaleTrialCallback, at most `max_retries` times (sweep/study.py). A sweep without
  any result (every trial it ran FAILED) exits 2 naming the first failure;
  `retry_failed=true` queues the study's FAILED trials once more after the cause was fixed.
- One study, one set of settings: the study keeps its fixed settings (config minus searched keys)
  and its identity (a UUID); a sweeper with other settings stops in one line, and a new study
  under an old name gets its own MLflow parent run and report folder.
- Workers: several sweeper processes — on one machine or many — started with the same `storage` and
  `study_name` share the sweep. Each claim (fail stale trials, count, ask) runs under a lock held by
  the storage itself, so no worker overshoots n_trials, and Optuna hands each trial, queued or new,
  to exactly one worker. A worker stays until the study has n_trials done, to take over the retry
  of a worker that dies.
- Refit (`refit=true`): once the study has n_trials done, one worker (claimed under the same
  lock) trains the best trial's settings again on every labelled row and publishes its test
  predictions as <sweep dir>/submission.csv (sweep/refit.py); a rerun resumes or skips it.
- MLflow: one parent run per sweep, found or created under the same lock (workers starting together
  find one run, not three); each trial's run nests under it across processes; results are kept in
  the study too (user attrs `metrics`, `adapter`, `worker`), so the report can be made from any
  machine (sweep/report.py).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from summarizer import compat
from summarizer.config import SamplerConf
from summarizer.errors import UserError, first_line
from summarizer.sweep import jobs
from summarizer.sweep import refit as refits
from summarizer.sweep.pruners import build_sampler, check_pruner
from summarizer.sweep.storage import check_storage, resolve_storage, shown, storage_lock
from summarizer.sweep.study import (
    ERROR,
    INTERRUPTED,
    JOINED,
    WORKER,
    beat,
    check_settings,
    claim,
    failed,
    frozen,
    identify,
    keep_result,
    open_study,
    recover_dead_trials,
    requeue,
    retry_failed,
    search_space,
    tally,
)
from summarizer.sweep.trial import read_result

log = logging.getLogger(__name__)


@dataclass
class SummarizerSweeperConf:
    _target_: str = "summarizer.sweep.sweeper.SummarizerSweeper"
    study_name: str = "sweep"
    storage: str = (
        "sqlite:///multirun/optuna.db"  # relative sqlite paths: against the launch folder
    )
    direction: str = "maximize"
    n_trials: int = 8  # total for the study, across reruns and workers
    n_jobs: int = 1  # trials in flight in this process (when gpus is empty)
    # [0,1,...]: one worker per entry, pinned to that GPU; auto: one per visible GPU
    gpus: Any = field(default_factory=list)
    sampler: SamplerConf = field(default_factory=SamplerConf)
    params: dict[str, str] = field(default_factory=dict)  # key: optuna sweep syntax
    enqueue: list[dict[str, Any]] = field(default_factory=list)  # trials to run first (new study)
    heartbeat_interval: int = 20  # seconds between heartbeats of a running trial
    grace_period: int = 120  # a trial silent this long is stale (its worker died)
    max_retries: int = 1  # re-runs of a trial cut off by an interruption
    retry_failed: bool = False  # queue the study's FAILED trials once more (their cause was fixed)
    report: bool = True  # plots + best-trial summary at the end (also: make sweep-report)
    # each worker starts its next trial's process ahead, importing torch & co while the current
    # trial runs (sweep/warm.py): auto = when trials run on GPUs (hydra.sweeper.gpus) | true | false
    warm_start: Any = "auto"
    # at the end: the best trial's settings trained again on every labelled row, its predictions
    # of data.test_path as <sweep dir>/submission.csv (sweep/refit.py)
    refit: bool = False


def warm_start(value: Any, on_gpus: bool) -> bool:
    """hydra.sweeper.warm_start as a switch: auto is on when the trials run on GPUs."""
    shown = str(value).lower()
    if shown not in ("auto", "true", "false"):
        raise UserError(f"hydra.sweeper.warm_start={value!r}: expected auto, true or false")
    return on_gpus if shown == "auto" else shown == "true"


def _shown_distribution(d: optuna.distributions.BaseDistribution) -> str:
    """`choice(8, 16)`, `log interval(5e-05, 0.0005)`, `int interval(0, 3)`: the sweep's syntax."""
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return f"choice({', '.join(map(str, d.choices))})"
    kind = "int " if isinstance(d, optuna.distributions.IntDistribution) else ""
    step = f", step={d.step}" if d.step not in (None, 1) else ""
    return f"{'log ' if d.log else ''}{kind}interval({d.low}, {d.high}{step})"


class SummarizerSweeper(Sweeper):
    def __init__(self, **conf: Any):
        self.conf: SummarizerSweeperConf = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(SummarizerSweeperConf), conf)
        )
        self.stop = threading.Event()
        self.wake = threading.Event()  # a trial ended: waiting workers look again
        self.ended = threading.Condition()  # a worker thread ended (self.alive: those left)
        self.alive = 0
        self.lock = threading.Lock()
        self.submit_lock = threading.Lock()
        self.procs: dict[int, subprocess.Popen] = {}
        self.jobs: dict[int, Any] = {}  # trial number -> submitit job
        self.told: set[int] = set()  # trials whose outcome was told
        self.errors: list[Exception] = []
        self.outcomes: list[tuple] = []  # (number, state, why, log) of each trial this process told
        self.me = f"{socket.gethostname()}:{os.getpid()}"
        self.launcher = None
        self.executor = None
        self.parent_run: str | None = None
        self.said_waiting = False

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launch_dir = Path.cwd()
        self.sweep_dir = Path(config.hydra.sweep.dir)
        target = str(OmegaConf.select(config, "hydra.launcher._target_") or "")
        if "hydra_submitit_launcher" in target:
            from hydra.core.plugins import Plugins

            self.launcher = Plugins.instance().instantiate_launcher(
                hydra_context=hydra_context, task_function=task_function, config=config
            )
        elif not target.endswith(".BasicLauncher"):
            raise UserError(
                f"hydra/launcher ({target}): the summarizer sweeper runs trials as local processes "
                "(basic, the default) or as submitit jobs (submitit_local, submitit_slurm, or a "
                "preset in conf/hydra/launcher extending them)"
            )

    # --- the loop -------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> list:
        from summarizer.distributed import sweep_gpus

        c = self.conf
        gpus = sweep_gpus(c.gpus)  # gpus=auto on a machine without one fails before anything
        self.gpus = gpus
        self.warm = warm_start(c.warm_start, bool(gpus)) and self.launcher is None
        pruner = OmegaConf.select(self.config, "trial.pruner")
        if pruner is not None:  # a bad pruner fails here once, not in every trial's job
            check_pruner(pruner)
        self.url = resolve_storage(c.storage, self.launch_dir)
        check_storage(self.url)
        self.study = open_study(
            self.url,
            c.study_name,
            c.direction,
            c.sampler,
            heartbeat_interval=c.heartbeat_interval,
            grace_period=c.grace_period,
            heartbeat_stale_trial_callback=self._on_stale,
        )
        self.space, fixed = search_space(
            [f"{k}={v}" for k, v in c.params.items()] + list(arguments)
        )
        self.fixed = [f"{k}={v}" for k, v in fixed.items()]
        if c.refit:  # before any trial: a sweep that cannot end in a submission does not start
            self._check_refit(fixed)
        if self._tracking_uri():
            import mlflow  # noqa: F401  (seconds of import: not while holding the lock below)
        # Under the study's lock: workers starting together agree on the study's identity and
        # settings, and create one MLflow experiment and parent run.
        with storage_lock(self.url, c.study_name):
            self.study_id, made_now = identify(self.study)
            check_settings(self.study, self._settings(fixed), set(self.space), shown(self.url))
            # A study older than identities: its parent run from then is its own.
            older = made_now and bool(self.study.get_trials(deepcopy=False))
            self.parent_run = self._mlflow_parent(adopt=older)
            self._mlflow_settings()
        with storage_lock(self.url, c.study_name):  # one enqueue, not one per worker
            if not self.study.get_trials(deepcopy=False):
                for params in c.enqueue:
                    self.study.enqueue_trial(dict(params), skip_if_exists=True)
            joined = int(self.study.user_attrs.get(JOINED, 0))
            self.study.set_user_attr(JOINED, joined + 1)
            lost = recover_dead_trials(self.study, c.max_retries, read_result)
            again = retry_failed(self.study) if c.retry_failed else []
        if again:
            log.info(
                "hydra.sweeper.retry_failed=true: failed trial(s) %s queued again",
                ", ".join(map(str, again)),
            )
        for number, again in lost:
            self._mlflow_fail(number, status="KILLED")
            log.warning(
                "trial %d was left running by a dead sweeper; %s",
                number,
                "re-queued" if again else "retries used up",
            )
        if joined:
            self.study.sampler = build_sampler(c.sampler, offset=joined)
        if self.launcher is not None:
            self.executor = jobs.submitit_executor(self.launcher)
            if c.gpus:
                log.warning(
                    "hydra.sweeper.gpus only sets how many trials run at once with a submitit "
                    "launcher; the scheduler assigns GPUs (hydra.launcher.gpus_per_node)"
                )
        # One worker per listed GPU (a GPU listed twice runs two trials), else n_jobs workers.
        slots = gpus or [None] * max(1, c.n_jobs)
        done, running, waiting = tally(self.study)
        how = f"submitit {compat.submitit_kind(self.launcher)} jobs" if self.launcher else None
        log.info(
            "study %r in %s: %d done, %d running elsewhere, %d queued; target %d trials, %d in "
            "parallel (%s)",
            c.study_name, shown(self.url), done, running, waiting, c.n_trials, len(slots),
            how or "local processes",
        )  # fmt: skip
        # Workers count themselves out on a condition: after a Ctrl-C has interrupted a
        # Thread.join, CPython 3.11 may report a still running thread as not alive.
        self.alive = len(slots)
        for s in slots:
            threading.Thread(target=self._worker, args=(s,), daemon=True).start()
        interrupted = False
        with jobs.sigterm_as_ctrl_c():
            try:
                with self.ended:
                    while self.alive:
                        self.ended.wait(timeout=0.5)
            except KeyboardInterrupt:
                interrupted = True
                jobs.ignore_sigterm()
                log.warning(
                    "interrupted: stopping running trials; rerun the same command to resume"
                )
                self.stop.set()
                self.wake.set()
                jobs.terminate(self.procs, self.jobs)
                with self.ended:  # each worker tells its cut-off trial (FAIL, re-queued) and ends
                    self.ended.wait_for(lambda: self.alive == 0, timeout=60)
        refit_error = None
        if c.refit and not interrupted and not self.errors:
            interrupted, refit_error = self._refit()
        self._finish()
        if interrupted:
            raise KeyboardInterrupt
        if self.errors:
            from sqlalchemy.exc import OperationalError

            e = self.errors[0]
            if isinstance(e, OperationalError):
                raise UserError(
                    f"hydra.sweeper.storage={shown(self.url)}: lost the database during the sweep "
                    f"({first_line(e.orig or e)}); rerun the same command to resume"
                ) from e
            raise e
        self._check_outcome()
        if refit_error:
            raise UserError(refit_error)
        return []

    # --- the refit -------------------------------------------------------------------------------

    def _check_refit(self, fixed: dict) -> None:
        test = fixed.get("data.test_path", OmegaConf.select(self.config, "data.test_path"))
        if not test or str(test) in ("null", "None"):
            raise UserError(
                "hydra.sweeper.refit=true needs data.test_path (the rows the refit predicts for "
                "submission.csv); set it, or hydra.sweeper.refit=false"
            )
        if not (self.launch_dir / str(test)).is_file():
            raise UserError(f"data.test_path={test}: file not found (hydra.sweeper.refit=true)")

    def _refit(self) -> tuple[bool, str | None]:
        """Train the best trial's settings on all labelled rows and publish its submission, here
        unless another worker does or did. Returns (interrupted, the error line of a failure)."""
        c = self.conf
        with storage_lock(self.url, c.study_name):
            d = refits.decide(self.study, c.n_trials, self.sweep_dir, self.me, c.grace_period)
        if d.action == "done":
            refits.publish(d.folder / refits.SUBMISSION, self.sweep_dir / refits.SUBMISSION)
            log.info("refit done: %s", self.sweep_dir / refits.SUBMISSION)
            return False, None
        if d.action != "run":
            log.info("refit: not here (%s)", d.why if d.action != "elsewhere" else
                     f"trial {d.trial.number}'s refit runs in {d.why}")  # fmt: skip
            return False, None
        trial, out = d.trial, d.folder
        budget, why = refits.budget(trial, refits.settings(self.study))
        own = [*budget, f"tracking.run_name={c.study_name}-refit", f"trial.refit_of={trial.number}"]
        if self.parent_run:
            own.append(f"trial.parent_run_id={self.parent_run}")
        if d.resume:
            own.append("train.resume=true")
        args = refits.overrides(self.fixed, trial.params, own)
        aside = refits.prepare(out, d.resume)
        if aside:
            log.info("refit: %s had no checkpoint to resume from: kept as %s", out, aside)
        log.info(
            "refit%s: trial %d's settings on every labelled row, %s, in %s",
            " resumed" if d.resume else "", trial.number, why, out,
        )  # fmt: skip
        returncode, logs, interrupted = None, out / "job.log", False
        with jobs.sigterm_as_ctrl_c():
            try:
                returncode, logs = self._run_refit(args, out, trial.number)
            except KeyboardInterrupt:
                interrupted = True
                jobs.ignore_sigterm()
                log.warning("interrupted: stopping the refit; rerun the same command to resume it")
                jobs.terminate(self.procs, self.jobs)
        result = refits.read_result(out) if returncode == 0 else None
        run_id = self._refit_run(out, trial.number)
        if result and result.get("state") == "COMPLETE" and (out / refits.SUBMISSION).is_file():
            target = self.sweep_dir / refits.SUBMISSION
            backup = refits.publish(out / refits.SUBMISSION, target)
            if backup:
                log.info("refit: the previous %s is kept as %s", target.name, backup)
            refits.record(self.study, "COMPLETE", run_id=run_id)
            self._mlflow_refit(run_id, target)
            log.info("refit done: %s (trial %d's settings, %s)", target, trial.number, out)
            return False, None
        if interrupted:
            refits.record(self.study, "FAIL", error="interrupted")
            return True, None
        reason = jobs.failure_line(logs) or f"exit code {returncode}"
        refits.record(self.study, "FAIL", error=reason)
        return False, (
            f"the refit of trial {trial.number} FAILED: {reason} (see {logs}); rerun the same "
            "command to resume it"
        )

    def _run_refit(self, args: list[str], out: Path, number: int) -> tuple[int, Path]:
        """The refit job, as the trials ran: a local process (on the first listed GPU), or one
        submitit job whose folder is `out` (hydra.sweep.subdir)."""
        beat = lambda: refits.beat(self.study)  # noqa: E731
        if self.executor is None:
            gpu = self.gpus[0] if self.gpus else None
            returncode = jobs.run_process(
                args,
                out,
                cwd=self.launch_dir,
                env=jobs.process_env(gpu, 0),
                beat=beat,
                interval=self.conf.heartbeat_interval,
                running=self.procs,
                key=-1,
            )
            return returncode, out / "job.log"

        def submit(*job_args):
            with self.submit_lock:
                return self.executor.submit(*job_args)

        return jobs.run_job(
            submit,
            self.launcher,
            [*args, f"hydra.sweep.subdir={out.name}"],
            number,
            beat=beat,
            interval=self.conf.heartbeat_interval,
            running=self.jobs,
            submitted=lambda job: log.info("refit: submitit job %s", job.job_id),
            warn=lambda line: log.warning("refit: %s", line),
        )

    def _refit_run(self, out: Path, number: int) -> str | None:
        """The refit job's MLflow run (from its folder), tagged `refit.of_trial` and ended if its
        process could not end it (killed)."""
        uri = self._tracking_uri()
        run_file = out / "mlflow_run_id"
        if not uri or not run_file.is_file():
            return None
        run_id = run_file.read_text("utf-8").strip()
        try:
            from mlflow.tracking import MlflowClient

            from summarizer.tracking import end_run_if_running

            MlflowClient(uri).set_tag(run_id, "refit.of_trial", str(number))
            end_run_if_running(uri, run_id, "KILLED", "FAIL")
        except Exception as e:  # bookkeeping: never lose a finished refit for it
            log.warning("MLflow: could not tag the refit's run: %s", first_line(e))
        return run_id

    def _mlflow_refit(self, run_id: str | None, submission: Path) -> None:
        uri = self._tracking_uri()
        if not uri or not self.parent_run:
            return
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(uri)
            if run_id:
                client.set_tag(self.parent_run, "refit.run_id", run_id)
            client.log_artifact(self.parent_run, str(submission))
        except Exception as e:  # bookkeeping: never lose a finished refit for it
            log.warning("MLflow: could not log the refit on the sweep's run: %s", first_line(e))

    def _settings(self, fixed: dict) -> dict[str, str]:
        """What every trial of this sweep runs with, as strings: the composed config without
        Hydra's part, the config groups' choices, and this command's fixed values on top."""
        from summarizer.tracking import flatten

        tree = OmegaConf.to_container(self.config, resolve=False)  # as written: ${...} stay
        tree.pop("hydra", None)
        out = flatten(tree)
        choices = OmegaConf.select(self.config, "hydra.runtime.choices") or {}
        out.update({g: str(o) for g, o in choices.items() if not g.startswith("hydra/")})
        out.update({k.lstrip("+~"): str(v) for k, v in fixed.items()})
        return out

    def _check_outcome(self) -> None:
        """A sweep without any result is an error (exit 2): every trial this process ran failed,
        or it ran none and the study's trials are all FAILED. Some failures among results are a
        warning that says how to run them again."""
        c = self.conf
        again = "rerun with hydra.sweeper.retry_failed=true to run them again"
        mine = sorted((o for o in self.outcomes if o[1] == "FAIL"), key=lambda o: o[0])  # by number
        if self.outcomes and len(mine) == len(self.outcomes):
            number, _, why, logs = mine[0]
            raise UserError(
                f"all {len(mine)} trial(s) of this sweep failed; the first, trial {number}: "
                f"{why} (see {logs}); fix the cause and {again}"
            )
        if self.outcomes:
            return
        lost = failed(self.study)
        if not lost:
            return
        first = lost[0]
        why = first.user_attrs.get(ERROR) or "no error line"
        where = Path(first.user_attrs.get("output_dir", self.sweep_dir)) / "job.log"
        good = self.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)
        )
        if not good:
            raise UserError(
                f"study {c.study_name!r}: all {len(lost)} trial(s) FAILED and count as done, so "
                f"nothing ran; the first, trial {first.number}: {why} (see {where}); {again}"
            )
        log.warning(
            "study %r: %d FAILED trial(s) count as done (the first, trial %d: %s); %s",
            c.study_name, len(lost), first.number, why, again,
        )  # fmt: skip

    def _worker(self, gpu: int | None) -> None:
        try:
            self._work(gpu)
        finally:
            with self.ended:
                self.alive -= 1
                self.ended.notify_all()

    def _work(self, gpu: int | None) -> None:
        spare = jobs.Spare() if self.warm else None
        try:
            self._claim_and_run(gpu, spare)
        finally:
            if spare:
                spare.close()

    def _claim_and_run(self, gpu: int | None, spare: jobs.Spare | None) -> None:
        while not self.stop.is_set():
            trial = None
            try:
                with self.lock, storage_lock(self.url, self.conf.study_name):
                    trial, running = claim(self.study, self.space, self.conf.n_trials, self.me)
                if trial is None:
                    if running == 0:
                        return
                    if not self.said_waiting:
                        self.said_waiting = True
                        log.info(
                            "%d trial(s) still running, here or in other workers: waiting, to "
                            "take over any that loses its worker",
                            running,
                        )
                    self.wake.wait(timeout=self.conf.heartbeat_interval)
                    self.wake.clear()
                    continue
                self._run_trial(trial, gpu, spare)
            except Exception as e:  # a sweeper bug or a storage error: stop, leave nothing RUNNING
                log.error("worker stopped: %s: %s", type(e).__name__, e)
                self.errors.append(e)
                self.stop.set()
                self.wake.set()
                if trial is not None and trial.number not in self.told:
                    with self.lock, contextlib.suppress(Exception):
                        self.study.tell(trial, state=TrialState.FAIL)
                return

    def _run_trial(self, trial: optuna.Trial, gpu: int | None, spare: jobs.Spare | None) -> None:
        fixed = {f.split("=", 1)[0] for f in self.fixed}
        # A fixed value on this command line wins over a retry's value from an older search space.
        overrides = [f"{k}={v}" for k, v in trial.params.items() if k not in fixed]
        # A study recreated under the same folder never overwrites old trials: the next free
        # trial_NNNN[-time[-k]] (two new studies may start the same trial within one second)
        base, stamp = f"trial_{trial.number:04d}", time.strftime("%Y%m%d-%H%M%S")
        for k in itertools.count():
            name = base if k == 0 else f"{base}-{stamp}" if k == 1 else f"{base}-{stamp}-{k - 1}"
            out = self.sweep_dir / name
            try:
                out.mkdir(parents=True)
                break
            except FileExistsError:
                continue
        args = [
            *self.fixed,
            *overrides,
            f"trial.storage={self.url}",
            f"trial.study={self.conf.study_name}",
            f"trial.number={trial.number}",
        ]
        if self.parent_run:
            args.append(f"trial.parent_run_id={self.parent_run}")
        trial.set_user_attr("overrides", " ".join(overrides))
        trial.set_user_attr("output_dir", str(out.resolve()))
        log.info(
            "trial %d started%s: %s",
            trial.number,
            f" on GPU {gpu}" if gpu is not None and self.executor is None else "",
            " ".join(overrides),
        )
        if self.executor is None:
            returncode = jobs.run_process(
                args,
                out,
                cwd=self.launch_dir,
                env=jobs.process_env(gpu, 0 if self.conf.gpus else self.conf.n_jobs),
                beat=lambda: beat(self.study, trial),
                interval=self.conf.heartbeat_interval,
                running=self.procs,
                key=trial.number,
                spare=spare,
            )
            logs = out / "job.log"
        else:
            returncode, logs = self._run_job(trial, args, out)
        self._tell(trial, returncode, out, logs)

    def _run_job(self, trial: optuna.Trial, args: list[str], out: Path) -> tuple[int, Path]:
        """One submitit job for this trial; its folder becomes <sweep dir>/trial_NNNN through
        hydra.sweep.subdir."""

        def submit(*job_args):
            with self.submit_lock:  # the executor is shared by the worker threads
                return self.executor.submit(*job_args)

        def submitted(job) -> None:
            trial.set_user_attr("job_id", str(job.job_id))
            log.info(
                "trial %d: submitit job %s (logs: %s)", trial.number, job.job_id, job.paths.folder
            )

        return jobs.run_job(
            submit,
            self.launcher,
            [*args, f"hydra.sweep.subdir={out.name}"],
            trial.number,
            beat=lambda: beat(self.study, trial),
            interval=self.conf.heartbeat_interval,
            running=self.jobs,
            submitted=submitted,
            warn=lambda line: log.warning("trial %d: %s", trial.number, line),
        )

    def _tell(self, trial: optuna.Trial, returncode: int, out: Path, logs: Path) -> None:
        result = read_result(out) if returncode == 0 else None
        with self.lock:
            self.told.add(trial.number)
            if self.stop.is_set() and result is None:
                trial.set_user_attr(INTERRUPTED, True)
                self.study.tell(trial, state=TrialState.FAIL)
                with storage_lock(self.url, self.conf.study_name):
                    again = requeue(self.study, frozen(self.study, trial), self.conf.max_retries)
                self._mlflow_fail(trial.number, status="KILLED")
                log.info(
                    "trial %d interrupted; %s",
                    trial.number,
                    "re-queued for the next run" if again else "retries used up",
                )
            elif result and result.get("state") == "PRUNED":
                self.study.tell(trial, state=TrialState.PRUNED)
                self.outcomes.append((trial.number, "PRUNED", None, logs))
                log.info("trial %d pruned", trial.number)
            elif result and result.get("state") == "COMPLETE" and result.get("value") is not None:
                keep_result(self.study, trial, result)
                self.study.tell(trial, float(result["value"]))
                self.outcomes.append((trial.number, "COMPLETE", None, logs))
                log.info("trial %d finished: %.4f", trial.number, result["value"])
            else:
                reason = jobs.failure_line(logs)
                if reason:  # kept in the study: the report and other workers can show it
                    trial.set_user_attr(ERROR, reason)
                self.study.tell(trial, state=TrialState.FAIL)
                why = reason or f"exit code {returncode}"
                self.outcomes.append((trial.number, "FAIL", why, logs))
                self._mlflow_fail(trial.number)
                log.warning(
                    "trial %d FAILED (exit code %s)%s; see %s",
                    trial.number,
                    returncode,
                    f": {reason}" if reason else "",
                    logs,
                )
        self.wake.set()

    def _on_stale(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """The storage's heartbeat_stale_trial_callback: the trial's worker died (no heartbeat for
        grace_period), wherever it ran. Optuna's retry callback runs it again; this one also ends
        its MLflow run and says so (the library's callback does neither)."""
        again = requeue(study, trial, self.conf.max_retries)
        self._mlflow_fail(trial.number, status="KILLED")
        log.warning(
            "trial %d lost its worker %s (no heartbeat for %d s)%s",
            trial.number,
            trial.user_attrs.get(WORKER, "?"),
            self.conf.grace_period,
            "; re-queued" if again else "; retries used up",
        )

    # --- MLflow ---------------------------------------------------------------------------------
    # Not optuna-integration's MLflowCallback: it logs each trial from study.optimize's process;
    # here each job logs its own run, nested under the sweep's parent run across processes.

    def _tracking_uri(self) -> str | None:
        from summarizer.tracking import resolve_uri

        t = self.config.get("tracking")
        if t is None or not t.enabled:
            return None
        return resolve_uri(t.uri, self.launch_dir)

    def _mlflow_parent(self, adopt: bool = False) -> str | None:
        """The sweep's parent run: found again by the study's identity (a rerun, another worker),
        else created. Call under the study's lock."""
        uri = self._tracking_uri()
        if not uri:
            return None
        from summarizer.tracking import parent_run, preflight

        preflight(self.config.tracking, uri)  # an unreachable server: one line, in seconds
        return parent_run(
            uri,
            self.config.tracking.experiment,
            self.conf.study_name,
            shown(self.url),
            self.study_id,
            adopt=adopt,
        )

    def _mlflow_settings(self) -> None:
        """The search space (each parameter's distribution), sampler and pruner on the parent run:
        what the sweep searched, readable beside its trials."""
        uri = self._tracking_uri()
        if not uri or not self.parent_run:
            return
        from summarizer.tracking import log_new_params

        params = {f"space.{k}": _shown_distribution(d) for k, d in self.space.items()}
        sampler = OmegaConf.to_container(OmegaConf.structured(self.conf.sampler))
        params.update({f"sampler.{k}": v for k, v in sampler.items()})
        pruner = OmegaConf.select(self.config, "trial.pruner")
        if pruner is not None:
            params.update({f"pruner.{k}": v for k, v in OmegaConf.to_container(pruner).items()})
        c = self.conf
        params.update({"n_trials": c.n_trials, "direction": c.direction, "study": c.study_name})
        try:
            log_new_params(uri, self.parent_run, params)
        except Exception as e:  # bookkeeping: never stop the sweep for it
            log.warning("MLflow: could not log the sweep's settings: %s", first_line(e))

    def _mlflow_fail(self, number: int, status: str = "FAILED") -> None:
        """End trial `number`'s MLflow run if its job could not (killed, died with its worker).
        Found by its tags under the parent run: no file of the machine that ran it is needed."""
        uri = self._tracking_uri()
        if not uri or not self.parent_run:
            return
        from summarizer.tracking import end_trial_runs

        try:
            end_trial_runs(uri, self.parent_run, number, status, "FAIL")
        except Exception as e:  # bookkeeping: never stop the sweep for it
            log.warning("MLflow: could not end trial %d's run: %s", number, first_line(e))

    def _finish(self) -> None:
        done, running, waiting = tally(self.study)
        log.info(
            "study %r: %d of %d trials done, %d queued",
            self.conf.study_name,
            done,
            self.conf.n_trials,
            waiting,
        )
        if done >= self.conf.n_trials:
            status = "FINISHED"
        elif running:  # other workers go on; the last one ends the parent run
            status = None
        else:
            status = "KILLED"
        if self.conf.report:
            from summarizer.sweep.report import report

            try:
                report(
                    self.study,
                    self.sweep_dir / "report",
                    self._tracking_uri(),
                    self.parent_run,
                    status=status,
                )
            except Exception as e:  # a report must not lose a finished sweep
                log.warning("sweep report failed: %s (rerun: make sweep-report)", e)
