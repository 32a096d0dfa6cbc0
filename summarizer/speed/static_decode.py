"""Greedy decoding with a static KV cache, one decode step replayed as a CUDA graph (~20x plain
batched `generate` on a GPU), its sampling sibling for MBR's candidates, and the per-token table
of the newline stop rule it shares with `generate`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, StaticLayer

from summarizer import compat, errors

log = logging.getLogger(__name__)


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


STATIC_ATTENTION = ("sdpa", "eager")  # the attentions greedy_static builds masks for


@dataclass(frozen=True)
class Sampling:
    """How `sample_static` draws: each prompt `repeat` times, the first copy greedy when
    `greedy_first`; the filters are transformers' (TemperatureLogitsWarper, TopPLogitsWarper,
    EpsilonLogitsWarper, in generate's order)."""

    repeat: int
    temperature: float = 1.0
    top_p: float = 1.0
    epsilon: float = 0.0
    greedy_first: bool = False
    seed: int = 0


def filtered_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The next-token distribution after temperature, top-p and epsilon, in float32."""
    scores = logits.float() / s.temperature
    if s.top_p < 1:
        ascending, order = torch.sort(scores, descending=False)
        remove = ascending.softmax(-1).cumsum(-1) <= 1 - s.top_p
        remove[..., -1:] = False  # the most likely token always stays
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    if s.epsilon > 0:
        top = scores.max(-1, keepdim=True).values
        remove = (scores.softmax(-1) < s.epsilon) & (scores < top)
        scores = scores.masked_fill(remove, -float("inf"))
    return scores.softmax(-1)


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
    return _decode(
        model, input_ids, attention_mask, max_new_tokens, stop_token_ids, pad_token_id, kinds,
        cuda_graph, check_every, None,
    )  # fmt: skip


def sample_static(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stop_token_ids: list[int],
    pad_token_id: int,
    sampling: Sampling,
    kinds: torch.Tensor | None = None,
    cuda_graph: bool | None = None,
    check_every: int = 8,
) -> torch.Tensor:
    """`greedy_static`'s decoding with sampled tokens: each prompt's row is prefilled once and its
    KV cache copied `sampling.repeat` times, so row i * repeat + k of the result is prompt i's
    k-th candidate, [batch * repeat, max_new_tokens]. A token is the argmax of probs / E with
    E ~ Exp(1) drawn per token (the exponential race: a draw from probs); E comes from a
    torch.Generator seeded with `sampling.seed`, filled before each step outside the captured
    graph (which then replays the same tensors), so a seed gives the same candidates."""
    return _decode(
        model, input_ids, attention_mask, max_new_tokens, stop_token_ids, pad_token_id, kinds,
        cuda_graph, check_every, sampling,
    )  # fmt: skip


def _decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stop_token_ids: list[int],
    pad_token_id: int,
    kinds: torch.Tensor | None,
    cuda_graph: bool | None,
    check_every: int,
    sampling: Sampling | None,
) -> torch.Tensor:
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

    impl = compat.attention_implementation(model)
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
    prompts = batch
    repeat = sampling.repeat if sampling else 1
    batch = prompts * repeat
    seen_text = torch.zeros(batch, dtype=torch.bool, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    generator = noise = greedy = None
    if sampling:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
        # per row: keeps the argmax (the greedy candidate) instead of sampling
        greedy = torch.zeros(batch, dtype=torch.bool, device=device)
        if sampling.greedy_first:
            greedy[::repeat] = True

    def refill() -> None:
        """Fresh exponential draws for the next token, outside any captured graph."""
        if sampling:
            noise.exponential_(generator=generator).clamp_(min=torch.finfo(noise.dtype).tiny)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        if sampling is None:
            return logits.argmax(-1)
        drawn = (filtered_probs(logits, sampling) / noise).argmax(-1)
        return torch.where(greedy, logits.argmax(-1), drawn)

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
    valid = torch.zeros(prompts, length, dtype=torch.bool, device=device)
    valid[:, :width] = attention_mask.bool()
    index = torch.arange(width, device=device)
    causal = (index[None, :] <= index[:, None])[None] & valid[:, None, :width]
    causal |= torch.eye(width, dtype=torch.bool, device=device)[None]
    allowed = torch.zeros(prompts, width, length, dtype=torch.bool, device=device)
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
    if repeat > 1:  # each prompt's prefilled cache and state, `repeat` times over
        copies = torch.arange(prompts, device=device).repeat_interleave(repeat)
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, copies)
            layer.values = layer.values.index_select(0, copies)
            layer.batch_size = batch
        logits, valid, positions = (t.index_select(0, copies) for t in (logits, valid, positions))
    if sampling:
        noise = torch.empty(logits.shape, dtype=torch.float32, device=device)
        refill()
    token = choose(logits)
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
        nxt = torch.where(done, pad_token_id, choose(logits))
        # out[:, at - width + 1] = nxt, as a fixed-shape update
        out.copy_(torch.where(col[None, :] == at - width + 1, nxt[:, None], out))
        finish(nxt)
        tok.copy_(nxt[:, None])
        pos.add_(1)
        at.add_(1)

    def drop_finished() -> None:
        """Early exit of finished rows: their tokens go to `result`, the state (KV cache included)
        keeps the others, so later steps compute only rows still writing."""
        nonlocal tok, pos, valid, done, seen_text, out, rows, noise, greedy
        keep = (~done).nonzero().squeeze(1)
        result[rows] = out
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, keep)
            layer.values = layer.values.index_select(0, keep)
            layer.batch_size = len(keep)
        tok, pos, valid, done, seen_text, out, rows = (
            t.index_select(0, keep) for t in (tok, pos, valid, done, seen_text, out, rows)
        )
        if sampling:
            noise, greedy = noise.index_select(0, keep), greedy.index_select(0, keep)

    def capture():
        """The step as a CUDA graph over the current state (after two real warm-up steps, as CUDA
        asks), or the step itself. Returns (run, steps taken while preparing)."""
        if not cuda_graph or max_new_tokens - 1 - taken <= 3:
            return step, 0
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                refill()
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
        refill()
        run()
        taken += 1
    result[rows] = out
    return result
