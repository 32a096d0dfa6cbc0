"""Hyperparameter sweeps: an asynchronous Optuna sweeper for Hydra, one module per job.

- `sweeper`: the Hydra Sweeper (`hydra/sweeper: summarizer`): the loop of worker threads, the
  outcome of each trial, MLflow's parent run.
- `study`: open the study, claim a trial, count what is done, retry cut-off trials.
- `storage`: the study's database URL, its check, the lock shared by every sweeper process.
- `jobs`: the trials' processes (local or submitit), their heartbeat loop, stopping them, signals.
- `trial`: the job's side: attach to its trial, write `result.json`.
- `pruners`: sampler and pruner name tables.
- `report`: best-trial summary and plots (`python -m summarizer.sweep.report`).
- `services`: local PostgreSQL and MLflow server (`python -m summarizer.sweep.services`).

Imports point one way: sweeper on top; report -> study -> storage, pruners, services; jobs, trial
and pruners import nothing of the sweeper's. None reaches the training stack (pipeline, train,
cli, augment: tests/unit/test_layers.py checks it), so a sweeper process stays light.
"""
