"""Batched summary generation: left padding, length-sorted batches, stop at the end of the summary."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from summarizer.config import GenerateConfig


class NewlineAfterText(StoppingCriteria):
    """Stop a row once it has written some text and then a newline (summaries are one line).

    Base models often start with a newline after 'Summary:', so a plain newline stop would end at once.
    """

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        new = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_width :], skip_special_tokens=True
        )
        done = ["\n" in text.lstrip() for text in new]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def clean(text: str, stop_at_newline: bool) -> str:
    text = text.strip()
    if stop_at_newline:
        text = text.split("\n", 1)[0].strip()
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
            [NewlineAfterText(tokenizer, width)] if cfg.stop_at_newline else []
        )
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
            out[i] = clean(texts[row], cfg.stop_at_newline)
    return out
