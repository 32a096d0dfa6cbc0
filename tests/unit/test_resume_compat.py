"""train.resume=true on a run folder written before a config key existed: the missing key counts at
its default, so only real changes block the resume."""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from summarizer.train.resume import _changes

CONF = Path(__file__).resolve().parents[2] / "conf"


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["output_dir=/tmp/x", *overrides])


def _saved_without(tmp_path, cfg, drop: list[tuple[str, ...]]) -> Path:
    tree = OmegaConf.to_container(cfg, resolve=True)
    for path in drop:
        node = tree
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(tree, allow_unicode=True))
    return saved


def test_keys_added_since_the_run_count_at_their_defaults(tmp_path):
    cfg = _cfg()
    saved = _saved_without(
        tmp_path, cfg, [("train", "packing"), ("distributed",), ("generate", "merge")]
    )
    assert _changes(saved, cfg) == ""


def test_a_real_change_still_blocks(tmp_path):
    saved = _saved_without(tmp_path, _cfg(), [("train", "packing")])
    assert "train.packing: False -> True" in _changes(saved, _cfg("train.packing=true"))
    assert "train.lr: 0.0002 -> 0.001" in _changes(saved, _cfg("train.lr=1e-3"))


def test_a_folder_whose_run_stopped_before_producing_anything_can_be_reused(tmp_path):
    from summarizer.errors import UserError
    from summarizer.train.resume import prepare

    cfg = _cfg()
    (tmp_path / "config.yaml").write_text("stopped: early\n")  # e.g. the data file was missing
    (tmp_path / "split.json").write_text("{}")
    assert prepare(cfg, tmp_path) is None
    (tmp_path / "mlflow_run_id").write_text("abc")  # it got going: protected
    try:
        prepare(cfg, tmp_path)
    except UserError as e:
        assert "already holds a run" in str(e)
    else:
        raise AssertionError("a folder with a run's products was not protected")
