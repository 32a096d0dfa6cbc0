"""How a study searches: the sampler that proposes each trial's settings and the pruner that stops
unpromising trials early, side by side. A new pruner is one entry in `PRUNERS`.
"""

from __future__ import annotations

import logging

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
PRUNERS = {
    "none": lambda c: optuna.pruners.NopPruner(),
    "median": lambda c: optuna.pruners.MedianPruner(c.n_startup_trials, c.n_warmup_steps),
    "percentile": lambda c: optuna.pruners.PercentilePruner(
        c.percentile, c.n_startup_trials, c.n_warmup_steps
    ),
    "hyperband": lambda c: optuna.pruners.HyperbandPruner(
        min_resource=c.min_resource, reduction_factor=c.reduction_factor
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
    if cfg.name not in PRUNERS:
        names = list(PRUNERS)
        raise UserError(
            f"trial.pruner.name={cfg.name!r}: expected {', '.join(names[:-1])} or {names[-1]}"
        )
    return PRUNERS[cfg.name](cfg)
