from __future__ import annotations

import pytest
import torch

from summarizer.config import GenerateConfig, ModelConfig, QuantConfig
from summarizer.errors import UserError
from summarizer.generate import NewlineAfterText, clean, summaries
from summarizer.model import build_model, stop_token_id


def test_clean_keeps_the_first_line():
    assert clean("\n 요약문입니다.\n#Person1#: 다음", True) == "요약문입니다."
    assert clean(" a\nb ", False) == "a\nb"


def _stops_after(tok, prompt, text) -> list[bool]:
    """Feed `text`'s tokens one by one, as `generate` does; the criterion's answer at each step."""
    crit = NewlineAfterText(tok)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [bool(crit(torch.tensor([prompt + ids[: n + 1]]), None)[0]) for n in range(len(ids))]


def test_newline_stop_waits_for_text(tiny):
    _, tok = tiny
    prompt = tok("요약:", add_special_tokens=False)["input_ids"]
    assert not any(_stops_after(tok, prompt, "\n"))
    steps = _stops_after(tok, prompt, "\n안녕\n")
    assert steps[-1] and not any(steps[:-1])  # stops at the newline after the text, not before
    assert not any(_stops_after(tok, prompt, "\n\n안녕 하세요"))


def test_newline_stop_is_per_row(tiny):
    _, tok = tiny
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    word = tok("안녕", add_special_tokens=False)["input_ids"]
    crit = NewlineAfterText(tok)
    first = torch.tensor([word[:1], nl[:1]])  # row 0 writes text, row 1 a leading newline
    assert crit(first, None).tolist() == [False, False]
    second = torch.cat([first, torch.tensor([nl[:1], nl[:1]])], 1)
    assert crit(second, None).tolist() == [True, False]


def test_generation_keeps_input_order_and_length(tiny):
    model, tok = tiny
    prompts = [tok(t)["input_ids"] for t in ["짧다", "조금 더 긴 입력 문장입니다", "중간 길이"]]
    cfg = GenerateConfig(batch_size=2, max_new_tokens=4, stop_at_newline=False)
    out = summaries(cfg, model, tok, prompts, [tok.eos_token_id])
    assert len(out) == 3
    # Each prompt alone gives the same text as in a padded batch (greedy, left padding).
    alone = [summaries(cfg, model, tok, [p], [tok.eos_token_id])[0] for p in prompts]
    assert out == alone


def test_hub_preset_without_gpu_names_the_local_preset():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cfg = ModelConfig(name="solar", source="hub", path="upstage/x", requires_gpu=True)
    with pytest.raises(UserError, match="model=solar needs a CUDA GPU.*model=gemma3_270m"):
        build_model(cfg, QuantConfig(), "/tmp")


def test_hub_model_without_hub_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(name="nohub", source="hub", path="no-such-org/no-such-model")
    with pytest.raises(UserError, match="cannot load 'no-such-org/no-such-model'") as err:
        build_model(cfg, QuantConfig(), "/tmp")
    assert "\n" not in str(err.value)


def test_missing_local_folder_and_package(tmp_path):
    with pytest.raises(UserError, match="folder not found"):
        build_model(
            ModelConfig(name="l", source="local", path=str(tmp_path / "x")), QuantConfig(), "/tmp"
        )
    cfg = ModelConfig(name="g", source="gguf", gguf_package="no_such_pkg", gguf_file="m.gguf")
    with pytest.raises(UserError, match="'no_such_pkg' is not installed"):
        build_model(cfg, QuantConfig(), "/tmp")


def test_stop_token_must_exist(tiny):
    _, tok = tiny
    assert stop_token_id(ModelConfig(name="t"), tok) == tok.eos_token_id
    with pytest.raises(UserError, match="stop_token"):
        stop_token_id(ModelConfig(name="t", stop_token="<|nope|>"), tok)


def test_tiny_model_takes_the_attention_setting():
    from summarizer.config import ModelConfig, QuantConfig
    from summarizer.model import build_model

    for attn in ("eager", "sdpa"):
        cfg = ModelConfig(name="tiny", source="tiny", dtype="float32", attn_implementation=attn)
        lm, _ = build_model(cfg, QuantConfig(), "~/.cache/summarizer")
        assert lm.config._attn_implementation == attn


def test_an_ngram_block_that_forbids_what_the_references_write_is_told(tiny):
    from summarizer.generate import ngram_block_warning, repeated_ngram_share

    _, tok = tiny
    phrase = "#Person1# 은 #Person2# 에게"
    n = len(tok(phrase, add_special_tokens=False)["input_ids"])
    twice = f"{phrase} 말한다. {phrase} 묻는다."  # the same words twice, as summaries name speakers
    once = "오늘 회의는 길었다."
    assert repeated_ngram_share(0, tok, [twice]) == 0.0  # 0: no block
    assert repeated_ngram_share(n - 1, tok, [twice, once]) == 0.5
    assert repeated_ngram_share(200, tok, [twice]) == 0.0  # longer than any summary
    shares = [repeated_ngram_share(k, tok, [twice, once]) for k in range(1, 12)]
    assert shares == sorted(shares, reverse=True)  # a longer n forbids less
    warning = ngram_block_warning(2, tok, [twice, once])
    assert warning.startswith("generate.no_repeat_ngram_size=2: 50% of the training summaries")
    assert "\n" not in warning
    assert ngram_block_warning(2, tok, [once, once]) is None
    assert ngram_block_warning(0, tok, [twice]) is None
