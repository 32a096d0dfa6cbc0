"""Padding-free packing: bins, the packed row, and a loss equal to the padded batch's."""

from __future__ import annotations

import random

import pytest
import torch

from summarizer.prompt import IGNORE_INDEX
from summarizer.speed.packing import collate_packed, pack_bfd
from summarizer.train.loss import collate, completion_loss


def test_bfd_bins_respect_the_budget_and_keep_every_row():
    rnd = random.Random(0)
    lengths = [rnd.randint(1, 500) for _ in range(300)]
    bins = pack_bfd(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    # best fit decreasing is near the lower bound on the number of bins
    assert len(bins) <= -(-sum(lengths) // 1024) + 3


def test_bfd_gives_an_overlong_row_its_own_bin():
    assert pack_bfd([2000, 10, 20], 1024) == [[0], [2, 1]]


def test_packed_row_positions_restart_and_borders_are_unsupervised():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},  # fully supervised: its first label is dropped
    ]
    b = collate_packed(rows, pad_token_id=0, multiple=4)  # TRL's collator: each pad its own
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9] + [IGNORE_INDEX] * 3]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 7, 8]
    assert b["max_length_q"] == 3 and b["num_tokens"] == 5
    assert set(b) == {"input_ids", "labels", "position_ids", "num_tokens"} | {
        f"{k}_{s}" for k in ("cu_seq_lens", "max_length") for s in "qk"
    }
    # a static row (the CUDA graph's): the tail as fill sequences of given lengths
    s = collate_packed(rows, pad_token_id=0, fill=[2, 1])
    assert s["input_ids"].tolist() == b["input_ids"].tolist()
    assert s["labels"].tolist() == b["labels"].tolist()
    assert s["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0]]
    assert s["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 8] and s["num_tokens"] == 5


@pytest.mark.parametrize("multiple", [1, 16])
def test_packed_loss_equals_padded_loss(tiny, multiple):
    """Same examples, same mean over supervised tokens: packing changes the speed, not the loss
    (attention stays inside each example through the restarting position ids)."""
    model, _ = tiny
    torch.manual_seed(0)
    rows = []
    for n_prompt, n_completion in [(30, 5), (12, 9), (20, 1), (7, 4)]:
        ids = torch.randint(4, 1000, (n_prompt + n_completion,)).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    with torch.no_grad():
        padded, _ = completion_loss(model, collate(rows, pad_token_id=0))
        packed, out = completion_loss(model, collate_packed(rows, 0, multiple))
    assert out.logits.shape[1] == 5 + 9 + 1 + 4  # the head ran only where a label follows
    assert packed.item() == pytest.approx(padded.item(), rel=1e-5)


def test_varlen_attention_function_matches_sdpa(tiny, monkeypatch):
    """The `summarizer_varlen` attention function, fed by a reference varlen kernel (per-sequence
    causal sdpa; the real one is CUDA-only), gives the padded batch's loss: the reshapes, the
    heads and the causal window reach the kernel right."""
    import torch.nn.attention.varlen as varlen

    from summarizer.speed import packing

    def reference(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), **kw):
        assert window_size == (-1, 0), window_size
        assert kw.get("enable_gqa") or k.shape[1] == q.shape[1], (k.shape, q.shape, kw)
        out = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qq, kk, vv = (t[a:b].transpose(0, 1) for t in (q, k, v))
            o = torch.nn.functional.scaled_dot_product_attention(
                qq, kk, vv, is_causal=True, scale=scale, enable_gqa=True
            )
            out.append(o.transpose(0, 1))
        return torch.cat(out)

    monkeypatch.setattr(varlen, "varlen_attn", reference)
    model, _ = tiny
    torch.manual_seed(1)
    rows = []
    for n_prompt, n_completion in [(25, 6), (9, 3)]:
        ids = torch.randint(4, 1000, (n_prompt + n_completion,)).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    before = model.config._attn_implementation
    packing.register()
    try:
        model.set_attn_implementation(packing.ATTENTION)
        with torch.no_grad():
            packed, _ = completion_loss(model, collate_packed(rows, 0, 8))
    finally:
        model.set_attn_implementation(before)
    with torch.no_grad():
        padded, _ = completion_loss(model, collate(rows, pad_token_id=0))
    assert packed.item() == pytest.approx(padded.item(), rel=1e-5)
