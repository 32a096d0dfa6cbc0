"""Preflight: everything a run will need checked, and every `auto` switch resolved, before any
data or model is loaded — so a bad value fails in a second, not after hours of training.

`make(cfg)` returns the run's `Plan`, frozen; the pipeline hands its parts to the stages
(`fit(..., plan=plan.train)`, `summaries(..., plan=plan.generate)`), which only read it. Nothing
else decides a switch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from summarizer import distributed, metrics, model
from summarizer.errors import UserError
from summarizer.speed.switches import GeneratePlan, TrainPlan, generate_plan, train_plan


@dataclass(frozen=True)
class Plan:
    device: str  # cuda | cpu
    world_size: int  # processes training this run (distributed=ddp: one per GPU)
    train: TrainPlan | None  # None: stages.train=false
    generate: GeneratePlan


def make(cfg, world_size: int | None = None) -> Plan:
    """world_size: the processes that will train (default: this process's DDP world)."""
    model.check_device(cfg.model)  # a GPU-only preset on a machine without one
    metrics.check_task(cfg.task)  # a metric or objective the task cannot score
    metrics.resolve_tokenizer(cfg.metric.tokenizer, cfg.data.language)
    check_generate(cfg.generate)
    check_data(cfg.data, cfg.prompt)
    check_lora(cfg.lora)
    # the model's context, when known without loading it (else build_model checks it first thing)
    limit = model.context_length(cfg.model, cfg.cache_dir)
    model.check_max_length(cfg.train.max_length, limit, cfg.model.name)
    if cfg.stages.predict_test and not cfg.data.test_path:
        raise UserError("stages.predict_test=true needs data.test_path")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    world = world_size or distributed.world_size()
    attention = cfg.model.attn_implementation or "sdpa"  # what transformers loads by default
    return Plan(
        device=device.type,
        world_size=world,
        train=train_plan(cfg.train, world) if cfg.stages.train else None,
        generate=generate_plan(cfg.generate, cfg.quant, device, attention),
    )


def check_generate(cfg) -> None:
    """Generation settings that would otherwise fail only after training (the strategy's own:
    speed.switches.strategy, through generate_plan)."""
    for key in ("batch_size", "max_new_tokens", "num_beams"):
        if getattr(cfg, key) < 1:
            raise UserError(f"generate.{key}={getattr(cfg, key)}: expected a number >= 1")


def check_data(cfg, prompt) -> None:
    size = cfg.val_size
    if size < 0 or (size >= 1 and size != int(size)):
        raise UserError(
            f"data.val_size={size}: expected a fraction below 1 (0.2) or a whole number of rows (80)"
        )
    missing = [
        key for key in ("instruction", "input_label", "output_label")
        if cfg.language not in (prompt[key] or {})
    ]  # fmt: skip
    if missing:
        known = sorted(set(prompt.instruction or {}))
        raise UserError(
            f"data.language={cfg.language!r}: the prompt has texts for {', '.join(known)} only; "
            f"add them with " + " ".join(f"+prompt.{k}.{cfg.language}='...'" for k in missing)
        )


def check_lora(cfg) -> None:
    if cfg.r < 1:
        raise UserError(f"lora.r={cfg.r} must be a positive integer")
    if cfg.alpha <= 0:
        raise UserError(f"lora.alpha={cfg.alpha}: expected > 0 (e.g. 2 x lora.r)")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"lora.dropout={cfg.dropout}: expected 0 <= dropout < 1")
