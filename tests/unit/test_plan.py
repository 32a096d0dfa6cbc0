"""The preflight plan: every value a run needs checked, every auto switch resolved once, before
any data or model loads; the stages read the frozen result."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from summarizer import plan as preflight
from summarizer.errors import UserError
from tests.unit.test_config import _compose


def _cfg(*overrides: str):
    return _compose([*overrides, "output_dir=/tmp/x"])


def test_default_run_on_cpu():
    plan = preflight.make(_cfg())
    assert plan.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert plan.world_size == 1
    if plan.device == "cpu":
        assert plan.train == preflight.TrainPlan("fp32", "adamw_torch", False, False, False, False)
        assert plan.generate == preflight.GeneratePlan(merged=False, static=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.train.liger = True


def test_no_training_no_train_plan():
    assert preflight.make(_cfg("stages.train=false")).train is None


def test_explicit_switches_are_read_once_into_the_plan():
    plan = preflight.make(
        _cfg("generate.static_decode=true", "generate.merge=true", "train.fused_lm_head=true")
    )
    assert plan.generate.static and plan.generate.merged and plan.train.fused_lm_head


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("generate.max_new_tokens=0", "generate.max_new_tokens=0"),
        ("generate.batch_size=0", "generate.batch_size=0"),
        ("generate.num_beams=0", "generate.num_beams=0"),
        ("metric.tokenizer=bogus", "metric.tokenizer='bogus'"),
        ("train.liger=maybe", "train.liger='maybe'"),
        ("generate.static_decode=fast", "generate.static_decode='fast'"),
        ("train.lr=0", "train.lr=0"),
        ("train.pack_multiple=0", "train.pack_multiple=0"),
        ("train.precision=fp8", "train.precision='fp8'"),
        ("stages.predict_test=true", "data.test_path"),
    ],
)
def test_a_bad_value_fails_in_preflight_naming_its_key(override, key):
    extra = ["data.test_path=null"] if override.startswith("stages.predict_test") else []
    with pytest.raises(UserError) as e:
        preflight.make(_cfg(override, *extra))
    assert key in str(e.value) and "\n" not in str(e.value)


def test_sampling_needs_a_positive_temperature():
    with pytest.raises(UserError, match="generate.temperature=0.0 with generate.do_sample=true"):
        preflight.make(_cfg("generate.do_sample=true", "generate.temperature=0"))


def test_the_process_count_reaches_the_graph_switch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what the graph needs but this
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a DDP rank
    with pytest.raises(UserError, match="needs one process"):
        preflight.make(_cfg("train.cuda_graph=true", "train.packing=true"))
    plan = preflight.make(_cfg("train.cuda_graph=auto", "train.packing=true"))
    assert plan.world_size == 2 and not plan.train.cuda_graph and plan.train.precision == "bf16"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert preflight.make(_cfg("train.cuda_graph=auto", "train.packing=true")).train.cuda_graph


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.eval_steps=0", "train.eval_steps=0: expected a step count >= 1"),
        ("train.scheduler=bogus", "train.scheduler='bogus': expected one of linear, cosine"),
        ("train.max_steps=0", "train.max_steps=0: expected -1 (train.epochs) or >= 1"),
        ("data.val_size=1.5", "data.val_size=1.5: expected a fraction below 1"),
        ("lora.r=-4", "lora.r=-4 must be a positive integer"),
        ("lora.dropout=1.0", "lora.dropout=1.0: expected 0 <= dropout < 1"),
    ],
)
def test_values_that_were_reinterpreted_or_failed_late(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preflight.make(_cfg(override))


def test_a_language_without_prompt_texts_names_the_overrides_that_add_them():
    with pytest.raises(UserError) as e:
        preflight.make(_cfg("data.language=fr"))
    message = str(e.value)
    assert message.startswith("data.language='fr': the prompt has texts for en, ko only")
    fix = message.split("add them with ")[1].replace("'...'", "x").split()
    plan = preflight.make(_cfg("data.language=fr", *fix))  # the suggested fix composes and passes
    assert plan.train is not None


@pytest.mark.parametrize("group", ["experiment", "task", "data", "train", "prompt", "model"])
def test_every_shipped_option_passes_preflight(group):
    from tests.unit.test_config import CONF

    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        cfg = _cfg(f"{group}={option}")
        if cfg.model.requires_gpu and not torch.cuda.is_available():
            with pytest.raises(UserError, match=f"model={cfg.model.name} needs a CUDA GPU"):
                preflight.make(cfg)
        else:
            preflight.make(cfg)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ([], "got stages.evaluate=true, train.eval_strategy=steps"),
        (["stages.evaluate=false"], "got train.eval_strategy=steps"),
        (["train.eval_strategy=no"], "got stages.evaluate=true"),
    ],
)
def test_val_size_zero_needs_no_evaluation(overrides, named):
    with pytest.raises(UserError) as e:
        preflight.make(_cfg("data.val_size=0", *overrides))
    message = str(e.value)
    assert message.startswith("data.val_size=0 (no validation split") and "\n" not in message
    assert message.endswith(named)


def test_val_size_zero_without_evaluation_passes():
    cfg = _cfg("data.val_size=0", "stages.evaluate=false", "train.eval_strategy=no")
    assert preflight.make(cfg).train is not None
