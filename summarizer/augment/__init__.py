"""Training-data augmentation: the `augmentation` config group.

`apply(cfg, train_examples, ...)` returns the training rows followed by the generated rows that pass
the filters, and figures for MLflow. Only the training split ever comes in here: validation and test
rows are never read, rewritten or sent to a model. The methods, one option of conf/augmentation each
(several combine, `augmentation=[speaker_swap,paraphrase]`), all start from the original rows:

- speaker_swap          #Person1# <-> #Person2#, in the dialogue and the summary alike
- instruction_variants  the same row under other instruction wordings (`Example.instruction`)
- paraphrase            a chat model rewrites the dialogue (any OpenAI-compatible API)
- back_translation      dialogue (and summary) into a pivot language and back (API)
- local_paraphrase      a local causal LM, loaded by `summarizer.model`, rewrites each dialogue line
- synthetic             new dialogue + summary pairs for the training rows' topics (API)

A generated row keeps the `id` of the training row it comes from (few-shot selection then never
shows a row its own source) and names its method in `source`.

The package, each module of plain functions, imported in this order (none imports a later one):
- text.py     dialogue text helpers (turns, tokens, n-grams, script shares)
- methods.py  the registry: one function per method, and how to add one
- checks.py   check_config: bad values fail before any work
- filters.py  the checks every generated row must pass, and the sample CSV
- cache.py    the reply cache, the set cache and the lock between sweep trials
- client.py   the OpenAI-compatible chat client (the `openai` package), rate limit, retries, key
- here        `apply`: check, reuse or make the set (methods -> filters), report
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from summarizer.augment import cache, client, filters, methods
from summarizer.augment.checks import check_config
from summarizer.augment.text import method_of
from summarizer.data import Example
from summarizer.files import write_atomic

log = logging.getLogger(__name__)

SAMPLE_FILE = "augmentation_sample.csv"  # written to the run folder, logged as an MLflow artifact
METHODS = tuple(methods.METHODS)  # the method names, in the order they run

__all__ = ["METHODS", "SAMPLE_FILE", "apply", "check_config"]


def apply(
    cfg,
    train: list[Example],
    *,
    language: str,
    cache_dir: str,
    model_cfg=None,
    quant_cfg=None,
    out_dir: Path | None = None,
) -> tuple[list[Example], dict[str, float]]:
    """The training rows plus the kept generated rows, and figures (`aug_*`) for MLflow.

    `cfg` is the `augmentation` node; `model_cfg`/`quant_cfg` are the run's (local_paraphrase uses
    them unless it names its own preset); `out_dir` receives the sample CSV.
    """
    if not isinstance(cfg, DictConfig):  # a dataclass (tests, scripts)
        cfg = OmegaConf.structured(cfg)
    names = methods.enabled(cfg)
    if not names:
        return train, {
            "aug_rows_before": len(train),
            "aug_rows_generated": 0,
            "aug_rows_kept": 0,
            "aug_rows_after": len(train),
        }
    check_config(cfg, names, language)
    folder = Path(cfg.cache_dir or Path(cache_dir) / "augment").expanduser()
    local_model = None
    if "local_paraphrase" in names:
        local_model = methods.local_model_config(cfg.local_paraphrase.model, model_cfg)
    digest = cache.set_digest(cfg, names, train, language, local_model)
    path = folder / "sets" / f"{digest}.jsonl"
    counters: Counter = Counter()
    with cache.locked(
        path.with_suffix(".lock")
    ):  # parallel sweep trials: one makes it, others wait
        found = cache.load_set(path)
        reused = found is not None
        if found is not None:
            kept, stats = found
        else:
            ctx = _context(cfg, language, folder, counters, local_model, quant_cfg, cache_dir)
            kept, stats, sample = make_set(cfg, names, train, ctx)
            info = {"stats": stats, "methods": names, "language": language}
            cache.save_set(path, kept, info, filters.SAMPLE_HEADER, sample)
    if out_dir is not None:
        write_atomic(
            Path(out_dir) / SAMPLE_FILE, path.with_suffix(".sample.csv").read_text("utf-8")
        )
    stats = {
        **stats,
        "aug_set_reused": float(reused),
        "aug_api_requests": counters["api_requests"],  # replies fetched by this run
        "aug_replies_cached": counters["replies_cached"],  # replies this run found in the cache
    }
    log.info(
        "augmentation %s: %d training rows + %d generated, %d kept after filters -> %d rows "
        "(set %s %s; %d API requests)",
        "+".join(names),
        stats["aug_rows_before"],
        stats["aug_rows_generated"],
        stats["aug_rows_kept"],
        stats["aug_rows_after"],
        digest,
        "reused" if reused else "made",
        counters["api_requests"],
    )
    return list(train) + kept, stats


def make_set(
    cfg, names: list[str], train: list[Example], ctx: methods.Context
) -> tuple[list[Example], dict, list[list]]:
    """(kept rows, figures, sample CSV rows): every enabled method's candidates, then the filters.
    Each method starts from the original training rows."""
    candidates = [pair for name in names for pair in methods.run(name, cfg[name], train, ctx)]
    kept, dropped = filters.filter_rows(candidates, train, cfg.filters, ctx.language)
    stats = {
        "aug_rows_before": len(train),
        "aug_rows_generated": len(candidates),
        "aug_rows_kept": len(kept),
        "aug_rows_after": len(train) + len(kept),
    }
    for name in names:
        stats[f"aug_kept_{name}"] = sum(method_of(row) == name for row, _ in kept)
    for reason, n in sorted(Counter(reason for _, _, reason in dropped).items()):
        stats[f"aug_dropped_{reason}"] = n
    sample = filters.sample_rows(kept, dropped, names, cfg.sample_rows)
    return [row for row, _ in kept], stats, sample


def _context(cfg, language, folder, counters, local_model, quant_cfg, cache_dir) -> methods.Context:
    """The methods' way to models: every reply through the reply cache in `folder`."""

    def cached(model_id, requests, fetch):
        return cache.cached_replies(model_id, requests, folder, counters, fetch)

    def ask(requests, what):
        def fetch(items, save):
            client.request_all(cfg.api, items, save, counters, what)

        return cached(cfg.api.model, requests, fetch)

    return methods.Context(
        language=language,
        seed=cfg.seed,
        ask=ask,
        cached=cached,
        local_model=local_model,
        quant_cfg=quant_cfg,
        cache_dir=cache_dir,
    )
