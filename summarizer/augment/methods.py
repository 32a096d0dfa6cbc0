"""The augmentation methods: one plain function per method, registered under its name.

A method is `name(sub, rows, ctx) -> [(generated row, the training row it comes from), ...]`:
`sub` is its options (the `augmentation.<name>` node), `rows` the training rows it works on (a
seeded `fraction` of them when its options have that key, else all), `ctx` a `Context` (language,
seed, and the reply cache through which it asks a model). `@method(kind=..., api=...)` registers it;
`kind` tells the filters what to expect of its rows (see `KINDS`), `api=True` marks a method that
asks the chat API (its requests then need `augmentation.api`, whose model joins the set identity).

Adding a method `foo`:
1. here: `@method(kind="rewrite")` above `def foo(sub, rows, ctx)`;
2. summarizer/config.py: `foo: FooConfig` in AugmentationConfig, a dataclass with at least
   `enabled: bool = False` (add `fraction: float = 1.0` for the seeded pick, `copies`, per-language
   `prompt` ... as needed: check_config validates those keys by name);
3. conf/augmentation/foo.yaml: `foo: {enabled: true, ...}`.
`apply`, the filters, the set identity, the figures and the sample CSV read this registry; nothing
else needs the new name. Only a constraint beyond the keys above needs a line in checks.py (as
instruction_variants, local_paraphrase and synthetic have), and only a method that loads a model of
its own needs it resolved in `apply` (as local_paraphrase's, which joins the set identity).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from summarizer.augment.text import (
    clean_dialogue,
    digest,
    parse_synthetic,
    split_turn,
    swap_speakers,
    synthetic_request,
)
from summarizer.data import Example
from summarizer.errors import UserError

log = logging.getLogger(__name__)

Pair = tuple[Example, Example]  # (generated row, the training row it comes from)
Request = tuple[str, str, int]  # (system prompt or template, text, copy number)
Fetch = Callable[[list, Callable[[str, str], None]], None]  # fetch(missing, save): see cache.py

# What the filters expect of a method's rows (filters.check_row):
KINDS = {
    "copy": "the source's text; speaker turns and tokens as in the source",
    "swap": "speaker turns and tokens as in the source with #Person1# and #Person2# exchanged",
    "rewrite": "new wording; turns and tokens as in the source; not a near-duplicate of it",
    "new": "a new dialogue; two speakers or more, only tokens the data uses; not a near-duplicate",
}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    make: Callable[[Any, list[Example], Context], list[Pair]]
    kind: str  # a key of KINDS
    api: bool  # asks the chat API in augmentation.api


@dataclasses.dataclass
class Context:
    """What a method may use besides its options and rows."""

    language: str  # data.language: picks the prompt entry
    seed: int  # augmentation.seed
    ask: Callable[[list[Request], str], list[str]]  # chat-API replies through the reply cache
    cached: Callable[[str, list[Request], Fetch], list[str]]  # any model's, through the cache
    local_model: Any = None  # local_paraphrase's model config (resolved by `apply`)
    quant_cfg: Any = None
    cache_dir: str = ""  # the run's cache_dir (model downloads)


METHODS: dict[str, Method] = {}  # in registration order: the order methods run and are reported


def method(*, kind: str, api: bool = False) -> Callable:
    """Register the decorated function as the method named like it."""
    assert kind in KINDS, kind

    def register(fn: Callable) -> Callable:
        assert fn.__name__ not in METHODS, f"method {fn.__name__} registered twice"
        METHODS[fn.__name__] = Method(fn.__name__, fn, kind, api)
        return fn

    return register


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(
            f"augmentation.{name}: no such method (methods: {', '.join(METHODS)}); a method is a "
            "function registered in summarizer/augment/methods.py"
        ) from None


def enabled(cfg) -> list[str]:
    """The methods switched on in the `augmentation` node, in registry order; an enabled entry
    without a registered function is an error."""
    on = {name for name, sub in cfg.items() if isinstance(sub, DictConfig) and sub.get("enabled")}
    for name in sorted(on):
        get(name)
    return [name for name in METHODS if name in on]


def run(name: str, sub, train: list[Example], ctx: Context) -> list[Pair]:
    """One method's candidate rows, from the original training rows."""
    rows = pick(train, sub.fraction, ctx.seed, name) if "fraction" in sub else list(train)
    return get(name).make(sub, rows, ctx)


def pick(rows: list[Example], fraction: float, seed: int, name: str) -> list[Example]:
    """A seeded share of the rows, the same whatever their order; kept in their order."""
    if fraction >= 1:
        return list(rows)
    n = round(fraction * len(rows))
    chosen = set(sorted((ex.id for ex in rows), key=lambda i: digest(f"{seed}:{name}:{i}"))[:n])
    return [ex for ex in rows if ex.id in chosen]


# --- methods without a model ---------------------------------------------------------------------


@method(kind="swap")
def speaker_swap(sub, rows: list[Example], ctx: Context) -> list[Pair]:
    """#Person1# <-> #Person2#, in the dialogue and the summary alike."""
    return [
        (
            dataclasses.replace(
                ex,
                dialogue=swap_speakers(ex.dialogue),
                summary=swap_speakers(ex.summary),
                source="speaker_swap",
            ),
            ex,
        )
        for ex in rows
    ]


@method(kind="copy")
def instruction_variants(sub, rows: list[Example], ctx: Context) -> list[Pair]:
    """`sub.copies` copies of each row, each under another instruction wording (seeded per id)."""
    templates = list(sub.templates[ctx.language])
    out = []
    for ex in rows:
        chosen = random.Random(f"{ctx.seed}:{ex.id}").sample(templates, sub.copies)
        for k, instruction in enumerate(chosen):
            row = dataclasses.replace(
                ex, instruction=instruction, source=f"instruction_variants.{k}"
            )
            out.append((row, ex))
    return out


# --- methods with a chat model (augmentation.api) ------------------------------------------------


@method(kind="rewrite", api=True)
def paraphrase(sub, rows: list[Example], ctx: Context) -> list[Pair]:
    """`sub.copies` rewrites of each dialogue by the chat model; the summary is kept."""
    prompt = sub.prompt[ctx.language]
    todo = [(ex, k) for ex in rows for k in range(sub.copies)]
    replies = ctx.ask([(prompt, ex.dialogue, k) for ex, k in todo], "paraphrase")
    return [
        (dataclasses.replace(ex, dialogue=clean_dialogue(r), source=f"paraphrase.{k}"), ex)
        for (ex, k), r in zip(todo, replies)
    ]


@method(kind="rewrite", api=True)
def back_translation(sub, rows: list[Example], ctx: Context) -> list[Pair]:
    """Dialogue (and summary) into the pivot language and back; each leg cached on its own."""
    texts = [ex.dialogue for ex in rows] + ([ex.summary for ex in rows] if sub.summary else [])
    there = ctx.ask([(sub.to_pivot[ctx.language], t, 0) for t in texts], "to pivot")
    todo = [p for p in there if p.strip()]  # an empty first leg has nothing to translate back
    back = iter(ctx.ask([(sub.from_pivot[ctx.language], p, 0) for p in todo], "from pivot"))
    texts_back = [next(back) if p.strip() else "" for p in there]
    out = []
    for i, ex in enumerate(rows):
        summary = " ".join(texts_back[len(rows) + i].split()) if sub.summary else ex.summary
        dialogue = clean_dialogue(texts_back[i])
        out.append((Example(ex.id, dialogue, summary, ex.topic, source="back_translation"), ex))
    return out


# --- a local model --------------------------------------------------------------------------------


@method(kind="rewrite")
def local_paraphrase(sub, rows: list[Example], ctx: Context) -> list[Pair]:
    """Each dialogue line's utterance rewritten by a local LM; the speaker tag is kept as is."""
    template = sub.prompt[ctx.language]
    todo = [(ex, k) for ex in rows for k in range(sub.copies)]
    lines = {ex.id: [split_turn(line) for line in ex.dialogue.split("\n")] for ex in rows}
    requests = [(template, text, k) for ex, k in todo for _, text in lines[ex.id] if text.strip()]
    model = ctx.local_model
    model_id = "local:" + ":".join(
        str(model.get(k) or "") for k in ("name", "source", "path", "gguf_file")
    )
    fetch = local_generator(sub, ctx.seed, model, ctx.quant_cfg, ctx.cache_dir)
    replies = iter(ctx.cached(model_id, requests, fetch))
    out = []
    for ex, k in todo:
        text = [tag + (next(replies) if said.strip() else said) for tag, said in lines[ex.id]]
        dialogue = clean_dialogue("\n".join(text))
        out.append((dataclasses.replace(ex, dialogue=dialogue, source=f"local_paraphrase.{k}"), ex))
    return out


def local_generator(sub, seed: int, model_cfg, quant_cfg, cache_dir: str) -> Fetch:
    """A `fetch(items, save)` that loads the local model (only when some line is not cached yet)
    and generates one line per request, stopping at the end of the line."""

    def fetch(items, save) -> None:
        import gc

        import torch

        from summarizer import generate, model
        from summarizer.config import GenerateConfig

        log.info("augmentation local_paraphrase: %d lines with %s", len(items), model_cfg.name)
        lm, tokenizer = model.build_model(model_cfg, quant_cfg, cache_dir)
        gen = GenerateConfig(
            batch_size=sub.batch_size,
            max_new_tokens=sub.max_new_tokens,
            do_sample=sub.temperature > 0,
            temperature=sub.temperature if sub.temperature > 0 else 1.0,
            stop_at_newline=True,
        )
        stops = sorted({model.stop_token_id(model_cfg, tokenizer), tokenizer.eos_token_id})
        prompts = [
            tokenizer(template.replace("{text}", text))["input_ids"]
            for _, (template, text, _copy) in items
        ]
        torch.manual_seed(seed)
        texts = generate.summaries(gen, lm, tokenizer, prompts, stops)
        for (key, _), text in zip(items, texts):
            save(key, text)
        del lm
        gc.collect()

    return fetch


def local_model_config(preset: str | None, run_model):
    """The local_paraphrase model: a conf/model preset by name, else the run's own model."""
    from summarizer.config import ModelConfig

    if preset:
        path = Path(__file__).resolve().parents[2] / "conf" / "model" / f"{preset}.yaml"
        if not path.is_file():
            options = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise UserError(
                f"augmentation.local_paraphrase.model={preset}: no such preset in {path.parent} "
                f"(options: {', '.join(options)})"
            )
        return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    if run_model is None:
        raise UserError("augmentation=local_paraphrase needs a model: set local_paraphrase.model")
    return run_model if isinstance(run_model, DictConfig) else OmegaConf.structured(run_model)


# --- new pairs by a chat model (augmentation.api) -------------------------------------------------


@method(kind="new", api=True)
def synthetic(sub, rows: list[Example], ctx: Context) -> list[Pair]:
    """New pairs for a seeded pick of the training topics; each topic's first training row is
    the example in the request (and the row the filters compare the new one with)."""
    by_topic: dict[str, Example] = {}
    for ex in sorted(rows, key=lambda e: e.id):
        if ex.topic and ex.summary:
            by_topic.setdefault(ex.topic, ex)
    if not by_topic:
        raise UserError(
            "augmentation=synthetic needs topics, and no training row has one "
            "(set data.topic_column to the column that holds them)"
        )
    topics = sorted(by_topic, key=lambda t: digest(f"{ctx.seed}:synthetic:{t}"))
    todo = [(by_topic[t], k) for t in topics for k in range(sub.per_topic)][: sub.max_rows]
    prompt = sub.prompt[ctx.language]
    replies = ctx.ask([(prompt, synthetic_request(ex), k) for ex, k in todo], "synthetic")
    out = []
    for (ex, k), reply in zip(todo, replies):
        dialogue, summary = parse_synthetic(reply)
        out.append((Example(ex.id, dialogue, summary, ex.topic, source=f"synthetic.{k}"), ex))
    return out
