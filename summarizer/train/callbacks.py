"""Trainer callbacks: stop on a non-finite loss, log the Trainer's figures to MLflow by step, and
report each evaluation to the sweep's Optuna trial (which may prune it).
"""

from __future__ import annotations

import logging
import math

import optuna
from transformers import TrainerCallback

from summarizer import distributed, tracking
from summarizer.errors import UserError

log = logging.getLogger(__name__)


class StopOnNonFinite(TrainerCallback):
    """A NaN/inf loss never recovers: stop at once with a clear error instead of hours later."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise UserError(
                    f"{key} became {value} at step {state.global_step}; lower train.lr or check the data"
                )


class ReportToTrial(TrainerCallback):
    """At each evaluation: report -eval_loss (higher is better, like the objective) and prune.

    Under DDP only rank 0 holds the trial (`trial` is None on the others): it decides and every rank
    gets its decision, so all stop at the same step instead of the others waiting in the next
    collective for a rank 0 that has left."""

    def __init__(self, trial: optuna.Trial | None):
        self.trial = trial

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):

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


class MlflowMetrics(TrainerCallback):
    """Trainer logs (loss, eval_loss, learning rate, grad norm) -> MLflow metrics by step; `names`
    maps other log keys (the RL stage's: reward, reward_std, kl ... -> rl_*)."""

    NAMES = {
        "loss": "train_loss",
        "eval_loss": "eval_loss",
        "learning_rate": "lr",
        "grad_norm": "grad_norm",
    }

    def __init__(self, names: dict[str, str] | None = None):
        self.names = names or self.NAMES

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {
            self.names[k]: v for k, v in (logs or {}).items() if k in self.names and v is not None
        }
        if metrics:
            tracking.log_metrics(metrics, step=state.global_step)
