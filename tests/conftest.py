from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from summarizer.config import ModelConfig, QuantConfig, register_configs

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_KO = ROOT / "data" / "samples" / "dialogsum_ko.csv"
SAMPLE_EN = ROOT / "data" / "samples" / "dialogsum_en.jsonl"
SHARED = ROOT.parent / "shared"

register_configs()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    if os.environ.get("SUMMARIZER_REQUIRE_GPU") == "1":  # make test-gpu: skipping would pass
        pytest.exit("make test-gpu needs a CUDA GPU: torch.cuda.is_available() is False", 2)
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny(cache_dir):
    """(model, tokenizer) of the tiny preset: random weights, BPE trained on the Korean sample."""
    from summarizer.model import build_model

    cfg = ModelConfig(name="tiny", source="tiny", dtype="float32")
    cfg.tiny.train_text = str(SAMPLE_KO)
    return build_model(cfg, QuantConfig(), cache_dir)
