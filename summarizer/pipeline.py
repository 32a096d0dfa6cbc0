"""The whole job, top to bottom: data -> prompts -> model -> train -> generate -> ROUGE -> MLflow.

`run(cfg)` returns the objective a sweeper maximises: the task's `objective` score on the validation
split, by default ROUGE-1 + ROUGE-2 + ROUGE-L F1 (x 100). Every file a run writes lands in `cfg.output_dir` (a fresh folder per run).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf

from summarizer import (
    augment,
    data,
    distributed,
    generate,
    mbr,
    metrics,
    model,
    prompt,
    tracking,
)
from summarizer import plan as preflight
from summarizer.errors import UserError
from summarizer.files import write_atomic, write_csv
from summarizer.speed import merge
from summarizer.sweep import trial as sweep
from summarizer.train import callbacks, resume, rl
from summarizer.train.fit import fit

log = logging.getLogger(__name__)


def run(cfg: DictConfig, plan: preflight.Plan | None = None) -> float:
    # every value checked, every auto switch resolved, once (the entry point may have done it)
    plan = plan or preflight.make(cfg)
    out = Path(cfg.output_dir)
    _check_writable(out)
    resumed = resume.prepare(cfg, out)  # train.resume=true: this folder's checkpoint and MLflow run
    distributed.setup(cfg.distributed, out)  # a DDP rank joins its group once all ranks checked out
    main = distributed.is_main()  # rank 0 (or the only process) writes files, MLflow and Optuna
    uri = tracking.resolve_uri(cfg.tracking.uri, Path.cwd())
    if main:
        tracking.preflight(cfg.tracking, uri)  # fail before hours of training, not after
    if not resumed and main:  # a resumed run keeps the config it started with
        write_atomic(out / "config.yaml", tracking.redact(OmegaConf.to_yaml(cfg, resolve=True)))

    # Data: load, validate, split by id (seeded), cap for quick runs.
    examples = data.load(cfg.data)
    if cfg.stages.predict_test:  # a bad test file fails now, not after hours of training
        data.load(cfg.data, cfg.data.test_path, require_summary=False)
    train_ex, val_ex = data.split(examples, cfg.data.val_size, cfg.data.split_seed)
    train_ex = train_ex[: cfg.train.train_rows] if cfg.train.train_rows else train_ex
    val_ex = val_ex[: cfg.train.eval_rows] if cfg.train.eval_rows else val_ex
    split_ids = {"train": [e.id for e in train_ex], "validation": [e.id for e in val_ex]}
    if main:
        write_atomic(out / "split.json", json.dumps(split_ids))
    log.info("data %s: %d train / %d validation rows", cfg.data.path, len(train_ex), len(val_ex))
    # Augmentation: generated rows join the training split only (cached per augmentation config).
    train_ex, aug_stats = augment.apply(
        cfg.augmentation,
        train_ex,
        language=cfg.data.language,
        cache_dir=cfg.cache_dir,
        model_cfg=cfg.model,
        quant_cfg=cfg.quant,
        out_dir=out if main else None,
    )

    # Model and prompts: the same builder for training rows and generation prompts.
    with distributed.main_first():  # DDP: rank 0 converts / downloads, the others read the cache
        base, tokenizer = model.build_model(
            cfg.model, cfg.quant, cfg.cache_dir, max_length=cfg.train.max_length
        )
    fmt = prompt.resolve_format(cfg.prompt.format, tokenizer)
    stop_id = model.stop_token_id(cfg.model, tokenizer)
    shots = prompt.ShotSelector(cfg.prompt.fewshot, [e for e in train_ex if e.source == "original"])

    encode = make_encoder(cfg, tokenizer, fmt, stop_id, shots)
    refs = [e.summary for e in train_ex[:500]]
    if warning := generate.ngram_block_warning(cfg.generate.no_repeat_ngram_size, tokenizer, refs):
        log.warning(warning)

    # Tracking: one MLflow run; inside a sweep it nests under the sweep's run and reports to Optuna.
    trial = sweep.attach(cfg.trial) if main else None
    run_name = cfg.tracking.run_name or f"{cfg.model.name}-{cfg.data.name}-{cfg.prompt.name}"
    tags = {"model": cfg.model.name, "data": cfg.data.name, "output_dir": str(out.resolve())}
    tags.update(_choices())  # a DDP rank composed the job's own overrides: the same choices
    if distributed.world_size() > 1:
        tags["ddp.world_size"] = str(distributed.world_size())
    if trial:
        run_name = f"{cfg.trial.study}-trial-{trial.number}"
        tags.update({"optuna.study": cfg.trial.study, "optuna.trial": str(trial.number)})
    checkpoint, run_id = (resumed.checkpoint, resumed.mlflow_run_id) if resumed else (None, None)
    rl_checkpoint = resumed.rl_checkpoint if resumed else None
    sft_done = bool(resumed and resumed.sft_done)  # stages.rl: SFT finished before the cut
    if checkpoint:
        tags["resumed_from"] = checkpoint.name
    if rl_checkpoint:
        tags["rl_resumed_from"] = rl_checkpoint.name
    # stages.rl: SFT's adapter is kept in adapter_sft, the RL result is `adapter` (generation's)
    sft_adapter = out / (resume.SFT_ADAPTER if cfg.stages.rl else "adapter")
    sft_now = cfg.stages.train and not sft_done
    # ROUGE on the first train.eval_rouge_rows validation rows at each evaluation (rank 0 scores).
    rouge = None
    if cfg.stages.train and cfg.train.eval_rouge_rows > 0:
        rows = val_ex[: cfg.train.eval_rouge_rows]
        score_fn = _rouge_scorer(cfg, plan, tokenizer, rows, encode, stop_id) if main else None
        rouge = callbacks.EvalRouge(score_fn, cfg.task.objective, len(rows))
    # In a sweep every DDP rank gets the pruning callback: rank 0 decides, all stop together.
    in_sweep = cfg.trial.number is not None
    report = None
    if in_sweep:
        report = callbacks.ReportToTrial(
            trial,
            rouge if cfg.trial.intermediate == "rouge" else None,
            per_row=cfg.trial.pruner.name == "wilcoxon",
        )
    trainer_callbacks = [callbacks.MlflowMetrics()] + [c for c in (rouge, report) if c]
    params = OmegaConf.to_container(cfg, resolve=True)
    parent = cfg.trial.parent_run_id
    try:
        tracking_cfg = cfg.tracking if main else OmegaConf.merge(cfg.tracking, {"enabled": False})
        with tracking.run(
            tracking_cfg, uri, run_name, params, tags, parent, (optuna.TrialPruned,), run_id
        ) as r:
            if r:
                write_atomic(out / "mlflow_run_id", r.info.run_id)
            # First: a run cut short (pruned, failed) still has what it ran with, so comparing
            # runs in the UI never meets one without artifacts.
            tracking.log_artifact(out / "config.yaml")
            tracking.log_artifact(out / "split.json")
            tracking.log_metrics(aug_stats)  # aug_rows_before / _generated / _kept / _after ...
            tracking.log_artifact(out / augment.SAMPLE_FILE)
            lm = base
            if sft_now:
                train_rows = [encode(ex, True) for ex in train_ex]
                eval_rows = [encode(ex, True) for ex in val_ex]
                _log_truncation("training", train_rows + eval_rows)
                lm = model.add_lora(
                    base,
                    cfg.lora,
                    cfg.train.gradient_checkpointing,
                    cfg.train.upcast_frozen,
                    seed=cfg.train.seed,
                )
                try:
                    figures = fit(
                        cfg.train,
                        lm,
                        tokenizer,
                        train_rows,
                        eval_rows,
                        out,
                        trainer_callbacks,
                        checkpoint,
                        plan=plan.train,
                    )
                except optuna.TrialPruned:
                    _log_pruned(report)
                    raise
                tracking.log_metrics({f"final_{k}": v for k, v in figures.items()})
                if main:  # also without MLflow (benchmarks/ddp.py reads it)
                    write_atomic(out / "train_metrics.json", json.dumps(figures, indent=1))
            elif sft_done:
                lm = model.load_adapter(base, str(sft_adapter), trainable=True)
            elif cfg.adapter:
                lm = model.load_adapter(base, cfg.adapter, trainable=cfg.stages.rl)
            if not main:  # the other DDP ranks only train; rank 0 saves, generates and scores
                return float("nan")
            if sft_now:
                _save_adapter(lm, tokenizer, sft_adapter, out, whole=cfg.stages.rl)
                if cfg.tracking.log_adapter and not cfg.stages.rl:
                    tracking.log_artifact(sft_adapter)
            if cfg.stages.rl:
                figures = rl_stage(
                    cfg, plan, lm, tokenizer, train_ex, encode, stop_id, out, rl_checkpoint
                )
                tracking.log_metrics({f"final_{k}": v for k, v in figures.items()})
                rl.write_figures(out, figures)
                tracking.log_artifact(out / rl.METRICS_FILE)
                _save_adapter(lm, tokenizer, out / "adapter", out)
                if cfg.tracking.log_adapter:
                    tracking.log_artifact(out / "adapter")
            # a 4-bit model decodes ~8x slower than a bf16 copy with the adapter merged in
            if (cfg.stages.evaluate or cfg.stages.predict_test) and plan.generate.merged:
                lm = merge.merged_for_generation(lm)
                base = None
                model.free_memory()

            objective, scores, row_scores = float("nan"), {}, None
            if cfg.stages.evaluate:
                scores, rows = evaluate(
                    cfg, plan, lm, tokenizer, val_ex, encode, stop_id, out / "predictions.csv"
                )
                tracking.log_metrics(scores)
                tracking.log_artifact(out / "predictions.csv")
                log.info("validation scores (%s): %s", cfg.metric.tokenizer, _fmt(scores))
                objective = scores[cfg.task.objective]  # rouge_sum unless the task says otherwise
                # each validation row's objective: the sweep report compares trials row by row
                row_scores = sweep.row_scores(cfg.task.objective, [e.id for e in val_ex], rows)

            if cfg.stages.predict_test:
                predict_test(cfg, plan, lm, tokenizer, encode, stop_id, out / "submission.csv")
                tracking.log_artifact(out / "submission.csv")
    except optuna.TrialPruned as e:
        log.info("%s", e)
        if main:
            sweep.write_result(out, "PRUNED", None)
        return float("nan")
    trained = cfg.stages.train or cfg.stages.rl
    adapter = str((out / "adapter").resolve()) if trained else cfg.adapter
    sweep.write_result(
        out, "COMPLETE", objective, metrics=scores, adapter=adapter, row_scores=row_scores
    )
    return objective


def rl_stage(cfg, plan, lm, tokenizer, train_ex, encode, stop_id, out, checkpoint) -> dict:
    """stages.rl: TRL's GRPO/RLOO on the training split's generation prompts, rewarded by each
    completion's ROUGE against the row's summary (the run's metric tokenizer)."""
    prompts = [encode(ex, False) for ex in train_ex]
    _log_truncation("rl", prompts)
    stops = rl.Stops(
        tuple(sorted({stop_id, tokenizer.eos_token_id})),
        cfg.generate.stop_at_newline,
        cfg.generate.stop_at_blank_line,
    )
    tok = metrics.resolve_tokenizer(cfg.metric.tokenizer, cfg.data.language)
    reward = rl.rouge_reward(cfg.task, cfg.rl, tok, cfg.metric.keep_special_tokens, stops)
    log.info(
        "rl: %s on %d training prompts, %d completions each",
        cfg.rl.algorithm,
        len(prompts),
        cfg.rl.num_generations,
    )
    return rl.fit(
        cfg.rl,
        lm,
        tokenizer,
        [p["input_ids"] for p in prompts],
        [ex.summary for ex in train_ex],
        reward,
        stops,
        out,
        precision=plan.rl.precision,
        optim=plan.rl.optim,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        callbacks=[callbacks.MlflowMetrics(rl.NAMES)],
        resume_from=checkpoint,
    )


def _save_adapter(lm, tokenizer, path: Path, out: Path, whole: bool = False) -> None:
    """The adapter (and tokenizer) into `path`. `whole`: written beside it, then moved in, so that
    the folder is there only complete (train.resume reads adapter_sft as "SFT is done")."""
    import shutil

    target = path.with_name(path.name + ".partial") if whole else path
    if whole:
        shutil.rmtree(target, ignore_errors=True)  # an attempt cut off mid-save
    try:
        lm.save_pretrained(target)
        tokenizer.save_pretrained(target)
    except Exception as e:  # torch and safetensors raise their own types for ENOSPC
        if not resume.is_disk_full(e):
            raise
        raise resume.disk_full(target, out) from e
    if whole:
        if path.exists():
            shutil.rmtree(path)
        target.rename(path)


def _log_pruned(report: callbacks.ReportToTrial | None) -> None:
    """Where the pruner stopped the trial, on its run: the global step and the value of what the
    trial reported there (eval_loss, or the mean eval_<objective> of the ROUGE rows)."""
    if report is None or report.last is None:  # a DDP rank other than 0
        return
    step, name, value = report.last
    tracking.set_tags({"pruned.step": step, f"pruned.{name}": f"{value:.4f}"})
    tracking.log_metrics({"pruned_step": step, f"pruned_{name}": value})


def _rouge_scorer(cfg, plan, tokenizer, rows, encode, stop_id):
    """score(model) -> (mean scores, each row's task.objective) of `rows`, summarised as the run's
    evaluation does it (prompts, generation settings, metric): EvalRouge's `score_fn`. Never the
    merged copy: the model trains on."""
    tok = metrics.resolve_tokenizer(cfg.metric.tokenizer, cfg.data.language)
    refs = [ex.summary for ex in rows]
    search = plan.generate  # train.eval_rouge_strategy=greedy: one decode per row, not N
    if cfg.train.eval_rouge_strategy == "greedy":
        search = dataclasses.replace(search, strategy="greedy")

    def score(lm) -> tuple[dict[str, float], list[float]]:
        preds = summarize(cfg, lm, tokenizer, rows, encode, stop_id, search)
        per_row = metrics.score_rows(cfg.task, preds, refs, tok, cfg.metric.keep_special_tokens)
        return metrics.mean_rows(per_row), [r[cfg.task.objective] for r in per_row]

    return score


def evaluate(cfg, plan, lm, tokenizer, val_ex, encode, stop_id, path: Path) -> tuple[dict, list]:
    """(the mean scores, each row's scores) on the validation rows, in their order."""
    start = time.perf_counter()
    preds = summarize(cfg, lm, tokenizer, val_ex, encode, stop_id, plan.generate)
    seconds = time.perf_counter() - start
    tok = metrics.resolve_tokenizer(cfg.metric.tokenizer, cfg.data.language)
    refs = [ex.summary for ex in val_ex]
    per_row = metrics.score_rows(cfg.task, preds, refs, tok, cfg.metric.keep_special_tokens)
    scores = metrics.mean_rows(per_row)  # what metrics.score returns, without scoring twice
    rows = [[ex.id, p, ex.summary] for ex, p in zip(val_ex, preds)]
    write_csv(path, ["fname", "prediction", "reference"], rows)
    return {**scores, "generate_seconds_per_row": seconds / len(val_ex)}, per_row


def predict_test(cfg, plan, lm, tokenizer, encode, stop_id, path: Path) -> None:
    """Summaries for data.test_path in the competition's format (`,fname,summary`)."""
    if not cfg.data.test_path:
        raise UserError("stages.predict_test=true needs data.test_path")
    test_ex = data.load(cfg.data, cfg.data.test_path, require_summary=False)
    preds = summarize(cfg, lm, tokenizer, test_ex, encode, stop_id, plan.generate)
    rows = [[i, ex.id, p] for i, (ex, p) in enumerate(zip(test_ex, preds))]
    write_csv(path, ["", "fname", "summary"], rows)
    log.info("submission: %s (%d rows)", path, len(rows))


def make_encoder(cfg, tokenizer, fmt: str, stop_id: int, shots: prompt.ShotSelector):
    """encode(example, with_summary) -> token ids (+ labels): the one prompt path for training rows,
    validation and test generation, and `python -m summarizer.cli.predict`."""

    def encode(ex: data.Example, with_summary: bool) -> dict:
        p = prompt.build(
            cfg.prompt,
            cfg.data.language,
            fmt,
            ex.dialogue,
            shots(ex),
            tokenizer,
            instruction=ex.instruction,
        )
        return prompt.encode(
            tokenizer,
            p,
            prompt.completion_text(ex.summary, fmt) if with_summary else None,
            max_length=cfg.train.max_length,
            stop_token_id=stop_id,
            reserve=0 if with_summary else cfg.generate.max_new_tokens,
            min_dialogue_tokens=cfg.prompt.min_dialogue_tokens,
            add_bos=fmt == "plain",
            row_id=ex.id,
        )

    return encode


def summarize(cfg, lm, tokenizer, rows, encode, stop_id, plan=None) -> list[str]:
    """Summaries for `rows` with the run's prompt and generation settings, in input order."""
    prompts = [encode(ex, False) for ex in rows]
    _log_truncation("generation", prompts)
    stops = sorted({stop_id, tokenizer.eos_token_id})
    ids = [p["input_ids"] for p in prompts]
    # strategy=mbr keeps the candidate the run's own metric rates most central
    tok = metrics.resolve_tokenizer(cfg.metric.tokenizer, cfg.data.language)
    select = mbr.selector(cfg.task, tok, cfg.metric.keep_special_tokens)
    return generate.summaries(cfg.generate, lm, tokenizer, ids, stops, plan, select)


def _log_truncation(stage: str, rows: list[dict]) -> None:
    cut = sum(r["truncated"] for r in rows)
    if cut:
        log.warning("%s: %d of %d dialogues cut to fit train.max_length", stage, cut, len(rows))


def _choices() -> dict[str, str]:
    """Which option of each config group this job composed (e.g. prompt=few_shot)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    tags = {f"choice.{k}": str(v) for k, v in hc.runtime.choices.items() if "hydra" not in k}
    tags["overrides"] = " ".join(hc.overrides.task)[:5000]
    return tags


def _fmt(scores: dict) -> str:
    keys = [k for name in metrics.METRICS.values() for k in name if k in scores]
    return " ".join(f"{k}={scores[k]:.2f}" for k in keys)


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"output_dir={path} is not writable ({e.strerror})") from e
