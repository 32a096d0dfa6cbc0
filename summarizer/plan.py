"""Preflight: everything a run will need checked, and every `auto` switch resolved, before any
data or model is loaded — so a bad value fails in a second, not after hours of training.

`make(cfg)` returns the run's `Plan`, frozen; the pipeline hands its parts to the stages
(`fit(..., plan=plan.train)`, `summaries(..., plan=plan.generate)`), which only read it. Nothing
else decides a switch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from summarizer import data, distributed, metrics, model
from summarizer.config import RL_ALGORITHMS
from summarizer.errors import UserError
from summarizer.speed.switches import (
    GeneratePlan,
    TrainPlan,
    generate_plan,
    precision,
    train_plan,
)


@dataclass(frozen=True)
class Plan:
    device: str  # cuda | cpu
    world_size: int  # processes training this run (distributed=ddp: one per GPU)
    train: TrainPlan | None  # None: stages.train=false
    generate: GeneratePlan
    rl: RLPlan | None = None  # None: stages.rl=false


@dataclass(frozen=True)
class RLPlan:
    precision: str  # fp32 | bf16 | fp16: train.precision resolved, as for SFT
    optim: str  # the HF optimizer name (train.optim=auto: adamw_torch; RL steps are few)


def make(cfg, world_size: int | None = None) -> Plan:
    """world_size: the processes that will train (default: this process's DDP world)."""
    model.check_device(cfg.model)  # a GPU-only preset on a machine without one
    metrics.check_task(cfg.task)  # a metric or objective the task cannot score
    metrics.resolve_tokenizer(cfg.metric.tokenizer, cfg.data.language)
    check_generate(cfg.generate)
    check_data(cfg.data, cfg.prompt)
    check_no_validation(cfg)
    check_lora(cfg.lora)
    check_trial(cfg.trial, cfg.train)
    # the model's context, when known without loading it (else build_model checks it first thing)
    limit = model.context_length(cfg.model, cfg.cache_dir)
    model.check_max_length(cfg.train.max_length, limit, cfg.model.name)
    if cfg.stages.predict_test and not cfg.data.test_path:
        raise UserError("stages.predict_test=true needs data.test_path")
    world = world_size or distributed.world_size()
    rl = None
    if cfg.stages.rl:
        check_rl(cfg, world)
        optim = cfg.train.optim if cfg.train.optim != "auto" else "adamw_torch"
        rl = RLPlan(precision=precision(cfg.train), optim=optim)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    attention = cfg.model.attn_implementation or "sdpa"  # what transformers loads by default
    return Plan(
        device=device.type,
        world_size=world,
        train=train_plan(cfg.train, world) if cfg.stages.train else None,
        generate=generate_plan(cfg.generate, cfg.quant, device, attention),
        rl=rl,
    )


def check_rl(cfg, world_size: int) -> None:
    """stages.rl: the settings TRL would refuse after SFT, and a reward that has its references."""
    rl = cfg.rl
    if rl.algorithm not in RL_ALGORITHMS:
        raise UserError(f"rl.algorithm={rl.algorithm!r}: expected {' or '.join(RL_ALGORITHMS)}")
    if not cfg.stages.train and not cfg.adapter:
        raise UserError(
            "stages.rl=true with stages.train=false needs adapter=<a trained adapter folder> "
            "(RL continues a LoRA adapter; or set stages.train=true)"
        )
    if world_size > 1:
        raise UserError(
            f"stages.rl=true runs in one process; distributed.nproc={world_size}: use "
            "distributed=single"
        )
    if rl.num_generations < 2:
        raise UserError(
            f"rl.num_generations={rl.num_generations}: expected >= 2 (the advantage compares a "
            "prompt's completions with each other)"
        )
    for key in ("batch_size", "grad_accum", "max_new_tokens", "logging_steps", "save_steps"):
        if getattr(rl, key) < 1:
            raise UserError(f"rl.{key}={getattr(rl, key)}: expected a number >= 1")
    if rl.max_steps == 0 or rl.max_steps < -1:
        raise UserError(f"rl.max_steps={rl.max_steps}: expected -1 (rl.epochs) or >= 1")
    if rl.max_steps == -1 and rl.epochs <= 0:
        raise UserError(f"rl.epochs={rl.epochs}: expected > 0 (or rl.max_steps >= 1)")
    for key, ok, expected in (
        ("lr", rl.lr > 0, "> 0"),
        ("temperature", rl.temperature > 0, "> 0"),
        ("top_p", 0 < rl.top_p <= 1, "in (0, 1]"),
        ("beta", rl.beta >= 0, ">= 0 (0: no KL term)"),
    ):
        if not ok:
            raise UserError(f"rl.{key}={getattr(rl, key)}: expected {expected}")
    generation = rl.batch_size * world_size * rl.grad_accum
    if generation % rl.num_generations:
        raise UserError(
            f"rl.batch_size={rl.batch_size} x {world_size} process(es) x rl.grad_accum="
            f"{rl.grad_accum} = {generation} completions per generation round must be divisible by "
            f"rl.num_generations={rl.num_generations} (TRL samples whole groups)"
        )
    keys = [key for name in cfg.task.metrics for key in metrics.METRICS[name]]
    score = rl.reward.score or cfg.task.objective
    if score not in keys:
        raise UserError(
            f"rl.reward.score={score!r} is not a score of task.metrics={list(cfg.task.metrics)} "
            f"(they give {', '.join(keys)})"
        )
    if rl.reward.length_weight < 0 or rl.reward.length_target <= 0:
        raise UserError(
            f"rl.reward.length_weight={rl.reward.length_weight}, rl.reward.length_target="
            f"{rl.reward.length_target}: expected a weight >= 0 and a target ratio > 0"
        )
    columns = set().union(*(r.keys() for r in data.read_records(cfg.data.path)))
    if cfg.data.summary_column not in columns:
        raise UserError(
            f"stages.rl=true: {cfg.data.path} has no '{cfg.data.summary_column}' column "
            "(data.summary_column): the ROUGE reward needs each training row's reference"
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


def check_no_validation(cfg) -> None:
    """`data.val_size=0` trains on every labelled row: nothing is left to score or to evaluate
    the loss on (early stopping watches that loss too)."""
    if cfg.data.val_size != 0:
        return
    wrong = [
        f"{key}={value}" for key, value, ok in (
            ("stages.evaluate", str(cfg.stages.evaluate).lower(), not cfg.stages.evaluate),
            ("train.eval_strategy", cfg.train.eval_strategy, cfg.train.eval_strategy == "no"),
        ) if not ok
    ]  # fmt: skip
    if wrong:
        raise UserError(
            f"data.val_size=0 (no validation split: every labelled row trains) needs "
            f"stages.evaluate=false and train.eval_strategy=no (early stopping off with it); "
            f"got {', '.join(wrong)}"
        )


def check_lora(cfg) -> None:
    if cfg.r < 1:
        raise UserError(f"lora.r={cfg.r} must be a positive integer")
    if cfg.alpha_ratio is None and cfg.alpha <= 0:
        raise UserError(f"lora.alpha={cfg.alpha}: expected > 0 (e.g. 2 x lora.r)")
    model.lora_alpha(cfg)  # a ratio <= 0
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"lora.dropout={cfg.dropout}: expected 0 <= dropout < 1")


INTERMEDIATE = ("loss", "rouge")  # trial.intermediate: what each evaluation reports to the pruner
EVAL_ROUGE_STRATEGIES = ("greedy", "run")  # train.eval_rouge_strategy


def check_trial(trial, train) -> None:
    """What a trial reports and the pruner's budgets against the run's training (the pruner's own
    values are checked by sweep.pruners.check_pruner)."""
    if train.eval_rouge_rows < 0:
        raise UserError(f"train.eval_rouge_rows={train.eval_rouge_rows}: expected 0 (off) or rows")
    if train.eval_rouge_strategy not in EVAL_ROUGE_STRATEGIES:
        raise UserError(
            f"train.eval_rouge_strategy={train.eval_rouge_strategy!r}: expected greedy (the fast "
            "decoder) or run (generate.strategy)"
        )
    if trial.intermediate not in INTERMEDIATE:
        raise UserError(
            f"trial.intermediate={trial.intermediate!r}: expected {' or '.join(INTERMEDIATE)}"
        )
    if trial.intermediate == "rouge" and train.eval_rouge_rows < 1:
        raise UserError(
            "trial.intermediate=rouge reports ROUGE during training: set train.eval_rouge_rows "
            "(e.g. 64), or trial.intermediate=loss"
        )
    pruner = trial.pruner
    if pruner.name == "wilcoxon" and trial.intermediate != "rouge":
        raise UserError(
            "trial.pruner.name=wilcoxon pairs each ROUGE row with the best trial's: it needs "
            "trial.intermediate=rouge (and train.eval_rouge_rows)"
        )
    steps = train.max_steps  # the trial's training steps where known without the data (>0)
    if pruner.name in ("hyperband", "successive_halving") and 0 < steps < pruner.min_resource:
        raise UserError(
            f"trial.pruner.min_resource={pruner.min_resource} is more than the trial's "
            f"{steps} training steps (train.max_steps): no trial would ever be pruned"
        )
