"""The speed benchmark's harness, on CPU with a tiny shape: every variant trains and is measured,
generation runs all three ways, and the JSON holds the figures RESULTS.md is made of."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_bench_harness_on_cpu(tmp_path):
    cmd = [
        sys.executable, "benchmarks/bench.py", "--shape", "tiny", "--cpu-smoke",
        "--variants", "trl_plain,ours_batch,ours", "--train-rows", "24", "--eval-rows", "8",
        "--gen-rows", "8", "--single-rows", "2", "--max-new-tokens", "4", "--batch-size", "4",
        "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "tiny-cpu.json").read_text())
    train = result["train"]
    assert set(train) == {"trl_plain", "ours_batch", "ours"}
    # each variant trained in its own process (Liger's patches must not reach the next one)
    for name in train:
        assert (tmp_path / "work" / "variants" / name / "tiny-cpu.json").is_file()
    for name, figures in train.items():
        assert "error" not in figures, (name, figures)
        assert figures["tokens_total"] > 0 and math.isfinite(figures["eval_loss"])
    # the same rows reach the model whichever way they are batched
    assert train["ours"]["tokens_total"] == train["trl_plain"]["tokens_total"]
    # the plain run's batches, packed: the same steps and (on the same init) nearly the same loss
    assert train["ours_batch"]["steps"] == train["trl_plain"]["steps"] == 6
    assert train["ours"]["steps"] < train["ours_batch"]["steps"]  # token-budget rows
    assert train["ours_batch"]["eval_loss"] == pytest.approx(
        train["trl_plain"]["eval_loss"], rel=0.01
    )
    gen = result["generate"]
    assert gen["plain_batched"]["new_tokens"] == gen["ours"]["new_tokens"] == 8 * 4
    assert 0 <= gen["ours"]["rougeL_vs_plain_batched"] <= 100
    # the static decoder (run eagerly on CPU) writes what `generate` writes on the merged weights
    assert gen["ours"]["identical_to_merged"] == 8
    assert gen["merge_seconds"] >= 0 and "| merged |" in done.stdout
    assert "| ours |" in done.stdout  # the markdown table for RESULTS.md
