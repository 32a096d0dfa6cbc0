"""`python -m summarizer [overrides]`: compose conf/config.yaml and run the pipeline — in this
process, or (distributed=ddp) in one process per GPU started through torchrun
(summarizer/cli/launch.py), each of which runs this same command as one rank."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# Quieter third-party start-up; set before they are imported.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from summarizer import compat
from summarizer.config import register_configs
from summarizer.errors import UserError

register_configs()
log = logging.getLogger("summarizer")
# Hydra reports a composition error (unknown option or key, wrong type) in several lines and exits 1;
# with HYDRA_FULL_ERROR=1 it raises instead, and `cli` prints one `error:` line (exit 2). The mark
# tells our setting (inherited by sweep trials) from a user's own HYDRA_FULL_ERROR.
_MARK = "SUMMARIZER_HYDRA_ERRORS"
_ours = False  # cli() set HYDRA_FULL_ERROR
_started = False  # the job function was reached: the config composed, the run folder exists


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    global _started
    _started = True
    if _ours:  # composed: later errors are reported the usual Hydra way
        for name in ("HYDRA_FULL_ERROR", _MARK):
            os.environ.pop(name, None)
    from summarizer import tracking

    for handler in logging.getLogger().handlers:  # console and the job's log file
        handler.addFilter(tracking.RedactSecrets())
    try:
        return _job(cfg)
    except UserError as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper records the trial as failed and goes on
        log.error("%s", e)
        sys.stdout.flush()  # the logged line first: the error line is the last one printed
        print(f"error: {tracking.redact(str(e))}", file=sys.stderr, flush=True)
        sys.exit(2)


def _job(cfg: DictConfig) -> float:
    """The pipeline here, or `nproc` ranks of it launched (each runs this function as a rank)."""
    from summarizer import distributed
    from summarizer import plan as preflight
    from summarizer.cli import launch
    from summarizer.pipeline import run

    if distributed.is_worker():
        launch.as_rank()
    try:
        nproc = launch.processes(cfg)  # distributed=ddp: one process per GPU, this one waits
        if nproc > 1:
            preflight.make(cfg, world_size=nproc)  # a bad value fails here, not in every rank
            command = launch.rank_command(HydraConfig.get().overrides.task, Path(cfg.output_dir))
            return launch.launch(cfg, nproc, command)
        return run(cfg)
    finally:
        distributed.teardown()  # a rank leaves its process group (before its error line)


def cli() -> None:
    global _ours
    _ours = "HYDRA_FULL_ERROR" not in os.environ or os.environ.get(_MARK) == "1"
    if _ours:
        os.environ.update({"HYDRA_FULL_ERROR": "1", _MARK: "1"})
    try:
        compat.check_versions()  # a library outside its tested range: one line, before anything
        main()
    except (HydraException, OmegaConfBaseException, OSError) as e:
        if not _ours or _started:
            raise
        print(f"error: {setup_error(e)}", file=sys.stderr)
        sys.exit(2)
    except UserError as e:  # the sweeper's (storage, launcher); a single run reports its own
        if not _ours:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def setup_error(e: BaseException) -> str:
    """One line for an error raised before the job starts: composing the config or creating the
    run folder. Names the group option, key or folder."""
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return (
            f"{group}={option}: no such option in conf/{group} (available: {', '.join(e.options)})"
        )
    if isinstance(e, OSError) and not isinstance(e, HydraException):
        where = f"{e.filename}: {e.strerror}" if e.filename else str(e)
        return f"cannot write the run folder ({where}); pick another hydra.run.dir"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    cause = e.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        reason = str(cause).strip().splitlines()[0]
        if "not in" in reason:  # Key 'rank' not in 'LoraConfig'
            return f"{cause.full_key}: no such key ({reason}; `--cfg job` lists them all)"
        return f"{cause.full_key}: {reason} ({first})"
    return first


if __name__ == "__main__":
    cli()
