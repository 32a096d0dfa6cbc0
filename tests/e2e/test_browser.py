"""Slow tier: what a user sees in a real (headless) browser. MLflow's UI over a tiny sweep's store
shows the sweep's parent and trials with the pinned ROUGE columns, and the sweep's report page
draws its plots with the network off. Chromium from Debian's package (`chromium`); skipped without
it unless SUMMARIZER_REQUIRE_BROWSER=1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from summarizer import tracking
from tests.e2e.test_sweep_cli import run_sweep

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("SUMMARIZER_REQUIRE_BROWSER") == "1":
            pytest.fail("SUMMARIZER_REQUIRE_BROWSER=1 but no chromium (apt-get install chromium)")
        pytest.skip("no chromium (apt-get install chromium)")
    return exe


def dom(chromium: str, url: str, tmp_path: Path, *flags: str) -> str:
    """The page's DOM after its scripts ran (virtual time: no waiting on timers)."""
    cmd = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=3000,2000",
        "--virtual-time-budget=15000", *flags, "--dump-dom", url,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_ui_and_report_page_in_a_browser(tmp_path, chromium):
    run_sweep(tmp_path, "hydra.sweeper.n_trials=2", "trial.pruner.name=none")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    port = _free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    ui = subprocess.Popen(
        [str(mlflow_bin), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1"]
        + ["--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{server}/health", timeout=2).close()
                break
            except OSError:
                assert time.time() < deadline and ui.poll() is None, "mlflow ui did not start"
                time.sleep(0.5)
        # The address make mlflow-ui prints: the runs table, pinned columns, the parent.
        page = dom(chromium, tracking.runs_url(uri, "summarizer", server), tmp_path)
        assert "sweep-tiny_cpu" in page
        for column in ("metrics.`rouge_sum`", "metrics.`rouge1`", "params.`lora.r`"):
            assert f'col-id="{column}"' in page, column
        # The sweep's own view (its parent's sweep.view tag): parent and both trials.
        mlflow.set_tracking_uri(uri)
        parent = mlflow.search_runs(
            experiment_names=["summarizer"],
            filter_string="tags.`sweep.role` = 'parent'",
            output_format="list",
        )[0]
        page = dom(chromium, f"{server}/{parent.data.tags['sweep.view']}", tmp_path)
        for name in ("sweep-tiny_cpu", "tiny_cpu-trial-0", "tiny_cpu-trial-1"):
            assert name in page, name
        assert 'col-id="metrics.`rouge_sum`"' in page
    finally:
        ui.terminate()
        ui.wait(timeout=20)
    # The report page with the network off (no proxy, no DNS): plotly draws from the inlined js.
    report = tmp_path / "sweep" / "report" / "report.html"
    offline = ("--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND")
    page = dom(chromium, report.as_uri(), tmp_path, *offline)
    assert page.count('class="plot-container plotly"') >= 3 and "<svg" in page
    assert "main-svg" in page
