"""The end of a sweep (`hydra.sweeper.refit=true`): the best trial's settings trained once more on
every labelled row (`data.val_size=0`, no evaluation), and its test predictions published as
`<sweep dir>/submission.csv`.

The refit is one job, run like a trial but without a link to the study (no `trial.number`): its
folder is `<sweep dir>/refit_trial_NNNN` (NNNN: the best trial's number). The study keeps its state
in the user attr `refit` ({trial, output_dir, state, worker, beat}), so that of several workers
exactly one claims it (under the storage lock), a rerun after it finished does nothing, and a
refit that was cut off (Ctrl-C, a dead worker, a failure) is continued in its folder with
`train.resume=true` where it saved a checkpoint.

How long the refit trains: the epochs behind the weights the best trial kept (`kept_epoch` in its
train_metrics.json: the best checkpoint's epoch when early stopping loaded it, else the epochs it
ran), since the refit sees more rows per epoch than the trial did; without that file (another
machine's folder, an older trial) the trial's own train.epochs / train.max_steps.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from summarizer.files import write_atomic
from summarizer.sweep.services import pid_alive
from summarizer.sweep.study import REFIT, SETTINGS, tally
from summarizer.sweep.trial import read_result

FOLDER = "refit_trial_{:04d}"
SUBMISSION = "submission.csv"

# Every labelled row trains; nothing is left to evaluate on; the test rows are predicted.
ALL_ROWS = (
    "data.val_size=0",
    "stages.evaluate=false",
    "stages.predict_test=true",
    "train.eval_strategy=no",
    "train.early_stopping_patience=0",
)


@dataclass(frozen=True)
class Decision:
    """What this worker does about the refit: `run` (claimed: the record says RUNNING, by this
    worker), `done`, `elsewhere` (another live worker runs it), `wait` (trials still to finish),
    or `none` (no COMPLETE trial)."""

    action: str
    trial: FrozenTrial | None = None
    folder: Path | None = None
    resume: bool = False
    why: str = ""


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def overrides(fixed: list[str], params: dict, own: list[str]) -> list[str]:
    """The refit job's overrides: the sweep's fixed values, the best trial's parameters, then
    ALL_ROWS and `own` (its training budget, run name, ...), each key once (ours win)."""
    ours = [*ALL_ROWS, *own]
    mine = {_key(o) for o in ours}
    taken = {_key(f) for f in fixed}
    # a fixed value on the command line wins over the trial's (as for a trial's retry)
    drawn = [f"{k}={v}" for k, v in params.items() if k not in taken and k not in mine]
    return [*(f for f in fixed if _key(f) not in mine), *drawn, *ours]


def budget(trial: FrozenTrial, settings: dict[str, str]) -> tuple[list[str], str]:
    """(overrides, why) of how long the refit trains: see the module's docstring."""
    folder = Path(trial.user_attrs.get("output_dir", ""))
    try:
        figures = json.loads((folder / "train_metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        figures = {}
    kept = figures.get("kept_epoch")
    if isinstance(kept, (int, float)) and kept > 0:
        ran = figures.get("train_epochs")
        epochs = f"{kept:.6g}"
        how = (
            f"trial {trial.number} trained {epochs} epoch(s)"
            if ran is None or abs(ran - kept) < 1e-9
            else f"trial {trial.number} kept its checkpoint of epoch {epochs} ({ran:g} trained)"
        )
        return [f"train.epochs={epochs}", "train.max_steps=-1"], f"train.epochs={epochs}: {how}"
    values = {**settings, **{k: str(v) for k, v in trial.params.items()}}
    steps = values.get("train.max_steps", "-1")
    if steps.lstrip("-").isdigit() and int(steps) > 0:
        return [f"train.max_steps={steps}"], (
            f"train.max_steps={steps}: trial {trial.number}'s setting (no train_metrics.json in "
            f"{folder})"
        )
    epochs = values.get("train.epochs", "3.0")
    return [f"train.epochs={epochs}", "train.max_steps=-1"], (
        f"train.epochs={epochs}: trial {trial.number}'s setting (no train_metrics.json in {folder})"
    )


def _alive(record: dict, grace_period: float, now: float) -> bool:
    """Whether the worker in a RUNNING record still runs it: its pid on this host, else its beat."""
    host, _, pid = str(record.get("worker", "")).rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return pid_alive(int(pid))
    return now - float(record.get("beat", 0)) < grace_period


def _has_checkpoint(folder: Path) -> bool:
    return any(p.is_file() for p in folder.glob("checkpoints/checkpoint-*/trainer_state.json"))


def decide(
    study: optuna.Study,
    n_trials: int,
    sweep_dir: Path,
    worker: str,
    grace_period: float,
    now: float | None = None,
) -> Decision:
    """What `worker` does about the refit; a `run` is claimed in the study before it returns. Call
    under storage_lock, so that two workers never both claim it."""
    now = time.time() if now is None else now
    done, running, _ = tally(study)
    if done < n_trials or running:
        return Decision("wait", why=f"{done} of {n_trials} trials done, {running} running")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return Decision("none", why="no COMPLETE trial")
    best = study.best_trial
    record = study.user_attrs.get(REFIT) or {}
    same = record.get("trial") == best.number
    folder = Path(record["output_dir"]) if same else (sweep_dir / FOLDER.format(best.number))
    result = read_result(folder) if folder.is_dir() else None
    if result and result.get("state") == "COMPLETE":
        if not same or record.get("state") != "COMPLETE":  # its worker died before the record
            study.set_user_attr(
                REFIT,
                {"trial": best.number, "output_dir": str(folder.resolve()), "state": "COMPLETE"},
            )
        return Decision("done", best, folder)
    if same and record.get("state") == "RUNNING" and _alive(record, grace_period, now):
        return Decision("elsewhere", best, folder, why=f"worker {record.get('worker')}")
    resume = (folder / "config.yaml").is_file() and _has_checkpoint(folder)
    study.set_user_attr(
        REFIT,
        {
            "trial": best.number,
            "output_dir": str(folder.resolve()),
            "state": "RUNNING",
            "worker": worker,
            "beat": now,
        },
    )
    return Decision("run", best, folder, resume=resume)


def prepare(folder: Path, resume: bool) -> Path | None:
    """Ready `folder` for the job: a resumed one keeps its old job.log as job-<time>.log; one that
    holds a run without a checkpoint to resume from is set aside as `<folder>-<time>` (kept, never
    overwritten) for a new start. Returns the set-aside folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if resume:
        log_file = folder / "job.log"
        if log_file.is_file():
            log_file.rename(_free(folder / f"job-{stamp}.log"))
        return None
    if not (folder / "config.yaml").exists():
        folder.mkdir(parents=True, exist_ok=True)
        return None
    aside = _free(folder.with_name(f"{folder.name}-{stamp}"))
    folder.rename(aside)
    folder.mkdir(parents=True)
    return aside


def _free(path: Path) -> Path:
    """`path`, or `<stem>-k<suffix>` beside it where that is taken."""
    for k in range(10_000):
        free = path if k == 0 else path.with_name(f"{path.stem}-{k}{path.suffix}")
        if not free.exists():
            return free
    raise FileExistsError(path)


def beat(study: optuna.Study) -> None:
    """The refit's heartbeat, for other workers that would take over a dead one's."""
    record = study.user_attrs.get(REFIT) or {}
    study.set_user_attr(REFIT, {**record, "beat": time.time()})


def record(study: optuna.Study, state: str, **extra) -> None:
    study.set_user_attr(REFIT, {**(study.user_attrs.get(REFIT) or {}), "state": state, **extra})


def settings(study: optuna.Study) -> dict[str, str]:
    return dict(study.user_attrs.get(SETTINGS) or {})


def publish(source: Path, target: Path) -> Path | None:
    """Write `source`'s text to `target` atomically. A different `target` already there (an older
    best's submission) is kept first as `submission-<its time>.csv`; returns that copy's path."""
    text = source.read_text(encoding="utf-8")
    if not target.is_file():
        write_atomic(target, text)
        return None
    old = target.read_bytes()
    if old == text.encode("utf-8"):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(target.stat().st_mtime))
    for k in range(10_000):
        backup = target.with_name(f"{target.stem}-{stamp}{f'-{k}' if k else ''}{target.suffix}")
        try:
            with open(backup, "xb") as f:  # never replaces an earlier copy
                f.write(old)
            break
        except FileExistsError:
            continue
    write_atomic(target, text)
    return backup
