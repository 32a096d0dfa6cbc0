"""stages.rl: the ROUGE reward, completions cut where generation stops, preflight's one-line errors,
a reward that rises under GRPO and RLOO, and an RL stage cut off and resumed (the slow tier)."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import TrainerCallback

from summarizer import pipeline
from summarizer import plan as preflight
from summarizer.config import LoraConfig, RLConfig, TaskConfig
from summarizer.errors import UserError
from summarizer.model import add_lora
from summarizer.speed.static_decode import _token_kinds
from summarizer.speed.switches import precision
from summarizer.train import rl
from summarizer.train.checkpoints import checkpoint_problem
from tests.conftest import ROOT
from tests.faults.helpers import compose_run
from tests.unit.test_config import _compose

STOPS = rl.Stops((2,), at_newline=True, at_blank_line=False)


def _cfg(*overrides: str):
    return _compose(["stages.rl=true", *overrides, "output_dir=/tmp/x"])


def test_rl_is_off_by_default_and_grpo_is_the_default_group():
    cfg = _compose(["output_dir=/tmp/x"])
    assert cfg.stages.rl is False and cfg.rl.algorithm == "grpo"
    assert preflight.make(cfg).rl is None
    assert _compose(["rl=rloo", "output_dir=/tmp/x"]).rl.algorithm == "rloo"
    cfg = _cfg()
    assert preflight.make(cfg).rl == preflight.RLPlan(precision(cfg.train), "adamw_torch")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rl.algorithm=ppo"], "rl.algorithm='ppo': expected grpo or rloo"),
        (["rl.num_generations=1"], "rl.num_generations=1: expected >= 2"),
        (
            ["rl.batch_size=6", "rl.grad_accum=1", "rl.num_generations=4"],
            "rl.batch_size=6 x 1 process(es) x rl.grad_accum=1 = 6 completions per generation "
            "round must be divisible by rl.num_generations=4",
        ),
        (
            ["stages.train=false"],
            "stages.rl=true with stages.train=false needs adapter=<a trained adapter folder>",
        ),
        (["rl.reward.score=bleu"], "rl.reward.score='bleu' is not a score of task.metrics"),
        (["rl.temperature=0"], "rl.temperature=0.0: expected > 0"),
        (["rl.max_steps=0"], "rl.max_steps=0: expected -1 (rl.epochs) or >= 1"),
        (["rl.reward.length_weight=-1"], "rl.reward.length_weight=-1.0"),
        (
            [f"data.path={ROOT / 'data' / 'samples' / 'dialogsum_ko_test.csv'}"],
            "(data.summary_column): the ROUGE reward needs each training row's reference",
        ),
    ],
)
def test_preflight_errors(overrides, message):
    with pytest.raises(UserError) as err:
        preflight.make(_cfg(*overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_divisible_batches_and_several_processes():
    assert preflight.make(_cfg("rl.batch_size=3", "rl.grad_accum=2", "rl.num_generations=6")).rl
    with pytest.raises(UserError, match="stages.rl=true runs in one process"):
        preflight.make(_cfg(), world_size=2)


def test_reward_is_the_rows_rouge_of_the_cut_completion():
    task = TaskConfig()
    reward = rl.rouge_reward(task, RLConfig(), "whitespace", True, STOPS)
    logged = {}
    refs = ["the cat sat on the mat", "a dog ran home"]
    out = reward(
        prompts=["p", "q"],
        completions=["the cat sat on the mat\nand more text", "nothing alike"],
        summary=refs,
        log_metric=logged.__setitem__,
    )
    assert out[0] == pytest.approx(300.0)  # the part after the newline is not the summary
    assert out[1] == 0.0
    assert logged["rl_score"] == pytest.approx(150.0)
    cfg = OmegaConf.structured(RLConfig)
    cfg.reward.score, cfg.reward.rouge_weight = "rouge1", 0.5
    cfg.reward.length_weight, cfg.reward.length_target = 10.0, 1.0
    reward = rl.rouge_reward(task, cfg, "whitespace", True, STOPS)
    short, exact = reward(
        prompts=["p", "p"], completions=["the cat", "the cat sat on the mat"], summary=refs[:1] * 2
    )
    # rouge1 F1 of "the cat": P 1, R 1/3 -> 50; length 2/6 of the reference: -10 x 2/3
    assert short == pytest.approx(0.5 * 50 - 10 * (1 - 2 / 6))
    assert exact == pytest.approx(0.5 * 100)


def test_completions_are_cut_where_generation_stops(tiny):
    _, tok = tiny
    kinds = _token_kinds(tok)
    ids = tok.encode("\n요약 문장입니다\n다음 줄", add_special_tokens=False)
    n = rl.cut_completion(ids, kinds, STOPS, tok)
    assert tok.decode(ids[:n]).strip() == "요약 문장입니다"  # a leading newline does not stop it
    assert tok.decode(ids[:n]).rstrip(" ").endswith("\n")  # the stopping token is kept, as generate
    lists = rl.Stops((2,), at_newline=False, at_blank_line=True)
    ids = tok.encode("1. 하나\n2. 둘\n\n질문", add_special_tokens=False)
    n = rl.cut_completion(ids, kinds, lists, tok)
    assert "질문" not in tok.decode(ids[:n]) and "2. 둘" in tok.decode(ids[:n])
    assert rl.cut_completion(ids[:3], kinds, lists, tok) == 3


class _Rewards(TrainerCallback):
    def __init__(self):
        self.rewards = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            self.rewards.append(logs["reward"])


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_an_easy_reward_rises(tiny, tmp_path, algorithm):
    """Reward: the share of completion tokens among the quarter of the vocabulary whose output
    embeddings point most along one direction (1/4 at first). The tiny model's output embeddings
    are scaled up x3 in a copy (at their random init its logits are nearly flat and no adapter can
    move them: entropy ln(1024)); a supervised push of that share tops out near 0.43, so RL is
    asked for a clear rise, not for that ceiling."""
    import copy

    base, tok = tiny
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)  # tied: the input embeddings too
    lm = add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0), False, seed=0)
    head = model.get_output_embeddings().weight.detach()
    direction = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0))
    liked = set((head @ direction).topk(head.shape[0] // 4).indices.tolist())

    def share(prompts, completions, completion_ids, **_):
        return [sum(t in liked for t in ids) / max(1, len(ids)) for ids in completion_ids]

    cfg = OmegaConf.structured(RLConfig)
    cfg.algorithm, cfg.lr, cfg.max_steps, cfg.max_new_tokens = algorithm, 2e-2, 24, 6
    cfg.batch_size, cfg.num_generations, cfg.save_steps, cfg.logging_steps = 32, 8, 100, 1
    texts = ("가나다", "대화 요약", "라마", "회의", "#Person1#: 안녕", "날씨", "주문", "여행")
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    seen = _Rewards()
    no_stop = rl.Stops((tok.eos_token_id,), at_newline=False, at_blank_line=False)
    figures = rl.fit(cfg, lm, tok, prompts, ["x"] * 8, share, no_stop, tmp_path, callbacks=[seen])
    assert figures["rl_steps"] == 24 and len(seen.rewards) == 24
    # each step's mean share has a sampling error of ~0.03 (192 tokens): 6-step means, 0.04 apart
    first, last = sum(seen.rewards[:6]) / 6, sum(seen.rewards[-6:]) / 6
    assert last > first + 0.04, seen.rewards


class _StopAfterSave(TrainerCallback):
    """Kills the RL stage right after its checkpoint at `step` is saved."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


RL_RUN = [
    "stages.rl=true",
    "rl.max_steps=4",
    "rl.save_steps=2",
    "rl.batch_size=4",
    "rl.num_generations=2",
    "rl.max_new_tokens=6",
    "generate.max_new_tokens=6",
    "stages.evaluate=true",
    "train.eval_rows=2",
]


@pytest.mark.slow
def test_a_cut_rl_stage_resumes_from_its_checkpoint_without_redoing_sft(
    tmp_path, cache_dir, monkeypatch
):
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    real_fit = rl.fit

    def cut_fit(*args, callbacks=None, **kwargs):
        return real_fit(*args, callbacks=[*callbacks, _StopAfterSave(2)], **kwargs)

    monkeypatch.setattr(rl, "fit", cut_fit)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(compose_run(RL_RUN, out, uri, cache_dir))
    assert (out / "adapter_sft" / "adapter_config.json").is_file()
    assert not (out / "adapter").exists() and not (out / "result.json").exists()
    assert checkpoint_problem(out / "rl_checkpoints" / "checkpoint-2") is None
    sft_adapter = (out / "adapter_sft" / "adapter_model.safetensors").read_bytes()

    monkeypatch.undo()
    calls = []

    def no_sft(*args, **kwargs):
        raise AssertionError("SFT ran again")

    real_reward = rl.rouge_reward

    def counted(*args, **kwargs):
        reward = real_reward(*args, **kwargs)

        def rouge(*a, **k):
            calls.append(1)
            return reward(*a, **k)

        return rouge

    monkeypatch.setattr(pipeline, "fit", no_sft)
    monkeypatch.setattr(rl, "rouge_reward", counted)
    pipeline.run(compose_run([*RL_RUN, "train.resume=true"], out, uri, cache_dir))
    assert len(calls) == 2  # steps 3 and 4 only: one generation round each
    figures = json.loads((out / "rl_metrics.json").read_text())
    assert figures["rl_steps"] == 4
    state = json.loads((out / "rl_checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "reward" in e] == [1, 2, 3, 4]
    assert (out / "adapter_sft" / "adapter_model.safetensors").read_bytes() == sft_adapter
    assert (out / "adapter" / "adapter_config.json").is_file()
    result = json.loads((out / "result.json").read_text())
    assert result["state"] == "COMPLETE" and result["adapter"] == str((out / "adapter").resolve())
    assert not list(out.glob("*.partial"))
    import mlflow

    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["summarizer"], output_format="list")
    assert run.info.status == "FINISHED" and run.data.tags["rl_resumed_from"] == "checkpoint-2"
    assert "final_rl_steps" in run.data.metrics and "rl_reward" in run.data.metrics
