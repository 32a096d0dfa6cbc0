"""An asynchronous Optuna sweeper for Hydra (`hydra/sweeper: summarizer`), for one process or many.

Why not hydra-optuna-sweeper as is: it asks for a batch of trials, launches them and waits for the
slowest before asking again (idle workers / GPUs); it has no pruning; rerunning a sweep adds n_trials
more instead of resuming to n_trials. This sweeper reuses its search-space syntax
(`choice(...)`, `interval(...)`, `tag(log, interval(...))`, `range(...)`) and changes the loop:

- `n_jobs` worker threads each ask one trial, run it, tell the result as soon as it ends, then ask
  the next — nobody waits for a batch. How a trial runs follows `hydra/launcher`:
  - `basic` (the default): its own `python -m summarizer` process on this machine (own memory and
    CUDA context; `CUDA_VISIBLE_DEVICES` pins one GPU per worker when `gpus` is set). The process
    dies with its sweeper (PR_SET_PDEATHSIG), so a killed worker leaves no trial running unseen.
  - `submitit_local`, `submitit_slurm` or a preset extending them (conf/hydra/launcher/): one
    submitit job per trial, built from the launcher plugin's own settings (partition, GPUs, time,
    memory) and running the plugin's own job body (Hydra composes the trial's config in the job).
    The thread holds the job's future, records the trial's heartbeat while it is queued or running,
    and cancels it on Ctrl-C. Trade-offs: one scheduler job per trial (no job arrays: arrays are
    submitted as a batch, which is the wait-for-the-slowest loop again); `n_jobs` bounds the jobs
    in the queue at once; the sweeper must outlive its jobs (a login node in tmux, or its own
    small job), and it and the jobs share a filesystem (submitit's pickles, `result.json`). Any
    other launcher is refused rather than half supported.
- The job attaches to its trial through the shared storage (summarizer/sweep.py): it reports
  -eval_loss at each evaluation and the study's pruner stops it (PRUNED in Optuna and in MLflow).
- The study lives in an RDB (sqlite in multirun/ by default; PostgreSQL for several machines) under
  the sweep's name. A rerun resumes it to n_trials: COMPLETE, PRUNED and genuinely FAILED trials
  count; trials cut off by Ctrl-C, a killed sweeper (same host, dead pid) or a stale heartbeat
  (Optuna's heartbeat_stale_trial_callback, any host) are FAILED and re-queued with the same
  parameters, once per `max_retries`.
- Workers: several sweeper processes — on one machine or many — started with the same `storage` and
  `study_name` share the sweep. Each claim (fail stale trials, count, ask) runs under a lock held by
  the storage itself: a PostgreSQL advisory lock (released with its transaction, or by the server
  when a killed worker's connection drops) or a file lock beside a sqlite file. So no worker
  overshoots n_trials, and Optuna hands each trial, queued or new, to exactly one worker. A worker
  stays until the study has n_trials done, to take over the retry of a worker that dies.
- MLflow: one parent run per sweep, found or created under the same lock (workers starting together
  find one run, not three); each trial's run nests under it across processes; results are kept in
  the study too (user attrs `metrics`, `adapter`, `worker`), so the report can be made from any
  machine (summarizer/report.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import _convert_old_distribution_to_new_distribution
from optuna.trial import TrialState

from summarizer.config import SamplerConf
from summarizer.errors import UserError, first_line, log_tail
from summarizer.sweep.pruners import build_sampler
from summarizer.sweep.services import pid_alive

log = logging.getLogger(__name__)

RETRY_OF = "retry_of"  # user attr of a re-queued trial: the number of the trial it repeats
WORKER = "worker"  # user attr: host:pid of the sweeper process running the trial
INTERRUPTED = "interrupted"  # user attr of a trial cut off by Ctrl-C or a dead worker
ERROR = "error"  # user attr of a failed trial: the line of its job.log that says why
JOINED = "sweepers_joined"  # study user attr: sweeper processes started on it (seed offsets)


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
    report: bool = True  # plots + best-trial summary at the end (also: make sweep-report)


def resolve_storage(url: str, base: Path) -> str:
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path = (base / url[len("sqlite:///") :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return url


def shown(url: str) -> str:
    """The URL as it may be logged: any password masked."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing to hide
        return url


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    # A server: fail in seconds when it is unreachable, and survive its restarts in a long sweep.
    connect = {"connect_timeout": 10} if url.startswith("postgresql") else {}
    return {"pool_pre_ping": True, "connect_args": connect}


@functools.cache
def _engine(url: str):
    """The engine of the sweeper's own lock and checks (Optuna keeps its own)."""
    import sqlalchemy

    return sqlalchemy.create_engine(url, **_engine_kwargs(url))


def check_storage(url: str) -> None:
    """One line naming `hydra.sweeper.storage` instead of a driver's traceback when the study's
    database cannot be used: a bad URL, a driver that is not installed, a server that is down."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    key = f"hydra.sweeper.storage={shown(url)}"
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as e:
        raise UserError(
            f"{key}: not a database URL Optuna can use ({first_line(e)}); e.g. "
            "sqlite:///multirun/optuna.db or postgresql+psycopg://user@host:5432/optuna"
        ) from None
    if url.startswith("sqlite"):
        return
    try:
        dialect.import_dbapi()
    except ImportError as e:
        hint = (
            "use postgresql+psycopg://... with psycopg installed (pip install 'psycopg[binary]', "
            "or make install)"
            if parsed.get_backend_name() == "postgresql"
            else "install it"
        )
        raise UserError(
            f"{key}: its driver {parsed.get_driver_name()} is not installed ({e}); {hint}"
        ) from None
    try:
        with _engine(url).connect():
            pass
    except OperationalError as e:
        where = f"{parsed.host or 'localhost'}:{parsed.port or dialect.default_port or ''}"
        reason = first_line(e.orig if e.orig is not None else e)
        hint = "start it (make services-up prints the URL) or fix the URL"
        if "password" in reason:
            hint = "export PGPASSWORD (make services-up prints it) or fix the user"
        raise UserError(f"{key}: cannot connect to {where} ({reason}); {hint}") from None


_warned_unlocked: set[str] = set()


@contextlib.contextmanager
def storage_lock(url: str, study: str) -> Iterator[None]:
    """A lock shared by every sweeper process of `study`, held by its storage: a PostgreSQL advisory
    lock (per database; released at the end of its transaction, or by the server when a killed
    worker's connection drops), or an flock beside a sqlite file (one machine, as sqlite itself)."""
    if url.startswith("sqlite:///"):
        with open(url[len("sqlite:///") :] + ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or its process dies
            yield
        return
    if url.startswith("postgresql"):
        import sqlalchemy

        key = zlib.crc32(f"summarizer-sweep:{study}".encode())
        with _engine(url).begin() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            yield
        return
    if url not in _warned_unlocked:
        _warned_unlocked.add(url)
        log.warning(
            "hydra.sweeper.storage=%s: several sweeper processes are coordinated on sqlite and "
            "PostgreSQL only; run one sweeper on this storage",
            shown(url),
        )
    yield


def open_study(
    url: str, name: str, direction: str, sampler: SamplerConf | None, **heartbeat
) -> optuna.Study:
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat
    sampler_obj = build_sampler(sampler)
    # Workers starting together on a new database would race to create Optuna's tables and the
    # study (PostgreSQL then fails one of them): create them one at a time.
    with storage_lock(url, name):
        storage = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url), **heartbeat)
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


def claim(
    study: optuna.Study, space: dict, n_trials: int, worker: str
) -> tuple[optuna.Trial | None, int]:
    """One trial for `worker` if the study needs more: (trial, running), else (None, running) —
    with running == 0 the study is done; otherwise the rest are running (here or elsewhere) and
    one of them may still fail and come back. Call it under storage_lock: counting and asking must
    not interleave with another worker's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # its callback re-queues them
    done, running, _ = tally(study)
    if done + running >= n_trials:
        return None, running
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "heartbeat ... with Study.optimize": we beat
        trial = study.ask()
    for name, dist in space.items():
        trial._suggest(name, dist)  # fixed values for re-queued trials
    trial.set_user_attr(WORKER, worker)
    # A first beat now: Optuna never finds a trial stale that has none, and this worker may die
    # before its first periodic one.
    study._storage.record_heartbeat(trial._trial_id)
    return trial, running


def failure_line(job_log: Path) -> str | None:
    """Why a trial's process failed, from the end of its job.log: the last `error:` line (what
    a UserError prints), else the last exception line of a traceback."""
    lines = log_tail(job_log, 65536)
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: ") :].strip()[:300]
    for line in reversed(lines):
        name = line.split(":", 1)[0]
        if (
            ":" in line
            and name.replace(".", "").replace("_", "").isalnum()
            and (name.endswith(("Error", "Exception", "Interrupt")))
        ):
            return line.strip()[:300]
    return None


def _read_result(out: Path) -> dict | None:
    """The job's `result.json` (summarizer/sweep.py writes it), read here without importing that
    module: it pulls in transformers, seconds of start-up the sweeper process does not need."""
    try:
        return json.loads((out / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_sweeper() -> None:
    """Run in the trial process before exec: the kernel SIGKILLs it when the sweeper's thread that
    started it dies (PR_SET_PDEATHSIG), even by SIGKILL, so no trial of a dead worker runs on
    unseen while the study retries it elsewhere."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def submitit_executor(launcher: Any):
    """The submitit executor Hydra's submitit launcher would build for `launcher`'s settings (the
    same mapping as its launch()), to submit one trial at a time and keep the job's future."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    kind = launcher._EXECUTOR  # "local" or "slurm"
    params = dict(launcher.params)
    init = {"folder": params.pop("submitit_folder")}
    if "max_num_timeout" in params:
        init[f"{kind}_max_num_timeout"] = params.pop("max_num_timeout")
    executor = submitit.AutoExecutor(cluster=kind, **init)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"{kind}_{k}": v for k, v in params.items()})
    return executor


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
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

        from summarizer.distributed import sweep_gpus

        c = self.conf
        gpus = sweep_gpus(c.gpus)  # gpus=auto on a machine without one fails before anything
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
        declared = [f"{k}={v}" for k, v in c.params.items()]
        with (
            warnings.catch_warnings()
        ):  # it builds Optuna's deprecated (still working) distributions
            warnings.simplefilter("ignore", FutureWarning)
            space, fixed = create_params_from_overrides(declared + list(arguments))
        # A plain value on the command line fixes that parameter: it leaves the search space
        # (else the trial's sampled value, passed after it, would win).
        # Stored in today's form (FloatDistribution(log=True), ...): the old classes the parser
        # builds make every later read of the study warn.
        self.space = {
            k: _convert_old_distribution_to_new_distribution(d)
            for k, d in space.items()
            if k not in fixed
        }
        self.fixed = [f"{k}={v}" for k, v in fixed.items()]
        self.parent_run = self._mlflow_parent()
        with storage_lock(self.url, c.study_name):  # one enqueue, not one per worker
            if not self.study.get_trials(deepcopy=False):
                for params in c.enqueue:
                    self.study.enqueue_trial(dict(params), skip_if_exists=True)
            joined = int(self.study.user_attrs.get(JOINED, 0))
            self.study.set_user_attr(JOINED, joined + 1)
            self._recover_own_dead_trials()
        if joined:
            self.study.sampler = build_sampler(c.sampler, offset=joined)
        if self.launcher is not None:
            self.executor = submitit_executor(self.launcher)
            if c.gpus:
                log.warning(
                    "hydra.sweeper.gpus only sets how many trials run at once with a submitit "
                    "launcher; the scheduler assigns GPUs (hydra.launcher.gpus_per_node)"
                )
        # One worker per listed GPU (a GPU listed twice runs two trials), else n_jobs workers.
        slots = gpus or [None] * max(1, c.n_jobs)
        done, running, waiting = tally(self.study)
        log.info(
            "study %r in %s: %d done, %d running elsewhere, %d queued; target %d trials, %d in "
            "parallel (%s)",
            c.study_name, shown(self.url), done, running, waiting, c.n_trials, len(slots),
            f"submitit {self.launcher._EXECUTOR} jobs" if self.launcher else "local processes",
        )  # fmt: skip
        # Workers count themselves out on a condition: after a Ctrl-C has interrupted a
        # Thread.join, CPython 3.11 may report a still running thread as not alive.
        self.alive = len(slots)
        for s in slots:
            threading.Thread(target=self._worker, args=(s,), daemon=True).start()
        interrupted = False
        # SIGTERM (a scheduler's preemption, `kill`): the same clean stop as Ctrl-C.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
        try:
            with self.ended:
                while self.alive:
                    self.ended.wait(timeout=0.5)
        except KeyboardInterrupt:
            interrupted = True
            if main:  # a second SIGTERM must not cut the cleanup short
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            log.warning("interrupted: stopping running trials; rerun the same command to resume")
            self.stop.set()
            self.wake.set()
            self._terminate_all()
            with self.ended:  # each worker tells its cut-off trial (FAIL, re-queued) and ends
                self.ended.wait_for(lambda: self.alive == 0, timeout=60)
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
        self._finish(interrupted)
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
        return []

    def _worker(self, gpu: int | None) -> None:
        try:
            self._work(gpu)
        finally:
            with self.ended:
                self.alive -= 1
                self.ended.notify_all()

    def _work(self, gpu: int | None) -> None:
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
                self._run_trial(trial, gpu)
            except Exception as e:  # a sweeper bug or a storage error: stop, leave nothing RUNNING
                log.error("worker stopped: %s: %s", type(e).__name__, e)
                self.errors.append(e)
                self.stop.set()
                self.wake.set()
                if trial is not None and trial.number not in self.told:
                    with self.lock, contextlib.suppress(Exception):
                        self.study.tell(trial, state=TrialState.FAIL)
                return

    def _run_trial(self, trial: optuna.Trial, gpu: int | None) -> None:
        overrides = [f"{k}={v}" for k, v in trial.params.items()]
        out = self.sweep_dir / f"trial_{trial.number:04d}"
        if out.exists():  # a study recreated under the same folder: never overwrite old trials
            out = out.with_name(f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        out.mkdir(parents=True)
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
            returncode, logs = self._run_process(trial, args, out, gpu), out / "job.log"
        else:
            returncode, logs = self._run_job(trial, args, out)
        self._tell(trial, returncode, out, logs)

    def _run_process(self, trial: optuna.Trial, args: list[str], out: Path, gpu: int | None) -> int:
        cmd = [sys.executable, "-m", "summarizer", *args, f"hydra.run.dir={out}"]
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        elif (
            not self.conf.gpus and self.conf.n_jobs > 1
        ):  # share the cores instead of oversubscribing
            env.setdefault(
                "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.conf.n_jobs))
            )
        with open(out / "job.log", "w", encoding="utf-8") as job_log:
            proc = subprocess.Popen(
                cmd,
                cwd=self.launch_dir,
                env=env,
                stdout=job_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_sweeper,
            )
            self.procs[trial.number] = proc
            while proc.poll() is None:
                try:
                    proc.wait(timeout=self.conf.heartbeat_interval)
                except subprocess.TimeoutExpired:
                    self.study._storage.record_heartbeat(trial._trial_id)
            self.procs.pop(trial.number, None)
        return proc.returncode

    def _run_job(self, trial: optuna.Trial, args: list[str], out: Path) -> tuple[int, Path]:
        """One submitit job running Hydra's job body for this trial's overrides; its folder
        becomes <sweep dir>/trial_NNNN through hydra.sweep.subdir."""
        from hydra.core.singleton import Singleton
        from hydra.core.utils import JobStatus

        overrides = [*args, f"hydra.sweep.subdir={out.name}"]
        with self.submit_lock:  # the executor is shared by the worker threads
            job = self.executor.submit(
                self.launcher,
                overrides,
                "hydra.sweep.dir",
                trial.number,
                f"trial_{trial.number}",
                Singleton.get_state(),
            )
        self.jobs[trial.number] = job
        trial.set_user_attr("job_id", str(job.job_id))
        log.info("trial %d: submitit job %s (logs: %s)", trial.number, job.job_id, job.paths.folder)
        beat = time.monotonic()
        try:
            while not job.done():
                time.sleep(1.0)
                if time.monotonic() - beat >= self.conf.heartbeat_interval:
                    self.study._storage.record_heartbeat(trial._trial_id)
                    beat = time.monotonic()
            ret = job.result()
            if ret.status == JobStatus.COMPLETED:
                return 0, job.paths.folder
            try:
                ret.return_value  # noqa: B018  (raises the job's exception)
            except Exception as e:
                log.warning("trial %d: %s: %s", trial.number, type(e).__name__, first_line(e))
            return 1, job.paths.folder
        except Exception as e:  # the job itself died: time limit, cancelled, node failure
            log.warning("trial %d: job %s ended without a result: %s", trial.number, job.job_id, e)
            return 1, job.paths.folder
        finally:
            self.jobs.pop(trial.number, None)

    def _tell(self, trial: optuna.Trial, returncode: int, out: Path, logs: Path) -> None:
        result = _read_result(out) if returncode == 0 else None
        with self.lock:
            self.told.add(trial.number)
            if self.stop.is_set() and result is None:
                trial.set_user_attr(INTERRUPTED, True)
                self.study.tell(trial, state=TrialState.FAIL)
                with storage_lock(self.url, self.conf.study_name):
                    again = self._requeue(trial.number)
                self._mlflow_fail(trial.number, status="KILLED")
                log.info(
                    "trial %d interrupted; %s",
                    trial.number,
                    "re-queued for the next run" if again else "retries used up",
                )
            elif result and result.get("state") == "PRUNED":
                self.study.tell(trial, state=TrialState.PRUNED)
                log.info("trial %d pruned", trial.number)
            elif result and result.get("state") == "COMPLETE" and result.get("value") is not None:
                # In the study too: the report and the best trial come from the shared storage,
                # not from a folder on the machine that ran the trial.
                self._keep_result(trial._trial_id, result)
                self.study.tell(trial, float(result["value"]))
                log.info("trial %d finished: %.4f", trial.number, result["value"])
            else:
                reason = failure_line(logs)
                if reason:  # kept in the study: the report and other workers can show it
                    trial.set_user_attr(ERROR, reason)
                self.study.tell(trial, state=TrialState.FAIL)
                self._mlflow_fail(trial.number)
                log.warning(
                    "trial %d FAILED (exit code %s)%s; see %s",
                    trial.number,
                    returncode,
                    f": {reason}" if reason else "",
                    logs,
                )
        self.wake.set()

    def _keep_result(self, trial_id: int, result: dict) -> None:
        storage = self.study._storage
        storage.set_trial_user_attr(trial_id, "metrics", result.get("metrics") or {})
        if result.get("adapter"):
            storage.set_trial_user_attr(trial_id, "adapter", result["adapter"])

    def _requeue(self, number: int) -> bool:
        storage = self.study._storage
        trial_id = storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)
        return requeue(self.study, storage.get_trial(trial_id), self.conf.max_retries)

    def _on_stale(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna's heartbeat_stale_trial_callback: the trial's worker died (no heartbeat for
        grace_period), wherever it ran. Run the trial again and close its MLflow run."""
        again = requeue(study, trial, self.conf.max_retries)
        self._mlflow_fail(trial.number, status="KILLED")
        log.warning(
            "trial %d lost its worker %s (no heartbeat for %d s)%s",
            trial.number,
            trial.user_attrs.get(WORKER, "?"),
            self.conf.grace_period,
            "; re-queued" if again else "; retries used up",
        )

    def _recover_own_dead_trials(self) -> None:
        """RUNNING trials of a sweeper on this host that no longer exists: fail and re-queue now,
        instead of waiting for the heartbeat grace period."""
        host = socket.gethostname()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get(WORKER, "")
            w_host, _, pid = worker.rpartition(":")
            if w_host == host and pid.isdigit() and not pid_alive(int(pid)):
                out = t.user_attrs.get("output_dir")
                result = _read_result(Path(out)) if out else None
                if result and result.get("state") in ("COMPLETE", "PRUNED"):
                    # A submitit job outlives its sweeper and may have finished meanwhile.
                    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                        if result["state"] == "PRUNED":
                            self.study.tell(t.number, state=TrialState.PRUNED)
                        else:
                            self._keep_result(t._trial_id, result)
                            self.study.tell(t.number, float(result["value"]))
                        log.info("trial %d ended after its sweeper died: result kept", t.number)
                    continue
                self.study._storage.set_trial_user_attr(t._trial_id, INTERRUPTED, True)
                try:
                    self.study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue
                again = self._requeue(t.number)
                self._mlflow_fail(t.number, status="KILLED")
                log.warning(
                    "trial %d was left running by a dead sweeper; %s",
                    t.number,
                    "re-queued" if again else "retries used up",
                )

    def _terminate_all(self) -> None:
        for proc in list(self.procs.values()):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for job in list(self.jobs.values()):
            with contextlib.suppress(Exception):
                job.cancel(check=False)  # scancel on SLURM; SIGINT to a local job
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
        """The sweep's parent run: found again by tag (a rerun, another worker), else created."""
        uri = self._tracking_uri()
        if not uri:
            return None
        import mlflow  # noqa: F401  (seconds of import: not while holding the lock below)

        from summarizer.tracking import parent_run, preflight

        # Under the study's lock: workers starting together create one experiment and one run.
        with storage_lock(self.url, self.conf.study_name):
            preflight(self.config.tracking, uri)  # an unreachable server: one line, in seconds
            return parent_run(
                uri, self.config.tracking.experiment, self.conf.study_name, shown(self.url)
            )

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

    def _finish(self, interrupted: bool) -> None:
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


def _interrupt(signum, frame):
    raise KeyboardInterrupt
