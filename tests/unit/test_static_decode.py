"""generate.greedy_static: the same tokens as `generate(do_sample=False)`, for each attention layout.

On CPU the decode step runs eagerly; on CUDA the same step is captured as a CUDA graph (gpu test).
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen3Config

from summarizer.config import GenerateConfig
from summarizer.errors import UserError
from summarizer.generate import NewlineAfterText, summaries
from summarizer.speed.static_decode import greedy_static
from summarizer.speed.switches import use_static

VOCAB = 300
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL, num_hidden_layers=2, num_key_value_heads=2),
    # sliding window 5 < the prompt width: the window mask matters in prefill and decode
    "gemma3": lambda: Gemma3TextConfig(
        **SMALL,
        num_hidden_layers=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=5,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
    ),
    "qwen3": lambda: Qwen3Config(**SMALL, num_hidden_layers=2, num_key_value_heads=2, head_dim=16),
}
PAD = 0


def _model(name: str, device="cpu", attention="sdpa"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation=attention)
    model = model.eval().to(device)
    with torch.no_grad():  # sharper logits than the random init's: no near-ties in the argmax
        for n, p in model.named_parameters():
            if "embed" in n or "lm_head" in n:
                p.mul_(8)
    return model


def _batch(device="cpu", width=12, pads=(0, 3, 7, 1, 11)):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (len(pads), width), generator=gen)
    mask = torch.ones_like(ids)
    for row, k in enumerate(pads):  # left padding, one row with a single real token
        ids[row, :k] = PAD
        mask[row, :k] = 0
    return ids.to(device), mask.to(device)


def _reference(model, ids, mask, new, eos, criteria=None):
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=PAD,
            stopping_criteria=criteria,
        )
    return out[:, ids.shape[1] :]


def _same(reference, ours):
    """generate stops when every row is done; greedy_static may run a few steps further (pads)."""
    n = reference.shape[1]
    assert torch.equal(reference, ours[:, :n]), (reference, ours)
    assert (ours[:, n:] == PAD).all()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_tokens_as_generate(name, attention):
    model = _model(name, attention=attention)
    ids, mask = _batch()
    free = _reference(model, ids, mask, 10, [])  # no stop: every row writes 10 tokens
    # a token that row 1 writes by step 4: rows stop at different steps, row 1 mid-way
    eos = [int(free[1, 4])]
    with torch.inference_mode():
        ours = greedy_static(model, ids, mask, 10, eos, PAD)
    _same(_reference(model, ids, mask, 10, eos), ours)
    first = free[1].tolist().index(eos[0])
    assert int(ours[1, first]) == eos[0] and (ours[1, first + 1 :] == PAD).all()


def test_newline_rule_matches_the_stopping_criterion(tiny):
    """The in-step newline rule and NewlineAfterText stop the same rows at the same tokens."""
    model = _model("llama")
    ids, mask = _batch()
    free = _reference(model, ids, mask, 12, [])
    kinds = torch.zeros(VOCAB + 1, dtype=torch.uint8)
    kinds[3:] = 1  # text
    kinds[int(free[0, 0])] = 2  # a newline: row 0 starts with it, so it must not stop there
    kinds[int(free[2, 5])] = 4  # text then a newline: stops row 2 at step 5
    crit = NewlineAfterText(tiny[1])
    crit.kinds = kinds
    reference = _reference(model, ids, mask, 12, [], [crit])
    with torch.inference_mode():
        ours = greedy_static(model, ids, mask, 12, [], PAD, kinds=kinds)
    _same(reference, ours)
    assert int(ours[0, 0]) == int(free[0, 0]) and ours[0, 1] != PAD


def test_stops_early_when_every_row_is_done():
    model = _model("llama")
    ids, mask = _batch(pads=(0, 0))
    first = _reference(model, ids, mask, 1, [])
    calls = []
    forward = model.forward

    def counting(*a, **k):
        calls.append(1)
        return forward(*a, **k)

    model.forward = counting
    with torch.inference_mode():
        ours = greedy_static(model, ids, mask, 50, first[:, 0].tolist(), PAD, check_every=4)
    assert (ours[:, 1:] == PAD).all()
    assert len(calls) < 10  # prefill + a few steps, not 50


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_finished_rows_leave_the_batch(name):
    """Rows that stopped are dropped from the batch and its KV cache (early exit); the others
    still write exactly what `generate` writes."""
    model = _model(name)
    ids, mask = _batch(pads=(0, 3, 7, 1, 11, 2, 0, 5))
    free = _reference(model, ids, mask, 12, [])
    # stop tokens that rows 0-4 write early and rows 5-7 never write: those three go on to the end
    later = set(free[5:].flatten().tolist())
    eos = sorted({t for r in range(5) for t in free[r, 1:3].tolist() if t not in later})
    assert eos
    widths = []
    forward = model.forward

    def spy(*a, **k):
        widths.append(k["input_ids"].shape[0])
        return forward(*a, **k)

    model.forward = spy
    with torch.inference_mode():
        ours = greedy_static(model, ids, mask, 12, eos, PAD, check_every=1)
    del model.forward
    reference = _reference(model, ids, mask, 12, eos)
    _same(reference, ours)
    assert (reference[5:] != PAD).all()  # three rows wrote on to the end
    assert widths[0] == 8 and 3 <= widths[-1] < 8  # the prefill had every row, later steps fewer
    assert widths == sorted(widths, reverse=True)


def _lora_tiny(cache_dir, attention="sdpa", device="cpu"):
    """The tiny preset with LoRA (as a run generates with quant=none), its weights redrawn wide
    enough that greedy decoding writes varied text and newlines (the preset's own init writes
    spaces only, which would make every summary empty)."""
    from summarizer.config import LoraConfig, ModelConfig, QuantConfig
    from summarizer.model import add_lora, build_model

    cfg = ModelConfig(name="tiny", source="tiny", dtype="float32", attn_implementation=attention)
    base, tok = build_model(cfg, QuantConfig(), cache_dir)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "norm" not in n:
                p.normal_(0, 0.5)
    return add_lora(base.to(device), LoraConfig(), gradient_checkpointing=False), tok


def _summaries_both_ways(model, tok):
    prompts = [tok("#Person1#: 안녕하세요 " * n)["input_ids"] for n in (1, 5, 2, 9, 3, 7)]
    texts = {}
    for choice in ("true", "false"):
        cfg = GenerateConfig(batch_size=4, max_new_tokens=24, static_decode=choice)
        texts[choice] = summaries(cfg, model, tok, prompts, [tok.eos_token_id])
    assert sum(bool(t) for t in texts["false"]) >= 3  # real text to compare
    return texts


def test_summaries_static_matches_generate(cache_dir):
    texts = _summaries_both_ways(*_lora_tiny(cache_dir))
    assert texts["true"] == texts["false"]


def test_use_static_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_static(GenerateConfig(), cpu)  # auto: a GPU only
    assert use_static(GenerateConfig(), cuda)
    assert not use_static(GenerateConfig(num_beams=4), cuda)  # auto falls back to generate
    assert not use_static(GenerateConfig(repetition_penalty=1.2), cuda)
    assert use_static(GenerateConfig(static_decode="true"), cpu)
    assert not use_static(GenerateConfig(static_decode="False"), cuda)
    with pytest.raises(UserError, match="generate.static_decode='fast'"):
        use_static(GenerateConfig(static_decode="fast"), cpu)
    with pytest.raises(UserError, match="greedy decoding only"):
        use_static(GenerateConfig(static_decode="true", do_sample=True), cpu)
    # flash attention takes no 4D mask: auto falls back to generate, true says why
    assert not use_static(GenerateConfig(), cuda, "flash_attention_2")
    with pytest.raises(UserError, match="sdpa or eager, not 'flash_attention_2'"):
        use_static(GenerateConfig(static_decode="true"), cpu, "flash_attention_2")


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cuda_graph_same_tokens_as_generate(name, caplog):
    model = _model(name, "cuda")
    ids, mask = _batch("cuda")
    free = _reference(model, ids, mask, 16, [])
    eos = [int(free[1, 6])]
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        ours = greedy_static(model, ids, mask, 16, eos, PAD, cuda_graph=True)
    assert "no CUDA graph" not in caplog.text  # the graph was captured and replayed
    _same(_reference(model, ids, mask, 16, eos), ours)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_cuda_graph_rows_leave_the_batch(attention, caplog):
    """Early exit on CUDA: finished rows leave, the graph is captured again for the smaller batch,
    and the rows still writing get what `generate` gives them (eager attention as well as sdpa)."""
    model = _model("llama", "cuda", attention)
    ids, mask = _batch("cuda", pads=(0, 3, 7, 1, 11, 2, 0, 5))
    free = _reference(model, ids, mask, 24, [])
    later = set(free[5:].flatten().tolist())
    eos = sorted({t for r in range(5) for t in free[r, 1:3].tolist() if t not in later})
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        ours = greedy_static(model, ids, mask, 24, eos, PAD, cuda_graph=True, check_every=4)
    assert "no CUDA graph" not in caplog.text
    reference = _reference(model, ids, mask, 24, eos)
    _same(reference, ours)
    assert (reference[5:] != PAD).all()


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_summaries_on_cuda_match_generate(attention, cache_dir):
    """The pipeline's call on CUDA (newline rule, eos, CUDA graph) on an unmerged LoRA model, as a
    sweep trial with quant=none evaluates it, against plain `generate`."""
    texts = _summaries_both_ways(*_lora_tiny(cache_dir, attention, "cuda"))
    assert texts["true"] == texts["false"]
