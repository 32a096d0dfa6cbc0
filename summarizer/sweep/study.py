"""The study side of a sweep: open the study, claim each trial under the storage lock, count what is
done, and run again the trials that were cut off (Ctrl-C, a dead worker, a stale heartbeat).

A cut-off trial is retried by Optuna's own `RetryHeartbeatStaleTrialCallback`: it adds a WAITING
trial with the same parameters (and user attrs) and keeps the chain in the new trial's system attrs
(`failed_trial`: the first trial of the chain, `retry_history`: every trial before this one), at
most `max_retries` times per chain. The storage calls it for a stale heartbeat (any host); the
sweeper calls the same callback for a trial it cut off itself or found left running by a dead
sweeper on its own host. `tally` counts a FAIL as done unless a later trial retries it;
`retry_failed` (hydra.sweeper.retry_failed=true) queues genuine failures once more, linked by the
`retry_of_failed` user attr instead of the chain, so that the chain's max_retries stays whole for
interruptions of the retry.

The study keeps its own identity (`study_id`, a UUID: a new study under an old name is another
study) and the fixed settings its trials run with (`settings`): a sweeper whose settings differ
stops instead of adding trials on other data or another model (`check_settings`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import socket
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from summarizer import compat
from summarizer.config import SamplerConf
from summarizer.errors import UserError
from summarizer.sweep.pruners import build_sampler
from summarizer.sweep.services import pid_alive
from summarizer.sweep.storage import engine_kwargs, storage_lock

log = logging.getLogger(__name__)

WORKER = "worker"  # user attr: host:pid of the sweeper process running the trial
INTERRUPTED = "interrupted"  # user attr of a trial cut off by Ctrl-C or a dead worker
ERROR = "error"  # user attr of a failed trial: the line of its job.log that says why
JOINED = "sweepers_joined"  # study user attr: sweeper processes started on it (seed offsets)
STUDY_ID = "study_id"  # study user attr: a UUID given at creation (the MLflow parent's key)
SETTINGS = "settings"  # study user attr: {key: value} of the settings every trial runs with
SEARCHED = "searched"  # study user attr: the keys searched when SETTINGS was stored
ROW_SCORES = "row_scores"  # user attr of a COMPLETE trial: each validation row's objective
PRUNED_AT = "pruned_at"  # user attr of a PRUNED trial: {step, name, value} where it stopped
REFIT = "refit"  # study user attr: {trial, output_dir, state, worker} of the sweep's refit
RETRY_OF_FAILED = "retry_of_failed"  # user attr of a trial re-running a FAILED one (retry_failed)

# Settings that say where or how a trial runs, not what it computes: workers and reruns may differ
# in them (a key, or a prefix ending in "."). The sweeper's own settings (n_trials, n_jobs, gpus,
# storage) are under hydra.*, which is not part of the settings at all.
MAY_DIFFER = (
    "output_dir",
    "cache_dir",
    "train.resume",
    "distributed.backend",
    "distributed.master_port",
    "distributed.nproc",
    "tracking.",
    "trial.",  # the job's link to its trial, and the pruner (like the sampler: how to search)
    "sweep",  # the sweep file's name: its content is in the settings
)

# The heartbeat, fail_stale_trials and the retry callback are experimental in Optuna: used here
# as documented, so their warning (issued in this module's frames) says nothing to a user.
warnings.filterwarnings("ignore", category=ExperimentalWarning, module=__name__)


def open_study(
    url: str, name: str, direction: str, sampler: SamplerConf | None, **heartbeat
) -> optuna.Study:
    """The study `name` at `url`, created if new; `heartbeat`: RDBStorage's heartbeat_interval,
    grace_period and heartbeat_stale_trial_callback."""
    warnings.filterwarnings("ignore", category=ExperimentalWarning)  # RDBStorage's heartbeat args
    sampler_obj = build_sampler(sampler)
    # Workers starting together on a new database would race to create Optuna's tables and the
    # study (PostgreSQL then fails one of them): create them one at a time.
    with storage_lock(url, name):
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url), **heartbeat)
        return optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=sampler_obj,
            direction=direction,
            load_if_exists=True,
        )


def search_space(overrides: list[str]) -> tuple[dict, dict]:
    """(search space, fixed values) of Hydra sweep overrides (`lora.r=choice(8,16)`, `k=0`), parsed
    as hydra-optuna-sweeper does. A plain value fixes that parameter: it leaves the search space
    (else the trial's sampled value, passed after it, would win). The distributions are today's
    (FloatDistribution(log=True), ...): the old classes the parser builds make every later read of
    the study warn."""
    with warnings.catch_warnings():  # the parser builds Optuna's deprecated (working) classes
        warnings.simplefilter("ignore", FutureWarning)
        space, fixed = compat.sweeper_params(overrides)
    return {k: compat.new_distribution(d) for k, d in space.items() if k not in fixed}, fixed


def retry_of(trial: FrozenTrial) -> int | None:
    """The number of the trial that `trial` (a FrozenTrial: Optuna keeps the retry chain in system
    attrs, which a live Trial does not show) runs again, or None for a trial of its own."""
    history = RetryHeartbeatStaleTrialCallback.retry_history(trial)
    return history[-1] if history else trial.user_attrs.get(RETRY_OF_FAILED)


def identify(study: optuna.Study) -> tuple[str, bool]:
    """(the study's identity, True when this call gave it one): a study made before identities
    existed gets one on its first resume. Call under storage_lock, so workers agree on one."""
    found = study.user_attrs.get(STUDY_ID)
    if found:
        return found, False
    made = uuid.uuid4().hex
    study.set_user_attr(STUDY_ID, made)
    return made, True


def _may_differ(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_DIFFER)


def _short(value: str | None) -> str:
    text = "(unset)" if value is None else value
    return text if len(text) <= 80 else text[:77] + "..."


def check_settings(
    study: optuna.Study, settings: dict[str, str], searched: set[str], where: str
) -> None:
    """Keep `settings` (the composed config's keys that are neither searched nor MAY_DIFFER, as
    strings) in a study that has none; in one that has, refuse other values with one line naming
    the first differing key, both values, and how to start a new study. A key searched now or when
    the settings were stored is left out (a rerun may change the search space). A study without
    any result (all its trials FAILED or queued, none running) takes the new settings: nothing
    measured on the old ones would be mixed with them. Call under storage_lock."""
    settings = {k: v for k, v in settings.items() if not _may_differ(k)}
    stored = study.user_attrs.get(SETTINGS)
    if stored is not None:
        skip = searched | set(study.user_attrs.get(SEARCHED, []))
        # Keys on one side only are the schema's (a key added or dropped by an upgrade).
        keys = sorted(
            k for k in stored.keys() & settings.keys()
            if k not in skip and not _may_differ(k) and stored[k] != settings[k]
        )  # fmt: skip
        if not keys:
            return
        results = study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        )
        key = keys[0]
        if results:
            taken = set(optuna.get_all_study_names(compat.storage(study)))
            new = next(f"{study.study_name}_{n}" for n in range(2, 10_000)
                       if f"{study.study_name}_{n}" not in taken)  # fmt: skip
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise UserError(
                f"hydra.sweeper.study_name={study.study_name}: {key}={_short(settings.get(key))} "
                f"here, but the study's trials in {where} ran with {key}="
                f"{_short(stored.get(key))}{more}; rerun with the study's settings, or start a "
                f"new study: hydra.sweeper.study_name={new}"
            )
        log.warning(
            "study %r has no result yet: its trials now run with this command's settings (%s: "
            "%s -> %s)",
            study.study_name, key, _short(stored.get(key)), _short(settings.get(key)),
        )  # fmt: skip
    study.set_user_attr(SETTINGS, settings)
    study.set_user_attr(SEARCHED, sorted(searched))


def failed(study: optuna.Study) -> list[FrozenTrial]:
    """The FAILED trials that count as done: nothing runs them again."""
    trials = study.get_trials(deepcopy=False)
    retried = {retry_of(t) for t in trials}
    return [t for t in trials if t.state == TrialState.FAIL and t.number not in retried]


def retry_failed(study: optuna.Study) -> list[int]:
    """Queue the parameters of every FAILED trial that nothing runs again yet, once (its cause was
    fixed): the failure then no longer counts as done, its retry does. Returns their numbers. Call
    under storage_lock, so two workers do not queue the same failure twice."""
    again = failed(study)
    for t in again:
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=t.params,
                distributions=t.distributions,
                user_attrs={RETRY_OF_FAILED: t.number},
            )
        )
    return [t.number for t in again]


def frozen(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> FrozenTrial:
    """`trial` as the storage has it now (its state and user attrs after this process's writes)."""
    return compat.storage(study).get_trial(compat.trial_id(trial))


def requeue(study: optuna.Study, trial: FrozenTrial, max_retries: int) -> bool:
    """Queue a cut-off trial's parameters again (Optuna's retry callback), unless its chain has
    been retried `max_retries` times already; True when it was queued. (The callback edits the
    trial it gets: it gets a copy, not the storage's cached one.)"""
    again = len(RetryHeartbeatStaleTrialCallback.retry_history(trial)) < max_retries
    RetryHeartbeatStaleTrialCallback(max_retry=max_retries)(study, copy.deepcopy(trial))
    return again


def tally(study: optuna.Study) -> tuple[int, int, int]:
    """(done, running, waiting). Done: COMPLETE, PRUNED, and FAIL unless a later trial retries it.
    (Optuna's MaxTrialsCallback counts states inside study.optimize: it cannot leave retried
    failures out, nor count the trials running in other processes.)"""
    trials = study.get_trials(deepcopy=False)
    retried = {retry_of(t) for t in trials}  # by the chain, or by retry_failed
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


def beat(study: optuna.Study, trial: optuna.Trial) -> None:
    """Record a heartbeat of `trial`, for the process that waits on its job (Optuna's own heartbeat
    thread runs only inside study.optimize)."""
    compat.storage(study).record_heartbeat(compat.trial_id(trial))


def claim(
    study: optuna.Study, space: dict, n_trials: int, worker: str
) -> tuple[optuna.Trial | None, int]:
    """One trial for `worker` if the study needs more: (trial, running), else (None, running) —
    with running == 0 the study is done; otherwise the rest are running (here or elsewhere) and
    one of them may still fail and come back. Call it under storage_lock: counting and asking must
    not interleave with another worker's."""
    optuna.storages.fail_stale_trials(study)  # the storage's stale-trial callback re-queues them
    done, running, _ = tally(study)
    if done + running >= n_trials:
        return None, running
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "heartbeat ... with Study.optimize": we beat
        trial = study.ask()
    # A retry holds its original's parameters already (even from an older search space): only the
    # others are drawn, or taken from an enqueued trial's fixed values.
    taken = trial.params
    for name, dist in space.items():
        if name not in taken:
            compat.suggest(trial, name, dist)
    trial.set_user_attr(WORKER, worker)
    if trial.user_attrs.get(INTERRUPTED):  # copied from the original by the retry callback
        trial.set_user_attr(INTERRUPTED, False)
    # A first beat now: Optuna never finds a trial stale that has none, and this worker may die
    # before its first periodic one.
    beat(study, trial)
    return trial, running


def keep_result(study: optuna.Study, trial: optuna.Trial | FrozenTrial, result: dict) -> None:
    """The job's metrics, adapter path and each validation row's objective (`row_scores`: key,
    ids_hash, values; the ids stay in result.json), kept in the study: the report, its paired
    comparison and the best trial come from the shared storage, not from a folder on the machine
    that ran the trial."""
    storage, trial_id = compat.storage(study), compat.trial_id(trial)
    storage.set_trial_user_attr(trial_id, "metrics", result.get("metrics") or {})
    rows = result.get("row_scores")
    if rows:
        kept = {k: rows[k] for k in ("key", "ids_hash", "values")}
        storage.set_trial_user_attr(trial_id, ROW_SCORES, kept)
    if result.get("adapter"):
        storage.set_trial_user_attr(trial_id, "adapter", result["adapter"])


def recover_dead_trials(
    study: optuna.Study, max_retries: int, read_result: Callable[[Path], dict | None]
) -> list[tuple[int, bool]]:
    """RUNNING trials of a sweeper on this host that no longer exists: failed and re-queued now,
    instead of after the heartbeat grace period (Optuna knows heartbeats only, not processes).
    One whose job finished meanwhile (a submitit job outlives its sweeper) keeps its result.
    Returns (number, re-queued) for each trial failed. Call it under storage_lock."""
    host, lost = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w_host, _, pid = t.user_attrs.get(WORKER, "").rpartition(":")
        if w_host != host or not pid.isdigit() or pid_alive(int(pid)):
            continue
        out = t.user_attrs.get("output_dir")
        result = read_result(Path(out)) if out else None
        if result and result.get("state") in ("COMPLETE", "PRUNED"):
            with contextlib.suppress(UpdateFinishedTrialError):
                if result["state"] == "PRUNED":
                    study.tell(t.number, state=TrialState.PRUNED)
                else:
                    keep_result(study, t, result)
                    study.tell(t.number, float(result["value"]))
                log.info("trial %d ended after its sweeper died: result kept", t.number)
            continue
        storage = compat.storage(study)
        storage.set_trial_user_attr(compat.trial_id(t), INTERRUPTED, True)
        try:
            storage.set_trial_state_values(compat.trial_id(t), state=TrialState.FAIL)
        except UpdateFinishedTrialError:  # another worker got there first
            continue
        lost.append((t.number, requeue(study, frozen(study, t), max_retries)))
    return lost
