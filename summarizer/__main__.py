"""`python -m summarizer [overrides]`: compose conf/config.yaml and run the pipeline — in this
process, or (distributed=ddp) in one process per GPU started through torchrun
(summarizer/cli/launch.py), each of which runs this same command as one rank."""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
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

from summarizer import compat, tracking
from summarizer.config import register_configs
from summarizer.errors import UserError

register_configs()
tracking.quiet_third_party()
log = logging.getLogger("summarizer")
# Hydra reports a composition error (unknown option or key, wrong type) in several lines and exits 1;
# with HYDRA_FULL_ERROR=1 it raises instead, and `cli` prints one `error:` line (exit 2). The mark
# tells our setting (inherited by sweep trials) from a user's own HYDRA_FULL_ERROR.
_MARK = "SUMMARIZER_HYDRA_ERRORS"
_ours = False  # cli() set HYDRA_FULL_ERROR
_started = False  # the job function was reached: the config composed, the run folder exists


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    global _started, _signal
    _started, _signal = True, None
    if _ours:  # composed: later errors are reported the usual Hydra way
        for name in ("HYDRA_FULL_ERROR", _MARK):
            os.environ.pop(name, None)
    for handler in logging.getLogger().handlers:  # console and the job's log file
        handler.addFilter(tracking.RedactSecrets())
    hc = HydraConfig.get()
    # Hydra's record of the command and config: no secret stays on disk. Every .hydra* folder (a
    # resumed run has several); hydra.output_subdir would resolve afresh to a new name here.
    for record in Path(hc.runtime.output_dir).glob(".hydra*"):
        tracking.redact_files(record)
    multirun = hc.mode == RunMode.MULTIRUN
    # A plain run, not a sweep's trial or refit (the sweeper handles their folders and signals).
    plain = not multirun and cfg.trial.number is None and cfg.trial.refit_of is None
    out = Path(cfg.output_dir)
    fresh = plain and _hydra_only(out, fresh=True)  # Hydra made this folder for this invocation
    previous = signal.getsignal(signal.SIGTERM)
    if plain and _main_thread():
        signal.signal(signal.SIGTERM, _terminated)  # a clean stop, as on Ctrl-C
    try:
        choice = HydraConfig.get().runtime.choices.get("sweep")
        if plain and choice:
            raise UserError(
                f"sweep={choice} is an Optuna sweep: add --multirun (python -m summarizer "
                f"--multirun sweep={choice} ...) or run make sweep SWEEP={choice}"
            )
        return _job(cfg)
    except UserError as e:
        if multirun:
            raise  # the sweeper records the trial as failed and goes on
        log.error("%s", e)
        failed = (str(e), 2)
    except KeyboardInterrupt:
        if not plain:
            raise
        why = "stopped by SIGTERM" if _signal == signal.SIGTERM else "interrupted (Ctrl-C)"
        from summarizer.train import resume

        failed = (resume.stopped(out, why), 128 + (_signal or signal.SIGINT))
    finally:
        if plain and _main_thread():
            signal.signal(signal.SIGTERM, previous)
    # Out of the handler the failed frames are gone: collecting them closes their progress bars,
    # which would otherwise print themselves at exit, after the error line.
    gc.collect()
    _fail(*failed, out if fresh else None)


_signal: int | None = None  # the signal that stopped the run, when one did


def _terminated(signum, frame):
    global _signal
    _signal = signum
    raise KeyboardInterrupt  # unwinds like Ctrl-C: the MLflow run ends KILLED


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _fail(message: str, code: int, created: Path | None) -> None:
    """The last line printed, `error: <message>`, and the exit code; a run folder this invocation
    created and that holds nothing but Hydra's own files is removed first."""
    if created is not None:
        _remove_if_hydra_only(created)
    sys.stdout.flush()  # the logged line first: the error line is the last one printed
    print(f"error: {tracking.redact(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


_HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}


def _hydra_only(out: Path, fresh: bool = False) -> bool:
    """`out` holds only what Hydra writes when it makes a run folder: .hydra/ and the job's log
    (with fresh=True: that log still empty, so no earlier invocation wrote there)."""
    try:
        names = {p.name for p in out.iterdir()}
        hydra = {p.name for p in (out / ".hydra").iterdir()} if (out / ".hydra").is_dir() else set()
        log_file = out / f"{HydraConfig.get().job.name}.log"
        empty = not log_file.exists() or log_file.stat().st_size == 0
    except OSError:
        return False
    return names <= {".hydra", log_file.name} and hydra <= _HYDRA_FILES and (empty or not fresh)


def _remove_if_hydra_only(out: Path) -> None:
    if not _hydra_only(out):
        return
    for handler in logging.getLogger().handlers:  # the job's log file is open
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == out:
            handler.close()
            logging.getLogger().removeHandler(handler)
    try:
        for name in _HYDRA_FILES:
            (out / ".hydra" / name).unlink(missing_ok=True)
        (out / ".hydra").rmdir()
        (out / f"{HydraConfig.get().job.name}.log").unlink(missing_ok=True)
        out.rmdir()  # only if empty: never a file that is not Hydra's
    except OSError:
        pass


def _job(cfg: DictConfig) -> float:
    """The pipeline here, or `nproc` ranks of it launched (each runs this function as a rank)."""
    from summarizer import distributed
    from summarizer import plan as preflight

    plan = None
    if not distributed.is_worker() and str(cfg.distributed.nproc) == "1":
        plan = preflight.make(
            cfg
        )  # a bad value fails before the launcher and training libraries load
    from summarizer.cli import launch

    if distributed.is_worker():
        launch.as_rank()
    try:
        nproc = launch.processes(cfg)  # distributed=ddp: one process per GPU, this one waits
        if nproc > 1:
            preflight.make(cfg, world_size=nproc)  # a bad value fails here, not in every rank
            command = launch.rank_command(HydraConfig.get().overrides.task, Path(cfg.output_dir))
            return launch.launch(cfg, nproc, command)
        from summarizer.pipeline import run

        return run(cfg, plan)  # the plan made above, not resolved a second time
    finally:
        distributed.teardown()  # a rank leaves its process group (before its error line)


def cli() -> None:
    global _ours
    _ours = "HYDRA_FULL_ERROR" not in os.environ or os.environ.get(_MARK) == "1"
    if _ours:
        os.environ.update({"HYDRA_FULL_ERROR": "1", _MARK: "1"})
    _tracking_uri_from_environment()
    try:
        compat.check_versions()  # a library outside its tested range: one line, before anything
        main()
    except (HydraException, OmegaConfBaseException, OSError) as e:
        if not _ours or _started:
            raise
        print(f"error: {setup_error(e)}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:  # logging's "Unable to configure handler": the job log's folder
        if not _ours or _started or not isinstance(e.__cause__, OSError):
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
    if isinstance(e, ValueError) and isinstance(e.__cause__, OSError):  # the job's log file
        cause = e.__cause__
        folder = Path(cause.filename).parent if cause.filename else "?"
        return (
            f"cannot write the run folder {folder} ({cause.strerror or cause}); "
            "pick another hydra.run.dir"
        )
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    cause = e.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        reason = str(cause).strip().splitlines()[0]
        if "not in" in reason:  # Key 'rank' not in 'LoraConfig'
            return f"{cause.full_key}: no such key ({reason}; `--cfg job` lists them all)"
        return f"{cause.full_key}: {reason} ({first})"
    return first


_URI_OVERRIDE = re.compile(r"^[+~]*tracking\.uri=")


def _tracking_uri_from_environment() -> None:
    """MLFLOW_TRACKING_URI wins over the config's tracking.uri, as in MLflow's own tools; a
    tracking.uri= on the command line wins over it. Passed as an override, so the sweeper, DDP
    ranks, the saved config and a resume see the same store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri or any(_URI_OVERRIDE.match(a) for a in sys.argv[1:]):
        return
    quoted = uri.replace("\\", "\\\\").replace("'", "\\'")
    sys.argv.append(f"tracking.uri='{quoted}'")


if __name__ == "__main__":
    cli()
