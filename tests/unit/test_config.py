"""Every group option and experiment composes; typos and wrong types fail at compose time."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = [
    "model",
    "lora",
    "quant",
    "prompt",
    "augmentation",
    "data",
    "train",
    "distributed",
    "task",
    "experiment",
    "sweep",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=False)


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda x: str(x)
)
def test_every_option_composes_and_resolves(group, option):
    cfg = _compose([f"{group}={option}", "output_dir=/tmp/x"])
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["model"]["name"]
    if group not in ("experiment", "sweep"):
        assert cfg[group].get("name", option) == option or group == "lora"


def test_every_yaml_option_is_commented():
    for path in CONF.rglob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        assert "#" in text, f"{path} has no comment"


def test_solar_with_rank_32():
    cfg = _compose(["model=solar", "lora.r=32", "output_dir=/tmp/x"])
    assert cfg.lora.r == 32 and cfg.model.path == "upstage/SOLAR-10.7B-Instruct-v1.0"


def test_unknown_key_fails():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        _compose(["lora.rank=8"])


def test_wrong_type_fails():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose(["lora.r=sixteen"])


def test_unknown_option_fails():
    with pytest.raises(ConfigCompositionException, match="model"):
        _compose(["model=gpt5"])


def test_defaults_are_the_qlora_recipe():
    cfg = _compose(["output_dir=/tmp/x"])
    assert (cfg.model.name, cfg.quant.method, cfg.lora.r, cfg.lora.alpha) == (
        "gemma3_270m",
        "nf4",
        16,
        32,
    )
    assert len(cfg.lora.target_modules) == 7 and cfg.train.lr == 2e-4


def test_experiment_overrides_the_top_level_defaults():
    cfg = _compose(["experiment=cpu_demo", "output_dir=/tmp/x"])
    assert cfg.stages.predict_test is True and cfg.quant.method == "none"
    assert cfg.train.max_steps == 16 and cfg.tracking.run_name == "cpu_demo"
