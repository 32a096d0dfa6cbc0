"""Shared by the fault suite: a tiny run composed in-process, the real CLI, and the checks that every
failure is one clear line and that nothing produced earlier is lost."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tests.conftest import ROOT, SAMPLE_KO
from tests.e2e.test_run import run_cli, runs  # the CLI in a subprocess, MLflow in tmp_path

__all__ = [
    "TINY",
    "World",
    "assert_kept",
    "cli_env",
    "compose_run",
    "digest",
    "last_error",
    "popen_cli",
    "run_cli",
    "runs",
]

# A tiny run that trains two steps (a checkpoint after each) and stops: seconds, in-process.
TINY = [
    "model=tiny",
    "quant=none",
    "train=debug",
    "train.train_rows=8",
    "train.eval_rows=4",
    "train.max_steps=2",
    "train.save_steps=1",
    "train.logging_steps=1",
    "train.eval_strategy=no",
    "train.early_stopping_patience=0",
    "train.max_length=384",
    "stages.evaluate=false",
    "tracking.log_adapter=false",
    f"data.path={SAMPLE_KO}",
    f"data.test_path={ROOT / 'data' / 'samples' / 'dialogsum_ko_test.csv'}",
    f"model.tiny.train_text={SAMPLE_KO}",
]


def compose_run(overrides: list[str], out: Path, uri: str, cache_dir: str) -> DictConfig:
    """The config `python -m summarizer <overrides>` would run, without Hydra's run folder."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                *TINY,
                f"output_dir={out}",
                f"tracking.uri={uri}",
                f"cache_dir={cache_dir}",
                *overrides,  # last: a case may replace any of the above
            ],
        )


def cli_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    env.update(SUMMARIZER_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    return env


def popen_cli(
    tmp_path: Path, name: str, *overrides: str, cwd: Path = ROOT, env: dict | None = None
) -> subprocess.Popen:
    """`run_cli`'s command, started without waiting (to kill it, or to run several at once).
    A `hydra.run.dir=` or `tracking.uri=` among `overrides` replaces the default one."""
    defaults = {
        "hydra.run.dir": str(tmp_path / name),
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    given = {o.split("=", 1)[0] for o in overrides}
    cmd = [sys.executable, "-m", "summarizer", *overrides]
    cmd += [f"{k}={v}" for k, v in defaults.items() if k not in given]
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**cli_env(tmp_path), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job (how CI may run) starts with SIGINT ignored, and Python then
        # installs no Ctrl-C handler: restore it, as in a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def last_error(stderr: str) -> str:
    """The CLI's last stderr line, which must be the whole error: `error: <one line>`."""
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert last.startswith("error: "), stderr[-3000:]
    return last


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_kept(folder: Path, before: dict[str, str]) -> None:
    """Every file `digest` saw in `folder` is there with the same bytes; Hydra's log only grew
    (a later invocation adds its lines and its own `.hydra-<time>` record, nothing else)."""
    now = digest(folder)
    for name, sha in before.items():
        if name != "__main__.log":
            assert now.get(name) == sha, f"{name} was changed or removed"


@dataclass
class World:
    """A temp folder with an MLflow store and one finished run (`earlier`) that no failure may
    touch: its files keep their bytes, its MLflow run stays FINISHED, no run is deleted."""

    tmp: Path
    cache_dir: str
    earlier: Path = field(init=False)
    snapshot: dict = field(default_factory=dict)
    statuses: dict = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.tmp / 'mlflow.db'}"

    def cfg(self, name: str, *overrides: str) -> DictConfig:
        return compose_run(list(overrides), self.tmp / name, self.uri, self.cache_dir)

    def runs(self) -> list:
        mlflow.set_tracking_uri(self.uri)
        return mlflow.search_runs(experiment_names=["summarizer"], output_format="list")

    def record(self) -> None:
        self.snapshot = digest(self.earlier)
        self.statuses = {r.info.run_id: r.info.status for r in self.runs()}

    def assert_intact(self, out: Path | None = None, *, continued: str | None = None) -> None:
        """Nothing lost: the earlier run's files as they were, every MLflow run still there with its
        status (but `continued`), new runs ended (none left RUNNING), no temp file left in `out`."""
        assert digest(self.earlier) == self.snapshot
        now = {r.info.run_id: r.info.status for r in self.runs()}
        assert set(self.statuses) <= set(now), "an MLflow run disappeared"
        assert {k: now[k] for k in self.statuses if k != continued} == {
            k: v for k, v in self.statuses.items() if k != continued
        }
        assert all(v != "RUNNING" for k, v in now.items() if k not in self.statuses)
        if out is not None and out.is_dir():
            assert not [p for p in out.rglob(".*") if p.is_file()], "a temporary file was left"
