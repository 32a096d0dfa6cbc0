"""How a study searches: the sampler that proposes each trial's settings and the pruner that stops
unpromising trials early, side by side. A new pruner is one entry in `PRUNERS`.
"""

from __future__ import annotations

import logging
import warnings

import optuna

from summarizer.config import PrunerConfig, SamplerConf
from summarizer.errors import UserError

log = logging.getLogger(__name__)


# name -> builder(conf, seed). A new sampler or pruner is one entry here (its settings, if it needs
# new ones, go in SamplerConf / PrunerConfig in config.py).
SAMPLERS = {
    "random": lambda c, seed: optuna.samplers.RandomSampler(seed=seed),
    "tpe": lambda c, seed: optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=c.n_startup_trials, multivariate=c.multivariate
    ),
}
# Steps and resources are training steps (the Trainer's global_step at each evaluation), except
# for wilcoxon: a trial reports each ROUGE row's value at step evaluation x rows + row.
PRUNERS = {
    "none": lambda c: optuna.pruners.NopPruner(),
    "median": lambda c: optuna.pruners.MedianPruner(c.n_startup_trials, c.n_warmup_steps),
    "percentile": lambda c: optuna.pruners.PercentilePruner(
        c.percentile, c.n_startup_trials, c.n_warmup_steps
    ),
    "hyperband": lambda c: optuna.pruners.HyperbandPruner(
        min_resource=c.min_resource,
        max_resource=max_resource(c),
        reduction_factor=c.reduction_factor,
    ),
    "successive_halving": lambda c: optuna.pruners.SuccessiveHalvingPruner(
        min_resource=c.min_resource,
        reduction_factor=c.reduction_factor,
        min_early_stopping_rate=c.min_early_stopping_rate,
    ),
    "wilcoxon": lambda c: optuna.pruners.WilcoxonPruner(
        p_threshold=c.p_threshold, n_startup_steps=c.n_startup_steps
    ),
}


def build_sampler(conf: SamplerConf | None, offset: int = 0) -> optuna.samplers.BaseSampler | None:
    """The study's sampler, its seed shifted by `offset`: the n-th sweeper process to join a study
    draws with seed + n, else workers started together would all sample the same parameters."""
    if conf is None:
        return None
    if conf.name not in SAMPLERS:
        raise UserError(
            f"hydra.sweeper.sampler.name={conf.name!r}: expected {' or '.join(SAMPLERS)}"
        )
    return SAMPLERS[conf.name](conf, None if conf.seed is None else conf.seed + offset)


def build_pruner(cfg: PrunerConfig) -> optuna.pruners.BasePruner:
    check_pruner(cfg)
    with (
        warnings.catch_warnings()
    ):  # WilcoxonPruner is marked experimental (it works as documented)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return PRUNERS[cfg.name](cfg)


def max_resource(cfg: PrunerConfig) -> int | str:
    """trial.pruner.max_resource as HyperbandPruner takes it: "auto" or a step count."""
    value = cfg.max_resource
    if str(value) == "auto":
        return "auto"
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(
            f"trial.pruner.max_resource={value!r}: expected auto or a number of training steps"
        ) from None


def check_pruner(cfg: PrunerConfig) -> None:
    """The pruner's name and budgets, each wrong one a line naming its key (Optuna's own
    ValueErrors would come from inside a trial job, as a traceback)."""
    if cfg.name not in PRUNERS:
        names = list(PRUNERS)
        raise UserError(
            f"trial.pruner.name={cfg.name!r}: expected {', '.join(names[:-1])} or {names[-1]}"
        )
    key = "trial.pruner."
    if cfg.name in ("median", "percentile"):
        if cfg.n_startup_trials < 0 or cfg.n_warmup_steps < 0:
            raise UserError(
                f"{key}n_startup_trials={cfg.n_startup_trials} / {key}n_warmup_steps="
                f"{cfg.n_warmup_steps}: expected >= 0"
            )
        if cfg.name == "percentile" and not 0 <= cfg.percentile <= 100:
            raise UserError(f"{key}percentile={cfg.percentile}: expected 0 to 100")
    if cfg.name in ("hyperband", "successive_halving"):
        if cfg.min_resource < 1:
            raise UserError(f"{key}min_resource={cfg.min_resource}: expected >= 1 training step")
        if cfg.reduction_factor < 2:
            raise UserError(
                f"{key}reduction_factor={cfg.reduction_factor}: expected >= 2 (each rung keeps "
                "1/reduction_factor of the trials)"
            )
    if cfg.name == "hyperband":
        most = max_resource(cfg)
        if most != "auto" and most < cfg.min_resource:
            raise UserError(
                f"{key}max_resource={most} is below {key}min_resource={cfg.min_resource}"
            )
    if cfg.name == "successive_halving" and cfg.min_early_stopping_rate < 0:
        raise UserError(
            f"{key}min_early_stopping_rate={cfg.min_early_stopping_rate}: expected >= 0"
        )
    if cfg.name == "wilcoxon":
        if not 0 < cfg.p_threshold < 1:
            raise UserError(f"{key}p_threshold={cfg.p_threshold}: expected between 0 and 1")
        if cfg.n_startup_steps < 0:
            raise UserError(f"{key}n_startup_steps={cfg.n_startup_steps}: expected >= 0")
