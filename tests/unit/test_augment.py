"""Augmentation without an API: config composition, speaker swap and instruction variants on the
real Korean rows, every filter, the training-split-only rule, the materialised-set cache and
local paraphrase with the tiny model."""

from __future__ import annotations

import copy
import re
from collections import Counter
from dataclasses import replace

import pytest
from omegaconf import DictConfig, OmegaConf

from summarizer import augment, data, prompt
from summarizer.augment import cache, methods
from summarizer.augment.filters import check_row, filter_rows
from summarizer.augment.text import TOKEN, split_turn, swap_speakers
from summarizer.config import AugmentationConfig, AugmentFilterConfig, ModelConfig, QuantConfig
from summarizer.errors import UserError
from tests.conftest import SAMPLE_KO
from tests.unit.test_config import _compose, options
from tests.unit.test_data import cfg as data_cfg
from tests.unit.test_prompt import prompt_cfg


@pytest.fixture(scope="module")
def rows():
    return data.load(data_cfg(SAMPLE_KO))


_COMPOSED: dict = {}


def group(*names: str):
    """The composed `augmentation` node for these options (a fresh copy: tests change it)."""
    if names not in _COMPOSED:
        cfg = _compose([f"augmentation=[{','.join(names)}]", "output_dir=/tmp/x"])
        _COMPOSED[names] = cfg.augmentation
    return copy.deepcopy(_COMPOSED[names])


def run(cfg, train, tmp_path, **kwargs):
    return augment.apply(cfg, train, language="ko", cache_dir=str(tmp_path), **kwargs)


# --- config --------------------------------------------------------------------------------------


def test_each_option_enables_only_its_method_and_options_combine():
    assert set(options("augmentation")) == {"none", *augment.METHODS}
    assert not any(group("none")[m].enabled for m in augment.METHODS)
    for method in augment.METHODS:
        cfg = group(method)
        assert [m for m in augment.METHODS if cfg[m].enabled] == [method]
    cfg = group("speaker_swap", "instruction_variants")
    assert cfg.speaker_swap.enabled and cfg.instruction_variants.enabled
    assert not cfg.paraphrase.enabled and cfg.instruction_variants.templates.ko
    cfg = _compose(
        ["augmentation=paraphrase", "augmentation.api.model=solar-mini", "output_dir=/x"]
    )
    assert cfg.augmentation.api.model == "solar-mini"
    assert cfg.augmentation.api.base_url == "https://api.upstage.ai/v1"
    assert cfg.augmentation.api.key_env == "UPSTAGE_API_KEY"  # a name, never the key


def test_every_option_has_text_for_both_languages():
    for method in augment.METHODS:
        cfg = group(method)
        for language in ("ko", "en"):
            augment.check_config(cfg, [method], language)


def test_none_returns_the_rows_unchanged(rows, tmp_path):
    result, stats = run(group("none"), rows[:5], tmp_path)
    assert result == rows[:5] and stats["aug_rows_after"] == 5 and stats["aug_rows_kept"] == 0
    assert not (tmp_path / "augment").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("speaker_swap.fraction=1.5", "augmentation.speaker_swap.fraction=1.5: expected 0 to 1"),
        ("instruction_variants.copies=9", "instruction_variants.copies=9: only 4 templates"),
        ("filters.min_length_ratio=3", "need 0 < min_length_ratio (3.0) <= max_length_ratio"),
        ("filters.max_similarity=0", "filters.max_similarity=0.0: expected (0, 1]"),
    ],
)
def test_bad_values_name_the_key(rows, tmp_path, override, message):
    cfg = group("speaker_swap", "instruction_variants")
    key, value = override.split("=")
    OmegaConf.update(cfg, key, float(value) if "." in value or "ratio" in key else int(value))
    with pytest.raises(UserError, match=re.escape(message)):
        run(cfg, rows[:3], tmp_path)


def test_a_missing_language_entry_names_the_key(rows, tmp_path):
    cfg = group("paraphrase")
    cfg.paraphrase.prompt = {"en": "Paraphrase."}
    with pytest.raises(UserError, match=r"augmentation.paraphrase.prompt has no entry for .*'ko'"):
        run(cfg, rows[:3], tmp_path)


# --- the method registry -------------------------------------------------------------------------


def test_the_registry_matches_the_options_dataclasses():
    cfg = OmegaConf.structured(AugmentationConfig)
    switchable = [k for k, v in cfg.items() if isinstance(v, DictConfig) and "enabled" in v]
    assert set(switchable) == set(methods.METHODS) and augment.METHODS == tuple(methods.METHODS)
    for name, m in methods.METHODS.items():
        assert m.name == name and m.kind in methods.KINDS and m.make.__name__ == name
    assert {n for n, m in methods.METHODS.items() if m.api} == {
        "paraphrase",
        "back_translation",
        "synthetic",
    }


def test_an_unknown_method_is_one_clear_line(rows, tmp_path):
    with pytest.raises(UserError) as e:
        methods.get("shout")
    assert str(e.value).startswith("augmentation.shout: no such method (methods: speaker_swap, ")
    assert "summarizer/augment/methods.py" in str(e.value) and "\n" not in str(e.value)
    cfg = group("speaker_swap")
    OmegaConf.set_struct(cfg, False)
    cfg.shout = {"enabled": True}  # switched on in the config, no function registered
    with pytest.raises(UserError, match=r"^augmentation.shout: no such method"):
        run(cfg, rows[:3], tmp_path)
    assert not (tmp_path / "augment").exists()  # before any work
    cfg.shout.enabled = False
    _, stats = run(cfg, rows[:3], tmp_path)
    assert stats["aug_kept_speaker_swap"] == 3


def test_a_registered_function_is_a_whole_method(rows, tmp_path, monkeypatch):
    """The path in methods.py's docstring: one registered function and an options node; the
    seeded `fraction` pick, the filters (by its kind), the figures and the set cache follow."""
    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))  # registrations undone after

    @methods.method(kind="copy")
    def shout(sub, rows, ctx):
        return [(replace(ex, summary=ex.summary + "!", source="shout"), ex) for ex in rows]

    cfg = group("none")
    OmegaConf.set_struct(cfg, False)
    cfg.shout = {"enabled": True, "fraction": 0.5}
    result, stats = run(cfg, rows[:10], tmp_path)
    assert stats["aug_kept_shout"] == 5 and stats["aug_rows_after"] == 15
    assert [r.id for r in result[10:]] == [
        ex.id for ex in methods.pick(rows[:10], 0.5, cfg.seed, "shout")
    ]
    assert all(r.summary.endswith("!") for r in result[10:])
    again, stats = run(cfg, rows[:10], tmp_path)
    assert again == result and stats["aug_set_reused"] == 1


# --- speaker swap --------------------------------------------------------------------------------


def test_speaker_swap_on_every_real_row(rows, tmp_path):
    result, stats = run(group("speaker_swap"), rows, tmp_path)
    swapped = result[len(rows) :]
    assert stats["aug_rows_kept"] == len(rows) == len(swapped) == 160
    for ex, sw in zip(rows, swapped):
        assert sw.id == ex.id and sw.source == "speaker_swap" and sw.topic == ex.topic
        # Speaker tags of every line exchanged, line by line.
        for a, b in zip(ex.dialogue.split("\n"), sw.dialogue.split("\n")):
            tag = re.match(r"#Person(\d)#:", a).group(1)
            other = {"1": "2", "2": "1"}.get(tag, tag)
            assert b.startswith(f"#Person{other}#:")
        # Mentions in the summary too; counts exchanged; all other text the same.
        for text, new in ((ex.dialogue, sw.dialogue), (ex.summary, sw.summary)):
            before, after = Counter(TOKEN.findall(text)), Counter(TOKEN.findall(new))
            assert after["#Person1#"] == before["#Person2#"]
            assert after["#Person2#"] == before["#Person1#"]
            assert TOKEN.sub("#", text) == TOKEN.sub("#", new)
            assert swap_speakers(new) == text


def test_speaker_swap_keeps_masked_tokens(rows):
    masked = [ex for ex in rows if re.search(r"#(PhoneNumber|Address|DateOfBirth)#", ex.dialogue)]
    assert masked  # the sample has #PhoneNumber#, #Address# and #DateOfBirth# rows
    for ex in masked:
        new = swap_speakers(ex.dialogue)
        for token in ("#PhoneNumber#", "#Address#", "#DateOfBirth#"):
            assert new.count(token) == ex.dialogue.count(token)


# --- instruction variants ------------------------------------------------------------------------


def test_instruction_variants_reach_the_training_prompt_only(rows, tmp_path):
    cfg = group("instruction_variants")
    result, stats = run(cfg, rows[:10], tmp_path)
    variants = result[10:]
    assert stats["aug_rows_kept"] == 20 and len(variants) == 20
    templates = set(cfg.instruction_variants.templates.ko)
    for ex in rows[:10]:
        mine = [v for v in variants if v.id == ex.id]
        assert len(mine) == 2 and len({v.instruction for v in mine}) == 2
        assert all(v.instruction in templates and v.dialogue == ex.dialogue for v in mine)
    again, _ = run(cfg, rows[:10], tmp_path / "other")  # seeded: the same picks
    assert again == result

    p = prompt_cfg()
    own = prompt.build(
        p, "ko", "plain", variants[0].dialogue, [], instruction=variants[0].instruction
    )
    default = prompt.build(p, "ko", "plain", rows[0].dialogue, [], instruction=rows[0].instruction)
    assert own.prefix.startswith(variants[0].instruction)
    assert default.prefix.startswith("대화를 요약하세요.")  # validation rows: the preset's


# --- filters -------------------------------------------------------------------------------------


def reason(row, ref, train, f=None):
    known = {t for ex in train for t in TOKEN.findall(f"{ex.dialogue} {ex.summary}")}
    return check_row(row, ref, f or AugmentFilterConfig(), "ko", known)


def reverse_words(dialogue: str) -> str:
    lines = []
    for line in dialogue.split("\n"):
        tag, text = split_turn(line)
        lines.append(tag + " ".join(reversed(text.split())))
    return "\n".join(lines)


def test_each_filter_drops_what_it_should(rows):
    ex = next(e for e in rows if "#PhoneNumber#" in e.dialogue and "#Person1#" in e.summary)
    good = replace(ex, dialogue=reverse_words(ex.dialogue), source="paraphrase.0")
    assert reason(good, ex, rows) is None

    def para(dialogue, summary=None):
        return replace(ex, dialogue=dialogue, summary=summary or ex.summary, source="paraphrase.0")

    lost_token = good.dialogue.replace("#PhoneNumber#", "010-1234-5678", 1)
    assert reason(para(lost_token), ex, rows) == "tokens"
    renamed = good.dialogue.replace("#Person2#:", "#Person3#:", 1)
    assert reason(para(renamed), ex, rows) == "tokens"
    lines = good.dialogue.split("\n")
    merged = "\n".join([lines[0] + " " + lines[1], *lines[2:]])
    assert reason(para(merged), ex, rows) == "tokens"  # turns merged
    lost = ex.summary.replace("#Person1#", "그 사람")
    assert reason(para(good.dialogue, lost), ex, rows) == "tokens"  # a speaker lost

    def each_line(words: str) -> str:  # every turn and token kept, the words replaced
        out = []
        for line in lines:
            tag, text = split_turn(line)
            out.append(tag + " ".join([*TOKEN.findall(text), words]))
        return "\n".join(out)

    short = each_line("네")
    assert reason(para(short), ex, rows) == "length"
    assert reason(para(each_line("아주 " * 60)), ex, rows) == "length"
    english = each_line("Sure, I can call you back later at the office today.")
    assert reason(para(english), ex, rows) == "language"
    assert reason(para(""), ex, rows) == "empty"
    blank_turn = "\n".join([split_turn(lines[0])[0], *lines[1:]])
    assert reason(para(blank_turn), ex, rows) == "empty"
    # A looser filter lets them through.
    loose = AugmentFilterConfig(keep_tokens=False, min_length_ratio=0.01, min_language_share=0)
    assert reason(para(short), ex, rows, loose) is None
    assert reason(para(english), ex, rows, loose) is None


def test_near_duplicates_and_duplicates(rows):
    ex = rows[0]
    echo = replace(ex, source="paraphrase.0")
    spaced = replace(ex, dialogue=ex.dialogue.replace(", ", ",  "), source="paraphrase.0")
    first = replace(ex, dialogue=reverse_words(ex.dialogue), source="paraphrase.0")
    twin = replace(first, source="paraphrase.1")  # the same rewrite twice
    swap_of_plain = replace(rows[1], dialogue="안녕하세요 여러분 반갑습니다", summary="인사합니다.")
    plain = replace(swap_of_plain, source="original")
    candidates = [(echo, ex), (spaced, ex), (first, ex), (twin, ex)]
    candidates.append((replace(swap_of_plain, source="speaker_swap"), plain))
    kept, dropped = filter_rows(candidates, [*rows, plain], AugmentFilterConfig(), "ko")
    assert [row for row, _ in kept] == [first]
    assert [r for _, _, r in dropped] == [
        "duplicate",
        "near_duplicate",
        "duplicate",
        "duplicate",  # a swap that changes nothing
    ]


def test_synthetic_rows_need_turns_speakers_and_known_tokens(rows):
    ex = rows[0]
    ok = (
        "#Person1#: 새로운 대화를 시작해 볼까요 오늘은?\n#Person2#: 좋아요, 무엇이든 이야기해 봐요."
    )
    ok = "\n".join([ok] * 5)
    summary = "#Person1#와 #Person2#는 새로운 대화를 나누며 오늘 할 일을 정합니다. 숨쉬기는 괜찮다고 합니다."

    def syn(dialogue, s=summary):
        return replace(ex, dialogue=dialogue, summary=s, source="synthetic.0")

    assert reason(syn(ok), ex, rows) is None
    assert reason(syn(ok.replace("#Person2#", "#Person1#")), ex, rows) == "tokens"  # one speaker
    assert reason(syn(ok + "\n(끝)"), ex, rows) == "tokens"  # a line without a speaker
    assert reason(syn(ok.replace("#Person2#", "#Friend#")), ex, rows) == "tokens"  # unknown token
    assert reason(syn(ok, summary.replace("#Person2#", "#Person3#")), ex, rows) == "tokens"


# --- training split only; the cache of materialised sets -----------------------------------------


def test_augmentation_touches_the_training_split_only(rows, tmp_path):
    train, validation = data.split(rows, 0.2, 42)
    frozen = list(validation)
    result, _ = run(group("speaker_swap", "instruction_variants"), train, tmp_path)
    assert validation == frozen
    train_ids, val_ids = {ex.id for ex in train}, {ex.id for ex in validation}
    assert {ex.id for ex in result} == train_ids and not train_ids & val_ids
    val_texts = {t for ex in validation for t in (ex.dialogue, swap_speakers(ex.dialogue))}
    assert not val_texts & {ex.dialogue for ex in result}
    val_summaries = {t for ex in validation for t in (ex.summary, swap_speakers(ex.summary))}
    assert not val_summaries & {ex.summary for ex in result}


def test_the_set_is_made_once_and_reused(rows, tmp_path):
    cfg = group("speaker_swap", "instruction_variants")
    first, stats = run(cfg, rows[:20], tmp_path, out_dir=tmp_path / "run1")
    again, stats2 = run(cfg, rows[:20], tmp_path, out_dir=tmp_path / "run2")
    assert again == first and stats["aug_set_reused"] == 0 and stats2["aug_set_reused"] == 1
    assert {k: v for k, v in stats.items() if k != "aug_set_reused"} == {
        k: v for k, v in stats2.items() if k != "aug_set_reused"
    }
    sample = (tmp_path / "run2" / augment.SAMPLE_FILE).read_text("utf-8")
    assert sample == (tmp_path / "run1" / augment.SAMPLE_FILE).read_text("utf-8")
    assert len(list((tmp_path / "augment" / "sets").glob("*.jsonl"))) == 1


def test_what_the_set_identity_depends_on(rows):
    cfg = group("speaker_swap", "paraphrase")
    names = ["speaker_swap", "paraphrase"]

    def digest(c=cfg, train=rows[:10], m=names):
        return cache.set_digest(c, m, train, "ko", None)

    base = digest()
    assert digest() == base
    speed = cfg.copy()
    speed.api.concurrency, speed.api.max_retries, speed.sample_rows = 1, 0, 3
    assert digest(speed) == base  # how fast, not what
    unused = cfg.copy()
    unused.synthetic.max_rows = 5  # a method that is off
    assert digest(unused) == base
    assert digest(train=rows[:11]) != base  # other training rows
    assert digest(train=[replace(rows[0], summary="x"), *rows[1:10]]) != base
    filters = cfg.copy()
    filters.filters.max_similarity = 0.5
    assert digest(filters) != base
    model = cfg.copy()
    model.api.model = "solar-mini"
    assert digest(model) != base
    assert digest(m=["speaker_swap"]) != base


def test_local_paraphrase_with_the_tiny_model(rows, tmp_path, cache_dir):
    model_cfg = OmegaConf.structured(ModelConfig(name="tiny", source="tiny", dtype="float32"))
    model_cfg.tiny.train_text = str(SAMPLE_KO)
    cfg = group("local_paraphrase")
    cfg.local_paraphrase.max_new_tokens = 4
    cfg.local_paraphrase.temperature = 0
    cfg.cache_dir = str(tmp_path / "augment")
    train = rows[:2]
    lines = sum(len(ex.dialogue.split("\n")) for ex in train)

    def go():
        return augment.apply(
            cfg,
            train,
            language="ko",
            cache_dir=cache_dir,
            model_cfg=model_cfg,
            quant_cfg=QuantConfig(),
        )

    result, stats = go()
    assert stats["aug_rows_generated"] == 2 and stats["aug_replies_cached"] == 0
    assert result[:2] == train and stats["aug_rows_after"] == 2 + stats["aug_rows_kept"]
    dropped = sum(v for k, v in stats.items() if k.startswith("aug_dropped_"))
    assert dropped + stats["aug_rows_kept"] == 2  # a random model's text: mostly filtered
    replies = list((tmp_path / "augment" / "replies").rglob("*.json"))
    assert len(replies) == lines  # one reply per dialogue line

    for path in (tmp_path / "augment" / "sets").glob("*"):
        path.unlink()  # the set is gone, the replies stay: no model call needed
    again, stats2 = go()
    assert again == result and stats2["aug_replies_cached"] == lines
