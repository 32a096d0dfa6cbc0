"""Batched summary generation: left padding, length-sorted batches, stop at the end of the summary.

generate.strategy picks the search (docs/decoding.md): greedy, beam, sample, or mbr, which samples
candidates per dialogue and keeps the one a `select` function (the pipeline's: summarizer.mbr)
picks, so that this module knows nothing of metrics.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from summarizer import compat
from summarizer.config import GenerateConfig
from summarizer.speed.static_decode import (
    NEWLINE,
    NL_AFTER_TEXT,
    TEXT,
    Sampling,
    _token_kinds,
    greedy_static,
    sample_static,
)
from summarizer.speed.switches import GeneratePlan, generate_plan

log = logging.getLogger(__name__)


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


def clean(text: str, stop_at_newline: bool, stop_at_blank_line: bool = False) -> str:
    text = text.strip()
    if stop_at_newline:
        text = text.split("\n", 1)[0].strip()
    elif stop_at_blank_line:
        text = _BLANK_LINE.split(text, maxsplit=1)[0].strip()
    return text


def repeated_ngram_share(n: int, tokenizer, references: list[str]) -> float:
    """The share of `references` that repeat an n-gram of tokens: the summaries that
    generate.no_repeat_ngram_size=n would forbid the model to write. Speaker tags count: Gemma
    writes ' #Person2#' as 4 tokens, so n <= 4 forbids naming a speaker twice."""
    if n <= 0 or not references:
        return 0.0
    repeating = 0
    for text in references:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
        repeating += len(grams) != len(set(grams))
    return repeating / len(references)


def ngram_block_warning(n: int, tokenizer, references: list[str], share: float = 0.1) -> str | None:
    """A one-line warning when generate.no_repeat_ngram_size=n forbids what `share` or more of
    the references write, None otherwise."""
    found = repeated_ngram_share(n, tokenizer, references)
    if found < share:
        return None
    return (
        f"generate.no_repeat_ngram_size={n}: {found:.0%} of the training summaries repeat a "
        f"{n}-gram of tokens (speaker tags are several tokens), which generation will not be "
        "allowed to write; 0 turns the block off"
    )


def summaries(
    cfg: GenerateConfig,
    model,
    tokenizer,
    prompts: list[list[int]],
    stop_token_ids: list[int],
    plan: GeneratePlan | None = None,
    select: Callable[[list[str]], int] | None = None,
) -> list[str]:
    """Generate one summary per tokenized prompt, returned in the input order. `plan`: the run's
    resolved switches (None: resolved here for this model, for a caller outside the pipeline).
    `select`: strategy=mbr's choice among one prompt's candidate summaries (their index)."""
    if cfg.batch_size <= 0 or cfg.max_new_tokens <= 0:
        raise ValueError("generate.batch_size and generate.max_new_tokens must be >= 1")
    model.eval()
    device = next(model.parameters()).device
    # Longest first: similar lengths share a batch (less padding), and memory peaks at the start.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    if plan is None:
        plan = generate_plan(cfg, None, device, compat.attention_implementation(model))
    mbr = plan.strategy == "mbr"
    if mbr and select is None:
        raise ValueError("generate.strategy=mbr needs a select function (summarizer.mbr)")
    per = cfg.mbr.candidates + cfg.mbr.include_greedy if mbr else 1  # texts per prompt
    static = plan.static
    # the newline rule's table of token kinds, on the device once for every batch
    kinds = _token_kinds(tokenizer).to(device) if static and cfg.stop_at_newline else None
    distinct = 0  # MBR: different candidates, summed over prompts
    for batch, start in enumerate(
        tqdm(range(0, len(order), cfg.batch_size), desc="generate", unit="batch")
    ):
        idx = order[start : start + cfg.batch_size]
        width = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(idx):
            input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        seed = cfg.seed + batch  # each batch its own draws, the same ones on every run
        with torch.inference_mode():
            if static and mbr:
                sampling = Sampling(
                    repeat=per,
                    temperature=cfg.mbr.temperature,
                    top_p=cfg.mbr.top_p,
                    epsilon=cfg.mbr.epsilon,
                    greedy_first=cfg.mbr.include_greedy,
                    seed=seed,
                )
                new = sample_static(
                    model, input_ids, mask, cfg.max_new_tokens, stop_token_ids, pad, sampling, kinds
                )
            elif static:
                new = greedy_static(
                    model, input_ids, mask, cfg.max_new_tokens, stop_token_ids, pad, kinds
                )
            else:
                new = _generate_strategy(
                    cfg, plan.strategy, model, tokenizer, input_ids, mask, stop_token_ids, seed
                )
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        texts = [clean(t, cfg.stop_at_newline, cfg.stop_at_blank_line) for t in texts]
        for row, i in enumerate(idx):
            candidates = texts[row * per : (row + 1) * per]
            out[i] = candidates[select(candidates)] if mbr else candidates[0]
            distinct += len(set(candidates))
    if mbr and prompts:
        log.info("mbr: %.1f distinct of %d candidates per dialogue", distinct / len(prompts), per)
    return out


def _generate_strategy(
    cfg: GenerateConfig, strategy: str, model, tokenizer, input_ids, mask, stop_token_ids, seed
) -> torch.Tensor:
    """The new tokens of `generate` for the strategy; under mbr, prompt i's candidates are rows
    i * per ... i * per + per - 1 (the greedy one first), as `sample_static` orders them."""
    greedy = {"num_beams": 1, "do_sample": False}
    if strategy == "greedy":
        return _generate(cfg, model, tokenizer, input_ids, mask, stop_token_ids, greedy)
    if strategy == "beam":
        search = {"num_beams": cfg.num_beams, "do_sample": cfg.do_sample}
        if cfg.do_sample:  # beam sampling (generate.strategy=auto with both keys)
            search.update(temperature=cfg.temperature, top_p=cfg.top_p)
    elif strategy == "sample":
        search = {"num_beams": 1, "do_sample": True, "temperature": cfg.temperature}
        search["top_p"] = cfg.top_p
    else:
        m = cfg.mbr
        search = {"num_beams": 1, "do_sample": True, "temperature": m.temperature, "top_p": m.top_p}
        search.update(epsilon_cutoff=m.epsilon or None, num_return_sequences=m.candidates)
    # generate draws from torch's global generator: seeded here, and left as it was after
    devices = [input_ids.device] if input_ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        new = _generate(cfg, model, tokenizer, input_ids, mask, stop_token_ids, search)
    if strategy != "mbr" or not cfg.mbr.include_greedy:
        return new
    first = _generate(cfg, model, tokenizer, input_ids, mask, stop_token_ids, greedy)
    n = cfg.mbr.candidates
    width = max(first.shape[1], new.shape[1])  # generate stops when its batch is done
    pad = tokenizer.pad_token_id
    first = torch.nn.functional.pad(first, (0, width - first.shape[1]), value=pad)
    new = torch.nn.functional.pad(new, (0, width - new.shape[1]), value=pad)
    rows = [t for i in range(len(first)) for t in (first[i : i + 1], new[i * n : (i + 1) * n])]
    return torch.cat(rows)


def _generate(
    cfg: GenerateConfig, model, tokenizer, input_ids, mask, stop_token_ids, search: dict
) -> torch.Tensor:
    """`generate` with the given search settings and the configured penalties and stop rules;
    returns the new tokens."""
    width = input_ids.shape[1]
    stopping = StoppingCriteriaList([NewlineAfterText(tokenizer)] if cfg.stop_at_newline else [])
    if cfg.stop_at_blank_line and not cfg.stop_at_newline:
        stopping.append(BlankLineAfterText(tokenizer, width))
    search = {"temperature": None, "top_p": None, **search}  # not the model's sampling defaults
    generated = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=cfg.max_new_tokens,
        top_k=None,
        repetition_penalty=cfg.repetition_penalty,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        eos_token_id=stop_token_ids,
        pad_token_id=tokenizer.pad_token_id,
        stopping_criteria=stopping,
        **search,
    )
    return generated[:, width:]
