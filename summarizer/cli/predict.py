"""Summarise new dialogues with a trained run: base model + its adapter (or a merged model).

    python -m summarizer.cli.predict outputs/<day>/<run> --input dialogues.csv [--output preds.csv]
    echo "#Person1#: ... " | python -m summarizer.cli.predict outputs/<day>/<run> --input -

The run's saved config.yaml fixes the model, task, prompt and few-shot settings, so prompts are built
exactly as in training (few-shot examples come from the run's training split, read from its data
file and split.json) and generation keeps the task's max_new_tokens and stop rule, and the run's
generate.strategy unless --strategy names another (`--strategy mbr`: MBR over sampled
candidates). Input: CSV, JSON or JSONL with the run's id and input columns (a
task=question_decomposition run: `id`, `question`), or one input on stdin (the output is printed). Output: `,fname,summary` like the competition's
sample submission, written atomically; an existing file is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from summarizer import compat, data, model, pipeline, prompt
from summarizer import plan as preflight
from summarizer.config import Config
from summarizer.errors import UserError
from summarizer.files import write_csv
from summarizer.speed import merge


def run_config(run_dir: Path):
    """The run's resolved config, typed."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise UserError(f"{config}: not found (pass a run folder of `python -m summarizer`)")
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(config))


def load_run(run_dir: Path):
    """The run's config and its training examples (the few-shot pool)."""
    cfg = run_config(run_dir)
    train_ex: list[data.Example] = []
    if cfg.prompt.fewshot.k:
        split = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))
        ids = set(split["train"])
        try:
            train_ex = [ex for ex in data.load(cfg.data) if ex.id in ids]
        except UserError as e:
            raise UserError(f"few-shot examples come from the run's training data: {e}") from e
    return cfg, train_ex


def predict(
    run_dir: Path,
    rows: list[data.Example],
    adapter: Path | None = None,
    merged: Path | None = None,
    overrides: dict | None = None,
) -> list[str]:
    cfg, train_ex = load_run(run_dir)
    for key, value in (overrides or {}).items():
        OmegaConf.update(cfg, key, value)
    if merged:
        cfg.model.source, cfg.model.path = "local", str(merged)
        cfg.quant.method = "none"
    run_plan = preflight.make(OmegaConf.merge(cfg, {"stages": {"train": False}}))
    base, tokenizer = model.build_model(
        cfg.model, cfg.quant, cfg.cache_dir, max_length=cfg.train.max_length
    )
    lm = base if merged else model.load_adapter(base, str(adapter or run_dir / "adapter"))
    if not merged and run_plan.generate.merged:  # as the pipeline generates
        lm = merge.merged_for_generation(lm)
    fmt = prompt.resolve_format(cfg.prompt.format, tokenizer)
    stop_id = model.stop_token_id(cfg.model, tokenizer)
    shots = prompt.ShotSelector(cfg.prompt.fewshot, train_ex)
    encode = pipeline.make_encoder(cfg, tokenizer, fmt, stop_id, shots)
    return pipeline.summarize(cfg, lm, tokenizer, rows, encode, stop_id, run_plan.generate)


def check_columns(cfg, run_dir: Path, path: Path) -> None:
    """The input's columns are the run's (predict takes no data.* settings): a missing one is
    named with what to rename, before data.load suggests settings this command does not read."""
    records = data.read_records(path)
    columns = set().union(*(r.keys() for r in records))
    wanted = {
        "data.id_column": cfg.data.id_column,
        "data.dialogue_column": cfg.data.dialogue_column,
    }
    missing = {k: v for k, v in wanted.items() if v not in columns}
    if missing:
        names = ", ".join(f"{k}={v!r}" for k, v in missing.items())
        raise UserError(
            f"{path}: missing column(s) {sorted(missing.values())}; found {sorted(columns)}; "
            f"predict reads the run's columns ({names} in {run_dir / 'config.yaml'}): rename the "
            "input's columns to those"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m summarizer.cli.predict", description=__doc__.split("\n")[0]
    )
    p.add_argument("run", type=Path, help="a run folder (config.yaml, split.json, adapter/)")
    p.add_argument(
        "--input", required=True, help="CSV / JSON / JSONL file, or - for one dialogue on stdin"
    )
    p.add_argument("--output", type=Path, default=None, help="default: <input>.predictions.csv")
    p.add_argument("--adapter", type=Path, default=None, help="default: <run>/adapter")
    p.add_argument(
        "--merged", type=Path, default=None, help="a merged model (python -m summarizer.cli.merge)"
    )
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument(
        "--strategy",
        default=None,
        help="generate.strategy: greedy | beam | sample | mbr (default: the run's)",
    )
    p.add_argument("--mbr-candidates", type=int, default=None, help="generate.mbr.candidates")
    args = p.parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "generate.batch_size": args.batch_size,
            "generate.max_new_tokens": args.max_new_tokens,
            "generate.strategy": args.strategy,
            "generate.mbr.candidates": args.mbr_candidates,
        }.items()
        if v is not None
    }
    try:
        compat.check_versions()
        cfg = run_config(args.run)
        if args.input == "-":
            text = sys.stdin.read().strip()
            if not text:
                raise UserError("stdin: empty dialogue")
            rows = [data.Example("stdin", text)]
        else:
            check_columns(cfg, args.run, Path(args.input))
            rows = data.load(cfg.data, args.input, require_summary=False)
            output = args.output or Path(f"{args.input}.predictions.csv")
            if output.exists():
                raise UserError(
                    f"{output} already exists; pass another --output (nothing is overwritten)"
                )
        start = time.perf_counter()
        preds = predict(args.run, rows, args.adapter, args.merged, overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.input == "-":
        print(preds[0])
        return 0
    write_csv(
        output,
        ["", "fname", "summary"],
        [[i, r.id, s] for i, (r, s) in enumerate(zip(rows, preds))],
    )
    print(
        f"{len(preds)} summaries in {time.perf_counter() - start:.1f}s -> {output}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
