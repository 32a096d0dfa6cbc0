"""The `task` group: list parsing and count accuracy, list targets in JSON/JSONL, the metrics a task
names, the blank-line stop, and what each task option composes to."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from summarizer.config import DataConfig, GenerateConfig, PromptConfig, TaskConfig
from summarizer.data import load, split
from summarizer.errors import UserError
from summarizer.generate import BlankLineAfterText, clean, summaries
from summarizer.lists import count_items, numbered, split_items
from summarizer.metrics import check_task, rouge, score, subq_count
from summarizer.prompt import build, completion_text
from tests.conftest import ROOT

CONF = ROOT / "conf"
QD_KO = ROOT / "data" / "samples" / "question_decomposition_ko.json"
QD_EN = ROOT / "data" / "samples" / "question_decomposition_en.jsonl"
QD = TaskConfig(
    name="question_decomposition",
    input_field="question",
    target_field="sub_questions",
    target_format="numbered_list",
    metrics=["rouge", "subq_count"],
)


def qd_data(path, **kw) -> DataConfig:
    return DataConfig(
        name="qd",
        path=str(path),
        id_column="id",
        dialogue_column="question",
        summary_column="sub_questions",
        topic_column=None,
        **kw,
    )


# --- list items and counts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,items",
    [
        ("1. 서울의 인구는?\n2. 부산의 인구는?", ["서울의 인구는?", "부산의 인구는?"]),
        ("1) a\n2) b\n3) c", ["a", "b", "c"]),
        ("(1) a\n(2) b", ["a", "b"]),
        ("1.서울은?\n2.부산은?", ["서울은?", "부산은?"]),  # no space after the number
        ("1번. 가는?\n2번. 나는?", ["가는?", "나는?"]),
        ("① 가는?\n② 나는?\n③ 다는?", ["가는?", "나는?", "다는?"]),
        ("- a?\n* b?\n• c?", ["a?", "b?", "c?"]),
        ("Q1: x?\nQ2: y?", ["x?", "y?"]),
        ("하위 질문:\n1. a?\n2. b?", ["a?", "b?"]),  # an echoed label is not an item
        (
            "1. 첫 질문이 길어서\n다음 줄로 이어진다?\n2. 둘째?",
            ["첫 질문이 길어서 다음 줄로 이어진다?", "둘째?"],
        ),
        ("1. 서울은? 2. 부산은? 3. 대구는?", ["서울은?", "부산은?", "대구는?"]),  # run together
        ("a?\n\nb?", ["a?", "b?"]),  # no markers: one item per line
        ("1.5배 늘어난 이유는?", ["1.5배 늘어난 이유는?"]),  # a decimal, not item 1
        ("-5도 이하일 때는?", ["-5도 이하일 때는?"]),  # a sign, not a bullet
        ("2024. 3. 1. 무슨 일이 있었나?", ["2024. 3. 1. 무슨 일이 있었나?"]),  # a date
        ("", []),
        ("  \n ", []),
    ],
)
def test_split_items(text, items):
    assert split_items(text) == items
    assert count_items(text) == len(items)


def test_numbered_replaces_an_item_own_marker():
    assert numbered(["1. a?", "b?", "- c?"]) == "1. a?\n2. b?\n3. c?"
    assert split_items(numbered(["서울은?", "부산은?"])) == ["서울은?", "부산은?"]


def test_count_accuracy_and_mean_absolute_error():
    preds = ["1. a\n2. b", "1. a", "- a\n- b\n- c\n- d", ""]
    refs = ["1. x\n2. y", "1. x\n2. y", "1. x\n2. y", "1. x\n2. y\n3. z"]
    # counts 2/2 (match), 1/2, 4/2, 0/3 -> 1 of 4 match; |diffs| 0, 1, 2, 3
    assert subq_count(preds, refs) == {"subq_count_acc": 0.25, "subq_count_mae": 1.5}
    with pytest.raises(ValueError):
        subq_count(["a"], [])


def test_list_rouge_reads_the_items_not_their_numbers():
    ref = "1. 서울의 인구는?\n2. 부산의 인구는?"
    other_style = "1) 서울의 인구는?\n2) 부산의 인구는?"
    s = score(QD, [other_style], [ref], "mecab")
    assert s["rouge1"] == s["rougeL"] == pytest.approx(100)
    assert s["subq_count_acc"] == 1 and s["subq_count_mae"] == 0
    # Unrelated items share only the markers: scored as text, "1 . 2 ." would earn points.
    wrong = "1. 날씨는 어떤가?\n2. 몇 시인가?"
    assert score(QD, [wrong], [ref], "mecab")["rouge1"] < rouge([wrong], [ref], "mecab")["rouge1"]


def test_the_summary_task_scores_exactly_like_rouge():
    preds, refs = ["#Person1#이 간다.", "a"], ["#Person1#이 온다.", "a"]
    assert score(TaskConfig(), preds, refs, "mecab") == rouge(preds, refs, "mecab")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"metrics": ["rouge", "bleu"]}, "task.metrics=['rouge', 'bleu']: expected one or more of"),
        ({"metrics": []}, "task.metrics=[]"),
        ({"objective": "subq_count_acc"}, "task.objective='subq_count_acc' is not a score of"),
        ({"target_format": "json"}, "task.target_format='json': expected text or numbered_list"),
    ],
)
def test_task_mistakes_are_one_line(change, message):
    with pytest.raises(UserError, match=re.escape(message)) as err:
        check_task(TaskConfig(**change))
    assert "\n" not in str(err.value)
    check_task(QD)
    check_task(TaskConfig(metrics=["rouge", "subq_count"], objective="subq_count_acc"))


# --- data: JSON and JSONL with list targets -------------------------------------------------------


def test_the_samples_load_with_their_lists_numbered():
    ko, en = load(qd_data(QD_KO)), load(qd_data(QD_EN))
    assert len(ko) == 40 and len(en) == 24 and len(ko) + len(en) >= 30
    for ex in ko + en:
        assert 2 <= count_items(ex.summary) <= 4, ex.id
        assert ex.summary.startswith("1. ") and ex.dialogue.endswith("?")
    # The files keep some sub-question lists as JSON lists: loaded, they read like the others.
    raw = json.loads(QD_KO.read_text(encoding="utf-8"))
    as_list = next(r for r in raw if isinstance(r["sub_questions"], list))
    loaded = next(ex for ex in ko if ex.id == as_list["id"])
    assert loaded.summary == "\n".join(
        f"{n}. {q}" for n, q in enumerate(as_list["sub_questions"], 1)
    )
    assert re.search("[가-힣]", ko[0].dialogue) and not re.search("[가-힣]", en[0].dialogue)
    train, val = split(ko, 0.25, 42)
    assert (len(train), len(val)) == (30, 10)


def _write(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    else:
        path.write_text(json.dumps(rows, ensure_ascii=False), "utf-8")
    return path


GOOD = {
    "id": "a",
    "question": "서울과 부산 중 어디가 더 큰가?",
    "sub_questions": ["서울은?", "부산은?"],
}


@pytest.mark.parametrize("name", ["d.json", "d.jsonl"])
@pytest.mark.parametrize(
    "row,message",
    [
        ({"id": "b", "sub_questions": "1. x?"}, "row 2 (id 'b'): missing 'question'"),
        ({"id": "b", "question": "q?"}, "row 2 (id 'b'): missing 'sub_questions'"),
        (
            {"id": "b", "question": "  ", "sub_questions": "1. x?"},
            "row 2 (id 'b'): empty 'question'",
        ),
        (
            {"id": "b", "question": "q?", "sub_questions": []},
            "row 2 (id 'b'): empty 'sub_questions'",
        ),
        (
            {"id": "b", "question": "q?", "sub_questions": ["x?", 3]},
            "row 2 (id 'b'): 'sub_questions' item 2 is not text (int)",
        ),
        (
            {"id": "b", "question": "q?", "sub_questions": ["x?", " "]},
            "row 2 (id 'b'): 'sub_questions' item 2 is empty",
        ),
        (
            {"id": "b", "question": ["q?"], "sub_questions": "1. x?"},
            "row 2 (id 'b'): 'question' is a list; expected text",
        ),
        ({"id": "", "question": "q?", "sub_questions": "1. x?"}, "row 2 has an empty 'id'"),
    ],
)
def test_bad_rows_name_the_file_row_and_field(tmp_path, name, row, message):
    path = _write(tmp_path, name, [GOOD, row])
    with pytest.raises(UserError, match=re.escape(message)) as err:
        load(qd_data(path))
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_missing_and_empty_rows_can_be_skipped(tmp_path):
    rows = [GOOD, {"id": "b", "question": "q?"}, {"id": "c", "question": "", "sub_questions": "x"}]
    path = _write(tmp_path, "d.jsonl", rows)
    assert [ex.id for ex in load(qd_data(path, skip_invalid_rows=True))] == ["a"]


def test_a_file_without_the_task_fields_says_which_keys_set_them(tmp_path):
    path = _write(tmp_path, "d.json", [{"id": "a", "query": "q?", "answer": "x"}])
    with pytest.raises(
        UserError, match=r"missing column\(s\) \['question', 'sub_questions'\]"
    ) as e:
        load(qd_data(path))
    assert "task.input_field / task.target_field" in str(e.value)


def test_input_rows_need_no_target(tmp_path):
    path = _write(tmp_path, "in.json", [{"id": "a", "question": "q?"}])
    assert load(qd_data(path), require_summary=False)[0].summary is None


# --- prompts and generation -----------------------------------------------------------------------


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*overrides, "output_dir=/tmp/x"])


def test_the_task_texts_reach_the_prompt_in_both_formats(tiny):
    cfg = _compose("task=question_decomposition", "prompt=one_shot")
    pcfg = OmegaConf.to_object(cfg.prompt)
    assert isinstance(pcfg, PromptConfig) and pcfg.fewshot.k == 1
    shot = load(qd_data(QD_KO))[1]
    p = build(pcfg, "ko", "plain", "세종대왕은 언제 태어났나?", [shot])
    assert p.prefix.startswith(cfg.task.instruction.ko) and "질문:\n" in p.prefix
    assert f"하위 질문: {shot.summary}\n" in p.prefix and p.suffix == "\n하위 질문:"
    assert completion_text(shot.summary, "plain") == f" {shot.summary}"
    _, tok = tiny
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    try:
        p = build(pcfg, "en", "chat", "Who?", [shot], tok)
    finally:
        tok.chat_template = None
    assert p.prefix.startswith(f"<|user|>{cfg.task.instruction.en}\n\nQuestion:\n")
    assert f"<|assistant|>{shot.summary}\n" in p.prefix


def test_clean_cuts_a_list_at_its_blank_line():
    text = "\n1. a?\n2. b?\n\n질문: 다음"
    assert clean(text, False, True) == "1. a?\n2. b?"
    assert clean(text, False) == text.strip()
    assert clean(text, True, True) == "1. a?"  # the one-line rule wins when both are set


def test_blank_line_stop_waits_for_text(tiny):
    _, tok = tiny
    prompt = tok("하위 질문:", add_special_tokens=False)["input_ids"]
    crit = BlankLineAfterText(tok, len(prompt))

    def stops(text):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return bool(crit(torch.tensor([prompt + ids]), None)[0])

    assert not stops("\n\n")  # an empty start is not the end of a list
    assert not stops("\n1. 서울은?\n2. 부산은?\n")  # one newline between items is not the end
    assert stops("\n1. 서울은?\n2. 부산은?\n\n")


def test_generation_with_the_blank_line_rule(tiny):
    model, tok = tiny
    prompts = [tok(t)["input_ids"] for t in ["질문: 서울은?\n하위 질문:", "질문: 부산과 대구는?"]]
    cfg = GenerateConfig(batch_size=2, max_new_tokens=6, stop_at_newline=False)
    free = summaries(cfg, model, tok, prompts, [tok.eos_token_id])
    cfg.stop_at_blank_line = True
    listed = summaries(cfg, model, tok, prompts, [tok.eos_token_id])
    assert len(listed) == 2 and all("\n\n" not in text for text in listed)
    assert all(a.startswith(b) for a, b in zip(free, listed))


# --- composition ----------------------------------------------------------------------------------


def test_the_default_task_is_todays_summary_setup():
    cfg = _compose()
    assert cfg.task.name == "dialogue_summary" and list(cfg.task.metrics) == ["rouge"]
    assert cfg.task.objective == "rouge_sum"
    assert (cfg.data.dialogue_column, cfg.data.summary_column) == ("dialogue", "summary")
    assert cfg.prompt.instruction.ko.startswith("다음 대화를 한두 문장으로 요약하세요.")
    assert cfg.prompt.output_label.en == "Summary:"
    g = cfg.generate
    assert (g.max_new_tokens, g.stop_at_newline, g.stop_at_blank_line) == (128, True, False)


def test_question_decomposition_brings_its_fields_data_and_generation():
    cfg = _compose("task=question_decomposition")
    assert cfg.data.name == "question_decomposition_ko" and cfg.data.id_column == "id"
    assert (cfg.data.dialogue_column, cfg.data.summary_column) == ("question", "sub_questions")
    assert cfg.prompt.output_label.ko == "하위 질문:"
    g = cfg.generate
    assert (g.max_new_tokens, g.stop_at_newline, g.stop_at_blank_line) == (160, False, True)
    assert list(cfg.task.metrics) == ["rouge", "subq_count"]
    check_task(OmegaConf.to_object(cfg.task))
    # The command line still wins over what the task picks.
    cfg = _compose(
        "task=question_decomposition", "data=question_decomposition_en", "generate.max_new_tokens=8"
    )
    assert cfg.data.language == "en" and cfg.generate.max_new_tokens == 8
    assert cfg.data.dialogue_column == "question"


def test_prompt_text_overrides_still_work():
    # Hangul needs quotes in Hydra's override grammar.
    assert _compose("prompt.instruction.ko='요약해.'").prompt.instruction.ko == "요약해."
    assert _compose("task.instruction.ko='요약해.'").prompt.instruction.ko == "요약해."


@pytest.mark.parametrize(
    "overrides",
    [["experiment=cpu_demo_qd"], ["task=question_decomposition", "experiment=cpu_demo_qd"]],
)
def test_the_qd_demo_experiment(overrides):
    cfg = _compose(*overrides)
    assert (
        cfg.task.name == "question_decomposition" and cfg.data.name == "question_decomposition_ko"
    )
    assert cfg.model.name == "gemma3_270m" and cfg.quant.method == "none"
    assert cfg.train.max_steps > 0 and cfg.stages.predict_test is False
    assert cfg.tracking.run_name == "cpu_demo_qd"
