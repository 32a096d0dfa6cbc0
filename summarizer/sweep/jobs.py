"""The trials' own processes: how the sweeper starts one, waits on it while beating its heartbeat,
stops it, and reads why it failed. Nothing here knows Optuna: the sweeper passes a `beat` callable.

- A local process (`hydra/launcher=basic`): `python -m summarizer <overrides>` with its own memory
  and CUDA context; it dies with the sweeper thread that started it (PR_SET_PDEATHSIG), so a killed
  worker leaves no trial running unseen while the study retries it elsewhere.
- A submitit job (`submitit_local`, `submitit_slurm`, a preset extending them): the executor Hydra's
  submitit launcher would build, running that launcher's own job body for one trial.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from summarizer import compat
from summarizer.errors import first_line, log_tail

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def failure_line(job_log: Path) -> str | None:
    """Why a trial's process failed, from the end of its job.log: the last `error:` line (what
    a UserError prints), else the last exception line of a traceback."""
    lines = log_tail(job_log, 65536)
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: ") :].strip()[:300]
    for line in reversed(lines):
        name = line.split(":", 1)[0]
        if (
            ":" in line
            and name.replace(".", "").replace("_", "").isalnum()
            and (name.endswith(("Error", "Exception", "Interrupt")))
        ):
            return line.strip()[:300]
    return None


def _die_with_sweeper() -> None:
    """Run in the trial process before exec: the kernel SIGKILLs it when the sweeper's thread that
    started it dies (PR_SET_PDEATHSIG), even by SIGKILL."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def process_env(gpu: int | str | None, share_cores: int) -> dict:
    """A trial process's environment: pinned to `gpu`, or, with `share_cores` > 1 trials side by
    side on the CPU, a share of the cores each instead of oversubscribing them."""
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    elif share_cores > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // share_cores)))
    return env


class Spare:
    """One worker's trial process started ahead (summarizer/sweep/warm.py): it imports the heavy
    libraries while the worker's current trial runs, and the worker's next trial takes it over
    instead of starting cold. It is used only for the same folder and environment it was started
    with, dies with the worker's thread (PR_SET_PDEATHSIG) and exits at the end of its input."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.key: tuple | None = None

    def start(self, cwd: Path, env: dict) -> None:
        """A new spare for `cwd` and `env` (the one before, if any, is stopped). Where none can
        start (out of processes or memory), there is none: the next trial starts cold."""
        self.close()
        self.key = _spare_key(cwd, env)
        with contextlib.suppress(OSError):
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "summarizer.sweep.warm"],
                cwd=cwd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
                preexec_fn=_die_with_sweeper,
            )

    def take(self, cwd: Path, env: dict, args: list[str], log: Path) -> subprocess.Popen | None:
        """The spare, now running `python -m summarizer <args>` into `log`; None when there is no
        usable spare (never started, died, or started for another folder or environment)."""
        proc, key, self.proc = self.proc, self.key, None
        if proc is None:
            return None
        if proc.poll() is not None or key != _spare_key(cwd, env):
            _stop(proc)
            return None
        try:
            proc.stdin.write(json.dumps({"args": args, "log": str(log)}) + "\n")
            proc.stdin.close()
        except OSError:  # it died meanwhile
            _stop(proc)
            return None
        return proc

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            _stop(proc)


def _spare_key(cwd: Path, env: dict) -> tuple:
    return str(cwd), sorted(env.items())


def _stop(proc: subprocess.Popen) -> None:
    """A spare that took no trial has nothing to lose: killed at once (it may still be importing)."""
    with contextlib.suppress(OSError):
        proc.stdin.close()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_process(
    args: list[str],
    out: Path,
    *,
    cwd: Path,
    env: dict,
    beat: Callable[[], None],
    interval: float,
    running: dict,
    key: int,
    spare: Spare | None = None,
) -> int:
    """Run one trial as `python -m summarizer <args>` in `out` (its output in out/job.log), calling
    `beat` every `interval` seconds until it ends; `running[key]` holds it meanwhile (for
    `terminate`). With a `spare`, the trial takes over the spare process when it can, and a new
    spare starts for the next trial. Returns its exit code."""
    args = [*args, f"hydra.run.dir={out}"]
    proc = spare.take(cwd, env, args, out / "job.log") if spare else None
    if proc is None:
        with open(out / "job.log", "w", encoding="utf-8") as job_log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "summarizer", *args],
                cwd=cwd,
                env=env,
                stdout=job_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_sweeper,
            )
    running[key] = proc
    if spare:
        spare.start(cwd, env)  # the next trial's process imports while this one runs
    while proc.poll() is None:
        try:
            proc.wait(timeout=interval)
        except subprocess.TimeoutExpired:
            beat()
    running.pop(key, None)
    return proc.returncode


def submitit_executor(launcher: Any):
    """The submitit executor Hydra's submitit launcher would build for `launcher`'s settings (the
    same mapping as its launch()), to submit one trial at a time and keep the job's future."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    kind = compat.submitit_kind(launcher)
    params = dict(launcher.params)
    init = {"folder": params.pop("submitit_folder")}
    if "max_num_timeout" in params:
        init[f"{kind}_max_num_timeout"] = params.pop("max_num_timeout")
    executor = submitit.AutoExecutor(cluster=kind, **init)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"{kind}_{k}": v for k, v in params.items()})
    return executor


def run_job(
    submit: Callable[..., Any],
    launcher: Any,
    overrides: list[str],
    number: int,
    *,
    beat: Callable[[], None],
    interval: float,
    running: dict,
    submitted: Callable[[Any], None],
    warn: Callable[[str], None],
) -> tuple[int, Path]:
    """One submitit job running Hydra's job body (`launcher`) for trial `number`'s overrides;
    `submit` is the executor's (serialised by the caller). `submitted(job)` is told the job, `beat`
    runs every `interval` seconds while it is queued or running, `running[number]` holds it
    meanwhile. Returns (0 or 1, the job's log folder)."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobStatus

    job = submit(
        launcher, overrides, "hydra.sweep.dir", number, f"trial_{number}", Singleton.get_state()
    )
    running[number] = job
    submitted(job)
    last = time.monotonic()
    try:
        while not job.done():
            time.sleep(1.0)
            if time.monotonic() - last >= interval:
                beat()
                last = time.monotonic()
        ret = job.result()
        if ret.status == JobStatus.COMPLETED:
            return 0, job.paths.folder
        try:
            ret.return_value  # noqa: B018  (raises the job's exception)
        except Exception as e:
            warn(f"{type(e).__name__}: {first_line(e)}")
        return 1, job.paths.folder
    except Exception as e:  # the job itself died: time limit, cancelled, node failure
        warn(f"job {job.job_id} ended without a result: {e}")
        return 1, job.paths.folder
    finally:
        running.pop(number, None)


def terminate(procs: dict, jobs: dict, wait: float = 15.0) -> None:
    """Stop every trial: SIGTERM to each process group (SIGKILL after `wait` seconds), cancel each
    submitit job (scancel on SLURM, SIGINT to a local job)."""
    for proc in list(procs.values()):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for job in list(jobs.values()):
        with contextlib.suppress(Exception):
            job.cancel(check=False)
    deadline = time.time() + wait
    for proc in list(procs.values()):
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signals: main thread only


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (a scheduler's preemption, `kill`) raises KeyboardInterrupt inside the block: the
    same clean stop as Ctrl-C. The previous handler is back afterwards."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ignore_sigterm() -> None:
    """While stopping: a second SIGTERM must not cut the cleanup short."""
    if _in_main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
