"""A password in `tracking.uri` reaches no file of the run folder: not Hydra's record of the
command and config (.hydra/), not the run's config.yaml, not the job log."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.faults.helpers import TINY, cli_env


@pytest.mark.slow
def test_a_password_in_the_tracking_uri_reaches_no_file(tmp_path):
    secret = "s3cret-pw-7f3a"
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "summarizer", *TINY,
        "stages.train=false", "stages.predict_test=false", "tracking.enabled=false",
        f"tracking.uri=http://alice:{secret}@127.0.0.1:9/", f"hydra.run.dir={out}",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.parent.name.startswith(".hydra") for p in files)  # Hydra's record is there
    for path in files:
        assert secret not in path.read_text(encoding="utf-8", errors="replace"), path
    assert "alice:***@127.0.0.1" in (out / ".hydra" / "overrides.yaml").read_text()
    assert secret not in proc.stdout + proc.stderr
