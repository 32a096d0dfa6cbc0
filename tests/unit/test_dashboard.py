"""`make dashboard`: optuna-dashboard serves a sweep's study over its storage, JSON API included."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_dashboard_serves_the_study_and_its_trials(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="tiny_cpu", storage=url, direction="maximize")
    for value in (1.0, 2.0):
        t = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        study.tell(t, value)
    exe = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    assert exe, "optuna-dashboard is pinned in requirements.txt"
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--host", "127.0.0.1", "--port", str(port), url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}/api/studies"
        deadline = time.time() + 60
        while True:
            try:
                studies = _get(base)["study_summaries"]
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "dashboard did not start"
                time.sleep(0.3)
        assert [s["study_name"] for s in studies] == ["tiny_cpu"]
        detail = _get(f"{base}/{studies[0]['study_id']}")
        assert [t["values"] for t in detail["trials"]] == [[1.0], [2.0]]
        assert all(t["state"] == "Complete" for t in detail["trials"])
    finally:
        proc.terminate()
        proc.wait(timeout=10)
