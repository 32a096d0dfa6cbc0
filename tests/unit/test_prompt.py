"""Prompt building, few-shot selection, truncation and loss masks on real Korean rows."""

from __future__ import annotations

import pytest

from summarizer.config import FewShotConfig, PromptConfig
from summarizer.data import Example, load
from summarizer.errors import UserError
from summarizer.prompt import IGNORE_INDEX, ShotSelector, build, completion_text, encode
from tests.conftest import SAMPLE_KO
from tests.unit.test_data import cfg as data_cfg

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def rows():
    return load(data_cfg(SAMPLE_KO))


def prompt_cfg(k=0, selection="fixed", max_chars=1024) -> PromptConfig:
    return PromptConfig(
        instruction={"ko": "대화를 요약하세요.", "en": "Summarize."},
        input_label={"ko": "대화:", "en": "Dialogue:"},
        output_label={"ko": "요약:", "en": "Summary:"},
        fewshot=FewShotConfig(k=k, selection=selection, max_chars=max_chars),
    )


def test_plain_zero_shot_layout(rows):
    p = build(prompt_cfg(), "ko", "plain", rows[0].dialogue, [])
    assert p.prefix == "대화를 요약하세요.\n\n대화:\n"
    assert p.suffix == "\n요약:" and p.dialogue == rows[0].dialogue


def test_plain_few_shot_puts_examples_before_the_dialogue(rows):
    p = build(prompt_cfg(k=2, max_chars=50), "ko", "plain", rows[0].dialogue, rows[1:3])
    text = p.prefix + p.dialogue + p.suffix
    assert text.count("요약:") == 3 and rows[1].summary in p.prefix and rows[2].summary in p.prefix
    assert rows[1].dialogue[:50] not in p.prefix or len(rows[1].dialogue) <= 50
    assert text.index(rows[2].summary) < text.index(rows[0].dialogue)


def test_missing_language_text_is_a_clear_error(rows):
    with pytest.raises(UserError, match="language 'ja'"):
        build(prompt_cfg(), "ja", "plain", rows[0].dialogue, [])


def test_chat_format_uses_the_template(rows, tiny):
    _, tok = tiny
    tok.chat_template = CHATML
    try:
        p = build(prompt_cfg(k=1), "ko", "chat", rows[0].dialogue, rows[1:2], tok)
    finally:
        tok.chat_template = None
    assert p.prefix.startswith("<|im_start|>user\n대화를 요약하세요.")
    assert f"<|im_start|>assistant\n{rows[1].summary}<|im_end|>" in p.prefix
    assert p.suffix == "<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("selection", ["fixed", "random", "similar"])
def test_shot_selection_never_uses_the_row_itself(rows, selection):
    pick = ShotSelector(FewShotConfig(k=3, selection=selection, seed=1), rows[:40])
    for row in rows[:40]:
        shots = pick(row)
        assert len(shots) == 3 and row.id not in {s.id for s in shots}
    assert pick(rows[5]) == pick(rows[5])  # deterministic


def test_similar_selection_finds_near_duplicates(rows):
    pool = rows[:40]
    target = Example("new", pool[7].dialogue + " 네.", None)
    assert ShotSelector(FewShotConfig(k=1, selection="similar"), pool)(target)[0].id == pool[7].id


def test_k_larger_than_the_pool_is_an_error(rows):
    with pytest.raises(UserError, match="k=5 is larger than the few-shot pool"):
        ShotSelector(FewShotConfig(k=5), rows[:3])


def encode_row(tok, row, max_length=512, with_summary=True, k=0, shots=()):
    p = build(prompt_cfg(k=k), "ko", "plain", row.dialogue, list(shots))
    completion = completion_text(row.summary, "plain") if with_summary else None
    return encode(
        tok,
        p,
        completion,
        max_length=max_length,
        stop_token_id=tok.eos_token_id,
        reserve=0 if with_summary else 64,
        row_id=row.id,
    )


def test_only_the_summary_is_supervised(rows, tiny):
    _, tok = tiny
    enc = encode_row(tok, rows[0])
    supervised = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX]
    assert supervised[-1] == tok.eos_token_id
    assert tok.decode(supervised[:-1]).strip() == rows[0].summary
    assert enc["labels"][: len(enc["labels"]) - len(supervised)] == [IGNORE_INDEX] * (
        len(enc["labels"]) - len(supervised)
    )


def test_long_dialogue_is_cut_never_the_summary(rows, tiny):
    _, tok = tiny
    row = max(rows, key=lambda r: len(r.dialogue))
    full = encode_row(tok, row, max_length=4096)
    assert len(full["input_ids"]) > 300
    cut = encode_row(tok, row, max_length=300)
    assert not full["truncated"] and cut["truncated"] and len(cut["input_ids"]) <= 300
    n_summary = sum(lab != IGNORE_INDEX for lab in full["labels"])
    assert sum(lab != IGNORE_INDEX for lab in cut["labels"]) == n_summary
    assert cut["input_ids"][-n_summary:] == full["input_ids"][-n_summary:]
    assert tok.decode(cut["input_ids"]).rstrip("</s>").endswith(row.summary)


def test_generation_prompt_reserves_the_new_tokens(rows, tiny):
    _, tok = tiny
    row = max(rows, key=lambda r: len(r.dialogue))
    enc = encode_row(tok, row, max_length=200, with_summary=False)
    assert "labels" not in enc and enc["truncated"] and len(enc["input_ids"]) <= 200 - 64
    assert tok.decode(enc["input_ids"]).endswith("요약:")


def test_max_length_shorter_than_the_prompt_is_an_error(rows, tiny):
    _, tok = tiny
    with pytest.raises(UserError, match=rf"row '{rows[0].id}': max_length=60 is too short"):
        encode_row(tok, rows[0], max_length=60, k=3, shots=rows[1:4])
