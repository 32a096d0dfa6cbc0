"""Batched summary generation: left padding, length-sorted batches, stop at the end of the summary."""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from summarizer.config import GenerateConfig
from summarizer.errors import UserError


class NewlineAfterText(StoppingCriteria):
    """Stop a row once it has written some text and then a newline (summaries are one line).

    Base models often start with a newline after 'Summary:', so a plain newline stop would end at once.
    Decided from the last token alone, on the device (no decoding of the whole output each step, no
    host sync): each vocabulary entry is classified once per tokenizer (`_token_kinds`).
    """

    def __init__(self, tokenizer):
        self.kinds = _token_kinds(tokenizer)
        self.seen_text = None  # per row: some text already written (one criterion per batch)

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        if self.kinds.device != input_ids.device:
            self.kinds = self.kinds.to(input_ids.device)
        last = input_ids[:, -1].clamp(max=len(self.kinds) - 1)
        kind = self.kinds[last]
        if self.seen_text is None:
            self.seen_text = torch.zeros_like(last, dtype=torch.bool)
        done = (kind & NL_AFTER_TEXT != 0) | (self.seen_text & (kind & NEWLINE != 0))
        self.seen_text |= kind & TEXT != 0
        return done


TEXT, NEWLINE, NL_AFTER_TEXT = 1, 2, 4  # bits of a token's kind


def _token_kinds(tokenizer) -> torch.Tensor:
    """Per token id: has non-space text, has a newline, has a newline after its own text."""
    cached = getattr(tokenizer, "_summarizer_token_kinds", None)
    if cached is not None:
        return cached
    size = len(tokenizer)
    pieces = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=True)
    kinds = torch.zeros(size + 1, dtype=torch.uint8)  # + one slot for ids past the tokenizer
    for i, piece in enumerate(pieces):
        text = piece.strip()
        kind = (TEXT if text else 0) | (NEWLINE if "\n" in piece else 0)
        if text and "\n" in piece.lstrip():
            kind |= NL_AFTER_TEXT
        kinds[i] = kind
    try:
        tokenizer._summarizer_token_kinds = kinds
    except AttributeError:
        pass
    return kinds


_BLANK_LINE = re.compile(r"\n[ \t]*\n")  # an empty line: the end of a multi-line list


class BlankLineAfterText(StoppingCriteria):
    """Stop a row once it has written some text and then an empty line (generate.stop_at_blank_line):
    a numbered list spans lines, and a base model goes on after it with an empty line and a new
    "Question:". Decodes the row's new text each step: lists are short, and a token that ends a line
    may or may not start the blank one, which the last token alone cannot tell."""

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        new = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_width :], skip_special_tokens=True
        )
        done = [bool(_BLANK_LINE.search(text.lstrip())) for text in new]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def use_merged(cfg: GenerateConfig, quant) -> bool:
    """Whether to generate with a merged bf16 copy of the model (see GenerateConfig.merge)."""
    choice = str(cfg.merge).lower()
    if choice not in ("auto", "true", "false"):
        raise UserError(f"generate.merge={cfg.merge!r}: expected auto, true or false")
    if choice == "auto":
        return torch.cuda.is_available() and quant.method != "none"
    return choice == "true"


def clean(text: str, stop_at_newline: bool, stop_at_blank_line: bool = False) -> str:
    text = text.strip()
    if stop_at_newline:
        text = text.split("\n", 1)[0].strip()
    elif stop_at_blank_line:
        text = _BLANK_LINE.split(text, maxsplit=1)[0].strip()
    return text


def summaries(
    cfg: GenerateConfig, model, tokenizer, prompts: list[list[int]], stop_token_ids: list[int]
) -> list[str]:
    """Generate one summary per tokenized prompt, returned in the input order."""
    if cfg.batch_size <= 0 or cfg.max_new_tokens <= 0:
        raise ValueError("generate.batch_size and generate.max_new_tokens must be >= 1")
    model.eval()
    device = next(model.parameters()).device
    # Longest first: similar lengths share a batch (less padding), and memory peaks at the start.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    for start in tqdm(range(0, len(order), cfg.batch_size), desc="generate", unit="batch"):
        idx = order[start : start + cfg.batch_size]
        width = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(idx):
            input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        stopping = StoppingCriteriaList(
            [NewlineAfterText(tokenizer)] if cfg.stop_at_newline else []
        )
        if cfg.stop_at_blank_line and not cfg.stop_at_newline:
            stopping.append(BlankLineAfterText(tokenizer, width))
        with torch.inference_mode():
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=cfg.max_new_tokens,
                num_beams=cfg.num_beams,
                do_sample=cfg.do_sample,
                temperature=cfg.temperature if cfg.do_sample else None,
                top_p=cfg.top_p if cfg.do_sample else None,
                top_k=None,
                repetition_penalty=cfg.repetition_penalty,
                no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                eos_token_id=stop_token_ids,
                pad_token_id=pad,
                stopping_criteria=stopping,
            )
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        for row, i in enumerate(idx):
            out[i] = clean(texts[row], cfg.stop_at_newline, cfg.stop_at_blank_line)
    return out
