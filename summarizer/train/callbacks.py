"""Trainer callbacks: stop on a non-finite loss, log the Trainer's figures to MLflow by step, score
ROUGE on some validation rows at each evaluation, and report each evaluation to the sweep's Optuna
trial (which may prune it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable

import optuna
from transformers import TrainerCallback

from summarizer import distributed, tracking
from summarizer.errors import UserError
from summarizer.sweep.study import PRUNED_AT

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


class EvalRouge(TrainerCallback):
    """At each evaluation (train.eval_rouge_rows > 0): `score_fn(model)` generates summaries for the
    fixed ROUGE rows with the run's generation settings and scores them, returning (mean scores,
    each row's task.objective); they are logged as eval_<score> by step, with eval_rouge_seconds
    (the cost of that evaluation), and added to the evaluation's metrics.

    The model generates as it is, a PeftModel mid-training (never merged: it trains on), in eval
    mode and outside training's speed modes (`pause`, set by fit: packed attention, compiled layers,
    lean dropout); its train mode is restored afterwards. Under DDP only rank 0 has a `score_fn`
    (None on the others): it generates while the others wait at a barrier."""

    def __init__(self, score_fn: Callable | None, objective: str, rows: int):
        self.score_fn = score_fn
        self.objective = objective
        self.rows = rows  # how many rows each evaluation scores (on every rank)
        self.pause: Callable = contextlib.nullcontext
        self.seconds_total = 0.0  # all evaluations' generation and scoring (part of train_seconds)
        self.last: tuple[int, dict, list[float]] | None = None  # (step, mean scores, row values)

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if self.score_fn is not None:
            start = time.perf_counter()
            training = model.training
            try:
                with self.pause():
                    scores, values = self.score_fn(model)
            finally:
                model.train(training)
            seconds = time.perf_counter() - start
            self.seconds_total += seconds
            self.last = (state.global_step, scores, list(values))
            named = {f"eval_{k}": float(v) for k, v in scores.items()}
            tracking.log_metrics({**named, "eval_rouge_seconds": seconds}, step=state.global_step)
            if metrics is not None:
                metrics.update(named)
            log.info(
                "step %d: eval_%s %.2f on %d rows (%.1f s)",
                state.global_step, self.objective, scores[self.objective], len(values), seconds,
            )  # fmt: skip
        distributed.barrier()  # the other ranks train on once rank 0 has generated


class ReportToTrial(TrainerCallback):
    """At each evaluation: report to the trial (higher is better, like the objective) and prune.

    What is reported (trial.intermediate): -eval_loss at global_step (`rouge` None), or the mean
    task.objective of EvalRouge's rows at global_step; with `per_row` (the Wilcoxon pruner) each
    row i's value at step e x rows + i of evaluation e = 0, 1, ..., so that the pruner pairs row
    with row at the same point of training against the best trial; then one should_prune.

    Under DDP only rank 0 holds the trial (`trial` is None on the others): it decides and every rank
    gets its decision, so all stop at the same step instead of the others waiting in the next
    collective for a rank 0 that has left."""

    def __init__(
        self, trial: optuna.Trial | None, rouge: EvalRouge | None = None, per_row: bool = False
    ):
        self.trial = trial
        self.rouge = rouge
        self.per_row = per_row
        self.evaluations = 0
        self.last: tuple[int, str, float] | None = None  # (global step, metric, value) reported

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or "eval_loss" not in metrics:
            return
        e, self.evaluations = self.evaluations, self.evaluations + 1
        said = None  # the pruning message, from rank 0
        if self.trial is not None:
            step = state.global_step
            if self.rouge is None:
                self.last = (step, "eval_loss", float(metrics["eval_loss"]))
                self.trial.report(-float(metrics["eval_loss"]), step=step)
            else:
                at, scores, values = self.rouge.last
                if at != step:
                    raise RuntimeError(f"ReportToTrial at step {step} after EvalRouge at {at}")
                mean = float(scores[self.rouge.objective])
                self.last = (step, f"eval_{self.rouge.objective}", mean)
                if self.per_row:
                    for i, value in enumerate(values):
                        self.trial.report(float(value), step=e * len(values) + i)
                else:
                    self.trial.report(mean, step=step)
            if self.trial.should_prune():
                _, name, value = self.last
                said = f"trial {self.trial.number} pruned at step {step} ({name} {value:.4f})"
                # Optuna makes a pruned trial's value its last report: under per_row, one row's
                # score. The mean where it stopped is what the report shows.
                self.trial.set_user_attr(PRUNED_AT, {"step": step, "name": name, "value": value})
        said = distributed.from_main(said)
        if said is not None:
            raise optuna.TrialPruned(said)


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
