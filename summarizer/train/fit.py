"""Fine-tune the LoRA model with TRL's SFTTrainer on pre-tokenized, completion-only examples."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path

from transformers import EarlyStoppingCallback

from summarizer import distributed
from summarizer.config import TrainConfig
from summarizer.errors import UserError
from summarizer.speed import graph_step, lean_lora, packing
from summarizer.speed.compile import compiled_layers
from summarizer.speed.switches import TrainPlan, train_plan
from summarizer.train import loss
from summarizer.train.callbacks import EvalRouge, StopOnNonFinite
from summarizer.train.checkpoints import _resume_state, resolve_checkpoint, verify_checkpoint
from summarizer.train.trainer import CompletionOnlyTrainer, _packs_bins, training_args

log = logging.getLogger(__name__)


def fit(
    cfg: TrainConfig,
    model,
    tokenizer,
    train_rows: list[dict],
    eval_rows: list[dict],
    output_dir: Path,
    callbacks: list | None = None,
    resume_from: str | Path | None = None,
    plan: TrainPlan | None = None,
) -> dict:
    """Train in place; returns loss and throughput figures. Checkpoints go to output_dir/checkpoints.
    `resume_from` (train.resume's checkpoint) wins over `cfg.resume_from`."""

    # the pipeline passes the run's plan; a caller outside it (a benchmark) gets one resolved here
    plan = plan or train_plan(cfg, distributed.world_size())
    args = training_args(cfg, output_dir / "checkpoints", plan)
    graphed = plan.cuda_graph
    binned, shapes = _packs_bins(cfg), []
    if binned:
        # One dataset item = one bin of examples packed into a row (batch size 1 bin per device).
        budget = cfg.pack_tokens or cfg.batch_size * cfg.max_length
        train_bins, eval_bins = _bins(train_rows, budget), _bins(eval_rows, budget)
        train_ds = _packed_dataset(train_bins)
        eval_ds = _packed_dataset(eval_bins) if eval_rows else None
        log.info(
            "packing: %d training rows into %d rows of <= %d tokens",
            len(train_rows),
            len(train_ds),
            budget,
        )
        if graphed:  # every row in one static shape, as the graph replays it
            bins = train_bins + eval_bins
            shapes = [graph_step.plan(bins, budget, cfg.max_length, cfg.pack_multiple)]
    else:
        train_ds = _dataset(train_rows)
        eval_ds = _dataset(eval_rows) if eval_rows else None
        if graphed:  # a few static shapes any batch fits (the sampler's batches are not known)
            most = max(cfg.batch_size, cfg.eval_batch_size if eval_rows else 0)
            rows = train_rows + eval_rows
            shapes = graph_step.plan_batches(rows, most, cfg.max_length, cfg.pack_multiple)
    if shapes:
        log.info("train.cuda_graph: rows of %s", ", ".join(map(str, shapes)))

    def collator(items):
        rows = [r for item in items for r in _unbin(item)] if binned else items
        if shapes:
            shape = graph_step.pick(shapes, rows)
            return graph_step.collate_static(rows, tokenizer.pad_token_id, shape)
        if cfg.packing:  # bins, or (pack_tokens=0) the padded path's batches, each into one row
            return packing.collate_packed(rows, tokenizer.pad_token_id, cfg.pack_multiple)
        return loss.collate(rows, tokenizer.pad_token_id)

    if args.eval_strategy != "no" and eval_ds is None:
        raise UserError("train.eval_strategy needs validation rows (data.val_size > 0)")
    extra = list(callbacks or []) + [StopOnNonFinite()]
    if args.load_best_model_at_end:
        extra.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = CompletionOnlyTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=extra,
    )
    trainer.fused_lm_head = plan.fused_lm_head
    trainer.graph_step = (
        graph_step.GraphStep(functools.partial(loss.static_loss, chunked=trainer.fused_lm_head))
        if graphed
        else None
    )
    trainer.graph_required = plan.cuda_graph_required
    resume = str(resume_from) if resume_from else None  # checked by last_good_checkpoint
    if not resume and cfg.resume_from:
        resume = resolve_checkpoint(cfg.resume_from)
        verify_checkpoint(resume, "train.resume_from")
    start_step, loss_sum = 0, None
    if resume:
        start_step, loss_sum = _resume_state(Path(resume))
        trainer.loss_before = loss_sum or 0.0
        log.info("resuming from %s (step %d)", resume, start_step)
    start = time.perf_counter()
    # while the Trainer runs (its evaluations included); each is undone on the way out, and while
    # EvalRouge generates mid-training
    modes = _TrainModes(model, cfg)
    rouge = [cb for cb in extra if isinstance(cb, EvalRouge)]
    for cb in rouge:
        cb.pause = modes.paused
    with modes:
        result = trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - start
        eval_loss = _final_eval_loss(trainer, eval_ds) if eval_ds is not None else None
    captures = []  # each graph's warm-up + capture: seconds inside train_seconds
    if trainer.graph_step is not None:
        captures = trainer.graph_step.capture_seconds
        trainer.graph_step.close()
    # Mixed precision: accelerate wrapped model.forward in autocast; unwrap it so generation runs
    # in the model's own dtype, as `predict` later does (a static KV cache also needs one dtype).
    trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    loss_avg = float(result.training_loss)  # HF's: over the steps of this call only
    if loss_sum is not None and result.global_step:
        ran = result.global_step - start_step
        loss_avg = (loss_sum + loss_avg * ran) / result.global_step
    tokens = distributed.all_sum(trainer.tokens_seen)  # DDP: all ranks' tokens, the job's rate
    figures = {
        "train_loss_avg": loss_avg,
        "train_steps": int(result.global_step),
        "train_seconds": seconds,
        "train_tokens_per_second": tokens / seconds if seconds else 0.0,
    }
    if eval_loss is not None:
        figures["eval_loss"] = eval_loss
    # the epochs behind the weights kept (the best checkpoint's, when early stopping loaded it):
    # what a refit on all labelled rows trains for (sweep/refit.py)
    figures["train_epochs"] = float(trainer.state.epoch or 0.0)
    figures["kept_epoch"] = _kept_epoch(trainer)
    if rouge:  # inside train_seconds: what ROUGE during training cost this run
        figures["eval_rouge_seconds_total"] = sum(cb.seconds_total for cb in rouge)
    if captures:  # one-off costs: a short run's tokens/s is below the steady rate
        figures["train_graph_captures"] = len(captures)
        figures["train_graph_capture_seconds"] = sum(captures)
    return figures


class _TrainModes:
    """Training's own speed modes (packed attention, lean LoRA dropout, compiled layers) as one
    context; `paused()` leaves them for a while (generation needs the model's own attention and
    eager layers) and enters them again."""

    def __init__(self, model, cfg: TrainConfig):
        self.model, self.cfg, self.stack = model, cfg, None

    def __enter__(self):
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(packing.attention(self.model, self.cfg.packing))
        self.stack.enter_context(
            lean_lora.dropout_recompute(self.model, self.cfg.lora_dropout_recompute)
        )
        self.stack.enter_context(compiled_layers(self.model, self.cfg.compile))
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)

    @contextlib.contextmanager
    def paused(self):
        self.stack.close()
        try:
            yield
        finally:
            self.__enter__()


def _dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_dict({c: [r[c] for r in rows] for c in ("input_ids", "labels")})


def _bins(rows: list[dict], budget: int) -> list[list[dict]]:
    return [
        [rows[i] for i in b] for b in packing.pack_bfd([len(r["input_ids"]) for r in rows], budget)
    ]


def _packed_dataset(bins: list[list[dict]]):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": [[r["input_ids"] for r in b] for b in bins],
            "labels": [[r["labels"] for r in b] for b in bins],
        }
    )


def _unbin(item: dict) -> list[dict]:
    return [{"input_ids": i, "labels": lab} for i, lab in zip(item["input_ids"], item["labels"])]


def _kept_epoch(trainer) -> float:
    """The epoch of the weights training leaves: the best checkpoint's with load_best_model_at_end
    (its step's logged epoch), else where training ended."""
    state = trainer.state
    best = state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
    if best:
        step = int(str(best).rstrip("/").rsplit("-", 1)[-1])
        for entry in state.log_history:
            if entry.get("step") == step and "epoch" in entry:
                return float(entry["epoch"])
    return float(state.epoch or 0.0)


def _final_eval_loss(trainer, eval_ds) -> float:
    """Eval loss of the model as it leaves training, without a second pass when one just ran."""
    if trainer.args.load_best_model_at_end and trainer.state.best_metric is not None:
        return float(trainer.state.best_metric)
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    if evals and evals[-1].get("step") == trainer.state.global_step:
        return float(evals[-1]["eval_loss"])
    return float(trainer.evaluate(eval_ds)["eval_loss"])
