"""generate.strategy=mbr: the selection (expected utility over distinct candidates, the run's
metric), the sampled static decoder (transformers' filters, a seeded draw, the greedy candidate),
summaries() on both decoding paths, and the strategy rules in preflight."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from transformers import EpsilonLogitsWarper, TemperatureLogitsWarper, TopPLogitsWarper

from summarizer import compat, mbr, metrics
from summarizer import plan as preflight
from summarizer.config import GenerateConfig, MbrConfig, TaskConfig
from summarizer.errors import UserError
from summarizer.generate import summaries
from summarizer.speed.static_decode import Sampling, filtered_probs, greedy_static, sample_static
from summarizer.speed.switches import strategy, use_static
from tests.unit.test_config import _compose
from tests.unit.test_static_decode import PAD, VOCAB, _batch, _lora_tiny, _model

TASK = TaskConfig()  # rouge, objective rouge_sum, text targets


def _selector(task=TASK, tokenizer="whitespace"):
    return mbr.selector(task, tokenizer, True)


def test_the_most_central_of_three_similar_candidates_wins_over_an_outlier():
    outlier = "stock prices fell sharply in tokyo on monday"
    similar = [
        "the cat sat on a mat",
        "the cat sat on the mat",  # shares the most with both others
        "a cat sat on the mat today",
    ]
    for candidates in ([*similar, outlier], [outlier, *similar]):
        # expected utility from score_rows, rouge_score's own path, pair by pair
        rows = {
            i: [
                metrics.score_rows(TASK, [c], [o], "whitespace")[0]["rouge_sum"]
                for j, o in enumerate(candidates)
                if j != i
            ]
            for i, c in enumerate(candidates)
        }
        central = max(rows, key=lambda i: sum(rows[i]))
        assert candidates[central] == "the cat sat on the mat"
        assert _selector()(candidates) == central


def test_repeated_candidates_are_scored_once_and_count_as_evidence():
    seen = []

    def utility(texts):
        seen.append(list(texts))
        return metrics.pairwise(TASK, texts, "rouge_sum", "whitespace")

    # "b c" is nearer to the others than "a a", but "a a" was sampled three times
    candidates = ["x y", "a a", "b c", "a a", "a a"]
    assert mbr.select(candidates, utility) == 1
    assert seen == [["x y", "a a", "b c"]]
    assert mbr.select(["same", "same"], utility) == 0 and len(seen) == 1  # nothing to compare
    # counts: a text's own copies beyond itself, and every other sample, over total - 1
    assert mbr.expected_utility([[9, 1], [1, 9]], [2, 1]) == [(9 + 1) / 2, (2 * 1) / 2]


def test_ties_go_to_the_first_candidate():
    assert mbr.select(["p", "q"], lambda texts: [[1, 0], [0, 1]]) == 0
    assert mbr.select(["q", "p", "r"], lambda texts: [[0, 2, 2], [2, 0, 2], [2, 2, 0]]) == 0


@pytest.mark.parametrize(
    ("tokenizer", "task", "texts"),
    [
        (
            "mecab",
            TASK,
            [
                "#Person1#은 내일 회의에 간다.",
                "#Person1#이 회의에 간다고 말한다.",
                "비가 온다.",
                "",
            ],
        ),
        ("default", TASK, ["The cats were running home", "a cat runs home", "home"]),
        (
            "whitespace",
            TaskConfig(target_format="numbered_list", metrics=["rouge", "subq_count"]),
            ["1. a b\n2. c d", "1. a b\n2. e\n3. c", "1. z"],
        ),
    ],
)
def test_pairwise_scores_are_score_rows_numbers(tokenizer, task, texts):
    keys = [k for name in task.metrics for k in metrics.METRICS[name]]
    for key in keys:
        matrix = metrics.pairwise(task, texts, key, tokenizer, True)
        for i, pred in enumerate(texts):
            for j, ref in enumerate(texts):
                expected = metrics.score_rows(task, [pred], [ref], tokenizer, True)[0][key]
                assert matrix[i][j] == expected, (key, pred, ref)


def test_an_objective_where_lower_is_better_is_minimised():
    task = TaskConfig(
        target_format="numbered_list", metrics=["subq_count"], objective="subq_count_mae"
    )
    two, three, five = "1. a\n2. b", "1. a\n2. b\n3. c", "1. a\n2. b\n3. c\n4. d\n5. e"
    assert _selector(task)([five, three, two, three]) == 1  # the middle count, not the farthest


def test_pairwise_rouge_equals_rouge_score_on_random_sequences():
    """Repeats, shared runs and empty texts: the counted n-grams and the bit-parallel LCS give
    rouge_score's numbers."""
    gen = random.Random(0)
    texts = [" ".join(gen.choices("abcde", k=gen.randint(0, 70))) for _ in range(12)]
    for key in ("rouge1", "rouge2", "rougeL"):
        matrix = metrics.pairwise(TASK, texts, key, "whitespace")
        for i, pred in enumerate(texts):
            refs = texts
            rows = metrics.score_rows(TASK, [pred] * len(refs), refs, "whitespace")
            assert matrix[i] == [r[key] for r in rows], key


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(1, temperature=0.7),
        Sampling(1, top_p=0.8),
        Sampling(1, epsilon=0.02),
        Sampling(1, temperature=1.3, top_p=0.9, epsilon=0.05),
        Sampling(1, epsilon=0.9),  # removes every token but the top one, which stays
    ],
)
def test_filters_are_transformers_warpers(sampling):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    scores = logits.clone()
    for warper in (
        TemperatureLogitsWarper(sampling.temperature),
        TopPLogitsWarper(sampling.top_p) if sampling.top_p < 1 else None,
        EpsilonLogitsWarper(sampling.epsilon) if sampling.epsilon > 0 else None,
    ):
        scores = warper(None, scores) if warper else scores
    assert torch.allclose(filtered_probs(logits, sampling), scores.softmax(-1), atol=1e-6)


def _sample(model, ids, mask, sampling, new=10, eos=()):
    with torch.inference_mode():
        return sample_static(model, ids, mask, new, list(eos), PAD, sampling)


def test_seeded_candidates_differ_and_repeat_exactly():
    model = _model("llama")
    ids, mask = _batch(pads=(0, 3, 7))
    sampling = Sampling(repeat=5, temperature=1.5, greedy_first=True, seed=7)
    out = _sample(model, ids, mask, sampling)
    assert out.shape == (15, 10)
    for p in range(3):
        rows = {tuple(r) for r in out[p * 5 : (p + 1) * 5].tolist()}
        assert len(rows) == 5  # five different candidates for each prompt
    assert torch.equal(out, _sample(model, ids, mask, sampling))  # the same seed: the same
    other = _sample(model, ids, mask, Sampling(5, temperature=1.5, greedy_first=True, seed=8))
    assert not torch.equal(out, other)
    # the greedy candidate is greedy_static's output for its prompt
    with torch.inference_mode():
        greedy = greedy_static(model, ids, mask, 10, [], PAD)
    assert torch.equal(out[::5], greedy) and torch.equal(other[::5], greedy)


def test_sampled_rows_stop_at_a_stop_token_and_leave_the_batch():
    model = _model("gemma3")
    ids, mask = _batch(pads=(0, 5))
    sampling = Sampling(repeat=6, temperature=2.0, seed=1)
    free = _sample(model, ids, mask, sampling, new=12)
    # stop tokens that 8 of the 12 rows write by their second token (the draws are the free
    # run's until a row leaves the batch)
    eos = sorted({int(t) for t in free[:8, 1]})
    widths, forward = [], model.forward

    def spy(*a, **k):
        widths.append(k["input_ids"].shape[0])
        return forward(*a, **k)

    model.forward = spy
    with torch.inference_mode():
        out = sample_static(model, ids, mask, 12, eos, PAD, sampling, check_every=1)
    del model.forward
    assert widths[0] == 2 and widths[1] == 12  # the prompts are prefilled once, then copied
    assert widths[-1] < 12  # finished rows left the batch
    for r, row in enumerate(out.tolist()):
        at = next((i for i, t in enumerate(row) if t in eos), None)
        if r < 8:
            assert at is not None and at <= 1 and row[: at + 1] == free[r, : at + 1].tolist()
        if at is not None:
            assert all(t == PAD for t in row[at + 1 :])


def test_draws_follow_the_distribution():
    """The exponential race: first tokens of many copies of one prompt are distributed as the
    filtered softmax of the prefill's logits."""
    model = _model("llama")
    ids, mask = _batch(pads=(4,))
    sampling = Sampling(repeat=20000, temperature=1.0, epsilon=0.01, seed=3)
    first = _sample(model, ids, mask, sampling, new=1)[:, 0]
    with torch.inference_mode():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    probs = filtered_probs(logits, sampling)[0]
    seen = torch.bincount(first, minlength=VOCAB).float() / len(first)
    assert (probs > 0.01).sum() >= 10  # a real spread to compare
    assert (seen[probs == 0] == 0).all()  # filtered tokens are never drawn
    assert 0.5 * (seen - probs).abs().sum() < 0.05  # total variation distance


def _mbr_cfg(static: str, **mbr_settings) -> GenerateConfig:
    return GenerateConfig(
        batch_size=2,
        max_new_tokens=16,
        strategy="mbr",
        static_decode=static,
        mbr=MbrConfig(candidates=3, temperature=1.5, epsilon=0.0, **mbr_settings),
    )


@pytest.mark.parametrize("static", ["true", "false"])
def test_summaries_hand_each_prompts_candidates_to_select(cache_dir, static):
    model, tok = _lora_tiny(cache_dir)
    prompts = [tok("#Person1#: 안녕하세요 " * n)["input_ids"] for n in (1, 5, 2)]
    stops = [tok.eos_token_id]
    greedy = summaries(GenerateConfig(batch_size=2, max_new_tokens=16), model, tok, prompts, stops)
    seen = []

    def first(candidates):
        seen.append(candidates)
        return 0

    picked = summaries(_mbr_cfg(static), model, tok, prompts, stops, select=first)
    assert picked == greedy  # candidate 0 is the greedy summary, on either path
    assert len(seen) == 3 and all(len(c) == 4 for c in seen)
    assert sum(len(set(c)) for c in seen) > 3  # sampling wrote other summaries too
    again = []
    summaries(_mbr_cfg(static), model, tok, prompts, stops, select=lambda c: again.append(c) or 0)
    assert again == seen  # generate.seed: the same candidates
    last = summaries(_mbr_cfg(static, include_greedy=False), model, tok, prompts, stops,
                     select=lambda c: len(c) - 1)  # fmt: skip
    assert len(last) == 3
    with pytest.raises(ValueError, match="needs a select function"):
        summaries(_mbr_cfg(static), model, tok, prompts, stops)


def test_default_strategy_is_greedy_and_unchanged(cache_dir):
    """The default (auto) and strategy=greedy write what plain `generate(do_sample=False)` writes,
    on the static path and through `generate`."""
    model, tok = _lora_tiny(cache_dir)
    prompts = [tok("#Person1#: 안녕하세요 " * n)["input_ids"] for n in (1, 4, 2)]
    texts = set()
    for strat in ("auto", "greedy"):
        for static in ("true", "false"):
            cfg = GenerateConfig(batch_size=4, max_new_tokens=12, strategy=strat,
                                 static_decode=static)  # fmt: skip
            texts.add(tuple(summaries(cfg, model, tok, prompts, [tok.eos_token_id])))
    reference = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.inference_mode():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=12, do_sample=False, eos_token_id=[tok.eos_token_id],
                                 pad_token_id=tok.pad_token_id)[0, len(p):]  # fmt: skip
        reference.append(tok.decode(new, skip_special_tokens=True).strip().split("\n")[0].strip())
    assert texts == {tuple(reference)}
    assert sum(map(bool, reference)) >= 2


@pytest.mark.parametrize(
    ("settings", "resolved"),
    [
        ({}, "greedy"),
        ({"num_beams": 4}, "beam"),
        ({"do_sample": True}, "sample"),
        ({"num_beams": 4, "do_sample": True}, "beam"),  # beam sampling, as before strategies
        ({"strategy": "beam", "num_beams": 3}, "beam"),
        ({"strategy": "SAMPLE"}, "sample"),
        ({"strategy": "mbr"}, "mbr"),
    ],
)
def test_strategy_resolution(settings, resolved):
    assert strategy(GenerateConfig(**settings)) == resolved


def test_static_decoding_serves_mbr_and_greedy_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_static(GenerateConfig(strategy="mbr"), cuda)
    assert not use_static(GenerateConfig(strategy="sample"), cuda)
    assert not use_static(GenerateConfig(strategy="mbr", repetition_penalty=1.1), cuda)
    with pytest.raises(UserError, match="greedy decoding only"):
        use_static(GenerateConfig(strategy="beam", num_beams=2, static_decode="true"), cpu)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["generate.strategy=fast"], "generate.strategy='fast': expected auto, greedy, beam"),
        (["generate.strategy=beam"], "generate.strategy=beam needs generate.num_beams >= 2"),
        (["generate.strategy=greedy", "generate.num_beams=4"],
         "generate.strategy=greedy with generate.num_beams=4"),
        (["generate.strategy=greedy", "generate.do_sample=true"],
         "generate.strategy=greedy with generate.do_sample=true"),
        (["generate.strategy=mbr", "generate.num_beams=2"],
         "generate.strategy=mbr with generate.num_beams=2"),
        (["generate.strategy=mbr", "generate.do_sample=true"],
         "generate.strategy=mbr with generate.do_sample=true"),
        (["generate.strategy=sample", "generate.temperature=0"],
         "generate.temperature=0.0 with generate.strategy=sample: expected > 0"),
        (["generate.do_sample=true", "generate.temperature=0"],
         "generate.temperature=0.0 with generate.do_sample=true: expected > 0"),
        (["generate.strategy=sample", "generate.top_p=0"], "generate.top_p=0.0 with"),
        (["generate.strategy=mbr", "generate.mbr.candidates=1"],
         "generate.mbr.candidates=1: expected >= 2"),
        (["generate.strategy=mbr", "generate.mbr.temperature=-1"],
         "generate.mbr.temperature=-1.0 with generate.strategy=mbr: expected > 0"),
        (["generate.strategy=mbr", "generate.mbr.top_p=1.5"],
         "generate.mbr.top_p=1.5 with generate.strategy=mbr: expected 0 < top_p <= 1"),
        (["generate.strategy=mbr", "generate.mbr.epsilon=1"],
         "generate.mbr.epsilon=1.0: expected 0 <= epsilon < 1"),
    ],
)  # fmt: skip
def test_bad_strategy_settings_fail_in_preflight_in_one_line(overrides, message):
    with pytest.raises(UserError) as e:
        preflight.make(_compose([*overrides, "output_dir=/tmp/x"]))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_mbr_settings_of_another_strategy_are_not_checked():
    plan = preflight.make(_compose(["generate.mbr.candidates=0", "output_dir=/tmp/x"]))
    assert plan.generate.strategy == "greedy"


def test_a_sweep_over_strategies_composes_each_choice():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        space, _ = compat.sweeper_params(
            ["generate.strategy=choice(greedy,mbr)", "generate.mbr.candidates=choice(4,8)"]
        )
    strategies = compat.new_distribution(space["generate.strategy"]).choices
    assert strategies == ("greedy", "mbr")
    for s in strategies:
        for n in compat.new_distribution(space["generate.mbr.candidates"]).choices:
            cfg = _compose(
                [f"generate.strategy={s}", f"generate.mbr.candidates={n}", "output_dir=/x"]
            )
            assert preflight.make(cfg).generate.strategy == s


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_cuda_graph_sampling_draws_what_the_eager_step_draws(name, caplog):
    """On CUDA the sampled step is captured and replayed, its exponential draws filled outside
    the graph: the same candidates as the step run eagerly, rows leaving the batch included."""
    import logging

    model = _model(name, "cuda")
    ids, mask = _batch("cuda", pads=(0, 3, 7, 1))
    sampling = Sampling(4, temperature=1.5, top_p=0.9, epsilon=0.02, greedy_first=True, seed=5)
    free = _sample(model, ids, mask, sampling, new=24)
    eos = sorted({int(t) for t in free[:10, 2]})  # most rows stop early: the batch shrinks
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        graph = sample_static(model, ids, mask, 24, eos, PAD, sampling, cuda_graph=True,
                              check_every=4)  # fmt: skip
        eager = sample_static(model, ids, mask, 24, eos, PAD, sampling, cuda_graph=False,
                              check_every=4)  # fmt: skip
        greedy = greedy_static(model, ids, mask, 24, eos, PAD, cuda_graph=True, check_every=4)
    assert "no CUDA graph" not in caplog.text
    assert torch.equal(graph, eager)
    assert torch.equal(graph[::4], greedy)
    assert len({tuple(r) for r in graph.tolist()}) > 8
