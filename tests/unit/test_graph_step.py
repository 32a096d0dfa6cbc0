"""train.cuda_graph: static packed rows (same loss as the dynamic ones) and the graph-replayed step."""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch

from summarizer.config import LoraConfig, TrainConfig
from summarizer.errors import UserError
from summarizer.model import add_lora
from summarizer.prompt import IGNORE_INDEX
from summarizer.speed import graph_step
from summarizer.speed.packing import collate_packed, pack_bfd
from summarizer.speed.switches import use_cuda_graph
from summarizer.train import loss as loss_mod
from summarizer.train.loss import completion_loss
from tests.unit.test_train import _rows  # random (prompt, completion) rows


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


def test_any_batch_fits_one_of_the_widths_planned_for_pack_tokens_0():
    """train.pack_tokens=0: the sampler's batches are unknown before training, so a few shapes
    are planned: the widest for the worst batch (the longest rows, the most targets), narrower
    ones at quantiles of random batches. Every batch fits one; `pick` gives it the narrowest it
    fits, so a typical batch is padded to little more than its own tokens."""
    rnd = torch.Generator().manual_seed(4)
    lengths = [(int(p), int(c)) for p, c in torch.randint(1, 90, (200, 2), generator=rnd)]
    rows = _rows(lengths, seed=4)
    shapes = graph_step.plan_batches(rows, 4, max_length=128, multiple=16)
    assert len(shapes) >= 3 and shapes == sorted(shapes, key=lambda s: s.width)
    longest = sorted(rows, key=lambda r: -len(r["input_ids"]))[:4]
    most = sorted(rows, key=lambda r: -sum(t != IGNORE_INDEX for t in r["labels"][1:]))[:4]
    assert graph_step.pick(shapes, longest) == shapes[-1]
    padded, real = 0, 0
    for batch in [longest, most] + [rows[i : i + 4] for i in range(0, 200, 4)] + [rows[:1]]:
        shape = graph_step.pick(shapes, batch)
        b = graph_step.collate_static(batch, 0, shape)
        assert b["input_ids"].shape == (1, shape.width)
        assert b["num_tokens"] == sum(len(r["input_ids"]) for r in batch)
        narrower = [s for s in shapes if s.width < shape.width]
        for s in narrower:  # the narrowest that fits: each narrower one is refused
            with pytest.raises(ValueError, match="does not fit"):
                graph_step.collate_static(batch, 0, s)
        padded, real = padded + shape.width, real + b["num_tokens"]
    worst = shapes[-1].width * 53
    assert padded < 0.7 * worst  # one worst-batch width for all would pad far more
    assert len(graph_step.plan_batches(rows[:3], 4, max_length=128)) == 1  # one batch: one shape


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


@pytest.mark.parametrize("chunk", [32768, 100])
def test_the_chunked_head_gives_the_static_rows_loss_and_gradients(tiny, monkeypatch, chunk):
    """static_loss(chunked=True): TRL's tiled log-probabilities at the fixed positions (the fill's
    positions weigh nothing) give the full-logits loss and the same LoRA gradients, in one tile or
    several."""
    monkeypatch.setattr(loss_mod, "CHUNK", chunk)
    lm = _lora(copy.deepcopy(tiny[0]))
    rows = _rows([(30, 5), (12, 9), (20, 1), (7, 4)], seed=7)
    shape = graph_step.plan([rows], 96, max_length=40, multiple=8)
    batch = graph_step.collate_static(rows, 0, shape)
    assert int((batch[graph_step.TARGETS] == IGNORE_INDEX).sum()) > 0  # padded positions
    params = [p for p in lm.parameters() if p.requires_grad]
    with torch.no_grad():  # lora_B starts at zero: move it so the LoRA gradients all differ
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)), alpha=0.1)
    grads, losses = {}, {}
    for chunked in (False, True):
        for p in params:
            p.grad = None
        loss, out = loss_mod.static_loss(lm, batch, 50, chunked=chunked)
        loss.backward()
        losses[chunked], grads[chunked] = loss.item(), [p.grad.clone() for p in params]
    assert out.logits is None  # no logits are made
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


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
    # the memory-bounded path: checkpointing (graph-safe RNG) and the chunked head at static rows
    lean = {**packed, "gradient_checkpointing": True, "fused_lm_head": "true"}
    assert use_cuda_graph(TrainConfig(cuda_graph="true", **lean))
    for change, need in [
        ({"packing": False}, "train.packing=true"),
        ({"compile": True}, "train.compile=false"),
        ({"lora_dropout_recompute": True}, "train.lora_dropout_recompute=false"),
        ({"precision": "fp16"}, "train.precision bf16 or fp32"),
    ]:
        cfg = {**packed, **change}
        assert not use_cuda_graph(TrainConfig(cuda_graph="auto", **cfg)), change
        with pytest.raises(UserError, match=f"train.cuda_graph=true needs {need}"):
            use_cuda_graph(TrainConfig(cuda_graph="true", **cfg))
    with pytest.raises(UserError, match="needs one process"):
        use_cuda_graph(TrainConfig(cuda_graph="true", **packed), world_size=2)


@pytest.mark.gpu
@pytest.mark.parametrize("lean", [False, True], ids=["plain", "checkpointed-chunked"])
def test_graph_replays_the_eager_steps(tiny, lean):
    """Forward + backward replayed as CUDA graphs give the eager step's loss and gradients, step
    after step with new rows and new weights, and gradients add up over accumulated rows, also
    when a row of a new width is captured mid-accumulation (varlen kernel, bf16 autocast spanning
    the capture as the Trainer's does). lean: with gradient checkpointing (recompute inside the
    graph) and the chunked LM head, against torch's eager checkpoint."""
    from summarizer.speed.packing import attention

    lm = _lora(copy.deepcopy(tiny[0])).cuda()
    if lean:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.train()  # checkpointing applies in training mode (LoRA dropout is 0 here)
    lengths = (40, 64, 33, 57, 48, 61, 29, 52, 44, 38, 20, 24, 62, 60, 30, 50)
    rows = _rows([(n - 9, 9) for n in lengths], seed=2)
    shapes = graph_step.plan_batches(rows, 2, max_length=64, multiple=16)  # pack_tokens=0
    # two batches (of 2 rows) per optimizer step: widths A A | B B | A C | B A, so the graph of B
    # is captured at a step's start (after zero_grad) and C's mid-accumulation
    order = [(0, 2), (0, 4), (0, 1), (0, 3), (0, 6), (1, 12), (0, 5), (0, 7)]
    pairs = [[rows[i], rows[j]] for i, j in order]
    widths = [graph_step.pick(shapes, b) for b in pairs]
    a, b, c = widths[0], widths[2], widths[5]
    assert widths == [a, a, b, b, a, c, b, a] and len({a, b, c}) == 3
    batches = [
        {
            k: v.cuda() if torch.is_tensor(v) else v
            for k, v in graph_step.collate_static(b, 0, shape).items()
        }
        for b, shape in zip(pairs, widths)
    ]
    params = [p for p in lm.parameters() if p.requires_grad]
    step = graph_step.GraphStep(functools.partial(loss_mod.static_loss, chunked=lean))
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
                    loss = loss_mod.static_loss(lm, b, n, chunked=lean)[0]
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
    assert len(step.graphs) == len(set(widths))  # one graph per width, sharing one pool
    step.close()


@pytest.mark.gpu
def test_checkpointed_dropout_draws_the_same_masks_in_the_recompute_of_a_graph():
    """The graph relies on torch's checkpoint (as HF layers call it) rewinding the CUDA generator
    inside a capture: the recompute in the backward draws the forward's dropout mask, and each
    replay draws a new one. y = sum(4 m2 m1 x) over two checkpointed layers, w1 = w2 = 1: dy/dw1
    and dy/dw2, computed from the recomputed masks, equal y only if the masks match."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    class Layer(GradientCheckpointingLayer):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones((), device="cuda"))

        def forward(self, x):
            return torch.nn.functional.dropout(x, 0.5, training=True) * self.w

    model = torch.nn.Sequential(Layer(), Layer())
    for layer in model:  # what gradient_checkpointing_enable sets (TrainConfig's kwargs)
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
    x = torch.rand(4096, device="cuda") + 0.5

    def step():
        loss = model(x).sum()
        loss.backward()
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up, as GraphStep does
    torch.cuda.current_stream().wait_stream(side)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    seen = []
    for _ in range(3):
        for p in model.parameters():
            p.grad.zero_()
        graph.replay()
        for layer in model:
            assert layer.w.grad.item() == pytest.approx(loss.item(), rel=1e-5)
        seen.append(loss.item())
    assert len(set(seen)) == 3  # a new mask every replay


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("pack_tokens,checkpointing", [(None, False), (0, False), (None, True)])
def test_fit_with_the_cuda_graph_trains_as_eager(tmp_path, cache_dir, pack_tokens, checkpointing):
    """train.cuda_graph=true through the Trainer (its optimizer, clipping, schedule): the same
    steps and losses as train.cuda_graph=false, and generation works afterwards. checkpointing:
    the memory-bounded path (recompute in the graph, the chunked LM head: fused_lm_head=auto)."""
    from summarizer.train.fit import fit

    rows = _rows([(n - 8, 8) for n in (40, 64, 33, 57, 48, 61, 29, 52, 44, 38, 50, 35)], 3)
    figures = {}
    for graphed in ("false", "true"):
        base, tok = _fresh_tiny(cache_dir)
        lm = _lora(base).cuda()
        cfg = TrainConfig(
            max_steps=6,
            batch_size=2,
            max_length=64,
            grad_accum=1,  # each batch its own step: a new width often starts one
            eval_strategy="no",
            save_steps=100,
            logging_steps=1,
            packing=True,
            pack_tokens=pack_tokens,  # 0: the sampler's batches of 2, each packed
            pack_multiple=16,  # several widths (graphs) for pack_tokens=0
            gradient_checkpointing=checkpointing,
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
    assert figures["true"]["train_steps"] == figures["false"]["train_steps"] == 6
    # each graph's capture is timed (train_seconds holds it: a short run's rate is below steady)
    assert 0 < figures["true"]["train_graph_capture_seconds"] < figures["true"]["train_seconds"]
    assert figures["true"]["train_graph_captures"] >= (2 if pack_tokens == 0 else 1)
    assert "train_graph_captures" not in figures["false"]
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
    from summarizer.speed.switches import TrainPlan
    from summarizer.train.fit import fit

    class Uncapturable:
        def __init__(self, loss):  # as fit builds it
            pass

        def __call__(self, model, batch, num_items):
            raise graph_step.CaptureError(
                "the training step cannot be captured as a CUDA graph: operation not permitted"
            )

        def close(self):
            raise AssertionError("a graph that was never captured has nothing to free")

    rows = _rows([(n - 8, 8) for n in (40, 64, 33, 57, 48, 61, 29, 52)], 5)
    losses = {}
    for graphed in (False, True):
        # the plan says graph (as train_plan would on a GPU); the stand-in cannot capture
        plan = TrainPlan("fp32", "adamw_torch", False, False, graphed, choice == "true")
        monkeypatch.setattr(graph_step, "GraphStep", Uncapturable)
        base, tok = _fresh_tiny(cache_dir)
        lm = _lora(base)
        cfg = TrainConfig(
            max_steps=3, batch_size=2, max_length=64, grad_accum=1, eval_strategy="no",
            save_steps=100, packing=True, cuda_graph=choice, warmup_ratio=0.0,
        )  # fmt: skip
        if graphed and choice == "true":
            with pytest.raises(UserError, match="train.cuda_graph=true: the training step cannot"):
                fit(cfg, lm, tok, rows, [], tmp_path / "true", plan=plan)
            return
        figures = fit(cfg, lm, tok, rows, [], tmp_path / str(graphed), plan=plan)
        assert figures["train_steps"] == 3 and figures["train_tokens_per_second"] > 0
        losses[graphed] = figures["train_loss_avg"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.slow
def test_a_model_that_reads_values_on_the_host_falls_back_to_eager(tmp_path, cache_dir):
    """A real capture failure (the LM head reads a value on the host, as data-dependent models
    do): auto trains eagerly, true names the cause."""
    from summarizer.train.fit import fit

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


@pytest.mark.gpu
@pytest.mark.slow
def test_an_out_of_memory_in_the_warm_up_falls_back_to_eager(tmp_path, cache_dir, monkeypatch):
    """The warm-up before a capture runs out of memory (the graphs' pool holds some): auto trains
    on eagerly from the same gradients, to the loss of a run without the graph."""
    from summarizer.train.fit import fit

    real = graph_step.GraphStep

    class OomInWarmUp(real):
        def __init__(self, loss, warmup: int = 2):
            calls = itertools.count()

            def failing(model, batch, num_items):
                if next(calls) == 0:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                return loss(model, batch, num_items)

            super().__init__(failing, warmup)

    rows = _rows([(n - 8, 8) for n in (40, 64, 33, 57, 48, 61, 29, 52)], 6)
    losses = {}
    for choice in ("false", "auto"):
        monkeypatch.setattr(graph_step, "GraphStep", OomInWarmUp)
        base, tok = _fresh_tiny(cache_dir)
        lm = _lora(base).cuda()
        cfg = TrainConfig(
            max_steps=3, batch_size=2, max_length=64, grad_accum=1, eval_strategy="no",
            save_steps=100, packing=True, gradient_checkpointing=False, warmup_ratio=0.0,
            optim="adamw_torch_fused", cuda_graph=choice, seed=3,
        )  # fmt: skip
        figures = fit(cfg, lm, tok, rows, [], tmp_path / choice)
        assert figures["train_steps"] == 3
        losses[choice] = figures["train_loss_avg"]
    assert losses["auto"] == pytest.approx(losses["false"], rel=1e-4)
