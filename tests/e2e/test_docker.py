"""The CPU Dockerfile builds and its image runs the tests. Needs a Docker engine: skipped where only
the client is installed (as on the CI and development machines of this project so far)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _engine() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


@pytest.mark.skipif(not _engine(), reason="no Docker engine here (the client alone cannot build)")
def test_cpu_image_builds_and_runs_unit_tests():
    tag = "summarizer-test:ci"
    build = subprocess.run(
        ["docker", "build", "-t", tag, "."], cwd=ROOT, capture_output=True, text=True, timeout=3600
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    run = subprocess.run(
        ["docker", "run", "--rm", tag, ".venv/bin/python", "-m", "pytest", "-q", "tests/unit/test_config.py"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:]
    subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=300)
