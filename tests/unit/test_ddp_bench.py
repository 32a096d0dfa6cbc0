"""benchmarks/ddp.py's pieces that need no GPU: override merging and reading a run's figures."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("ddp_bench", ROOT / "benchmarks" / "ddp.py")
ddp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ddp)


def test_later_override_replaces_the_same_key():
    base = ["model=gemma3_270m", "quant=none", "train.max_steps=80"]
    merged = ddp.merge_overrides(base, ["model=tiny", "train.max_steps=3", "data=dialogsum_en"])
    assert merged == ["quant=none", "model=tiny", "train.max_steps=3", "data=dialogsum_en"]


def test_figures_come_from_the_run_folder(tmp_path):
    (tmp_path / "train_metrics.json").write_text(json.dumps({"train_tokens_per_second": 12.5}))
    assert ddp._metrics(tmp_path) == {"final_train_tokens_per_second": 12.5}
    with pytest.raises(SystemExit, match="train_metrics.json missing"):
        ddp._metrics(tmp_path / "nothing")
