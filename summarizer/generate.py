"""Batched summary generation: left padding, length-sorted batches, stop at the end of the summary."""

from __future__ import annotations

import logging
import re

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import Cache, StaticLayer

from summarizer import errors
from summarizer.config import GenerateConfig
from summarizer.errors import UserError

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


STATIC_ATTENTION = ("sdpa", "eager")  # the attentions greedy_static builds masks for


def use_static(cfg: GenerateConfig, device: torch.device, attention: str = "sdpa") -> bool:
    """Whether to decode with `greedy_static` (see GenerateConfig.static_decode)."""
    choice = str(cfg.static_decode).lower()
    if choice not in ("auto", "true", "false"):
        raise UserError(
            f"generate.static_decode={cfg.static_decode!r}: expected auto, true or false"
        )
    plain_greedy = (
        cfg.num_beams == 1
        and not cfg.do_sample
        and cfg.repetition_penalty == 1.0
        and cfg.no_repeat_ngram_size == 0
        and (cfg.stop_at_newline or not cfg.stop_at_blank_line)
    )
    if choice == "true" and not plain_greedy:
        raise UserError(
            "generate.static_decode=true does greedy decoding only: it needs num_beams=1, "
            "do_sample=false, repetition_penalty=1.0, no_repeat_ngram_size=0 and no "
            "stop_at_blank_line"
        )
    if choice == "true" and attention not in STATIC_ATTENTION:
        raise UserError(
            f"generate.static_decode=true needs model.attn_implementation sdpa or eager, "
            f"not {attention!r}"
        )
    if choice == "auto":
        return plain_greedy and device.type == "cuda" and attention in STATIC_ATTENTION
    return choice == "true"


def greedy_static(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stop_token_ids: list[int],
    pad_token_id: int,
    kinds: torch.Tensor | None = None,
    cuda_graph: bool | None = None,
    check_every: int = 8,
) -> torch.Tensor:
    """Greedy decoding of a left-padded batch, as `generate(do_sample=False)` does it, faster.

    `generate` spends most of a decode step on the host (cache bookkeeping, mask building, logits
    processors, a sync per step), so a small model's step costs the same at any batch size. Here
    the KV cache is static (one buffer per layer, batch x (prompt + new) positions) and one decode
    step (forward, argmax, stop rules, the next step's inputs) only updates tensors in place, so on
    CUDA it is captured once as a CUDA graph and replayed: a step costs its kernels, no Python.
    The host looks every `check_every` steps whether rows have stopped: when at most half the
    batch is still writing, the finished rows leave the batch (and its KV cache) and the graph is
    captured again for the smaller batch; when none is, decoding ends.
    Rows stop at a stop token or, with `kinds` (NewlineAfterText's table), at a newline after text;
    a stopped row gets pad tokens, as in `generate`. Returns the new tokens, [batch, max_new_tokens].
    """
    device = input_ids.device
    batch, width = input_ids.shape
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    length = width + max_new_tokens
    config = model.config.get_text_config(decoder=True)
    # Every layer keeps all positions; a sliding-window layer gets its window through its mask.
    cache = Cache(
        layers=[StaticLayer(max_cache_len=length) for _ in range(config.num_hidden_layers)]
    )
    types = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None) if "sliding_attention" in types else None

    impl = model.config._attn_implementation
    if impl not in STATIC_ATTENTION:
        raise ValueError(f"greedy_static: attention {impl!r} is not one of {STATIC_ATTENTION}")
    low = torch.finfo(model.dtype).min

    def as_mask(keep: torch.Tensor) -> torch.Tensor:
        # sdpa takes a boolean mask; eager attention adds the mask to the scores
        return keep if impl == "sdpa" else torch.where(keep, 0.0, low).to(model.dtype)

    def masks(allowed: torch.Tensor, query_index: torch.Tensor):
        """allowed: [batch, queries, length] keys each query may see; query_index: [queries]."""
        full = allowed[:, None]
        if not types - {"full_attention"}:
            return as_mask(full)  # a 4D mask goes to the attention as is
        out = {t: as_mask(full) for t in types}
        if window:
            keys = torch.arange(length, device=device)
            near = keys[None, :] > query_index[:, None] - window
            out["sliding_attention"] = as_mask(full & near[None, None])
        return out

    stop = torch.zeros(
        max(len(kinds) if kinds is not None else 0, config.vocab_size) + 1,
        dtype=torch.bool,
        device=device,
    )
    stop[torch.tensor(stop_token_ids, dtype=torch.long, device=device)] = True
    if kinds is not None:
        kinds = kinds.to(device)
    seen_text = torch.zeros(batch, dtype=torch.bool, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)

    def finish(token: torch.Tensor) -> None:
        """Mark the rows this new token ends (after it is written, as StoppingCriteria see it)."""
        ended = stop[token.clamp(max=len(stop) - 1)]
        if kinds is not None:
            kind = kinds[token.clamp(max=len(kinds) - 1)]
            ended |= (kind & NL_AFTER_TEXT != 0) | (seen_text & (kind & NEWLINE != 0))
            seen_text.logical_or_(kind & TEXT != 0)
        done.logical_or_(ended)

    # Prefill: cache positions 0..width-1. A pad query sees itself only (an all-masked row would
    # give NaNs that the next layer's keys would carry).
    valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
    valid[:, :width] = attention_mask.bool()
    index = torch.arange(width, device=device)
    causal = (index[None, :] <= index[:, None])[None] & valid[:, None, :width]
    causal |= torch.eye(width, dtype=torch.bool, device=device)[None]
    allowed = torch.zeros(batch, width, length, dtype=torch.bool, device=device)
    allowed[:, :, :width] = causal
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids,
        attention_mask=masks(allowed, index),
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    token = logits.argmax(-1)
    out[:, 0] = token
    finish(token)

    # Decode state, updated in place by `step` (so a captured graph replays on the same tensors).
    tok = token[:, None].clone()
    pos = positions[:, -1:] + 1
    at = torch.full((1,), width, dtype=torch.long, device=device)  # cache index of `tok`
    col = torch.arange(max_new_tokens, device=device)
    rows = torch.arange(batch, device=device)  # the input row each row of the state belongs to
    result = out.clone()

    def step() -> None:
        valid.index_fill_(1, at, True)
        logits = model(
            input_ids=tok,
            attention_mask=masks(valid[:, None, :], at),
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
        nxt = torch.where(done, pad_token_id, logits.argmax(-1))
        # out[:, at - width + 1] = nxt, as a fixed-shape update
        out.copy_(torch.where(col[None, :] == at - width + 1, nxt[:, None], out))
        finish(nxt)
        tok.copy_(nxt[:, None])
        pos.add_(1)
        at.add_(1)

    def drop_finished() -> None:
        """Early exit of finished rows: their tokens go to `result`, the state (KV cache included)
        keeps the others, so later steps compute only rows still writing."""
        nonlocal tok, pos, valid, done, seen_text, out, rows
        keep = (~done).nonzero().squeeze(1)
        result[rows] = out
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, keep)
            layer.values = layer.values.index_select(0, keep)
            layer.batch_size = len(keep)
        tok, pos, valid, done, seen_text, out, rows = (
            t.index_select(0, keep) for t in (tok, pos, valid, done, seen_text, out, rows)
        )

    def capture():
        """The step as a CUDA graph over the current state (after two real warm-up steps, as CUDA
        asks), or the step itself. Returns (run, steps taken while preparing)."""
        if not cuda_graph or max_new_tokens - 1 - taken <= 3:
            return step, 0
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                step()  # recorded, not run: the state is untouched if the capture fails
            return graph.replay, 2
        except RuntimeError as e:  # a model whose forward syncs with the host cannot be captured
            log.warning(
                "generate: no CUDA graph for %s (%s); decoding step by step",
                type(model).__name__,
                errors.first_line(e),
            )
            return step, 2

    taken, run = 0, None  # decode steps taken (token 0 came from the prefill)
    while taken < max_new_tokens - 1:
        if taken % check_every == 0:
            active = int((~done).sum())  # the one host sync, every check_every steps
            if active == 0:
                break
            if active <= len(rows) // 2 and max_new_tokens - 1 - taken > check_every:
                drop_finished()
                run = None  # the graph holds the old tensors: capture again
        if run is None:
            run, warm = capture()
            taken += warm
            continue
        run()
        taken += 1
    result[rows] = out
    return result


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
    static = use_static(cfg, device, model.config._attn_implementation)
    # the newline rule's table of token kinds, on the device once for every batch
    kinds = _token_kinds(tokenizer).to(device) if static and cfg.stop_at_newline else None
    for start in tqdm(range(0, len(order), cfg.batch_size), desc="generate", unit="batch"):
        idx = order[start : start + cfg.batch_size]
        width = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(idx):
            input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        with torch.inference_mode():
            if static:
                new = greedy_static(
                    model, input_ids, mask, cfg.max_new_tokens, stop_token_ids, pad, kinds
                )
            else:
                new = _generate(cfg, model, tokenizer, input_ids, mask, stop_token_ids)
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for row, i in enumerate(idx):
            out[i] = clean(texts[row], cfg.stop_at_newline, cfg.stop_at_blank_line)
    return out


def _generate(
    cfg: GenerateConfig, model, tokenizer, input_ids, mask, stop_token_ids
) -> torch.Tensor:
    """`generate` with the configured search and stop rules; returns the new tokens."""
    width = input_ids.shape[1]
    stopping = StoppingCriteriaList([NewlineAfterText(tokenizer)] if cfg.stop_at_newline else [])
    if cfg.stop_at_blank_line and not cfg.stop_at_newline:
        stopping.append(BlankLineAfterText(tokenizer, width))
    generated = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=cfg.max_new_tokens,
        num_beams=cfg.num_beams,
        do_sample=cfg.do_sample,
        temperature=cfg.temperature if cfg.do_sample else None,
        top_p=cfg.top_p if cfg.do_sample else None,
        top_k=None,
        repetition_penalty=cfg.repetition_penalty,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        eos_token_id=stop_token_ids,
        pad_token_id=tokenizer.pad_token_id,
        stopping_criteria=stopping,
    )
    return generated[:, width:]
