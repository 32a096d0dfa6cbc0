"""A training step replayed as one CUDA graph (train.cuda_graph).

Why: with packing, varlen attention and Liger, a GPU step is short of GPU work and long on host
work: Python in bitsandbytes, peft and the kernel launchers, per layer (RESULTS.md: the GPU busy
0.34-0.53 of a step). Captured once, the forward and backward of a step are replayed by the driver
alone. A graph replays fixed shapes and fixed memory, so each packed row here has one static form:

- `plan`: from all bins before training, the row width W (the pack budget plus a small reserve),
  the number K of sequences per row, and the number S of supervised positions per row
  (`plan_batches` for train.pack_tokens=0: any batch of batch_size rows, from the longest rows).
- `collate_static`: a bin -> exactly W tokens split into exactly K sequences (the examples, then
  the fill split into 1..max_length-token sequences of pad tokens, masked out of the loss), and the
  S positions whose next token is supervised (the rest point at position 0 with no target). Same
  loss as the dynamic packed row (`train._packed_loss`), with no `nonzero()` on the device.
- `GraphStep`: warms the step up eagerly on a side stream, captures forward + backward into one
  graph whose gradients add into fixed `.grad` tensors, then copies each batch into the static
  inputs and replays. The optimizer, gradient clipping and the LR schedule stay the Trainer's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from summarizer import packing
from summarizer.prompt import IGNORE_INDEX

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


def plan_batches(rows: list[dict], batch_size: int, max_length: int, multiple: int = 64) -> Shape:
    """One static shape that any batch of `batch_size` rows fits (train.pack_tokens=0: the
    sampler's batches are not known in advance): the longest rows' tokens, the most targets."""
    lengths = sorted((len(r["input_ids"]) for r in rows), reverse=True)[:batch_size]
    targets = sorted((_supervised([r]) for r in rows), reverse=True)[:batch_size]
    return _shape(
        rows=min(batch_size, max(len(rows), 1)),
        tokens=sum(lengths) or 1,
        supervised=sum(targets),
        longest=max(lengths, default=1),
        max_length=max_length,
        multiple=multiple,
    )


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
    if real > shape.width - (shape.sequences - len(rows)) or len(rows) >= shape.sequences:
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


def static_loss(model, batch: dict, num_items: torch.Tensor | int | None):
    """(summed cross-entropy at the batch's fixed loss positions / num_items (default: its own
    count of targets), model outputs). Only tensor ops of fixed shapes: capturable."""
    outputs = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        cu_seq_lens_q=batch["cu_seq_lens_q"],
        cu_seq_lens_k=batch["cu_seq_lens_k"],
        max_length_q=batch["max_length_q"],
        max_length_k=batch["max_length_k"],
        use_cache=False,
        logits_to_keep=batch[POSITIONS],
    )
    targets = batch[TARGETS]
    loss = torch.nn.functional.cross_entropy(
        outputs.logits[0].float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = (targets != IGNORE_INDEX).sum() if num_items is None else num_items
    return loss / torch.as_tensor(count, device=loss.device).clamp(min=1), outputs


class CaptureError(RuntimeError):
    """The step could not be captured (an op that syncs with the host or changes shape)."""


class GraphStep:
    """Forward + backward of `static_loss` as one CUDA graph, adding into fixed gradient tensors.
    Call it where the Trainer calls its forward + backward; it returns the (detached) loss."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict = {}
        self.count: torch.Tensor | None = None  # num_items, a device scalar
        self.loss: torch.Tensor | None = None
        self.params: list[torch.nn.Parameter] = []
        self.grads: list[torch.Tensor] = []

    def __call__(self, model, batch: dict, num_items: torch.Tensor | int) -> torch.Tensor:
        """One forward + backward; num_items: the loss's divisor (targets of the optimizer step)."""
        if self.graph is None:
            self._capture(model, batch)
        for key, value in self.static.items():
            value.copy_(batch[key], non_blocking=True)
        self.count.fill_(num_items)
        if any(p.grad is not g for p, g in zip(self.params, self.grads)):
            # the optimizer step set the grads to None (zero_grad): a new step starts from zero
            for p, g in zip(self.params, self.grads):
                p.grad = g
            torch._foreach_zero_(self.grads)
        self.graph.replay()
        return self.loss.clone()

    def close(self) -> None:
        """Free the graph, its memory pool and the fixed gradients (generation needs the room)."""
        for p, g in zip(self.params, self.grads):
            if p.grad is g:
                p.grad = None
        if self.graph is not None:
            self.graph.reset()
        self.graph, self.static, self.loss, self.params, self.grads = None, {}, None, [], []

    def _capture(self, model, batch: dict) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.static = {k: batch[k].clone() for k in INPUTS}
        self.count = torch.ones((), device=self.static["input_ids"].device)
        inputs = {**self.static, "max_length_q": batch["max_length_q"]}
        inputs["max_length_k"] = batch["max_length_k"]

        def step():
            loss = static_loss(model, inputs, self.count)[0]
            loss.backward()
            return loss

        # Warm-up on a side stream (lazy initialisation, Triton autotuning, cuBLAS workspaces), as
        # torch.cuda.graph asks; its gradients are thrown away.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.empty_cache()  # the warm-up's blocks: the graph gets a memory pool of its own
        # Existing .grad tensors: the captured backward adds into them (gradient accumulation).
        self.grads = [torch.zeros_like(p) for p in self.params]
        for p, g in zip(self.params, self.grads):
            p.grad = g
        # Autocast caches its casts of the fp32 LoRA weights until the outermost autocast exits;
        # the Trainer's context spans the warm-up and the capture, so the graph would reuse the
        # warm-up's bf16 copies and never see the weights change: drop them, cast inside the graph.
        torch.clear_autocast_cache()
        self.graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the DataLoader's pin-memory thread may call CUDA while this captures
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                # detached: a live autograd graph would keep the captured AccumulateGrad nodes,
                # and later eager backwards (evaluation, other code) would sync with the capture
                self.loss = step().detach()
        except RuntimeError as err:  # e.g. a model whose forward reads a value on the host
            self.graph = None  # the failed capture has nothing to reset
            self.close()
            cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CaptureError(
                f"the training step cannot be captured as a CUDA graph: {cause}"
            ) from err
