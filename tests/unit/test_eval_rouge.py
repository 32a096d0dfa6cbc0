"""ROUGE during training (train.eval_rouge_rows), what a trial reports (trial.intermediate), the
pruners and their errors, lora.alpha_ratio, and the gemma sweep's search space."""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from summarizer import data, model, pipeline, plan, prompt
from summarizer.config import LoraConfig, PrunerConfig, TrainConfig, TrialConfig
from summarizer.errors import UserError
from summarizer.speed.switches import GeneratePlan
from summarizer.sweep.pruners import PRUNERS, build_pruner, check_pruner
from summarizer.sweep.study import search_space
from summarizer.train import callbacks
from summarizer.train.fit import fit
from tests.conftest import SAMPLE_KO

CONF = Path(__file__).resolve().parents[2] / "conf"


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=False)


@pytest.fixture
def run_parts(tiny, tmp_path):
    """A composed tiny config, its encoder, training rows and 3 ROUGE rows."""
    cfg = _compose(
        ["model=tiny", "quant=none", "train=debug", f"data.path={SAMPLE_KO}", "output_dir=/x"]
    )
    cfg.generate.max_new_tokens = 6
    cfg.train.max_length = 192  # short rows: seconds, not minutes, on a shared CPU
    _, tok = tiny
    fmt = prompt.resolve_format(cfg.prompt.format, tok)
    stop = model.stop_token_id(cfg.model, tok)
    shots = prompt.ShotSelector(cfg.prompt.fewshot, [])
    encode = pipeline.make_encoder(cfg, tok, fmt, stop, shots)
    examples = data.load(cfg.data)[:12]
    rows = [encode(ex, True) for ex in examples[:8]]
    return cfg, tok, encode, stop, rows, examples[8:11]


def _train(tiny, parts, tmp_path, extra):
    _, tok, _, _, rows, _ = parts
    lm = model.add_lora(copy.deepcopy(tiny[0]), LoraConfig(r=4, alpha=8), False, seed=1)
    train = TrainConfig(
        max_steps=2, eval_steps=1, save_steps=100, batch_size=2, grad_accum=1, logging_steps=1,
        early_stopping_patience=0, warmup_ratio=0.0,
    )  # fmt: skip
    return lm, fit(train, lm, tok, rows, rows[:2], tmp_path, extra)


def _scorer(parts, strategy: str = "greedy"):
    cfg, tok, encode, stop, _, rouge_rows = parts
    gen_plan = GeneratePlan(merged=False, static=False, strategy=strategy)
    return pipeline._rouge_scorer(
        cfg, plan.Plan("cpu", 1, None, gen_plan), tok, rouge_rows, encode, stop
    )


@pytest.mark.parametrize("setting,expected", [("greedy", "greedy"), ("run", "mbr")])
def test_rouge_during_training_decodes_greedily_unless_told_to_use_the_runs_search(
    tiny, run_parts, monkeypatch, setting, expected
):
    cfg = run_parts[0]
    cfg.train.eval_rouge_strategy = setting
    cfg.generate.strategy, cfg.generate.mbr.candidates = "mbr", 2
    seen = []
    summaries = pipeline.generate.summaries

    def spy(gen_cfg, lm, tokenizer, ids, stops, gen_plan, select):
        seen.append(gen_plan.strategy)
        return summaries(gen_cfg, lm, tokenizer, ids, stops, gen_plan, select)

    monkeypatch.setattr(pipeline.generate, "summaries", spy)
    lm = model.add_lora(copy.deepcopy(tiny[0]), LoraConfig(r=4, alpha=8), False, seed=1)
    means, per_row = _scorer(run_parts, "mbr")(lm)
    assert seen == [expected] and len(per_row) == 3 and "rouge_sum" in means


def test_rouge_at_each_evaluation_logged_by_step_and_reported_as_the_mean(
    tiny, run_parts, tmp_path, monkeypatch
):
    logged = []
    monkeypatch.setattr(
        callbacks.tracking, "log_metrics", lambda m, step=None: logged.append((step, m))
    )
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    seen = []  # the model's mode while it generated
    summaries = pipeline.generate.summaries

    def spy(cfg, lm, *args):
        out = summaries(cfg, lm, *args)
        seen.append(lm.training)
        return out

    monkeypatch.setattr(pipeline.generate, "summaries", spy)
    rouge = callbacks.EvalRouge(_scorer(run_parts), "rouge_sum", 3)
    report = callbacks.ReportToTrial(trial, rouge)
    lm, figures = _train(tiny, run_parts, tmp_path, [rouge, report])
    ours = [(step, m) for step, m in logged if "eval_rouge_seconds" in m]
    assert [step for step, _ in ours] == [1, 2]
    for _, m in ours:
        assert {"eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rouge_sum", "eval_final"} <= set(
            m
        )
        assert m["eval_rouge_seconds"] > 0
    # the trial heard the mean objective of the 3 rows at each global step
    values = study.trials[0].intermediate_values
    assert values == {1: ours[0][1]["eval_rouge_sum"], 2: ours[1][1]["eval_rouge_sum"]}
    assert seen == [False, False]  # generated in eval mode
    assert figures["eval_rouge_seconds_total"] == pytest.approx(
        sum(m["eval_rouge_seconds"] for _, m in ours)
    )
    assert report.last == (2, "eval_rouge_sum", ours[1][1]["eval_rouge_sum"])
    # called while the model trains (as a Trainer may), it hands the model back in train mode
    lm.train()
    state = type("S", (), {"global_step": 3})()
    rouge.on_evaluate(None, state, None, model=lm, metrics={"eval_loss": 1.0})
    assert seen[-1] is False and lm.training


def test_wilcoxon_mode_reports_each_row_at_evaluation_x_rows_plus_row(tiny, run_parts, tmp_path):
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    rouge = callbacks.EvalRouge(_scorer(run_parts), "rouge_sum", 3)
    report = callbacks.ReportToTrial(trial, rouge, per_row=True)
    kept = []
    # the rows' values as scored at each evaluation, in order
    original = rouge.on_evaluate

    def keep(*a, **k):
        original(*a, **k)
        kept.append(list(rouge.last[2]))

    rouge.on_evaluate = keep
    _train(tiny, run_parts, tmp_path, [rouge, report])
    assert len(kept) == 2 and all(len(v) == 3 for v in kept)
    expected = {e * 3 + i: v for e, values in enumerate(kept) for i, v in enumerate(values)}
    assert study.trials[0].intermediate_values == expected


def test_loss_mode_reports_minus_eval_loss_as_before():
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    report = callbacks.ReportToTrial(trial)
    state = type("S", (), {"global_step": 6})()
    report.on_evaluate(None, state, None, metrics={"eval_loss": 2.5})
    assert study.trials[0].intermediate_values == {6: -2.5}
    assert report.last == (6, "eval_loss", 2.5)


def test_the_wilcoxon_pruner_prunes_a_trial_worse_row_by_row():
    study = optuna.create_study(direction="maximize", pruner=build_pruner(
        PrunerConfig(name="wilcoxon", p_threshold=0.1, n_startup_steps=8)
    ))  # fmt: skip
    best = study.ask()
    for i in range(8):
        best.report(30.0 + i, step=i)
    study.tell(best, 40.0)
    bad = study.ask()
    rouge = callbacks.EvalRouge(None, "rouge_sum", 8)
    rouge.last = (10, {"rouge_sum": 5.0}, [5.0 + i for i in range(8)])
    report = callbacks.ReportToTrial(bad, rouge, per_row=True)
    state = type("S", (), {"global_step": 10})()
    with pytest.raises(optuna.TrialPruned, match="pruned at step 10 \\(eval_rouge_sum 5.0000\\)"):
        report.on_evaluate(None, state, None, metrics={"eval_loss": 1.0})
    # the mean where it stopped, for the report (Optuna's value would be the last row's 12.0)
    assert bad.user_attrs["pruned_at"] == {"step": 10, "name": "eval_rouge_sum", "value": 5.0}
    same = study.ask()  # as good as the best trial, row by row: kept
    rouge.last = (10, {"rouge_sum": 33.5}, [30.0 + i for i in range(8)])
    callbacks.ReportToTrial(same, rouge, per_row=True).on_evaluate(
        None, state, None, metrics={"eval_loss": 1.0}
    )


# --- pruners ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRUNERS))
def test_every_pruner_builds(name):
    assert isinstance(build_pruner(PrunerConfig(name=name)), optuna.pruners.BasePruner)


def test_pruner_settings_reach_optuna():
    hb = build_pruner(PrunerConfig(name="hyperband", min_resource=4, max_resource=40))
    assert (hb._min_resource, hb._max_resource, hb._reduction_factor) == (4, 40, 3)
    assert build_pruner(PrunerConfig(name="hyperband"))._max_resource == "auto"
    sh = build_pruner(
        PrunerConfig(
            name="successive_halving", min_resource=5, reduction_factor=2, min_early_stopping_rate=1
        )
    )
    assert (sh._min_resource, sh._reduction_factor, sh._min_early_stopping_rate) == (5, 2, 1)
    w = build_pruner(PrunerConfig(name="wilcoxon", p_threshold=0.05, n_startup_steps=64))
    assert (w._p_threshold, w._n_startup_steps) == (0.05, 64)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"name": "halving"}, "trial.pruner.name='halving': expected none, median, "),
        ({"name": "hyperband", "reduction_factor": 1}, "trial.pruner.reduction_factor=1"),
        ({"name": "successive_halving", "min_resource": 0}, "trial.pruner.min_resource=0"),
        ({"name": "hyperband", "min_resource": 8, "max_resource": 4}, "max_resource=4 is below"),
        ({"name": "hyperband", "max_resource": "lots"}, "trial.pruner.max_resource='lots'"),
        ({"name": "successive_halving", "min_early_stopping_rate": -1}, "min_early_stopping_rate"),
        ({"name": "wilcoxon", "p_threshold": 1.0}, "trial.pruner.p_threshold=1.0"),
        ({"name": "wilcoxon", "p_threshold": 0.0}, "trial.pruner.p_threshold=0.0"),
        ({"name": "wilcoxon", "n_startup_steps": -1}, "trial.pruner.n_startup_steps=-1"),
        ({"name": "percentile", "percentile": 120}, "trial.pruner.percentile=120"),
    ],
)
def test_bad_pruner_settings_are_one_line_errors(settings, message):
    with pytest.raises(UserError, match=message.replace("(", "\\(")) as e:
        check_pruner(PrunerConfig(**settings))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "trial,train,message",
    [
        ({"intermediate": "rouge"}, {}, "trial.intermediate=rouge .*train.eval_rouge_rows"),
        ({"intermediate": "bleu"}, {}, "trial.intermediate='bleu': expected loss or rouge"),
        ({"pruner": {"name": "wilcoxon"}}, {"eval_rouge_rows": 8}, "wilcoxon .*intermediate=rouge"),
        ({}, {"eval_rouge_rows": -1}, "train.eval_rouge_rows=-1"),
        ({}, {"eval_rouge_strategy": "beam"}, "train.eval_rouge_strategy='beam': expected greedy"),
        (
            {"pruner": {"name": "hyperband", "min_resource": 50}},
            {"max_steps": 20},
            "trial.pruner.min_resource=50 is more than the trial's 20 training steps",
        ),
    ],
)
def test_preflight_checks_what_the_trial_reports(trial, train, message):
    t = OmegaConf.merge(OmegaConf.structured(TrialConfig), trial)
    tr = OmegaConf.merge(OmegaConf.structured(TrainConfig), train)
    with pytest.raises(UserError, match=message):
        plan.check_trial(t, tr)


def test_preflight_accepts_rouge_with_rows_and_names_the_keys_in_the_run(tmp_path):
    cfg = _compose(["model=tiny", "quant=none", "trial.intermediate=rouge", "output_dir=/x"])
    with pytest.raises(UserError, match="trial.intermediate=rouge"):
        plan.make(cfg)
    cfg.train.eval_rouge_rows = 4
    cfg.trial.pruner.name = "wilcoxon"
    assert plan.make(cfg).generate is not None


# --- lora.alpha_ratio ------------------------------------------------------------------------


def test_alpha_ratio_sets_alpha_from_the_rank(tiny):
    assert model.lora_alpha(LoraConfig(r=8, alpha=32)) == 32
    assert model.lora_alpha(LoraConfig(r=8, alpha=32, alpha_ratio=4)) == 32
    assert model.lora_alpha(LoraConfig(r=16, alpha=1, alpha_ratio=0.5)) == 8
    lm = model.add_lora(copy.deepcopy(tiny[0]), LoraConfig(r=4, alpha_ratio=4.0), False)
    assert lm.peft_config["default"].lora_alpha == 16
    layer = lm.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 4.0
    with pytest.raises(UserError, match="lora.alpha_ratio=0: expected > 0"):
        plan.check_lora(LoraConfig(alpha_ratio=0))


# --- the gemma sweep -------------------------------------------------------------------------


def _gemma(extra: list[str] = ()):
    return _compose(["sweep=gemma", "output_dir=/x", *extra])


def test_gemma_sweep_searches_the_wider_space_and_every_value_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config", overrides=["sweep=gemma", "output_dir=/x"], return_hydra_config=True
        )
    params = dict(cfg.hydra.sweeper.params)
    space, fixed = search_space([f"{k}={v}" for k, v in params.items()])
    assert not fixed
    new = {
        "augmentation", "augmentation.speaker_swap.fraction", "generate.no_repeat_ngram_size", "generate.max_new_tokens", "train.epochs",
        "lora.alpha_ratio", "lora.dropout", "train.scheduler", "train.warmup_ratio",
    }  # fmt: skip
    assert new | {"lora.r", "train.lr", "prompt.fewshot.k"} <= set(space)
    assert space["augmentation"].choices == ("none", "speaker_swap")
    # each choice (the lowest and highest of a range) composes as a trial's override would
    for key, dist in space.items():
        values = getattr(dist, "choices", None) or (dist.low, dist.high)
        for value in values:
            c = _gemma([f"{key}={value}"])
            if key == "augmentation":
                assert c.augmentation.speaker_swap.enabled == (value == "speaker_swap")
            else:
                got = OmegaConf.select(c, key)  # typed: train.epochs=1 reads 1.0
                assert str(got) == str(value) or float(got) == float(value), key
    # the enqueued first trial is inside the space and composes
    (first,) = cfg.hydra.sweeper.enqueue
    assert set(first) == set(space)
    for key, value in first.items():
        d = space[key]
        assert value in d.choices if hasattr(d, "choices") else d.low <= value <= d.high, key
    c = _gemma([f"{k}={v}" for k, v in first.items()])
    assert c.lora.alpha_ratio == 2 and model.lora_alpha(c.lora) == 32
    assert (c.trial.intermediate, c.trial.pruner.name, c.train.eval_rouge_rows) == (
        "rouge", "wilcoxon", 64,
    )  # fmt: skip
    assert c.trial.pruner.n_startup_steps == 128  # two evaluations' rows
    # decoding: MBR over 16 samples (the decoding benchmark's winner); training's ROUGE greedy
    assert (c.generate.strategy, c.generate.mbr.candidates, c.generate.num_beams) == ("mbr", 16, 1)
    assert c.train.eval_rouge_strategy == "greedy"
    plan.check_trial(c.trial, c.train)
    assert plan.make(c).generate.strategy == "mbr"


def test_gemma_sweep_files_are_one():
    assert (CONF / "sweep" / "gemma.yaml").read_text() == (
        CONF.parent / "sweeps" / "gemma.yaml"
    ).read_text()


def test_static_decoding_of_the_unmerged_model_mid_training_gives_generates_tokens(
    tiny, run_parts, tmp_path
):
    """EvalRouge generates with the PeftModel as it trains (never merged) through the run's plan:
    the static decoder (a GPU's default) writes the same summaries as `generate` on it."""
    cfg, tok, encode, stop, _, rouge_rows = run_parts
    outs = {}
    for static in (False, True):
        seen, gen = outs.setdefault(static, []), GeneratePlan(merged=False, static=static)

        def write(lm, seen=seen, gen=gen):
            seen.append(pipeline.summarize(cfg, lm, tok, rouge_rows, encode, stop, gen))
            return {"rouge_sum": 0.0}, [0.0] * len(rouge_rows)

        _train(
            tiny, run_parts, tmp_path / str(static), [callbacks.EvalRouge(write, "rouge_sum", 3)]
        )
    assert outs[True] == outs[False] and len(outs[True]) == 2
