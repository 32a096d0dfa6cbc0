"""`train.resume=true`: continue a cut-off run in its own folder, where it left off.

Rerun the same command with `hydra.run.dir=<the run's folder>` and `train.resume=true`: the trainer
restarts from the folder's last good checkpoint (weights, optimizer, scheduler, RNG, step, loss sum)
and the MLflow run recorded in `mlflow_run_id` is continued, not duplicated. Without
`train.resume`, a run never writes into a folder that already holds one.
"""

from __future__ import annotations

import errno
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from summarizer.errors import UserError
from summarizer.sweep.trial import read_result
from summarizer.tracking import flatten
from summarizer.train.checkpoints import MANIFEST, last_good_checkpoint

log = logging.getLogger(__name__)

CONFIG = "config.yaml"  # the resolved config a run writes first: the mark of a run's folder
RUN_ID = "mlflow_run_id"
# Settings that do not change what the run computes (a run folder may be moved, then resumed).
# distributed.backend / master_port only say how the DDP ranks talk.
MAY_DIFFER = (
    "train.resume",
    "cache_dir",
    "output_dir",
    "distributed.backend",
    "distributed.master_port",
)


SFT_ADAPTER = "adapter_sft"  # stages.rl: the SFT adapter, saved (whole) before the RL stage starts
RL_CHECKPOINTS = "rl_checkpoints"


@dataclass(frozen=True)
class Resume:
    checkpoint: Path | None  # SFT's; None: SFT is not rerun (finished, or stages.train=false)
    mlflow_run_id: str | None
    rl_checkpoint: Path | None = None  # the RL stage's, when it had saved one
    sft_done: bool = False  # stages.rl: the SFT adapter is saved: load it, do not train again


def prepare(cfg: DictConfig, out: Path) -> Resume | None:
    """Check `out` before anything is written: None for a new run (refused where a run already is),
    else what to continue from. Errors are one line naming the folder and the fix."""
    saved = out / CONFIG
    if not cfg.train.resume:
        if saved.exists() and not _produced(out):
            # It stopped before producing anything (e.g. a missing data file): nothing to protect.
            log.info("%s holds only the config of a run that stopped early: starting afresh", out)
            return None
        if saved.exists():
            raise UserError(
                f"output_dir={out} already holds a run ({CONFIG}); add train.resume=true to "
                "continue it, or pick another hydra.run.dir"
            )
        return None
    if not saved.is_file():
        raise UserError(
            f"train.resume=true: {out} holds no run to continue (no {CONFIG}); pass the run's "
            "folder: hydra.run.dir=outputs/<date>/<time>_<model>"
        )
    result = read_result(out)
    if result and result.get("state") == "COMPLETE":
        raise UserError(f"train.resume=true: the run in {out} already finished (result.json)")
    changed = _changes(saved, cfg)
    if changed:
        raise UserError(
            f"train.resume=true: the config differs from the run in {out} ({changed}); resume "
            f"with the same overrides, or start a new run from its checkpoints: "
            f"train.resume_from={out / 'checkpoints'}"
        )
    rl = cfg.stages.rl
    sft_done = rl and cfg.stages.train and (out / SFT_ADAPTER / "adapter_config.json").is_file()
    checkpoint = None
    if cfg.stages.train and not sft_done:
        checkpoint = last_good_checkpoint(out / "checkpoints")
    rl_checkpoint = None
    rl_saved = any((out / RL_CHECKPOINTS).glob("checkpoint-*"))
    if rl and (rl_saved or not (sft_done or checkpoint)):  # nothing else to continue from
        rl_checkpoint = last_good_checkpoint(out / RL_CHECKPOINTS, "rl.save_steps")
    run_id = (out / RUN_ID).read_text("utf-8").strip() if (out / RUN_ID).is_file() else None
    if cfg.tracking.enabled and not run_id:
        log.warning("%s has no %s: the resumed run gets a new MLflow run", out, RUN_ID)
    if sft_done:
        log.info("resuming the run in %s: SFT is done (%s)", out, SFT_ADAPTER)
    where = rl_checkpoint or checkpoint
    if where:
        log.info("resuming the run in %s from %s", out, where.relative_to(out))
    return Resume(checkpoint, run_id or None, rl_checkpoint, sft_done)


# What a run produces once it got going: any of these makes its folder worth protecting.
PRODUCTS = (
    RUN_ID, "result.json", "checkpoints", "adapter", "predictions.csv", "submission.csv", "ddp",
    "augmentation_sample.csv", SFT_ADAPTER, RL_CHECKPOINTS,
)  # fmt: skip


def _produced(out: Path) -> bool:
    return any((out / name).exists() for name in PRODUCTS)


def _changes(saved: Path, cfg: DictConfig) -> str:
    """'key: before -> now' for the first settings that differ from the saved config."""
    from summarizer.config import Config

    try:  # keys added to the schema since the run was made count at their defaults
        loaded = OmegaConf.load(saved)
        if "trainer" in loaded and "distributed" not in loaded:  # the group's former name
            loaded.distributed = loaded.pop("trainer")
        saved_cfg = OmegaConf.merge(OmegaConf.structured(Config), loaded)
        before = flatten(OmegaConf.to_container(saved_cfg))
    except Exception as e:  # YAML or OmegaConf errors: the file was damaged
        raise UserError(f"train.resume=true: {saved} is unreadable ({type(e).__name__})") from e
    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    keys = sorted(
        k for k in before.keys() | now.keys() if k not in MAY_DIFFER and before.get(k) != now.get(k)
    )
    shown = ", ".join(f"{k}: {_short(before.get(k))} -> {_short(now.get(k))}" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _short(value: str | None) -> str:
    text = repr(value) if value is None or "\n" in value else value
    return text if len(text) <= 60 else text[:57] + "..."


def command(out: Path, resume: bool = True) -> str:
    """The command line that continues the run in `out`: this invocation's overrides, its folder
    and train.resume=true (resume=False: the same run started again, in a new folder)."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    own = ("hydra.run.dir", "output_dir", "train.resume")
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in own]
    tail = [f"hydra.run.dir={out}", "train.resume=true"] if resume else []
    return shlex.join(["python", "-m", "summarizer", *keep, *tail])


def last_saved(out: Path) -> Path | None:
    """The newest checkpoint in `out` whose saving finished (its manifest is written last)."""
    found = [p for p in (out / "checkpoints").glob("checkpoint-*") if (p / MANIFEST).is_file()]
    found = [p for p in found if p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def stopped(out: Path, why: str, first: str = "") -> str:
    """One line for a run stopped part-way (`why`): its last checkpoint and how to continue
    (`first`: what to do before)."""
    last = last_saved(out)
    if last is None:
        return (
            f"{why}; no checkpoint was saved yet (train.save_steps), nothing to resume; {first}"
            f"start it again: {command(out, resume=False)}"
        )
    return f"{why}; the last good checkpoint {last} is kept; {first}resume with: {command(out)}"


def is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC, as OSError or as torch's / safetensors' own write errors (they lose the errno)."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if any(t in text for t in ("No space left", "inline_container.cc", "StorageFull")):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def disk_full(saving: Path, out: Path) -> UserError:
    """The error for a save that ran out of disk space; the half-written `saving` is removed."""
    import shutil

    shutil.rmtree(saving, ignore_errors=True)  # never resumed from, and it holds the space
    return UserError(stopped(out, f"disk full while saving {saving}", "free space, then "))
