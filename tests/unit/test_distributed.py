"""DDP helpers: process counts, backends, sweep GPU slots, and the launcher's handling of its ranks
through torchrun's elastic agent (with stand-in rank scripts: no process group, seconds)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from summarizer import distributed
from summarizer.cli import launch
from summarizer.errors import UserError


@pytest.fixture
def not_a_worker(monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)


def test_nproc_auto_counts_the_visible_gpus():
    assert distributed.resolve_nproc("auto", gpus=4) == 4
    assert distributed.resolve_nproc(2, gpus=4) == 2
    assert distributed.resolve_nproc("3", gpus=0) == 3  # CPU: gloo processes
    with pytest.raises(UserError, match="distributed.nproc=auto counts CUDA GPUs and none is vis"):
        distributed.resolve_nproc("auto", gpus=0)


def test_nproc_errors_are_one_line(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(UserError) as e:
        distributed.resolve_nproc(3, gpus=2)
    assert str(e.value) == (
        "distributed.nproc=3 but 2 GPU(s) are visible (CUDA_VISIBLE_DEVICES=0,1): DDP runs one "
        "process per GPU; use distributed.nproc=auto or at most 2"
    )
    for bad in (0, -1, "two"):
        with pytest.raises(UserError, match="expected auto or a number >= 1"):
            distributed.resolve_nproc(bad, gpus=2)


def test_backend_auto_is_nccl_on_gpu_and_gloo_on_cpu():
    assert distributed.resolve_backend("auto", cuda=True) == "nccl"
    assert distributed.resolve_backend("auto", cuda=False) == "gloo"
    assert distributed.resolve_backend("gloo", cuda=True) == "gloo"
    with pytest.raises(UserError, match="distributed.backend=nccl needs CUDA GPUs"):
        distributed.resolve_backend("nccl", cuda=False)
    with pytest.raises(UserError, match="expected auto, nccl or gloo"):
        distributed.resolve_backend("mpi", cuda=False)


def _cfg(nproc, train=True, **extra):
    return OmegaConf.create(
        {
            "distributed": {"nproc": nproc, "backend": "auto", "master_port": 0},
            "stages": {"train": train},
            "tracking": {"enabled": False, "uri": "sqlite:///unused.db"},
            **extra,
        }
    )


def test_processes_launches_only_from_outside_a_rank(not_a_worker, monkeypatch):
    assert launch.processes(_cfg(1)) == 1
    assert launch.processes(_cfg(2)) == 2  # CPU here: 2 gloo processes
    assert launch.processes(_cfg(2, train=False)) == 1  # nothing to train: one process
    monkeypatch.setenv("WORLD_SIZE", "2")  # a rank (ours or a user's torchrun) never launches again
    assert launch.processes(_cfg(2)) == 1
    assert distributed.is_worker()


def test_rank_helpers_read_the_launcher_environment(not_a_worker, monkeypatch):
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (distributed.rank(), distributed.local_rank(), distributed.world_size()) == (1, 1, 2)
    assert not distributed.is_main()
    # No process group: the collectives are identities, main_first just runs the body.
    assert distributed.from_main("x") == "x" and distributed.all_sum(3.0) == 3.0
    with distributed.main_first():
        pass


def test_sweep_gpus(monkeypatch):
    assert distributed.sweep_gpus([0, 1]) == ["0", "1"]
    assert distributed.sweep_gpus([0, 0, 1]) == ["0", "0", "1"]  # two trials on GPU 0
    assert distributed.sweep_gpus([]) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")  # auto stays on the sweeper's own GPUs
    assert distributed.sweep_gpus("auto") == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match="no CUDA GPU is visible; on CPU use hydra.sweeper.n_jobs"):
        distributed.sweep_gpus("auto")
    with pytest.raises(UserError, match="expected auto or a list"):
        distributed.sweep_gpus("all")


def test_failure_message_prefers_the_ranks_own_error_line(tmp_path):
    log = tmp_path / "stderr.log"
    log.write_text("Traceback ...\nerror: data file not found: x.csv\n")
    assert launch.failure_message(1, 2, log, 2) == "data file not found: x.csv"
    log.write_text("Traceback ...\nRuntimeError: boom\n")
    assert launch.failure_message(1, 1, log, 2) == (
        f"distributed=ddp: rank 1 of 2 failed (exit code 1); see {log}"
    )
    assert "rank 0 of 4 was killed by signal 9" in launch.failure_message(0, -9, log, 4)


def test_rank_command_is_the_jobs_own_in_its_folder(tmp_path):
    cmd = launch.rank_command(["model=tiny", "distributed=ddp"], tmp_path)
    assert cmd[:3] == [sys.executable, "-m", "summarizer"]
    assert cmd[3:] == [
        "model=tiny",
        "distributed=ddp",
        f"hydra.run.dir={tmp_path}",
        "hydra.output_subdir=null",
    ]


# A stand-in rank, started by torchrun's agent like the real one: reads the job's overrides from its
# command line and acts on $RANK.
FAKE = """
import json, os, pathlib, sys, time
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
out, rank, mode = pathlib.Path(args["hydra.run.dir"]), os.environ["RANK"], args["mode"]
print(f"rank {rank} of {os.environ['WORLD_SIZE']} on port {os.environ['MASTER_PORT']}", flush=True)
if mode == "ok" and rank == "0":
    (out / "result.json").write_text(json.dumps({"state": "COMPLETE", "value": 1.5}))
if mode == "crash" and rank == "1":
    sys.exit(3)
if mode == "user_error":
    print("error: data file not found: nowhere.csv", file=sys.stderr)
    sys.exit(2)
if mode in ("crash", "interrupt"):
    try:  # the mark inside: a Ctrl-C right after it still lands in the handler below
        (out / f"started{rank}").write_text("")
        time.sleep(60)
    except KeyboardInterrupt:
        (out / f"interrupted{rank}").write_text("")
        sys.exit(1)
"""


def _launch(tmp_path, mode: str) -> float:
    cfg = _cfg(2, output_dir=str(tmp_path))
    command = [sys.executable, "-c", FAKE, f"mode={mode}", f"hydra.run.dir={tmp_path}"]
    return launch.launch(cfg, 2, command)


def _rank_logs(tmp_path, rank: int, name: str = "stdout.log") -> Path:
    (path,) = (tmp_path / "ddp").glob(f"*/attempt_0/{rank}/{name}")  # torchrun's layout
    return path


def test_launch_returns_rank_0s_objective(tmp_path, not_a_worker, capfd):
    assert _launch(tmp_path, "ok") == 1.5
    assert "[rank0]:rank 0 of 2 on port" in capfd.readouterr().out  # rank 0 reaches the console
    assert "rank 0 of 2" in _rank_logs(tmp_path, 0).read_text()
    assert "rank 1 of 2" in _rank_logs(tmp_path, 1).read_text()


def test_launch_reports_a_crashed_rank_with_its_log(tmp_path, not_a_worker):
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        _launch(tmp_path, "crash")
    log = _rank_logs(tmp_path, 1, "stderr.log")
    assert str(e.value) == f"distributed=ddp: rank 1 of 2 failed (exit code 3); see {log}"
    assert time.monotonic() - start < 30  # rank 0 was stopped, not waited for


def test_launch_passes_a_ranks_user_error_on_as_is(tmp_path, not_a_worker):
    with pytest.raises(UserError, match="^data file not found: nowhere.csv$"):
        _launch(tmp_path, "user_error")


def test_launch_without_a_result_is_an_error(tmp_path, not_a_worker):
    with pytest.raises(UserError, match="the ranks left no result.json"):
        _launch(tmp_path, "silent")


def test_launch_restores_this_processes_signal_handlers(tmp_path, not_a_worker):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    _launch(tmp_path, "ok")  # the agent installs its own while the ranks run
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


LAUNCHER = """
import sys
from omegaconf import OmegaConf
from summarizer.cli import launch
out = sys.argv[1]
cfg = OmegaConf.create({
    "distributed": {"nproc": 2, "backend": "gloo", "master_port": 0}, "stages": {"train": True},
    "tracking": {"enabled": False, "uri": "sqlite:///unused.db"}, "output_dir": out,
})
launch.launch(cfg, 2, [sys.executable, "-c", sys.argv[2], "mode=interrupt", f"hydra.run.dir={out}"])
"""


def test_ctrl_c_reaches_every_rank_and_ends_the_launcher_as_a_ctrl_c(tmp_path, not_a_worker):
    """Ctrl-C reaches the launcher only (torchrun starts each rank in its own session): the agent
    passes it on, every rank gets its KeyboardInterrupt (time to close its MLflow run), and the
    launcher ends with the KeyboardInterrupt a one-process run would."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(tmp_path), FAKE],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # SIGINT ignored in a shell's background job (how CI may run): restore it, as in a terminal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"started{r}").exists() for r in range(2)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - start < 20
    assert proc.returncode != 0 and err.rstrip().endswith("KeyboardInterrupt"), err[-2000:]
    assert (tmp_path / "interrupted0").exists() and (tmp_path / "interrupted1").exists()
