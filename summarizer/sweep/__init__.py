"""Hyperparameter sweeps: the Hydra sweeper that drives an Optuna study, its storage, the trial side
that a run attaches to, samplers and pruners, the report, and local services."""
