"""`distributed=ddp`: one run trained by `nproc` processes started through torchrun's agent.

`python -m summarizer distributed=ddp ...` composes the config as usual; the job function
(`summarizer/__main__.py`) sees that it needs more than one process and calls `launch` instead of
the pipeline. `launch` runs PyTorch's elastic agent in this process (`torch.distributed.launcher`,
what `torchrun --standalone` runs) on `python -m summarizer <the job's overrides>
hydra.run.dir=<this run's folder>`: every rank composes the same config from the same overrides
and environment, so secrets (masked in config.yaml) resolve as in the job and `train.resume=true`
resumes on every rank. The ranks run the ordinary pipeline (summarizer/distributed.py gates what
rank 0 alone does), and rank 0 tags its MLflow run with the job's Hydra choices, composed itself.
The agent runs in this process rather than as a `torchrun` child so that a failure comes back as
data (which rank failed first, its exit code, its log files), not as text to parse, and a signal
to this process reaches the ranks through the agent.

torchrun brings the rendezvous, the rank environment, one log folder per rank
(`<run>/ddp/<run id>_*/attempt_0/<rank>/stdout.log, stderr.log`), rank 0's output on the console
(`[rank0]:` lines; rank 0 also appends to the job's own log file, beside this process) and, when
one rank fails, the end of the others. This module adds only what it lacks:
- one `error:` line for a failed run: the failed rank's own `error:` line (a UserError prints the
  same line one process prints), else which rank failed and where its log is;
- the run's MLflow run closed as FAILED (KILLED on Ctrl-C) when rank 0 was stopped before it could;
- rank 0's objective, read from result.json, returned: a sweep trial with DDP looks like any other;
- a rank that outlives a killed launcher (SIGKILL, OOM) ends instead of blocking in a collective.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from pathlib import Path

from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from summarizer import distributed
from summarizer.errors import UserError, log_tail

log = logging.getLogger(__name__)

FOLDER = "ddp"  # in the run folder: torchrun's logs, one folder per rank
LAUNCHER_PID = "SUMMARIZER_DDP_LAUNCHER"  # the launching process, for `as_rank`
_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # the agent's handlers, restored after it


def processes(cfg: DictConfig) -> int:
    """How many processes should train this job: 1 runs it here, more go through `launch`.
    A rank (already under a launcher) is always 1: it is one of those processes."""
    if distributed.is_worker():
        return 1
    n = distributed.resolve_nproc(cfg.distributed.nproc)
    distributed.resolve_backend(cfg.distributed.backend)  # a bad backend fails here, not per rank
    if n > 1 and not cfg.stages.train:
        log.info("distributed.nproc=%d: nothing to train (stages.train=false), one process", n)
        return 1
    return n


def rank_command(overrides, out: Path) -> list[str]:
    """What each rank runs: this job's overrides, in this job's folder (the default run dir holds
    the time of day), with no second .hydra record there (the launching job wrote its own)."""
    return [
        sys.executable,
        "-m",
        "summarizer",
        *overrides,
        f"hydra.run.dir={out}",
        "hydra.output_subdir=null",
    ]


def launch(cfg: DictConfig, nproc: int, command: list[str]) -> float:
    """Train the job in `nproc` ranks running `command` (`rank_command`); returns rank 0's
    objective (result.json)."""
    from summarizer.sweep.trial import read_result

    out = Path(cfg.output_dir)
    run_id = time.strftime("%Y%m%d-%H%M%S")  # names the log folder: a resumed run's goes beside
    port = cfg.distributed.master_port
    logs = _Logs(log_dir=str(out / FOLDER), redirects=Std.ALL, tee=Std.ALL, local_ranks_filter={0})
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=run_id,
        rdzv_backend="c10d",  # torchrun --standalone: a store in this process (port 0: a free one)
        rdzv_endpoint=f"localhost:{port}",
        max_restarts=0,  # a failed rank fails the run: the pipeline has its own train.resume
        monitor_interval=0.2,
        logs_specs=logs,
        log_line_prefix_template="[rank${rank}]:",
    )
    log.info(
        "distributed=ddp: %d processes (%s) through torchrun; logs in %s/%s_*/attempt_0/<rank>/",
        nproc, distributed.resolve_backend(cfg.distributed.backend), out / FOLDER, run_id,
    )  # fmt: skip
    caught = None
    try:
        with _rank_environment(nproc), _signal_handlers_kept():
            elastic_launch(config, command[0])(*command[1:])
    except ChildFailedError as e:
        r, failure = e.get_first_failure()
        log.error(
            "distributed=ddp: rank %d exited with code %d; the other ranks were stopped",
            r, failure.exitcode,
        )  # fmt: skip
        _close_mlflow_run(cfg, out, "FAILED", "FAIL")
        stderr = Path(logs.dest.stderrs[failure.local_rank])  # its traceback, its error line
        raise UserError(failure_message(r, failure.exitcode, stderr, nproc)) from None
    except SignalException as e:  # the agent passed it on to the ranks and waited for them
        caught = e.sigval
    if caught is not None:
        _close_mlflow_run(cfg, out, "KILLED", "FAIL")
        # As if it had reached a one-process run: Ctrl-C becomes KeyboardInterrupt, SIGTERM ends.
        signal.raise_signal(caught)
        raise SystemExit(128 + caught)  # a handler that returned
    result = read_result(out)
    if result is None:
        raise UserError(f"distributed=ddp: the ranks left no result.json in {out}")
    value = result.get("value")
    return float(value) if result.get("state") == "COMPLETE" and value is not None else float("nan")


def failure_message(r: int, code: int, log_file: Path, n: int) -> str:
    """A rank's own `error:` line (a UserError: the same line one process prints), else which rank
    failed and where its log is."""
    last = _last_line(log_file)
    if last.startswith("error: "):
        return last[len("error: ") :]
    how = f"was killed by signal {-code}" if code < 0 else f"failed (exit code {code})"
    return f"distributed=ddp: rank {r} of {n} {how}; see {log_file}"


def as_rank() -> None:
    """In a rank: end with the launching process. torchrun starts each rank in its own session,
    so a launcher killed outright (SIGKILL, the OOM killer) would leave the ranks blocked in their
    next collective, holding their GPUs, until its timeout."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher and os.getppid() != int(launcher):  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)
    if not distributed.is_main():  # the job's log file is rank 0's; the others have their own
        for handler in logging.getLogger().handlers[:]:
            if isinstance(handler, logging.FileHandler):
                logging.getLogger().removeHandler(handler)
                handler.close()


class _Logs(DefaultLogsSpecs):
    """torchrun's log layout, remembered: where each rank's stdout and stderr went."""

    dest = None

    def reify(self, envs):
        self.dest = super().reify(envs)
        return self.dest


def _last_line(path: Path) -> str:
    lines = log_tail(path)
    return lines[-1].strip() if lines else ""


@contextlib.contextmanager
def _rank_environment(nproc: int):
    """What the ranks inherit besides torchrun's variables: unbuffered output (rank 0's progress
    reaches the console as it happens), a share of the cores each (torchrun's default is one
    thread), and this process's id for `as_rank`."""
    add = {"PYTHONUNBUFFERED": "1", LAUNCHER_PID: str(os.getpid())}
    if "OMP_NUM_THREADS" not in os.environ:
        add["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    before = {k: os.environ.get(k) for k in add}
    os.environ.update(add)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _signal_handlers_kept():
    """The agent installs handlers that turn these signals into its SignalException; once the
    ranks are gone this process handles them as before."""
    saved = {}
    for name in _SIGNALS:
        with contextlib.suppress(AttributeError, ValueError):  # not on this OS / not main thread
            sig = getattr(signal, name)
            saved[sig] = signal.getsignal(sig)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)


def _close_mlflow_run(cfg: DictConfig, out: Path, status: str, state: str) -> None:
    """Rank 0 stopped by the agent (another rank failed, or a signal) may not have ended its
    MLflow run: end it."""
    run_file = out / "mlflow_run_id"
    if not cfg.tracking.enabled or not run_file.is_file():
        return
    from summarizer import tracking

    try:
        uri = tracking.resolve_uri(cfg.tracking.uri, Path.cwd())
        tracking.end_run_if_running(uri, run_file.read_text("utf-8").strip(), status, state)
    except Exception as e:  # the error to report is the rank's, not this
        log.warning("could not close the MLflow run: %s", e)
