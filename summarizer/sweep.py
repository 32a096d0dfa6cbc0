"""The trial side of a sweep: a job started by the sweeper attaches to its Optuna trial through the
shared storage, reports -eval_loss at each evaluation so the study's pruner can stop it early, and
leaves `result.json` for the sweeper to `tell` the outcome."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import optuna
from transformers import TrainerCallback

from summarizer.config import PrunerConfig, TrialConfig
from summarizer.errors import UserError
from summarizer.files import write_atomic

log = logging.getLogger(__name__)


def build_pruner(cfg: PrunerConfig) -> optuna.pruners.BasePruner:
    if cfg.name == "none":
        return optuna.pruners.NopPruner()
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(cfg.n_startup_trials, cfg.n_warmup_steps)
    if cfg.name == "percentile":
        return optuna.pruners.PercentilePruner(
            cfg.percentile, cfg.n_startup_trials, cfg.n_warmup_steps
        )
    if cfg.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor
        )
    raise UserError(
        f"trial.pruner.name={cfg.name!r}: expected none, median, percentile or hyperband"
    )


def attach(cfg: TrialConfig) -> optuna.Trial | None:
    """The Optuna trial this job runs, or None outside a sweep."""
    if cfg.number is None:
        return None
    if not cfg.storage or not cfg.study:
        raise UserError("trial.number is set but trial.storage / trial.study are not")
    study = optuna.load_study(
        study_name=cfg.study, storage=cfg.storage, pruner=build_pruner(cfg.pruner)
    )
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, cfg.number)
    state = study._storage.get_trial(trial_id).state
    if state != optuna.trial.TrialState.RUNNING:  # e.g. a queued job whose worker died meanwhile
        raise UserError(
            f"trial {cfg.number} of study {cfg.study!r} is {state.name}, not RUNNING: its sweeper "
            "gave it up (or another worker retried it); this job stops"
        )
    return optuna.trial.Trial(study, trial_id)


class ReportToTrial(TrainerCallback):
    """At each evaluation: report -eval_loss (higher is better, like the objective) and prune.

    Under DDP only rank 0 holds the trial (`trial` is None on the others): it decides and every rank
    gets its decision, so all stop at the same step instead of the others waiting in the next
    collective for a rank 0 that has left."""

    def __init__(self, trial: optuna.Trial | None):
        self.trial = trial

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        from summarizer import distributed

        if not metrics or "eval_loss" not in metrics:
            return
        number = None
        if self.trial is not None:
            self.trial.report(-float(metrics["eval_loss"]), step=state.global_step)
            number = self.trial.number if self.trial.should_prune() else None
        number = distributed.from_main(number)  # the trial number when pruned, else None
        if number is not None:
            raise optuna.TrialPruned(
                f"trial {number} pruned at step {state.global_step} "
                f"(eval_loss {metrics['eval_loss']:.4f})"
            )


def write_result(out_dir: Path, state: str, value: float | None, **extra) -> None:
    write_atomic(
        out_dir / "result.json", json.dumps({"state": state, "value": value, **extra}, indent=2)
    )


def read_result(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
