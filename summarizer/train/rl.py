"""stages.rl: reinforcement learning of the run's LoRA adapter with TRL's GRPOTrainer or RLOOTrainer,
rewarded by the run's own ROUGE of each sampled summary (plus an optional length term).

The prompts are the pipeline's generation prompts, as token ids (TRL would tokenize a text again,
doubling a BOS the prompt already has); completions stop where generation stops (the stop tokens,
and the first newline after some text, or an empty line for lists), so the policy is trained on
exactly the tokens that the summary it is rewarded for came from.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from summarizer import compat, generate, metrics
from summarizer.config import RLConfig, TaskConfig
from summarizer.errors import UserError
from summarizer.files import write_atomic
from summarizer.speed.static_decode import NEWLINE, NL_AFTER_TEXT, TEXT, _token_kinds
from summarizer.train.checkpoints import write_manifest
from summarizer.train.resume import RL_CHECKPOINTS

log = logging.getLogger(__name__)

CHECKPOINTS = RL_CHECKPOINTS  # in the run folder, next to SFT's `checkpoints`
METRICS_FILE = "rl_metrics.json"
# TRL's log keys -> MLflow names (logged by step, with the SFT stage's callback)
NAMES = {
    "loss": "rl_loss",
    "learning_rate": "rl_lr",
    "grad_norm": "rl_grad_norm",
    "reward": "rl_reward",
    "reward_std": "rl_reward_std",
    "kl": "rl_kl",
    "entropy": "rl_entropy",
    "frac_reward_zero_std": "rl_frac_reward_zero_std",
    "completions/mean_length": "rl_completion_tokens",
    "rl_score": "rl_score",  # the reward's ROUGE part, before its weight
    "rl_length_ratio": "rl_length_ratio",  # candidate / reference length in metric tokens
}


@dataclass(frozen=True)
class Stops:
    """Where a completion ends, as the pipeline's generation ends it."""

    token_ids: tuple[int, ...]  # the stop token and EOS
    at_newline: bool  # generate.stop_at_newline
    at_blank_line: bool  # generate.stop_at_blank_line


def rouge_reward(
    task: TaskConfig,
    cfg: RLConfig,
    metric_tokenizer: str,
    keep_special_tokens: bool,
    stops: Stops,
) -> Callable[..., list[float]]:
    """A TRL reward function: rouge_weight x the row's `score` (task.objective by default) of the
    completion cut as generation cuts it, against the row's `summary`, minus length_weight x
    |len(candidate) / len(reference) - length_target| (metric tokens)."""
    key = cfg.reward.score or task.objective

    def rouge(prompts, completions, summary, log_metric=None, **_) -> list[float]:
        texts = [generate.clean(c, stops.at_newline, stops.at_blank_line) for c in completions]
        rows = metrics.score_rows(task, texts, list(summary), metric_tokenizer, keep_special_tokens)
        scores = [row[key] for row in rows]
        rewards = [cfg.reward.rouge_weight * s for s in scores]
        if log_metric:
            log_metric("rl_score", sum(scores) / len(scores))
        if cfg.reward.length_weight:
            ratios = [
                metrics.token_count(t, metric_tokenizer, keep_special_tokens)
                / max(1, metrics.token_count(r, metric_tokenizer, keep_special_tokens))
                for t, r in zip(texts, summary)
            ]
            target = cfg.reward.length_target
            rewards = [
                r - cfg.reward.length_weight * abs(q - target) for r, q in zip(rewards, ratios)
            ]
            if log_metric:
                log_metric("rl_length_ratio", sum(ratios) / len(ratios))
        return rewards

    return rouge


def cut_completion(ids: list[int], kinds: torch.Tensor, stops: Stops, tokenizer) -> int:
    """How many of `ids` generation would have kept: up to and including the token that ends the
    summary (generate.NewlineAfterText / BlankLineAfterText), else all of them."""
    if stops.at_newline:
        seen_text = False
        for i, token in enumerate(ids):
            kind = int(kinds[min(token, len(kinds) - 1)])
            if kind & NL_AFTER_TEXT or (seen_text and kind & NEWLINE):
                return i + 1
            seen_text |= bool(kind & TEXT)
        return len(ids)
    if stops.at_blank_line:
        if not generate._BLANK_LINE.search(
            tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        ):
            return len(ids)
        for i in range(1, len(ids) + 1):  # the first prefix that holds the empty line
            text = tokenizer.decode(ids[:i], skip_special_tokens=True).lstrip()
            if generate._BLANK_LINE.search(text):
                return i
    return len(ids)


def _trainer_class(base):
    """`base` (GRPOTrainer or RLOOTrainer) fed our prompt token ids, its completions cut where the
    pipeline's generation stops, and checkpoints with our manifest (train.resume checks it)."""

    class Trainer(base):
        prompt_ids: dict[str, list[int]]  # prompt text (the dataset's column) -> its token ids
        stops: Stops
        kinds: torch.Tensor  # generate's token kinds (text, newline) per vocabulary id

        def _tokenize_prompts(self, prompts):
            return [self.prompt_ids[p] for p in prompts], None, {}

        def _generate_single_turn(self, *args, **kwargs):
            out = super()._generate_single_turn(*args, **kwargs)
            ids, logprobs = out if isinstance(out, tuple) else (out, None)  # GRPO: (ids, logprobs)
            ends = [cut_completion(c, self.kinds, self.stops, self.processing_class) for c in ids]
            ids = [c[:n] for c, n in zip(ids, ends)]
            if logprobs is not None:
                logprobs = [lp[:n] for lp, n in zip(logprobs, ends)]
            return (ids, logprobs) if isinstance(out, tuple) else ids

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                folder = Path(self._get_output_dir(trial=trial)) / (
                    f"checkpoint-{self.state.global_step}"
                )
                write_manifest(folder)  # written last: a checkpoint cut off mid-save has none

    Trainer.__name__ = Trainer.__qualname__ = f"Summarizer{base.__name__}"
    return Trainer


def trl_classes(algorithm: str):
    """(config class, trainer class) of rl.algorithm."""
    if algorithm == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        return GRPOConfig, _trainer_class(GRPOTrainer)
    from trl import RLOOConfig, RLOOTrainer

    return RLOOConfig, _trainer_class(RLOOTrainer)


def rl_args(cfg: RLConfig, output_dir: Path, precision: str, optim: str, gradient_checkpointing):
    """The GRPOConfig / RLOOConfig of a run's `rl` settings."""
    config_class, _ = trl_classes(cfg.algorithm)
    extra = {"loss_type": cfg.loss_type} if cfg.algorithm == "grpo" else {}
    return config_class(
        output_dir=str(output_dir),
        learning_rate=cfg.lr,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        beta=cfg.beta,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        optim=optim,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=not torch.cuda.is_available(),
        report_to="none",  # MLflow is logged by our callback into the pipeline's run
        ddp_find_unused_parameters=False,
        logging_nan_inf_filter=False,
        **extra,
    )


def fit(
    cfg: RLConfig,
    model,
    tokenizer,
    prompts: list[list[int]],
    references: list[str],
    reward: Callable[..., list[float]],
    stops: Stops,
    output_dir: Path,
    *,
    precision: str = "fp32",
    optim: str = "adamw_torch",
    gradient_checkpointing: bool = False,
    callbacks: list | None = None,
    resume_from: Path | None = None,
) -> dict:
    """Train the PeftModel's active adapter in place on `prompts` (token ids) with `reward`;
    checkpoints go to output_dir/rl_checkpoints. Returns the stage's figures (rl_metrics.json)."""
    from datasets import Dataset

    _, trainer_class = trl_classes(cfg.algorithm)
    per_round = cfg.batch_size * cfg.grad_accum // cfg.num_generations
    if len(prompts) < per_round:  # TRL's sampler drops an incomplete round: no step at all
        raise UserError(
            f"stages.rl: {len(prompts)} training prompts, fewer than the {per_round} a step samples "
            f"(rl.batch_size={cfg.batch_size} x rl.grad_accum={cfg.grad_accum} / "
            f"rl.num_generations={cfg.num_generations}); lower rl.batch_size or use more rows"
        )
    args = rl_args(cfg, output_dir / CHECKPOINTS, precision, optim, gradient_checkpointing)
    if args.n_gpu > 1:  # one process, several GPUs: one GPU, as the SFT stage does
        compat.use_one_gpu(args)
    texts = [tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
    dataset = Dataset.from_dict({"prompt": texts, "summary": list(references)})
    # TRL ends a completion at the model's EOS ids: ours are the pipeline's stop tokens
    gen_cfg = model.generation_config
    eos_before = gen_cfg.eos_token_id
    gen_cfg.eos_token_id = list(stops.token_ids)
    try:
        trainer = trainer_class(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    finally:
        gen_cfg.eos_token_id = eos_before
    trainer.prompt_ids = dict(zip(texts, prompts))
    trainer.stops = stops
    trainer.kinds = _token_kinds(tokenizer)
    if resume_from:
        log.info("rl: resuming from %s", resume_from)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if "ref" in model.peft_config:  # rl.beta > 0: TRL's frozen copy of the starting adapter
        model.delete_adapter("ref")
    logs = [e for e in trainer.state.log_history if "reward" in e]
    figures = {
        "rl_steps": int(result.global_step),
        "rl_seconds": seconds,
        "rl_loss_avg": float(result.training_loss),
    }
    if logs:
        first, last = logs[0], logs[-1]
        figures.update({"rl_reward_first": first["reward"], "rl_reward_last": last["reward"]})
        figures["rl_reward_avg"] = sum(e["reward"] for e in logs) / len(logs)
    return figures


def write_figures(out: Path, figures: dict) -> None:
    write_atomic(out / METRICS_FILE, json.dumps(figures, indent=1))
