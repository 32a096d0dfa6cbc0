"""The speed benchmark's harness, on CPU with a tiny shape: the TRL peers at their best (padding-free
and BFD rows), ours, unsloth's absence, two repeats each, every generation peer (the compiled one
without torch.compile), and the JSON holds the figures RESULTS.md is made of."""

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
    variants = ["trl_plain", "trl_best", "trl_best_bfd_nockpt", "unsloth", "ours_batch", "ours"]
    cmd = [
        sys.executable, "benchmarks/bench.py", "--shape", "tiny", "--cpu-smoke",
        "--variants", ",".join(variants), "--repeats", "2", "--steps", "6", "--eval-rows", "8",
        "--gen-rows", "8", "--single-rows", "2", "--max-new-tokens", "4", "--batch-size", "4",
        "--no-compile", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "tiny-cpu.json").read_text())
    train = result["train"]
    assert list(train) == variants
    # unsloth is not installed here: reported, not failed, and no process was started for it
    assert train.pop("unsloth") == {"error": "not installed", "not_installed": True}
    # each repeat of each variant trained in its own process (Liger's patches must not leak)
    for name in train:
        for r in (0, 1):
            assert (tmp_path / "work" / "variants" / name / f"r{r}" / "tiny-cpu.json").is_file()
    for name, figures in train.items():
        assert "error" not in figures, (name, figures)
        assert figures["repeats"] == 2 and len(figures["per_repeat"]) == 2
        for key in ("tokens_per_second", "tokens_per_second_whole_run"):
            assert figures[key + "_min"] <= figures[key] <= figures[key + "_max"]
        assert figures["tokens_total"] > 0 and math.isfinite(figures["eval_loss"])
        assert figures["mfu"] is None  # no GPU peak to divide by on CPU
    assert result["mfu"]["flops_per_token"] > 0
    # the same rows reach the model whichever way they are batched
    assert len({f["tokens_total"] for f in train.values()}) == 1
    # trl_best is TRL at its best on the plain run's batches: padding-free, fused AdamW
    best = train["trl_best"]
    assert best["optim"] == "adamw_torch_fused" and best["gradient_checkpointing"] is True
    assert train["trl_plain"]["optim"] == "adamw_torch"
    assert train["trl_best_bfd_nockpt"]["gradient_checkpointing"] is False
    # the plain run's batches, padded, padding-free or packed: the same steps and nearly the loss
    assert train["ours_batch"]["steps"] == best["steps"] == train["trl_plain"]["steps"] == 6
    for name in ("ours_batch", "trl_best"):
        assert train[name]["eval_loss"] == pytest.approx(train["trl_plain"]["eval_loss"], rel=0.01)
    # token-budget rows: TRL's BFD bins of batch x max length, as ours packs
    assert train["ours"]["steps"] == train["trl_best_bfd_nockpt"]["steps"] < 6
    gen = result["generate"]
    for peer in ("plain_batched", "merged", "merged_compiled", "ours"):
        assert gen[peer]["new_tokens"] == 8 * 4, peer
        assert len(gen[peer]["run_seconds"]) == 2 and gen[peer]["repeats_identical"]
    assert gen["merged_compiled"]["compiled"] is False
    # the static decoder (run eagerly on CPU) writes what `generate` writes on the merged weights,
    # and so does generate's own static cache
    assert gen["ours"]["identical_to_merged"] == 8
    assert gen["merged_compiled"]["identical_to_ours_share"] == 1.0
    assert 0 <= gen["plain_batched"]["rougeL_vs_ours"] <= 100
    assert gen["merge_seconds"] >= 0
    # the markdown for RESULTS.md: matched ratios first, then the tables
    out = done.stdout[done.stdout.rindex("### tiny") :]
    assert out.index("| ours | trl_best_bfd_nockpt (matched)") < out.index("| training |")
    assert "| unsloth | not installed" in out
    assert "| merged_compiled |" in out and "| ours |" in out
