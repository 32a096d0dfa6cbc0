"""The whole job, top to bottom: data -> prompts -> model -> train -> generate -> ROUGE -> MLflow.

`run(cfg)` returns the objective a sweeper maximises: ROUGE-1 + ROUGE-2 + ROUGE-L F1 (x 100) on the
validation split. Every file a run writes lands in `cfg.output_dir` (a fresh folder per run).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from summarizer import data, generate, metrics, model, prompt, tracking, train
from summarizer.errors import UserError

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float:
    out = Path(cfg.output_dir)
    _check_writable(out)
    launch_dir = Path.cwd()
    uri = tracking.resolve_uri(cfg.tracking.uri, launch_dir)
    tracking.preflight(cfg.tracking, uri)  # fail before hours of training, not after
    write_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    # Data: load, validate, split by id (seeded), cap for quick runs.
    examples = data.load(cfg.data)
    train_ex, val_ex = data.split(examples, cfg.data.val_size, cfg.data.split_seed)
    train_ex = train_ex[: cfg.train.train_rows] if cfg.train.train_rows else train_ex
    val_ex = val_ex[: cfg.train.eval_rows] if cfg.train.eval_rows else val_ex
    write_atomic(
        out / "split.json",
        json.dumps({"train": [e.id for e in train_ex], "validation": [e.id for e in val_ex]}),
    )
    log.info("data %s: %d train / %d validation rows", cfg.data.path, len(train_ex), len(val_ex))

    # Model and prompts: the same builder for training rows and generation prompts.
    base, tokenizer = model.build_model(cfg.model, cfg.quant, cfg.cache_dir)
    fmt = prompt.resolve_format(cfg.prompt.format, tokenizer)
    stop_id = model.stop_token_id(cfg.model, tokenizer)
    shots = prompt.ShotSelector(cfg.prompt.fewshot, train_ex)

    def encode(ex: data.Example, with_summary: bool) -> dict:
        p = prompt.build(cfg.prompt, cfg.data.language, fmt, ex.dialogue, shots(ex), tokenizer)
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

    choices = _choices()
    run_name = cfg.tracking.run_name or f"{cfg.model.name}-{cfg.data.name}-{cfg.prompt.name}"
    tags = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "output_dir": str(out.resolve()),
        **choices,
    }
    params = OmegaConf.to_container(cfg, resolve=True)
    with tracking.run(cfg.tracking, uri, run_name, params, tags):
        lm = base
        if cfg.stages.train:
            train_rows = [encode(ex, True) for ex in train_ex]
            eval_rows = [encode(ex, True) for ex in val_ex]
            _log_truncation("training", train_rows + eval_rows)
            lm = model.add_lora(base, cfg.lora, cfg.train.gradient_checkpointing)
            figures = train.fit(
                cfg.train, lm, tokenizer, train_rows, eval_rows, out, [tracking.MlflowMetrics()]
            )
            tracking.log_metrics({f"final_{k}": v for k, v in figures.items()})
            lm.save_pretrained(out / "adapter")
            tokenizer.save_pretrained(out / "adapter")
            if cfg.tracking.log_adapter:
                tracking.log_artifact(out / "adapter")
        elif cfg.adapter:
            lm = model.load_adapter(base, cfg.adapter)

        objective = float("nan")
        if cfg.stages.evaluate:
            scores = evaluate(cfg, lm, tokenizer, val_ex, encode, stop_id, out / "predictions.csv")
            tracking.log_metrics(scores)
            tracking.log_artifact(out / "predictions.csv")
            log.info("validation ROUGE (%s): %s", cfg.metric.tokenizer, _fmt(scores))
            objective = scores["rouge_sum"]

        if cfg.stages.predict_test:
            if not cfg.data.test_path:
                raise UserError("stages.predict_test=true needs data.test_path")
            test_ex = data.load(cfg.data, cfg.data.test_path, require_summary=False)
            preds = _generate(cfg, lm, tokenizer, test_ex, encode, stop_id)
            write_csv(
                out / "submission.csv",
                ["", "fname", "summary"],
                [[i, ex.id, p] for i, (ex, p) in enumerate(zip(test_ex, preds))],
            )
            tracking.log_artifact(out / "submission.csv")
            log.info("submission: %s (%d rows)", out / "submission.csv", len(preds))
        tracking.log_artifact(out / "config.yaml")
        tracking.log_artifact(out / "split.json")
    return objective


def evaluate(cfg, lm, tokenizer, val_ex, encode, stop_id, path: Path) -> dict[str, float]:
    start = time.perf_counter()
    preds = _generate(cfg, lm, tokenizer, val_ex, encode, stop_id)
    seconds = time.perf_counter() - start
    tok = metrics.resolve_tokenizer(cfg.metric.tokenizer, cfg.data.language)
    scores = metrics.rouge(
        preds, [ex.summary for ex in val_ex], tok, cfg.metric.keep_special_tokens
    )
    write_csv(
        path,
        ["fname", "prediction", "reference"],
        [[ex.id, p, ex.summary] for ex, p in zip(val_ex, preds)],
    )
    return {**scores, "generate_seconds_per_row": seconds / len(val_ex)}


def _generate(cfg, lm, tokenizer, rows, encode, stop_id) -> list[str]:
    prompts = [encode(ex, False) for ex in rows]
    _log_truncation("generation", prompts)
    stops = sorted({stop_id, tokenizer.eos_token_id})
    return generate.summaries(cfg.generate, lm, tokenizer, [p["input_ids"] for p in prompts], stops)


def _log_truncation(stage: str, rows: list[dict]) -> None:
    cut = sum(r["truncated"] for r in rows)
    if cut:
        log.warning("%s: %d of %d dialogues cut to fit train.max_length", stage, cut, len(rows))


def _choices() -> dict[str, str]:
    """Which option of each config group this job composed (e.g. prompt=few_shot)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {
        f"choice.{k}": str(v)
        for k, v in HydraConfig.get().runtime.choices.items()
        if "hydra" not in k
    }


def _fmt(scores: dict) -> str:
    return " ".join(
        f"{k}={v:.2f}"
        for k, v in scores.items()
        if k in metrics.ROUGE_TYPES + ("rouge_sum", "final")
    )


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"output_dir={path} is not writable ({e.strerror})") from e


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    write_atomic(path, buf.getvalue())
