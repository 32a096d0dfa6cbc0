"""Padding-free training batches: several examples packed into one row, attention kept inside each.

Why: a padded batch spends compute on padding, and on a GPU every new padded shape costs a fresh
attention plan (~4 ms of CPU per cuDNN call measured, GPU busy ~27 % of a step). A packed row carries
only real tokens; position ids restart at each example (RoPE sees each example from 0) and
`cu_seq_lens` (cumulative lengths, as in FlashAttention) tell the attention kernel where examples end.

- `pack_bfd`: best-fit-decreasing bins of at most `budget` tokens (TRL's `packing_strategy="bfd"`;
  TRL's `pack_dataset` concatenates dataset columns, where we need the bins' example indices: the
  CUDA-graph planner sizes its static rows from them).
- `collate_packed`: a bin -> one row + position ids + cu_seq_lens, by TRL's padding-free collator;
  the row's length is rounded up to `multiple` (a few fixed shapes instead of one per step, so
  kernels and compiled graphs are reused). With `fill` (the CUDA graph's static rows) the tail is
  split into masked-out sequences of given lengths, which TRL's collator cannot do.
- `varlen_attention`: registered with transformers as `summarizer_varlen`, it runs
  `torch.nn.attention.varlen.varlen_attn` (FlashAttention's varlen kernel inside PyTorch, no extra
  package) on CUDA. Without CUDA (tests, CPU runs) packed rows go through sdpa, which transformers
  masks per example from the restarting position ids: same numbers, slower.
"""

from __future__ import annotations

import bisect
import contextlib
import inspect

import torch

from summarizer import compat
from summarizer.prompt import IGNORE_INDEX

ATTENTION = "summarizer_varlen"


def pack_bfd(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `budget` tokens, best fit decreasing.
    A row longer than the budget gets a bin of its own (it was already cut to train.max_length)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted: best fit = first that fits
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            if budget - n > 0:
                bisect.insort(free, (budget - n, len(bins) - 1))
    return bins


def collate_packed(
    rows: list[dict], pad_token_id: int, multiple: int = 1, fill: list[int] | None = None
) -> dict:
    """Concatenate `rows` (each with input_ids and labels) into one row of shape (1, L), the first
    label of each example dropped (the loss never crosses an example border).
    fill: the lengths of the masked-out pad sequences after the examples (default: the tail up to
    the next multiple of `multiple`, each pad token a sequence of its own, as TRL pads)."""
    if fill is None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        collator = DataCollatorForLanguageModeling(
            pad_token_id=pad_token_id, padding_free=True, pad_to_multiple_of=multiple
        )
        batch = collator([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
        batch.pop("seq_idx")  # for linear-attention layers, which no supported model has
        batch["num_tokens"] = sum(len(r["input_ids"]) for r in rows)  # real tokens, for tokens/s
        return batch
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    bounds = [0]
    for r in rows:
        n = len(r["input_ids"])
        ids += r["input_ids"]
        # The first token of each example predicts nothing from the previous one: the label of
        # position t is the target for position t-1, so the loss never crosses an example border.
        labels += [IGNORE_INDEX] + list(r["labels"][1:])
        positions += range(n)
        bounds.append(bounds[-1] + n)
    for extra in fill:
        ids += [pad_token_id] * extra
        labels += [IGNORE_INDEX] * extra
        positions += range(extra)
        bounds.append(bounds[-1] + extra)
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = int(cu.diff().max())
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
        "num_tokens": bounds[len(rows)],  # real (non-fill) tokens, for tokens/s
    }


def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@contextlib.contextmanager
def attention(model, packed: bool):
    """Train packed rows with the varlen kernel where there is one; put the model's own attention
    back afterwards (generation with a KV cache needs it)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = compat.attention_implementation(inner)
    use = packed and varlen_available()
    if use:
        register()
        inner.set_attn_implementation(ATTENTION)
    try:
        yield use
    finally:
        if use:
            inner.set_attn_implementation(before)


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, varlen_attention)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """transformers attention function: (1, H, L, D) tensors of a packed row -> (1, L, H, D)."""
    from torch.nn.attention.varlen import varlen_attn

    cu = kw.get("cu_seq_lens_q")
    if cu is None:
        raise RuntimeError(f"{ATTENTION} attention needs cu_seq_lens_q (a packed batch)")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (L, H, D)
    if kw.get("softcap"):
        raise RuntimeError(f"{ATTENTION} attention has no logit softcap: train this model unpacked")
    extra = {}
    params = _varlen_params()
    window = kw.get("sliding_window")  # e.g. Gemma 3's local layers: the last N tokens, itself too
    if "window_size" in params:
        extra["window_size"] = (window - 1 if window else -1, 0)  # (left, right=0): causal
    elif window:
        raise RuntimeError(f"{ATTENTION}: this torch has no sliding windows: train unpacked")
    else:
        extra["is_causal"] = True
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    # The kernel takes half precision only; autocast does not reach custom ops, and a kbit-prepared
    # model keeps its norms in fp32: use autocast's dtype (or bf16) as sdpa would run under it.
    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        on = torch.is_autocast_enabled(q.device.type)
        dtype = torch.get_autocast_dtype(q.device.type) if on else torch.bfloat16
    q, k, v = (t.to(dtype) for t in (q, k, v))
    cu = cu.to(q.device, torch.int32)
    m = int(kw["max_length_q"])
    out = varlen_attn(q, k, v, cu, cu, m, m, scale=scaling, **extra)
    if not torch.is_autocast_enabled(query.device.type):
        out = out.to(query.dtype)
    return out.unsqueeze(0), None


_PARAMS: set[str] = set()


def _varlen_params() -> set[str]:
    if not _PARAMS:
        from torch.nn.attention.varlen import varlen_attn

        _PARAMS.update(inspect.signature(varlen_attn).parameters)
    return _PARAMS
