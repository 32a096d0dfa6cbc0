"""The trial side of a sweep: a job started by the sweeper attaches to its Optuna trial through the
shared storage, reports -eval_loss (or ROUGE: trial.intermediate) at each evaluation so the study's
pruner can stop it early (train/callbacks.py ReportToTrial), and leaves `result.json` for the
sweeper to `tell` the outcome."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import optuna

from summarizer import compat
from summarizer.config import TrialConfig
from summarizer.errors import UserError
from summarizer.files import write_atomic
from summarizer.sweep.pruners import build_pruner

log = logging.getLogger(__name__)


def attach(cfg: TrialConfig) -> optuna.Trial | None:
    """The Optuna trial this job runs, or None outside a sweep."""
    if cfg.number is None:
        return None
    if not cfg.storage or not cfg.study:
        raise UserError("trial.number is set but trial.storage / trial.study are not")
    study = optuna.load_study(
        study_name=cfg.study, storage=cfg.storage, pruner=build_pruner(cfg.pruner)
    )
    storage = compat.storage(study)
    trial_id = storage.get_trial_id_from_study_id_trial_number(compat.study_id(study), cfg.number)
    state = storage.get_trial(trial_id).state
    if state != optuna.trial.TrialState.RUNNING:  # e.g. a queued job whose worker died meanwhile
        raise UserError(
            f"trial {cfg.number} of study {cfg.study!r} is {state.name}, not RUNNING: its sweeper "
            "gave it up (or another worker retried it); this job stops"
        )
    return optuna.trial.Trial(study, trial_id)


def row_scores(key: str, ids: list[str], rows: list[dict[str, float]]) -> dict:
    """Each validation row's `key` score, in the split's order, with the row ids and their hash:
    two trials are compared row by row only on the same rows (sweep/report.py)."""
    return {"key": key, "ids": ids, "ids_hash": ids_hash(ids), "values": [r[key] for r in rows]}


def ids_hash(ids: list[str]) -> str:
    return hashlib.sha1("\n".join(ids).encode("utf-8")).hexdigest()


def write_result(out_dir: Path, state: str, value: float | None, **extra) -> None:
    write_atomic(
        out_dir / "result.json", json.dumps({"state": state, "value": value, **extra}, indent=2)
    )


def read_result(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
