"""A training step replayed as one CUDA graph (train.cuda_graph).

Why: with packing, varlen attention and Liger, a GPU step is short of GPU work and long on host
work: Python in bitsandbytes, peft and the kernel launchers, per layer (RESULTS.md: the GPU busy
0.34-0.53 of a step). Captured once, the forward and backward of a step are replayed by the driver
alone. A graph replays fixed shapes and fixed memory, so each packed row here has a static form:

- `plan`: from all bins before training, the row width W (the pack budget plus a small reserve),
  the number K of sequences per row, and the number S of supervised positions per row
  (`plan_batches` for train.pack_tokens=0: a few widths, the last for the worst batch of
  batch_size rows; `pick` gives a batch the narrowest it fits).
- `collate_static`: a bin -> exactly W tokens split into exactly K sequences (the examples, then
  the fill split into 1..max_length-token sequences of pad tokens, masked out of the loss), and the
  S positions whose next token is supervised (the rest point at position 0 with no target). Same
  loss as the dynamic packed row (`train._packed_loss`), with no `nonzero()` on the device.
- `GraphStep`: for each static shape, on its first row, warms the step up eagerly on a side
  stream and captures forward + backward into a graph whose gradients add into fixed `.grad`
  tensors; then copies each row into that graph's inputs and replays it. The optimizer, gradient
  clipping and the LR schedule stay the Trainer's.
- With gradient checkpointing (the memory-bounded path) the recompute runs inside the graph:
  torch's checkpoint rewinds the CUDA generator within a capture (torch 2.11, pytorch#162505; a
  torch without it fails the capture, and train.cuda_graph=auto then trains eagerly), so the
  recompute draws the forward's LoRA dropout masks. `static_loss(chunked=True)` runs the LM head in vocabulary tiles
  at the fixed loss positions (TRL's chunked log-prob kernel): no (positions x vocabulary) logits.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from summarizer import compat
from summarizer.prompt import IGNORE_INDEX
from summarizer.speed import packing

log = logging.getLogger(__name__)

POSITIONS = "loss_positions"  # (S,) positions t whose next token is a target
TARGETS = "loss_targets"  # (S,) the target of each, IGNORE_INDEX for the fill
INPUTS = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", POSITIONS, TARGETS)


@dataclass(frozen=True)
class Shape:
    width: int  # tokens per row
    sequences: int  # sequences per row (examples + fill)
    supervised: int  # loss positions per row
    max_length: int  # longest sequence (FlashAttention's max_seqlen)


def plan(bins: list[list[dict]], budget: int, max_length: int, multiple: int = 64) -> Shape:
    """One static shape that every bin (a packed row's examples) fits."""
    return _shape(
        rows=max((len(b) for b in bins), default=1),
        tokens=max([budget] + [sum(len(r["input_ids"]) for r in b) for b in bins]),
        supervised=max((_supervised(b) for b in bins), default=1),
        longest=max((len(r["input_ids"]) for b in bins for r in b), default=1),
        max_length=max_length,
        multiple=multiple,
    )


def plan_batches(
    rows: list[dict],
    batch_size: int,
    max_length: int,
    multiple: int = 64,
    quantiles: tuple[float, ...] = (0.5, 0.9, 0.99),
    samples: int = 2000,
) -> list[Shape]:
    """Static shapes, narrowest first, for any batch of `batch_size` rows (train.pack_tokens=0:
    the sampler's batches are not known in advance). The last fits the worst batch (the longest
    rows, the most targets); the others are cut at quantiles of the tokens of random batches, so
    a typical batch is padded to a little over its own size, not to the worst one's (each width
    is a graph of its own, captured when a batch first needs it)."""
    tokens = torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.long)
    supervised = torch.tensor([_supervised([r]) for r in rows], dtype=torch.long)
    lengths = tokens.sort(descending=True).values[:batch_size].tolist()
    targets = supervised.sort(descending=True).values[:batch_size].tolist()
    longest = max(lengths, default=1)
    size = min(batch_size, max(len(rows), 1))

    def shape(tokens: int, supervised: int) -> Shape:
        return _shape(size, tokens, supervised, longest, max_length, multiple)

    worst = shape(sum(lengths) or 1, sum(targets))
    if len(rows) <= batch_size:
        return [worst]
    gen = torch.Generator().manual_seed(0)
    picks = torch.stack([torch.randperm(len(rows), generator=gen)[:size] for _ in range(samples)])
    totals, counts = tokens[picks].sum(1), supervised[picks].sum(1)
    shapes = []
    for q in quantiles:
        cut = int(torch.quantile(totals.float(), q).ceil())
        shapes.append(shape(cut, int(counts[totals <= cut].max())))
    return sorted(set(shapes + [worst]), key=lambda s: (s.width, s.supervised))


def pick(shapes: list[Shape], rows: list[dict]) -> Shape:
    """The narrowest shape `rows` fit."""
    for shape in shapes:
        if _fits(shape, rows):
            return shape
    real = sum(len(r["input_ids"]) for r in rows)
    raise ValueError(f"a batch of {len(rows)} rows, {real} tokens fits none of {shapes}")


def _fits(shape: Shape, rows: list[dict]) -> bool:
    """Whether `rows` fit one row of `shape`: their tokens plus at least one fill sequence (of one
    token or more) in its width, and their targets in its loss positions."""
    pieces = shape.sequences - len(rows)
    real = sum(len(r["input_ids"]) for r in rows)
    return pieces >= 1 and real + pieces <= shape.width and _supervised(rows) <= shape.supervised


def _shape(rows, tokens, supervised, longest, max_length, multiple) -> Shape:
    """K sequences of at most max_length tokens in W tokens: the fill (W - real tokens >= K - rows)
    gives each padding sequence at least one token."""
    max_length = max(max_length, longest)
    sequences = rows + math.ceil(tokens / max_length) + 1
    while True:  # W holds a token per sequence beyond the tokens; K covers W's fill in pieces
        width = -(-(tokens + sequences) // multiple) * multiple
        need = rows + math.ceil(width / max_length) + 1
        if need <= sequences:
            break
        sequences = need
    supervised = -(-max(supervised, 1) // multiple) * multiple
    return Shape(width, sequences, supervised, max_length)


def _supervised(rows: list[dict]) -> int:
    # the first token of each example has no target in a packed row (collate_packed)
    return sum(sum(1 for t in r["labels"][1:] if t != IGNORE_INDEX) for r in rows)


def collate_static(rows: list[dict], pad_token_id: int, shape: Shape) -> dict:
    """`rows` packed into one row of exactly shape.width tokens and shape.sequences sequences."""
    real = sum(len(r["input_ids"]) for r in rows)
    if not _fits(shape, rows):
        raise ValueError(f"a bin of {len(rows)} rows, {real} tokens does not fit {shape}")
    fill, pieces = shape.width - real, shape.sequences - len(rows)
    sizes = [fill // pieces + (1 if i < fill % pieces else 0) for i in range(pieces)]
    batch = packing.collate_packed(rows, pad_token_id, fill=sizes)
    labels = batch["labels"]
    where = (labels[0, 1:] != IGNORE_INDEX).nonzero().squeeze(1)
    extra = shape.supervised - len(where)
    batch[POSITIONS] = torch.cat([where, torch.zeros(extra, dtype=torch.long)])
    batch[TARGETS] = torch.cat([labels[0, where + 1], torch.full((extra,), IGNORE_INDEX)])
    # the Trainer counts targets from "labels" (num_items_in_batch); the kernel's max_seqlen is
    # the plan's, the same every step
    batch["max_length_q"] = batch["max_length_k"] = shape.max_length
    return batch


class CaptureError(RuntimeError):
    """The step could not be captured (an op that syncs with the host or changes shape)."""


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static: dict  # the inputs it reads: each batch is copied in
    loss: torch.Tensor  # the loss it writes


def _key(batch: dict) -> tuple[int, int, int]:
    """Which static shape a collated row has (width, sequences, loss positions)."""
    return (
        batch["input_ids"].shape[1],
        batch["cu_seq_lens_q"].shape[0] - 1,
        batch[POSITIONS].shape[0],
    )


class GraphStep:
    """Forward + backward of `static_loss` as a CUDA graph per static shape (one for packed bins;
    a few widths for pack_tokens=0), adding into fixed gradient tensors. Call it where the Trainer
    calls its forward + backward; it returns the (detached) loss. The graphs share one memory pool
    (they never run at once), so the widest one captured sets the memory."""

    def __init__(self, loss, warmup: int = 2):
        # loss(model, batch, num_items) -> (loss, outputs): the training loss on a static row
        # (train.loss.static_loss), passed in so that every loss variant stays in one module
        self.loss = loss
        self.warmup = warmup  # eager steps before the first capture; later shapes take one
        self.graphs: dict[tuple[int, int, int], _Captured] = {}
        self.pool = None  # the first graph's memory pool, shared by the others
        self.count: torch.Tensor | None = None  # num_items, a device scalar
        self.params: list[torch.nn.Parameter] = []
        self.grads: list[torch.Tensor] = []
        self.capture_seconds: list[float] = []  # each capture's warm-up + capture, in order

    def __call__(self, model, batch: dict, num_items: torch.Tensor | int) -> torch.Tensor:
        """One forward + backward; num_items: the loss's divisor (targets of the optimizer step)."""
        captured = self.graphs.get(_key(batch)) or self._capture(model, batch)
        for key, value in captured.static.items():
            value.copy_(batch[key], non_blocking=True)
        self.count.fill_(num_items)
        if any(p.grad is not g for p, g in zip(self.params, self.grads)):
            # the optimizer step set the grads to None (zero_grad): a new step starts from zero
            for p, g in zip(self.params, self.grads):
                p.grad = g
            compat.zero_(self.grads)
        captured.graph.replay()
        return captured.loss.clone()

    def close(self, keep_grads: bool = False) -> None:
        """Free the graphs, their memory pool and (unless keep_grads: training goes on eagerly,
        mid-accumulation) the fixed gradients; generation needs the room."""
        if not keep_grads:
            for p, g in zip(self.params, self.grads):
                if p.grad is g:
                    p.grad = None
        for captured in self.graphs.values():
            captured.graph.reset()
        self.graphs, self.pool, self.params, self.grads = {}, None, [], []

    def _capture(self, model, batch: dict) -> _Captured:
        """Warm up and capture the step for this batch's shape (on its first row of that shape).
        Each costs a few eager steps (seconds on a 4B model): logged, and counted in
        capture_seconds, so that a short run's tokens/s can be told apart from the steady rate."""
        start = time.perf_counter()
        key, first = _key(batch), not self.graphs
        if first:
            self.params = [p for p in model.parameters() if p.requires_grad]
            self.count = torch.ones((), device=batch["input_ids"].device)
        static = {k: batch[k].clone() for k in INPUTS}
        inputs = {**static, "max_length_q": batch["max_length_q"]}
        inputs["max_length_k"] = batch["max_length_k"]

        def step():
            loss = self.loss(model, inputs, self.count)[0]
            loss.backward()
            return loss

        # Warm-up on a side stream (lazy initialisation, Triton autotuning for this shape, cuBLAS
        # workspaces), as torch.cuda.graph asks; its gradients are thrown away, and the fixed
        # ones (mid-accumulation when a later shape is captured) are left as they are. A later
        # shape needs one pass (its own autotuning and plans): the lazy initialisation is done.
        held = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup if first else 1):
                    step()
        except RuntimeError as err:  # OOM (the graphs' pool holds memory) or an op the warm-up hit
            torch.cuda.current_stream().wait_stream(side)
            for p, h in zip(self.params, held):  # this optimizer step's gradients, as they were
                p.grad = h
            self.close(keep_grads=True)
            torch.cuda.empty_cache()
            raise CaptureError(
                f"the warm-up before capturing the training step failed: {_cause(err)}"
            ) from err
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.empty_cache()  # the warm-up's blocks: the graphs have a memory pool of their own
        if not self.grads:  # fixed .grad tensors: the captured backwards add into them
            self.grads = [torch.zeros_like(p) for p in self.params]
        # Captured with the fixed .grad tensors in place, or the graph's backward would make .grad
        # tensors of its own (the case for a shape first seen after zero_grad set them to None).
        # Their values are this optimizer step's so far, or zero at its start.
        new_step = any(h is not g for h, g in zip(held, self.grads))
        for p, g in zip(self.params, self.grads):
            p.grad = g
        if new_step:
            compat.zero_(self.grads)
        # Autocast caches its casts of the fp32 LoRA weights until the outermost autocast exits;
        # the Trainer's context spans the warm-up and the capture, so the graph would reuse the
        # warm-up's bf16 copies and never see the weights change: drop them, cast inside the graph.
        torch.clear_autocast_cache()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the DataLoader's pin-memory thread may call CUDA while this captures
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                # detached: a live autograd graph would keep the captured AccumulateGrad nodes,
                # and later eager backwards (evaluation, other code) would sync with the capture
                loss = step().detach()
        except RuntimeError as err:  # e.g. a model whose forward reads a value on the host
            self.close(keep_grads=True)
            torch.cuda.empty_cache()
            raise CaptureError(
                f"the training step cannot be captured as a CUDA graph: {_cause(err)}"
            ) from err
        if self.pool is None:
            self.pool = graph.pool()
        captured = self.graphs[key] = _Captured(graph, static, loss)
        torch.cuda.synchronize()  # the warm-up's work is in the time
        self.capture_seconds.append(time.perf_counter() - start)
        log.info(
            "train.cuda_graph: captured the step for rows of %d tokens, %d sequences, %d loss "
            "positions in %.1f s (graph %d)",
            *key,
            self.capture_seconds[-1],
            len(self.graphs),
        )
        return captured


def _cause(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
