"""train.cuda_graph: static packed rows (same loss as the dynamic ones) and the graph-replayed step."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from summarizer import graph_step
from summarizer.config import LoraConfig, TrainConfig
from summarizer.errors import UserError
from summarizer.model import add_lora
from summarizer.packing import collate_packed, pack_bfd
from summarizer.prompt import IGNORE_INDEX
from summarizer.train import completion_loss, use_cuda_graph


def _rows(lengths, seed=0, vocab=(4, 1000)):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n_prompt, n_completion in lengths:
        ids = torch.randint(*vocab, (n_prompt + n_completion,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    return rows


def _bins(rows, budget):
    return [[rows[i] for i in b] for b in pack_bfd([len(r["input_ids"]) for r in rows], budget)]


def _fresh_tiny(cache_dir):
    """(base model, tokenizer): a new tiny model each time (fit trains it in place)."""
    from summarizer.config import ModelConfig, QuantConfig
    from summarizer.model import build_model

    return build_model(
        ModelConfig(name="tiny", source="tiny", dtype="float32"), QuantConfig(), cache_dir
    )


def _lora(base):
    return add_lora(base, LoraConfig(dropout=0.0), gradient_checkpointing=False)


def test_every_bin_becomes_a_row_of_the_one_static_shape():
    rnd = torch.Generator().manual_seed(3)
    lengths = [(int(p), int(c)) for p, c in torch.randint(1, 60, (80, 2), generator=rnd)]
    rows = _rows(lengths)
    bins = _bins(rows, 256)
    shape = graph_step.plan(bins, 256, max_length=128, multiple=16)
    assert shape.width % 16 == 0 and shape.supervised % 16 == 0
    for b in bins:
        batch = graph_step.collate_static(b, 0, shape)
        cu = batch["cu_seq_lens_q"].tolist()
        assert batch["input_ids"].shape == batch["position_ids"].shape == (1, shape.width)
        assert len(cu) == shape.sequences + 1 and cu[-1] == shape.width
        sizes = [hi - lo for lo, hi in itertools.pairwise(cu)]
        assert sizes[: len(b)] == [len(r["input_ids"]) for r in b]  # the examples, in order
        assert all(1 <= n <= shape.max_length for n in sizes)  # no empty or overlong sequence
        positions = batch["position_ids"][0].tolist()
        assert positions == [i for n in sizes for i in range(n)]
        assert batch["num_tokens"] == sum(len(r["input_ids"]) for r in b)
        where, targets = batch[graph_step.POSITIONS], batch[graph_step.TARGETS]
        assert where.shape == targets.shape == (shape.supervised,)
        real = targets != IGNORE_INDEX
        # the dynamic packed row's targets, at the same positions
        dynamic = collate_packed(b, 0)["labels"][0]
        expect = (dynamic[1:] != IGNORE_INDEX).nonzero().squeeze(1)
        assert torch.equal(where[real], expect) and torch.equal(targets[real], dynamic[expect + 1])
        assert int(real.sum()) == int((batch["labels"] != IGNORE_INDEX).sum())


def test_any_batch_fits_the_shape_planned_from_the_longest_rows():
    """train.pack_tokens=0: the sampler's batches are unknown before training, so the shape is
    planned for the worst batch (the longest rows, the most targets), and every batch fits it."""
    rnd = torch.Generator().manual_seed(4)
    lengths = [(int(p), int(c)) for p, c in torch.randint(1, 90, (40, 2), generator=rnd)]
    rows = _rows(lengths, seed=4)
    shape = graph_step.plan_batches(rows, 4, max_length=128, multiple=16)
    longest = sorted(rows, key=lambda r: -len(r["input_ids"]))[:4]
    most = sorted(rows, key=lambda r: -sum(t != IGNORE_INDEX for t in r["labels"][1:]))[:4]
    for batch in [longest, most] + [rows[i : i + 4] for i in range(0, 40, 4)]:
        b = graph_step.collate_static(batch, 0, shape)
        assert b["input_ids"].shape == (1, shape.width)
        assert b["num_tokens"] == sum(len(r["input_ids"]) for r in batch)


def test_a_bin_larger_than_the_plan_is_refused():
    rows = _rows([(10, 5), (10, 5)])
    shape = graph_step.plan([rows[:1]], 16, max_length=16, multiple=1)
    with pytest.raises(ValueError, match="does not fit"):
        graph_step.collate_static(rows, 0, shape)


def test_static_row_loss_equals_the_dynamic_packed_loss(tiny):
    """Same examples, same loss: the fill is its own masked-out sequences, the padded loss
    positions have no target (attention per example from the restarting position ids on CPU)."""
    model, _ = tiny
    rows = _rows([(30, 5), (12, 9), (20, 1), (7, 4)], seed=1)
    shape = graph_step.plan([rows], 96, max_length=40, multiple=8)
    assert shape.supervised > 19  # some positions are padding
    with torch.no_grad():
        dynamic, _ = completion_loss(model, collate_packed(rows, 0))
        static, out = completion_loss(model, graph_step.collate_static(rows, 0, shape))
        scaled, _ = completion_loss(model, graph_step.collate_static(rows, 0, shape), 38)
    assert out.logits.shape[1] == shape.supervised
    assert static.item() == pytest.approx(dynamic.item(), rel=1e-5)
    assert scaled.item() == pytest.approx(dynamic.item() * 19 / 38, rel=1e-5)


def test_cuda_graph_choice(monkeypatch):
    assert not use_cuda_graph(TrainConfig())  # off unless asked
    packed = dict(packing=True, gradient_checkpointing=False, precision="bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not use_cuda_graph(TrainConfig(cuda_graph="auto", **packed))
    with pytest.raises(UserError, match="train.cuda_graph=true needs a CUDA GPU"):
        use_cuda_graph(TrainConfig(cuda_graph="true", **packed))
    with pytest.raises(UserError, match="train.cuda_graph='always': expected auto, true or false"):
        use_cuda_graph(TrainConfig(cuda_graph="always"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert use_cuda_graph(TrainConfig(cuda_graph="auto", **packed))
    assert use_cuda_graph(TrainConfig(cuda_graph="true", **packed))
    assert use_cuda_graph(TrainConfig(cuda_graph="auto", pack_tokens=0, **packed))  # any batch
    for change, need in [
        ({"packing": False}, "train.packing=true"),
        ({"gradient_checkpointing": True}, "train.gradient_checkpointing=false"),
        ({"compile": True}, "train.compile=false"),
        ({"lora_dropout_recompute": True}, "train.lora_dropout_recompute=false"),
        ({"fused_lm_head": "true"}, "train.fused_lm_head=auto or false"),
        ({"precision": "fp16"}, "train.precision bf16 or fp32"),
    ]:
        cfg = {**packed, **change}
        assert not use_cuda_graph(TrainConfig(cuda_graph="auto", **cfg)), change
        with pytest.raises(UserError, match=f"train.cuda_graph=true needs {need}"):
            use_cuda_graph(TrainConfig(cuda_graph="true", **cfg))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="needs one process"):
        use_cuda_graph(TrainConfig(cuda_graph="true", **packed))


@pytest.mark.gpu
def test_graph_replays_the_eager_steps(tiny):
    """Forward + backward replayed as a CUDA graph give the eager step's loss and gradients, step
    after step with new rows and new weights, and gradients add up over accumulated rows (varlen
    kernel, bf16 autocast spanning the capture as the Trainer's does)."""
    from summarizer.packing import attention

    lm = _lora(copy.deepcopy(tiny[0])).cuda()
    rows = _rows([(n - 9, 9) for n in (40, 64, 33, 57, 48, 61, 29, 52, 44, 38)], seed=2)
    bins = _bins(rows, 128)
    shape = graph_step.plan(bins, 128, max_length=64)
    batches = [
        {
            k: v.cuda() if torch.is_tensor(v) else v
            for k, v in graph_step.collate_static(b, 0, shape).items()
        }
        for b in bins
    ]
    params = [p for p in lm.parameters() if p.requires_grad]
    step = graph_step.GraphStep()
    gen = torch.Generator("cuda").manual_seed(0)

    def bf16():
        return torch.autocast("cuda", torch.bfloat16)

    with attention(lm, True):
        for i in range(0, len(batches) - 1, 2):  # two rows per optimizer step
            pair, n = batches[i : i + 2], 100
            for p in params:
                p.grad = None
            eager = []
            for b in pair:
                with bf16():
                    loss = graph_step.static_loss(lm, b, n)[0]
                loss.backward()
                eager.append(loss.item())
            del loss  # a live eager autograd graph would tie the capture to the default stream
            want = [p.grad.clone() for p in params]
            for p in params:
                p.grad = None  # as the Trainer's zero_grad leaves them
            with bf16():  # one context over capture and replays, as in the Trainer
                graphed = [step(lm, b, torch.tensor(n, device="cuda")) for b in pair]
            for e, g in zip(eager, graphed):
                assert g.item() == pytest.approx(e, rel=1e-3)
            for p, w in zip(params, want):
                torch.testing.assert_close(p.grad, w, rtol=1e-2, atol=1e-5)
            with torch.no_grad():  # new weights (lora_B leaves zero): the graph must see them
                for p in params:
                    p.add_(torch.randn(p.shape, device="cuda", generator=gen), alpha=0.05)
    assert step.graph is not None


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("pack_tokens", [None, 0])
def test_fit_with_the_cuda_graph_trains_as_eager(tmp_path, cache_dir, pack_tokens):
    """train.cuda_graph=true through the Trainer (its optimizer, clipping, schedule): the same
    steps and losses as train.cuda_graph=false, and generation works afterwards."""
    from summarizer.train import fit

    rows = _rows([(n - 8, 8) for n in (40, 64, 33, 57, 48, 61, 29, 52, 44, 38, 50, 35)], 3)
    figures = {}
    for graphed in ("false", "true"):
        base, tok = _fresh_tiny(cache_dir)
        lm = _lora(base).cuda()
        cfg = TrainConfig(
            max_steps=4,
            batch_size=2,
            max_length=64,
            grad_accum=2,
            eval_strategy="no",
            save_steps=100,
            logging_steps=1,
            packing=True,
            pack_tokens=pack_tokens,  # 0: the sampler's batches of 2, each packed
            gradient_checkpointing=False,
            optim="adamw_torch_fused",
            cuda_graph=graphed,
            warmup_ratio=0.0,
            lr=5e-3,  # the LoRA weights move enough that a graph blind to them would show
        )
        figures[graphed] = fit(cfg, lm, tok, rows, [], tmp_path / graphed)
        # the graph's fixed gradients are let go (and with them its memory pool)
        assert all(p.grad is None for p in lm.parameters() if p.requires_grad)
        ids = torch.tensor([rows[0]["input_ids"][:20]], device="cuda")
        assert lm.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape[1] == 23
    assert figures["true"]["train_steps"] == figures["false"]["train_steps"] == 4
    assert figures["true"]["train_loss_avg"] == pytest.approx(
        figures["false"]["train_loss_avg"], rel=1e-3
    )


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["auto", "true"])
def test_a_step_that_cannot_be_captured_trains_eagerly_or_fails_clearly(
    tmp_path, cache_dir, monkeypatch, choice
):
    """auto: a model the graph cannot capture trains eagerly on the static rows, to the same loss
    as a run without the graph; true: a one-line error naming the cause (CPU: a stand-in graph)."""
    import summarizer.train as train_mod
    from summarizer.train import fit

    class Uncapturable:
        def __call__(self, model, batch, num_items):
            raise graph_step.CaptureError(
                "the training step cannot be captured as a CUDA graph: operation not permitted"
            )

        def close(self):
            raise AssertionError("a graph that was never captured has nothing to free")

    rows = _rows([(n - 8, 8) for n in (40, 64, 33, 57, 48, 61, 29, 52)], 5)
    losses = {}
    for graphed in (False, True):
        monkeypatch.setattr(train_mod, "use_cuda_graph", lambda cfg, on=graphed: on)
        monkeypatch.setattr(graph_step, "GraphStep", Uncapturable)
        base, tok = _fresh_tiny(cache_dir)
        lm = _lora(base)
        cfg = TrainConfig(
            max_steps=3, batch_size=2, max_length=64, grad_accum=1, eval_strategy="no",
            save_steps=100, packing=True, cuda_graph=choice, warmup_ratio=0.0,
        )  # fmt: skip
        if graphed and choice == "true":
            with pytest.raises(UserError, match="train.cuda_graph=true: the training step cannot"):
                fit(cfg, lm, tok, rows, [], tmp_path / "true")
            return
        figures = fit(cfg, lm, tok, rows, [], tmp_path / str(graphed))
        assert figures["train_steps"] == 3 and figures["train_tokens_per_second"] > 0
        losses[graphed] = figures["train_loss_avg"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.slow
def test_a_model_that_reads_values_on_the_host_falls_back_to_eager(tmp_path, cache_dir):
    """A real capture failure (the LM head reads a value on the host, as data-dependent models
    do): auto trains eagerly, true names the cause."""
    from summarizer.train import fit

    rows = _rows([(n - 8, 8) for n in (40, 64, 33, 57, 48, 61, 29, 52)], 6)
    for choice in ("auto", "true"):
        base, tok = _fresh_tiny(cache_dir)
        head = base.lm_head
        plain = head.forward

        def syncing(x, plain=plain):
            if not bool(torch.isfinite(x).all()):  # a host read: not allowed while capturing
                raise AssertionError("non-finite hidden states")
            return plain(x)

        head.forward = syncing
        lm = _lora(base).cuda()
        cfg = TrainConfig(
            max_steps=3, batch_size=2, max_length=64, grad_accum=1, eval_strategy="no",
            save_steps=100, packing=True, gradient_checkpointing=False,
            optim="adamw_torch_fused", cuda_graph=choice,
        )  # fmt: skip
        if choice == "true":
            with pytest.raises(UserError, match="cannot be captured as a CUDA graph"):
                fit(cfg, lm, tok, rows, [], tmp_path / choice)
        else:
            assert fit(cfg, lm, tok, rows, [], tmp_path / choice)["train_steps"] == 3
