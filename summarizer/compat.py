"""Every use of a library's private API, in one place, and the versions it was tested with.

Some things the project needs have no public API: the Trainer's running loss sum (for an exact
resume), the Optuna trial id (heartbeats, user attributes), the Hydra Optuna sweeper's override
parser, undoing `nn.Module.compile`, bitsandbytes' CPU weight layout. Each is wrapped here once;
tests/unit/test_compat.py checks every wrapper against the installed libraries, so an upgrade
that moves one fails loudly there instead of silently giving a wrong value at run time. Code
that overrides a protected Trainer method names it in `TRAINER_HOOKS`, which the same test checks.

`check_versions()` runs at start-up: a library outside its tested range is a one-line error
(SUMMARIZER_ALLOW_UNTESTED=1 makes it a warning, for a user who wants to try a newer release).
pyproject.toml's lower bounds are the same tested versions.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata

from summarizer.errors import UserError

log = logging.getLogger(__name__)

ALLOW_ENV = "SUMMARIZER_ALLOW_UNTESTED"

# distribution -> (lowest tested, first untested): the CPU pins of requirements.txt and the GPU
# image's torch 2.11. Widen a range only after the contract tests pass on the new version.
TESTED = {
    "torch": ("2.11", "2.14"),
    "transformers": ("5.23", "5.24"),
    "peft": ("0.21", "0.22"),
    "trl": ("1.16", "1.17"),
    "accelerate": ("1.15", "1.16"),
    "optuna": ("5.0", "5.1"),
    "hydra-core": ("1.3.8", "1.4"),
    "hydra-optuna-sweeper": ("1.3.0", "1.4"),
    "hydra-submitit-launcher": ("1.2.0", "1.3"),
    "bitsandbytes": ("0.50", "0.51"),  # optional: checked only where installed
}

# Protected Trainer methods `train.trainer.CompletionOnlyTrainer` overrides or calls, with the
# parameters it passes: transformers documents no public hook for these.
TRAINER_HOOKS = {
    "_save_checkpoint": ("model", "trial"),  # our loss sum and manifest go into each checkpoint
    "_get_output_dir": ("trial",),  # where that checkpoint is written
    "_prepare_inputs": ("inputs",),  # the CUDA-graph step moves its batch as HF's step does
}


def _key(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0): release numbers only (local and pre-release tags dropped)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():  # 0rc1, 1.dev0: the number before the tag counts
            break
    return tuple(parts)


def untested(installed: dict[str, str] | None = None) -> list[str]:
    """'name X (tested: >=A,<B)' for each installed library outside its tested range."""
    if installed is None:
        installed = {}
        for name in TESTED:
            try:
                installed[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
    out = []
    for name, version in installed.items():
        low, high = TESTED[name]
        if not _key(low) <= _key(version) < _key(high):
            out.append(f"{name} {version} (tested: >={low},<{high})")
    return out


def check_versions(installed: dict[str, str] | None = None) -> None:
    bad = untested(installed)
    if not bad:
        return
    message = (
        f"untested library version: {'; '.join(bad)}; install the versions of requirements.txt "
        f"(make install), or set {ALLOW_ENV}=1 to run anyway"
    )
    if os.environ.get(ALLOW_ENV) == "1":
        log.warning("%s", message)
        return
    raise UserError(message)


# --- transformers ---------------------------------------------------------------------------------


def trainer_loss_sum(trainer) -> float:
    """The sum of the training losses of the steps this `train()` call ran: HF keeps what it logged
    in `_total_loss_scalar` and the steps since the last log in `_tr_loss` (a tensor)."""
    try:
        logged, pending = trainer._total_loss_scalar, trainer._tr_loss
    except AttributeError as e:  # a default of 0.0 would make a resumed run's loss silently wrong
        raise RuntimeError(
            f"transformers {metadata.version('transformers')}: the Trainer no longer keeps its loss "
            f"sum in _total_loss_scalar/_tr_loss ({e}); see summarizer/compat.py"
        ) from e
    return float(logged) + float(pending)


def use_one_gpu(args) -> None:
    """One process sees several GPUs: keep the model on one instead of HF's nn.DataParallel (TRL
    refuses it). HF's Trainer sets the same private field for a model spread over GPUs."""
    args._n_gpu = 1


def attention_implementation(model) -> str:
    """The attention a loaded model runs (`attn_implementation` at load time, or what HF chose)."""
    return model.config._attn_implementation


# --- torch ----------------------------------------------------------------------------------------


def uncompile(module) -> None:
    """Undo `nn.Module.compile()` in place: torch has no public call for it."""
    module._compiled_call_impl = None


def zero_(tensors: list) -> None:
    """Zero many tensors in one kernel launch per dtype (what optimizers' zero_grad uses)."""
    import torch

    torch._foreach_zero_(tensors)


# --- bitsandbytes ---------------------------------------------------------------------------------


def unpack_cpu_4bit(data, state):
    """bitsandbytes repacks 4-bit weights for its CPU kernel at the first forward on a CPU; undo
    that layout (as its own .cuda() does) so the weight can be dequantized."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    return _convert_weight_packed_for_cpu_inverse(data, state)


# --- Optuna and its Hydra sweeper ----------------------------------------------------------------


def storage(study):
    """The storage object a study was opened with (for heartbeats and trial ids): the same
    connection pool, where `optuna.storages.get_storage(url)` would open a second one."""
    return study._storage


def study_id(study) -> int:
    return study._study_id


def trial_id(trial) -> int:
    """The storage's id of a Trial or FrozenTrial (its `number` counts within the study only)."""
    return trial._trial_id


def suggest(trial, name: str, distribution):
    """Draw (or, for an enqueued trial, take the fixed value of) one parameter by its
    distribution object; the public `suggest_*` calls each rebuild it from arguments."""
    return trial._suggest(name, distribution)


def new_distribution(distribution):
    """A distribution as current Optuna has it (the sweeper plugin builds pre-3.0 ones)."""
    from optuna.distributions import _convert_old_distribution_to_new_distribution

    return _convert_old_distribution_to_new_distribution(distribution)


def sweeper_params(overrides: list):
    """(search space, fixed params) from Hydra sweep overrides such as `lora.r=choice(8,16)`, as
    hydra-optuna-sweeper parses them."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    return create_params_from_overrides(overrides)


def submitit_kind(launcher) -> str:
    """'local' or 'slurm': which executor Hydra's submitit launcher builds (a class attribute the
    plugin keeps private)."""
    return launcher._EXECUTOR
