"""Property-based tests on arbitrary Unicode dialogues (hypothesis): the data loader reads back
exactly what was written, in every format; the prompt builder never crashes, never truncates the
summary, and keeps every speaker token whole. Failures are one-line UserErrors, nothing else."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from summarizer.config import DataConfig, FewShotConfig, PromptConfig
from summarizer.data import Example, load
from summarizer.errors import UserError
from summarizer.prompt import IGNORE_INDEX, build, completion_text, encode

# Any character but lone surrogates (not encodable) and '#' (so that '#...#' marks only speakers).
CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="#")
TEXT = st.text(CHARS, min_size=1, max_size=60)
SPEAKER = re.compile(r"#Person\d+#")


@st.composite
def dialogues(draw) -> str:
    turns = draw(st.lists(st.tuples(st.integers(1, 12), TEXT), min_size=1, max_size=6))
    return "\n".join(f"#Person{n}#: {text}" for n, text in turns)


SUMMARY = TEXT.filter(lambda s: s.strip())


@st.composite
def rows(draw) -> list[dict]:
    n = draw(st.integers(1, 4))
    return [
        {
            "fname": f"id_{i}",
            "dialogue": draw(dialogues()),
            "summary": draw(SUMMARY),
            "topic": draw(st.text(CHARS, max_size=10)),
        }
        for i in range(n)
    ]


def write(path, fmt: str, records: list[dict]) -> None:
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
        path.write_text(buf.getvalue(), encoding="utf-8", newline="")
    elif fmt == "jsonl":
        lines = [json.dumps(r, ensure_ascii=False) for r in records]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(records=rows(), fmt=st.sampled_from(["csv", "jsonl", "json"]))
def test_loader_reads_back_any_unicode_dialogue(tmp_path, records, fmt):
    path = tmp_path / f"data.{fmt}"
    write(path, fmt, records)
    loaded = load(DataConfig(name="t", path=str(path)))
    assert [ex.id for ex in loaded] == [r["fname"] for r in records]
    for ex, rec in zip(loaded, records):
        assert ex.dialogue == rec["dialogue"].strip()
        assert ex.summary == rec["summary"].strip()  # whole: only outer whitespace is dropped
        assert SPEAKER.findall(ex.dialogue) == SPEAKER.findall(rec["dialogue"])


CFG = PromptConfig(
    instruction={"ko": "대화를 요약하세요.", "en": "Summarize the dialogue."},
    input_label={"ko": "대화:", "en": "Dialogue:"},
    output_label={"ko": "요약:", "en": "Summary:"},
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@settings(max_examples=150, deadline=None)
@given(
    dialogue=dialogues(),
    summary=SUMMARY,
    shots=st.lists(st.tuples(dialogues(), SUMMARY), max_size=2),
    max_chars=st.integers(8, 300),
    max_length=st.integers(8, 600),
    min_dialogue_tokens=st.integers(0, 40),
    fmt=st.sampled_from(["plain", "chat"]),
    language=st.sampled_from(["ko", "en"]),
    reserve=st.integers(0, 64),
)
def test_prompt_never_cuts_the_summary_or_a_speaker_token(
    tiny,
    dialogue,
    summary,
    shots,
    max_chars,
    max_length,
    min_dialogue_tokens,
    fmt,
    language,
    reserve,
):
    _, tok = tiny
    cfg = PromptConfig(**{**CFG.__dict__, "fewshot": FewShotConfig(k=2, max_chars=max_chars)})
    examples = [Example(f"s{i}", d, s) for i, (d, s) in enumerate(shots)]
    tok.chat_template = CHATML if fmt == "chat" else None
    try:
        p = build(cfg, language, fmt, dialogue, examples, tok)
    finally:
        tok.chat_template = None
    # Speaker tokens: the dialogue whole in the prompt, no example cut inside a token.
    assert p.dialogue == dialogue
    assert p.prefix.count("#Person") == len(SPEAKER.findall(p.prefix)), p.prefix

    stop = tok.eos_token_id
    completion = completion_text(summary, fmt)

    def ids(text: str, special: bool = False) -> list[int]:
        return tok(text, add_special_tokens=special)["input_ids"] if text else []

    prefix, suffix = ids(p.prefix, fmt == "plain"), ids(p.suffix)
    for with_summary in (True, False):
        try:
            out = encode(
                tok,
                p,
                completion if with_summary else None,
                max_length=max_length,
                stop_token_id=stop,
                reserve=0 if with_summary else reserve,
                min_dialogue_tokens=min_dialogue_tokens,
                add_bos=fmt == "plain",
                row_id="r1",
            )
        except UserError as e:  # too short for instruction + summary: said in one line
            assert "\n" not in str(e) and f"max_length={max_length} is too short" in str(e)
            continue
        target = ids(completion) + [stop] if with_summary else []
        assert len(out["input_ids"]) + (0 if with_summary else reserve) <= max_length
        if with_summary:  # the summary whole and supervised, then the stop token
            supervised = [t for t, y in zip(out["input_ids"], out["labels"]) if y != IGNORE_INDEX]
            assert supervised == target and out["input_ids"][-len(target) :] == target
        prompt_ids = out["input_ids"][: len(out["input_ids"]) - len(target)]
        assert prompt_ids[: len(prefix)] == prefix
        assert prompt_ids[len(prompt_ids) - len(suffix) :] == suffix
        kept = prompt_ids[len(prefix) : len(prompt_ids) - len(suffix)]
        full = ids(dialogue)
        assert kept == full[: len(kept)]  # the dialogue is only ever cut at its end
        assert out["truncated"] == (len(kept) < len(full))


@pytest.mark.parametrize("max_chars", [5, 9, 12, 20])
def test_a_clipped_example_never_ends_inside_a_token(max_chars):
    from summarizer.prompt import clip_chars

    text = "#Person1#: 안녕 #PhoneNumber# 입니다\n#Person2#: 네"
    clipped = clip_chars(text, max_chars)
    assert text.startswith(clipped) and len(clipped) <= max_chars
    assert clipped.count("#") % 2 == 0, clipped


# Keys a user overrides most, with values of every shape: each either composes and passes
# preflight, or fails as ONE line (a composition error as the CLI words it, or a UserError).
NUMBERS = st.one_of(
    st.integers(-(10**6), 10**6), st.floats(-1e6, 1e6, allow_nan=False), st.sampled_from([0, -1, 1])
)
WORDS = st.one_of(
    st.sampled_from(["auto", "true", "false", "none", "null", "fp16", "bf16", "ko", "en", "x"]),
    st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=8),
)
KEYS = {
    "lora.r": NUMBERS, "lora.alpha": NUMBERS, "lora.dropout": NUMBERS, "train.lr": NUMBERS,
    "train.batch_size": NUMBERS, "train.grad_accum": NUMBERS, "train.max_steps": NUMBERS,
    "train.eval_steps": NUMBERS, "train.save_steps": NUMBERS, "train.pack_multiple": NUMBERS,
    "train.epochs": NUMBERS, "data.val_size": NUMBERS, "generate.max_new_tokens": NUMBERS,
    "generate.batch_size": NUMBERS, "generate.num_beams": NUMBERS, "generate.temperature": NUMBERS,
    "prompt.fewshot.k": NUMBERS, "train.scheduler": WORDS, "train.precision": WORDS,
    "train.liger": WORDS, "train.cuda_graph": WORDS, "train.fused_lm_head": WORDS,
    "generate.static_decode": WORDS, "generate.merge": WORDS, "metric.tokenizer": WORDS,
    "data.language": WORDS, "train.eval_strategy": WORDS, "generate.do_sample": WORDS,
    "generate.strategy": st.one_of(WORDS, st.sampled_from(["greedy", "beam", "sample", "mbr"])),
    "generate.top_p": NUMBERS, "generate.mbr.candidates": NUMBERS,
    "generate.mbr.temperature": NUMBERS, "generate.mbr.top_p": NUMBERS,
    "generate.mbr.epsilon": NUMBERS,
}  # fmt: skip


@settings(max_examples=120, deadline=None)
@given(
    st.dictionaries(st.sampled_from(sorted(KEYS)), st.none(), min_size=1, max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries({k: KEYS[k] for k in keys})
    )
)
def test_any_override_composes_and_preflights_or_fails_in_one_line(overrides):
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from summarizer import plan as preflight
    from summarizer.__main__ import setup_error
    from tests.unit.test_config import _compose

    args = [f"{k}={v}" for k, v in overrides.items()] + ["output_dir=/tmp/x"]
    try:
        cfg = _compose(args)
    except (HydraException, OmegaConfBaseException) as e:  # the CLI's one line for these
        line = setup_error(e)
        assert line and "\n" not in line, args
        return
    try:
        preflight.make(cfg)
    except UserError as e:
        assert str(e) and "\n" not in str(e), args
