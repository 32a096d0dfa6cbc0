"""DDP helpers: process counts, backends, worker environments, sweep GPU slots, and the launcher's
handling of its workers (with stand-in worker scripts: no torch.distributed, seconds)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from summarizer import distributed
from summarizer.errors import UserError


@pytest.fixture
def not_a_worker(monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)


def test_nproc_auto_counts_the_visible_gpus():
    assert distributed.resolve_nproc("auto", gpus=4) == 4
    assert distributed.resolve_nproc(2, gpus=4) == 2
    assert distributed.resolve_nproc("3", gpus=0) == 3  # CPU: gloo processes
    with pytest.raises(UserError, match="trainer.nproc=auto counts CUDA GPUs and none is visible"):
        distributed.resolve_nproc("auto", gpus=0)


def test_nproc_errors_are_one_line(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(UserError) as e:
        distributed.resolve_nproc(3, gpus=2)
    assert str(e.value) == (
        "trainer.nproc=3 but 2 GPU(s) are visible (CUDA_VISIBLE_DEVICES=0,1): DDP runs one process "
        "per GPU; use trainer.nproc=auto or at most 2"
    )
    for bad in (0, -1, "two"):
        with pytest.raises(UserError, match="expected auto or a number >= 1"):
            distributed.resolve_nproc(bad, gpus=2)


def test_backend_auto_is_nccl_on_gpu_and_gloo_on_cpu():
    assert distributed.resolve_backend("auto", cuda=True) == "nccl"
    assert distributed.resolve_backend("auto", cuda=False) == "gloo"
    assert distributed.resolve_backend("gloo", cuda=True) == "gloo"
    with pytest.raises(UserError, match="trainer.backend=nccl needs CUDA GPUs"):
        distributed.resolve_backend("nccl", cuda=False)
    with pytest.raises(UserError, match="expected auto, nccl or gloo"):
        distributed.resolve_backend("mpi", cuda=False)


def _cfg(nproc, train=True, **extra):
    return OmegaConf.create(
        {
            "trainer": {"nproc": nproc, "backend": "auto", "master_port": 0},
            "stages": {"train": train},
            "tracking": {"enabled": False, "uri": "sqlite:///unused.db"},
            **extra,
        }
    )


def test_processes_relaunches_only_from_outside_a_worker(not_a_worker, monkeypatch):
    assert distributed.processes(_cfg(1)) == 1
    assert distributed.processes(_cfg(2)) == 2  # CPU here: 2 gloo processes
    assert distributed.processes(_cfg(2, train=False)) == 1  # nothing to train: one process
    monkeypatch.setenv("WORLD_SIZE", "2")  # a worker (ours or torchrun's) never launches again
    assert distributed.processes(_cfg(2)) == 1
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


def test_worker_environment():
    env = distributed.worker_env(1, 2, 29511, {"choice.model": "tiny"}, base={"PATH": "/bin"})
    assert env["RANK"] == env["LOCAL_RANK"] == "1"
    assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29511")
    assert env["PATH"] == "/bin" and int(env["OMP_NUM_THREADS"]) >= 1
    assert env[distributed.TAGS_ENV] == '{"choice.model": "tiny"}'
    kept = distributed.worker_env(0, 2, 1, {}, base={"OMP_NUM_THREADS": "7"})
    assert kept["OMP_NUM_THREADS"] == "7"  # the user's choice wins


def test_launcher_tags_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(distributed.TAGS_ENV, '{"choice.trainer": "ddp"}')
    assert distributed.launcher_tags() == {"choice.trainer": "ddp"}
    monkeypatch.setenv(distributed.TAGS_ENV, "{not json")
    assert distributed.launcher_tags() == {}


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


def _sleeper(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_wait_stops_the_others_when_one_rank_fails():
    procs = [_sleeper("import time; time.sleep(60)"), _sleeper("import sys; sys.exit(3)")]
    start = time.monotonic()
    assert distributed.wait(procs, poll=0.05) == (1, 3)
    assert time.monotonic() - start < 15
    assert procs[0].returncode is not None  # stopped, not left blocking in a collective


def test_wait_lets_a_rank_finish_early():
    procs = [_sleeper("import time; time.sleep(1)"), _sleeper("pass")]
    assert distributed.wait(procs, poll=0.05) is None
    assert [p.returncode for p in procs] == [0, 0]


def test_failure_message_prefers_the_workers_own_error_line(tmp_path):
    log = tmp_path / "rank1.log"
    log.write_text("Traceback ...\nerror: data file not found: x.csv\n")
    assert distributed.failure_message(1, 2, log, 2) == "data file not found: x.csv"
    log.write_text("Traceback ...\nRuntimeError: boom\n")
    assert distributed.failure_message(1, 1, log, 2) == (
        f"trainer=ddp: rank 1 of 2 failed (exit code 1); see {log}"
    )
    assert "rank 0 of 4 was killed by signal 9" in distributed.failure_message(0, -9, log, 4)


# A stand-in worker: reads the config on stdin like the real one and acts on $RANK.
FAKE = """
import json, os, pathlib, sys, time
from omegaconf import OmegaConf
cfg = OmegaConf.create(sys.stdin.read())
out, rank = pathlib.Path(cfg.output_dir), os.environ["RANK"]
print(f"rank {rank} of {os.environ['WORLD_SIZE']} on port {os.environ['MASTER_PORT']}")
if cfg.mode == "ok" and rank == "0":
    (out / "result.json").write_text(json.dumps({"state": "COMPLETE", "value": 1.5}))
if cfg.mode == "crash" and rank == "1":
    sys.exit(3)
if cfg.mode == "user_error":
    print("error: data file not found: nowhere.csv", file=sys.stderr)
    sys.exit(2)
if cfg.mode == "crash":
    time.sleep(60)
"""


def _launch(tmp_path, monkeypatch, mode: str) -> float:
    monkeypatch.setattr(distributed, "worker_command", lambda: [sys.executable, "-c", FAKE])
    cfg = _cfg(2, output_dir=str(tmp_path), mode=mode)
    return distributed.launch(cfg, tmp_path, 2, {"choice.trainer": "ddp"})


def test_launch_returns_rank_0s_objective(tmp_path, monkeypatch, capfd):
    assert _launch(tmp_path, monkeypatch, "ok") == 1.5
    assert "rank 0 of 2 on port" in capfd.readouterr().out  # rank 0 reaches the console
    assert "rank 0 of 2" in (tmp_path / "ddp" / "rank0.log").read_text()
    assert "rank 1 of 2" in (tmp_path / "ddp" / "rank1.log").read_text()


def test_launch_reports_a_crashed_rank_with_its_log(tmp_path, monkeypatch):
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        _launch(tmp_path, monkeypatch, "crash")
    assert str(e.value) == (
        f"trainer=ddp: rank 1 of 2 failed (exit code 3); see {tmp_path / 'ddp' / 'rank1.log'}"
    )
    assert time.monotonic() - start < 30  # rank 0 was stopped, not waited for


def test_launch_passes_a_workers_user_error_on_as_is(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="^data file not found: nowhere.csv$"):
        _launch(tmp_path, monkeypatch, "user_error")


def test_launch_without_a_result_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="the workers left no result.json"):
        _launch(tmp_path, monkeypatch, "silent")
