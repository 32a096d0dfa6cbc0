"""Contract tests of summarizer/compat.py: each private API it wraps still behaves as the wrapper
assumes in the installed libraries. A failure here means an upgrade moved one of them."""

from __future__ import annotations

import inspect

import optuna
import pytest
import torch

from summarizer import compat
from summarizer.errors import UserError


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def test_installed_versions_are_the_tested_ones():
    assert compat.untested() == []
    compat.check_versions()


@pytest.mark.parametrize(
    ("version", "ok"),
    [("5.23.0", True), ("5.23.9", True), ("5.24.0", False), ("5.22.1", False), ("5.23.0rc1", True)],
)
def test_version_ranges(version, ok):
    assert (compat.untested({"transformers": version}) == []) is ok


def test_an_untested_version_is_one_line_naming_it_unless_allowed(monkeypatch, caplog):
    with pytest.raises(UserError) as e:
        compat.check_versions({"trl": "2.0.1", "torch": "2.13.0+cpu"})
    message = str(e.value)
    assert "\n" not in message and "trl 2.0.1 (tested: >=1.16,<1.17)" in message
    assert "torch" not in message and compat.ALLOW_ENV in message
    monkeypatch.setenv(compat.ALLOW_ENV, "1")
    compat.check_versions({"trl": "2.0.1"})  # a warning only
    assert "trl 2.0.1" in caplog.text


def test_pyproject_lower_bounds_are_the_tested_versions():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = dict(d.split(">=") for d in deps if ">=" in d)
    for name, (low, _) in compat.TESTED.items():
        if name in bounds:
            assert compat._key(bounds[name].split(",")[0]) >= compat._key(low), name


def test_trainer_loss_sum_is_the_sum_of_the_step_losses(tmp_path):
    """HF's running loss (logged part + part since the last log) at every step end equals the sum
    of the losses the steps returned: what a checkpoint saves for an exact resume."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = _tiny_llama()
    rows = [{"input_ids": torch.randint(0, 64, (12,)).tolist()} for _ in range(6)]
    for r in rows:
        r["labels"] = r["input_ids"]
    step_losses, sums = [], []

    class Spy(Trainer):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            step_losses.append(float(loss))
            return loss

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sums.append(compat.trainer_loss_sum(trainer))

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=3,
        logging_steps=2,  # step 2 drains into the logged sum, step 3 stays pending
        report_to="none",
        use_cpu=True,
        save_strategy="no",
    )
    trainer = Spy(model=model, args=args, train_dataset=rows, callbacks=[Record()])
    result = trainer.train()
    expected = [sum(step_losses[: i + 1]) for i in range(3)]
    assert sums == pytest.approx(expected, rel=1e-5)
    assert result.training_loss * 3 == pytest.approx(expected[-1], rel=1e-5)


def test_trainer_still_has_the_hooks_we_override():
    from trl import SFTTrainer

    for name, params in compat.TRAINER_HOOKS.items():
        method = getattr(SFTTrainer, name)
        names = list(inspect.signature(method).parameters)[1:]
        assert names[: len(params)] == list(params), (name, names)


@pytest.mark.parametrize("name", ["GRPOTrainer", "RLOOTrainer"])
def test_rl_trainer_hooks_keep_their_signatures(name):
    """The RL stage's overrides: TRL tokenizes prompts and generates through these two methods."""
    import trl

    trainer = getattr(trl, name)
    for hook, params in compat.RL_TRAINER_HOOKS.items():
        names = list(inspect.signature(getattr(trainer, hook)).parameters)[1:]
        assert names[: len(params)] == list(params), (name, hook, names)
    source = inspect.getsource(trainer._generate)
    assert "self._tokenize_prompts(prompts)" in source and "self._generate_single_turn(" in source


def test_use_one_gpu_sets_what_n_gpu_reads(tmp_path):
    from trl import SFTConfig

    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    compat.use_one_gpu(args)
    assert args.n_gpu == 1


def test_attention_implementation():
    assert compat.attention_implementation(_tiny_llama()) == "sdpa"


def test_uncompile_undoes_module_compile():
    layer = torch.nn.Linear(2, 2)
    layer.compile()
    assert layer._compiled_call_impl is not None  # what compile() sets
    compat.uncompile(layer)
    assert layer._compiled_call_impl is None
    assert layer(torch.ones(1, 2)).shape == (1, 2)


def test_zero_zeroes_every_tensor():
    ts = [torch.ones(3), torch.ones(2, 2, dtype=torch.bfloat16)]
    compat.zero_(ts)
    assert all(t.abs().sum() == 0 for t in ts)


def test_unpack_cpu_4bit_restores_the_layout_for_dequantizing():
    """Packed for bitsandbytes' CPU kernel (what its Linear4bit does at a CPU forward where the CPU
    has AVX512-BF16), then unpacked: the same weights come out of dequantize_4bit."""
    import copy

    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import (
        _convert_weight_packed_for_cpu,
        dequantize_4bit,
        quantize_4bit,
    )

    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    data, state = quantize_4bit(weight, quant_type="nf4")
    plain = dequantize_4bit(data, state)
    packed, packed_state = _convert_weight_packed_for_cpu(data.clone(), copy.deepcopy(state))
    assert packed_state.packing_format_for_cpu and packed.shape != data.shape
    back, back_state = compat.unpack_cpu_4bit(packed, packed_state)
    assert back.shape == data.shape and not back_state.packing_format_for_cpu
    # the packing stores the block scales in bf16: equal to that rounding
    assert torch.allclose(dequantize_4bit(back, back_state), plain, atol=0.02)


def test_optuna_ids_storage_and_fixed_suggest(tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="s", storage=url)
    study.enqueue_trial({"x": 3})
    trial = study.ask()
    store = compat.storage(study)
    assert isinstance(store, optuna.storages.BaseStorage)
    tid = compat.trial_id(trial)
    sid = compat.study_id(study)
    assert store.get_trial_id_from_study_id_trial_number(sid, trial.number) == tid
    assert sid == store.get_study_id_from_name("s")
    dist = optuna.distributions.IntDistribution(0, 10)
    assert compat.suggest(trial, "x", dist) == 3  # the enqueued value wins
    assert compat.suggest(trial, "y", dist) in range(11)
    store.record_heartbeat(tid)  # RDB storage supports heartbeats
    frozen = study.get_trials(deepcopy=False)[0]
    assert compat.trial_id(frozen) == tid


def test_sweeper_params_parses_overrides_into_current_distributions():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        space, fixed = compat.sweeper_params(
            ["lora.r=choice(8,16)", "train.lr=tag(log, interval(1e-5, 1e-3))", "data.name=ko"]
        )
    assert fixed == {"data.name": "ko"}
    lr = compat.new_distribution(space["train.lr"])
    assert isinstance(lr, optuna.distributions.FloatDistribution) and lr.log
    r = compat.new_distribution(space["lora.r"])
    assert isinstance(r, optuna.distributions.CategoricalDistribution) and r.choices == (8, 16)


def test_the_cli_stops_with_one_line_on_an_untested_version(monkeypatch, capsys):
    import os
    import sys

    import summarizer.__main__ as entry

    monkeypatch.setattr(os, "environ", os.environ.copy())  # cli() sets HYDRA_FULL_ERROR
    monkeypatch.setattr(
        compat, "untested", lambda installed=None: ["trl 9.0 (tested: >=1.16,<1.17)"]
    )
    monkeypatch.setattr(sys, "argv", ["summarizer", "lora.r=8"])
    with pytest.raises(SystemExit) as e:
        entry.cli()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: untested library version: trl 9.0")
    assert err.count("\n") == 1


def test_submitit_kind_names_the_launchers_executor():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")  # a GPU image may lack it
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
        LocalLauncher,
        SlurmLauncher,
    )

    assert compat.submitit_kind(LocalLauncher) == "local"
    assert compat.submitit_kind(SlurmLauncher) == "slurm"
