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
shows a row its own source) and names its method in `source`. Every generated row must pass the
filters: speaker turns and #...# tokens (#Person1#, #PhoneNumber#, #Address# ...) preserved, length
ratio within bounds, not a near-duplicate of its source or of a sibling, written in the data's script.

Two caches under `augmentation.cache_dir` (default <cache_dir>/augment) make reruns free:
- replies/: one file per model reply, keyed by (model, prompt, text, copy number). A rerun, every
  sweep trial and a run resumed after a failure send only the requests not answered yet.
- sets/: the finished augmented rows per (augmentation config, training rows). Every trial of a
  sweep with the same augmentation reuses them without loading a model or calling the API.

API keys are read at request time from the environment or `.env` (the config holds only the
variable's name), sent only in the Authorization header, and masked in every error message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import http.client
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from summarizer.data import Example
from summarizer.errors import UserError
from summarizer.files import write_atomic, write_csv

log = logging.getLogger(__name__)

SAMPLE_FILE = "augmentation_sample.csv"  # written to the run folder, logged as an MLflow artifact
METHODS = (
    "speaker_swap",
    "instruction_variants",
    "paraphrase",
    "back_translation",
    "local_paraphrase",
    "synthetic",
)
API_METHODS = ("paraphrase", "back_translation", "synthetic")
TEXT_METHODS = ("paraphrase", "back_translation", "local_paraphrase", "synthetic")  # new wording
TOKEN = re.compile(r"#[A-Za-z]+\d*#")  # #Person1#, #PhoneNumber#, #Address#, #DateOfBirth# ...
TURN = re.compile(r"^(#[A-Za-z]+\d*#)\s*:\s*")  # a dialogue line's speaker tag
HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
LATIN = re.compile(r"[A-Za-z]")


# --- entry point ---------------------------------------------------------------------------------


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
    methods = [m for m in METHODS if cfg[m].enabled]
    if not methods:
        return train, {
            "aug_rows_before": len(train),
            "aug_rows_generated": 0,
            "aug_rows_kept": 0,
            "aug_rows_after": len(train),
        }
    check_config(cfg, methods, language)
    folder = Path(cfg.cache_dir or Path(cache_dir) / "augment").expanduser()
    local_model = None
    if "local_paraphrase" in methods:
        local_model = _local_model_config(cfg.local_paraphrase.model, model_cfg)
    digest = set_digest(cfg, methods, train, language, local_model)
    path = folder / "sets" / f"{digest}.jsonl"
    counters: Counter = Counter()
    with _locked(path.with_suffix(".lock")):  # parallel sweep trials: one makes it, the rest wait
        reused = path.is_file() and path.with_suffix(".json").is_file()
        if reused:
            kept = [Example(**json.loads(line)) for line in path.read_text("utf-8").splitlines()]
            stats = json.loads(path.with_suffix(".json").read_text("utf-8"))["stats"]
        else:
            kept, stats, sample = make_set(
                cfg, methods, train, language, folder, counters, local_model, quant_cfg, cache_dir
            )
            write_csv(path.with_suffix(".sample.csv"), SAMPLE_HEADER, sample)
            info = {"stats": stats, "methods": methods, "language": language}
            write_atomic(path.with_suffix(".json"), json.dumps(info, indent=1))
            lines = [json.dumps(dataclasses.asdict(ex), ensure_ascii=False) for ex in kept]
            write_atomic(path, "".join(line + "\n" for line in lines))  # last: marks it complete
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
        "+".join(methods),
        stats["aug_rows_before"],
        stats["aug_rows_generated"],
        stats["aug_rows_kept"],
        stats["aug_rows_after"],
        digest,
        "reused" if reused else "made",
        counters["api_requests"],
    )
    return list(train) + kept, stats


def make_set(cfg, methods, train, language, folder, counters, local_model, quant_cfg, cache_dir):
    """(kept rows, figures, sample CSV rows): every enabled method's candidates, then the filters.
    Each method starts from the original training rows."""
    candidates: list[tuple[Example, Example]] = []  # (generated row, the row it comes from)

    def ask(requests: list[tuple[str, str, int]], what: str) -> list[str]:
        """Chat-API replies to (system prompt, user text, copy) requests, through the cache."""
        fetch = lambda items, save: request_all(cfg.api, items, save, counters, what)  # noqa: E731
        return cached_replies(cfg.api.model, requests, folder, counters, fetch)

    def ask_local(requests: list[tuple[str, str, int]], what: str) -> list[str]:
        """Local-model replies (one line each), through the same cache."""
        model_id = "local:" + ":".join(
            str(local_model.get(k) or "") for k in ("name", "source", "path", "gguf_file")
        )
        fetch = local_generator(cfg.local_paraphrase, cfg.seed, local_model, quant_cfg, cache_dir)
        return cached_replies(model_id, requests, folder, counters, fetch)

    for method in methods:
        sub = cfg[method]
        rows = train if method == "synthetic" else pick(train, sub.fraction, cfg.seed, method)
        if method == "speaker_swap":
            candidates += speaker_swap_rows(rows)
        elif method == "instruction_variants":
            templates = list(sub.templates[language])
            candidates += instruction_variant_rows(rows, templates, sub.copies, cfg.seed)
        elif method == "paraphrase":
            candidates += paraphrase_rows(sub, rows, language, ask)
        elif method == "back_translation":
            candidates += back_translation_rows(sub, rows, language, ask)
        elif method == "local_paraphrase":
            candidates += local_paraphrase_rows(sub, rows, language, ask_local)
        else:
            candidates += synthetic_rows(sub, rows, language, cfg.seed, ask)

    kept, dropped = filter_rows(candidates, train, cfg.filters, language)
    stats = {
        "aug_rows_before": len(train),
        "aug_rows_generated": len(candidates),
        "aug_rows_kept": len(kept),
        "aug_rows_after": len(train) + len(kept),
    }
    for method in methods:
        stats[f"aug_kept_{method}"] = sum(_method(row) == method for row, _ in kept)
    for reason, n in sorted(Counter(reason for _, _, reason in dropped).items()):
        stats[f"aug_dropped_{reason}"] = n
    return [row for row, _ in kept], stats, sample_rows(kept, dropped, methods, cfg.sample_rows)


# --- methods with a model ------------------------------------------------------------------------


def paraphrase_rows(sub, rows: list[Example], language: str, ask) -> list[tuple[Example, Example]]:
    """`sub.copies` rewrites of each dialogue by the chat model; the summary is kept."""
    prompt = sub.prompt[language]
    todo = [(ex, k) for ex in rows for k in range(sub.copies)]
    replies = ask([(prompt, ex.dialogue, k) for ex, k in todo], "paraphrase")
    return [
        (dataclasses.replace(ex, dialogue=clean_dialogue(r), source=f"paraphrase.{k}"), ex)
        for (ex, k), r in zip(todo, replies)
    ]


def back_translation_rows(
    sub, rows: list[Example], language: str, ask
) -> list[tuple[Example, Example]]:
    """Dialogue (and summary) into the pivot language and back; each leg cached on its own."""
    texts = [ex.dialogue for ex in rows] + ([ex.summary for ex in rows] if sub.summary else [])
    there = ask([(sub.to_pivot[language], t, 0) for t in texts], "to pivot")
    todo = [p for p in there if p.strip()]  # an empty first leg has nothing to translate back
    back = iter(ask([(sub.from_pivot[language], p, 0) for p in todo], "from pivot"))
    texts_back = [next(back) if p.strip() else "" for p in there]
    out = []
    for i, ex in enumerate(rows):
        summary = " ".join(texts_back[len(rows) + i].split()) if sub.summary else ex.summary
        dialogue = clean_dialogue(texts_back[i])
        out.append((Example(ex.id, dialogue, summary, ex.topic, source="back_translation"), ex))
    return out


def local_paraphrase_rows(
    sub, rows: list[Example], language: str, ask
) -> list[tuple[Example, Example]]:
    """Each dialogue line's utterance rewritten by a local LM; the speaker tag is kept as is."""
    template = sub.prompt[language]
    todo = [(ex, k) for ex in rows for k in range(sub.copies)]
    turns = {ex.id: [_split_turn(line) for line in ex.dialogue.split("\n")] for ex in rows}
    requests = [(template, text, k) for ex, k in todo for _, text in turns[ex.id] if text.strip()]
    replies = iter(ask(requests, "local_paraphrase"))
    out = []
    for ex, k in todo:
        lines = [tag + (next(replies) if text.strip() else text) for tag, text in turns[ex.id]]
        dialogue = clean_dialogue("\n".join(lines))
        out.append((dataclasses.replace(ex, dialogue=dialogue, source=f"local_paraphrase.{k}"), ex))
    return out


def local_generator(sub, seed: int, model_cfg, quant_cfg, cache_dir: str) -> Callable:
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


def synthetic_rows(
    sub, train: list[Example], language: str, seed: int, ask
) -> list[tuple[Example, Example]]:
    """New pairs for a seeded pick of the training topics; each topic's first training row is
    the example in the request (and the row the filters compare the new one with)."""
    by_topic: dict[str, Example] = {}
    for ex in sorted(train, key=lambda e: e.id):
        if ex.topic and ex.summary:
            by_topic.setdefault(ex.topic, ex)
    if not by_topic:
        raise UserError(
            "augmentation=synthetic needs topics, and no training row has one "
            "(set data.topic_column to the column that holds them)"
        )
    topics = sorted(by_topic, key=lambda t: _hash(f"{seed}:synthetic:{t}"))
    todo = [(by_topic[t], k) for t in topics for k in range(sub.per_topic)][: sub.max_rows]
    prompt = sub.prompt[language]
    replies = ask([(prompt, synthetic_request(ex), k) for ex, k in todo], "synthetic")
    out = []
    for (ex, k), reply in zip(todo, replies):
        dialogue, summary = parse_synthetic(reply)
        out.append((Example(ex.id, dialogue, summary, ex.topic, source=f"synthetic.{k}"), ex))
    return out


# --- methods without a model ---------------------------------------------------------------------


def pick(rows: list[Example], fraction: float, seed: int, method: str) -> list[Example]:
    """A seeded share of the rows, the same whatever their order; kept in their order."""
    if fraction >= 1:
        return list(rows)
    n = round(fraction * len(rows))
    chosen = set(sorted((ex.id for ex in rows), key=lambda i: _hash(f"{seed}:{method}:{i}"))[:n])
    return [ex for ex in rows if ex.id in chosen]


def swap_speakers(text: str) -> str:
    """#Person1# <-> #Person2# everywhere (speaker tags and mentions); other tokens unchanged."""
    return re.sub(r"#Person([12])#", lambda m: f"#Person{3 - int(m.group(1))}#", text)


def speaker_swap_rows(rows: list[Example]) -> list[tuple[Example, Example]]:
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


def instruction_variant_rows(
    rows: list[Example], templates: list[str], copies: int, seed: int
) -> list[tuple[Example, Example]]:
    out = []
    for ex in rows:
        chosen = random.Random(f"{seed}:{ex.id}").sample(templates, copies)
        for k, instruction in enumerate(chosen):
            row = dataclasses.replace(
                ex, instruction=instruction, source=f"instruction_variants.{k}"
            )
            out.append((row, ex))
    return out


# --- text helpers --------------------------------------------------------------------------------


def clean_dialogue(text: str) -> str:
    """A model's dialogue reply in the data's layout: one `#PersonN#: text` line per turn."""
    lines = []
    for line in text.replace("\r\n", "\n").split("\n"):
        line = line.strip()
        if line and not line.startswith("```"):
            lines.append(TURN.sub(lambda m: f"{m.group(1)}: ", line, count=1))
    return "\n".join(lines)


def synthetic_request(example: Example) -> str:
    """The user message for a synthetic pair: the topic and one training row as the example."""
    return (
        f"TOPIC: {example.topic}\n\nEXAMPLE DIALOGUE:\n{example.dialogue}\n\n"
        f"EXAMPLE SUMMARY: {example.summary}"
    )


def parse_synthetic(reply: str) -> tuple[str, str]:
    """(dialogue, summary) from a `DIALOGUE: ... SUMMARY: ...` reply; ('', '') when not found."""
    m = re.search(r"^[*\s]*DIALOGUE[*\s]*:\**(.*?)^[*\s]*SUMMARY[*\s]*:\**(.*)", reply, re.S | re.M)
    if not m:
        return "", ""
    return clean_dialogue(m.group(1)), " ".join(m.group(2).split())


def _split_turn(line: str) -> tuple[str, str]:
    m = TURN.match(line)
    return (line[: m.end()], line[m.end() :]) if m else ("", line)


def _turns(dialogue: str) -> list[str | None]:
    return [m.group(1) if (m := TURN.match(line)) else None for line in dialogue.split("\n")]


def _script_share(text: str, language: str) -> float:
    """Share of letters written in the language's script (Hangul for ko, Latin for en)."""
    text = TOKEN.sub(" ", text)
    letters = sum(ch.isalpha() for ch in text)
    if not letters:
        return 0.0
    script = HANGUL if language == "ko" else LATIN
    return len(script.findall(text)) / letters


def _grams(text: str) -> set[str]:
    text = " ".join(TOKEN.sub(" ", text).split())
    return {text[i : i + 3] for i in range(max(1, len(text) - 2))}


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _method(row: Example) -> str:
    return row.source.split(".")[0]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- filters -------------------------------------------------------------------------------------


def filter_rows(
    candidates: list[tuple[Example, Example]], train: list[Example], f, language: str
) -> tuple[list[tuple[Example, Example]], list[tuple[Example, Example, str]]]:
    """(kept, dropped-with-reason). Reasons: empty, tokens, length, language, duplicate,
    near_duplicate (for rewritten text: too close to its source or to a kept sibling)."""
    known = {t for ex in train for t in TOKEN.findall(f"{ex.dialogue} {ex.summary or ''}")}
    seen = {(ex.instruction, ex.dialogue, ex.summary) for ex in train}
    siblings: dict[str, list[set[str]]] = {}  # per source row: its n-grams and its kept rewrites'
    kept, dropped = [], []
    for row, ref in candidates:
        reason = check_row(row, ref, f, language, known)
        if reason is None and (row.instruction, row.dialogue, row.summary) in seen:
            reason = "duplicate"
        if reason is None and _method(row) in TEXT_METHODS:
            grams = _grams(row.dialogue)
            group = siblings.setdefault(ref.id, [_grams(ref.dialogue)])
            if any(_jaccard(grams, g) > f.max_similarity for g in group):
                reason = "near_duplicate"
            else:
                group.append(grams)
        if reason is None:
            seen.add((row.instruction, row.dialogue, row.summary))
            kept.append((row, ref))
        else:
            dropped.append((row, ref, reason))
    return kept, dropped


def check_row(row: Example, ref: Example, f, language: str, known: set[str]) -> str | None:
    """Why a generated row fails the filters, or None. `ref` is the row it comes from."""
    method = _method(row)
    lines = row.dialogue.split("\n")
    turns = _turns(row.dialogue)
    if not row.dialogue.strip() or not (row.summary or "").strip():
        return "empty"
    if any(tag and not _split_turn(line)[1].strip() for tag, line in zip(turns, lines)):
        return "empty"  # a turn with a speaker tag and nothing said
    if f.keep_tokens:
        if method == "synthetic":
            # New text: every line a turn, two speakers or more, only tokens the data uses, and
            # the summary names only who is in the dialogue.
            tokens = set(TOKEN.findall(row.dialogue))
            if (
                None in turns
                or len(set(turns)) < 2
                or not tokens <= known
                or not set(TOKEN.findall(row.summary)) <= tokens
            ):
                return "tokens"
        else:
            want = ref
            if method == "speaker_swap":  # the tokens of the source, swapped
                want = Example(ref.id, swap_speakers(ref.dialogue), swap_speakers(ref.summary))
            if (
                turns != _turns(want.dialogue)
                or Counter(TOKEN.findall(row.dialogue)) != Counter(TOKEN.findall(want.dialogue))
                or set(TOKEN.findall(row.summary)) != set(TOKEN.findall(want.summary))
            ):
                return "tokens"
    pairs = [(row.dialogue, ref.dialogue)]
    if row.summary != ref.summary and method != "speaker_swap":
        pairs.append((row.summary, ref.summary))
    for new, old in pairs:
        if not f.min_length_ratio <= len(new) / max(1, len(old)) <= f.max_length_ratio:
            return "length"
    for new, old in pairs:
        if _script_share(new, language) < min(f.min_language_share, _script_share(old, language)):
            return "language"
    return None


SAMPLE_HEADER = [
    "method",
    "kept",
    "reason",
    "id",
    "instruction",
    "dialogue",
    "summary",
    "source_dialogue",
    "source_summary",
]


def sample_rows(kept, dropped, methods: list[str], n: int) -> list[list]:
    """Up to n kept rows and n/2 dropped ones, spread over the methods, beside their sources."""
    per = max(1, n // len(methods))
    rows = []
    for method in methods:
        mine = [(r, s, "") for r, s in kept if _method(r) == method][:per]
        mine += [d for d in dropped if _method(d[0]) == method][: max(1, per // 2)]
        for row, ref, reason in mine:
            rows.append(
                [
                    method,
                    int(not reason),
                    reason,
                    row.id,
                    row.instruction or "",
                    row.dialogue,
                    row.summary,
                    ref.dialogue,
                    ref.summary,
                ]
            )
    return rows


# --- reply cache ---------------------------------------------------------------------------------


def reply_key(model: str, prompt: str, text: str, copy: int) -> str:
    return _hash(json.dumps([model, prompt, text, copy], ensure_ascii=False))


def _reply_path(folder: Path, key: str) -> Path:
    return folder / "replies" / key[:2] / f"{key}.json"


def cached_replies(
    model: str,
    requests: list[tuple[str, str, int]],
    folder: Path,
    counters: Counter,
    fetch: Callable,
) -> list[str]:
    """Replies to (prompt, text, copy) requests: from the cache, the rest from `fetch(missing,
    save)`, which calls `save(key, reply)` as each one arrives, so a failure loses nothing."""
    keys = [reply_key(model, *r) for r in requests]
    replies: dict[str, str] = {}
    with _locked(folder / "replies.lock"):  # parallel trials never ask for the same reply twice
        missing = {}
        for key, request in zip(keys, requests):
            path = _reply_path(folder, key)
            if key in replies or key in missing:
                continue
            if path.is_file():
                replies[key] = json.loads(path.read_text("utf-8"))["reply"]
            else:
                missing[key] = request
        counters["replies_cached"] += len(replies)

        def save(key: str, reply: str) -> None:
            prompt, text, copy = missing[key]
            record = {"model": model, "prompt": prompt, "text": text, "copy": copy, "reply": reply}
            write_atomic(_reply_path(folder, key), json.dumps(record, ensure_ascii=False))
            replies[key] = reply

        if missing:
            try:
                fetch(list(missing.items()), save)
            except UserError as e:
                have = len(set(keys) & replies.keys())
                raise UserError(
                    f"{e}; {have} of {len(set(keys))} replies are cached in {folder / 'replies'} "
                    "and the next run resumes from there"
                ) from None
    return [replies[key] for key in keys]


# --- OpenAI-compatible chat API ------------------------------------------------------------------


class _Stopped(Exception):
    """Another request failed: this one gives up without retrying."""


def request_all(api, items: list, save: Callable, counters: Counter, what: str) -> None:
    """Send (key, (prompt, text, copy)) requests, `api.concurrency` at a time, rate limited;
    each reply is saved as soon as it arrives. The first failure stops the rest (UserError)."""
    key = api_key(api)
    url = api.base_url.rstrip("/") + "/chat/completions"
    wait_turn = rate_limiter(api.requests_per_minute)
    stop = threading.Event()
    lock = threading.Lock()
    log.info(
        "augmentation %s: %d requests to %s (model %s, %d at a time)",
        what,
        len(items),
        url,
        api.model,
        api.concurrency,
    )

    def one(item) -> None:
        cache_key, (prompt, text, _copy) = item
        try:
            reply = chat(api, url, key, prompt, text, wait_turn, stop)
        except UserError:
            stop.set()  # queued requests do not start
            raise
        save(cache_key, reply)
        with lock:
            counters["api_requests"] += 1

    done, step, start = 0, max(1, len(items) // 10), time.monotonic()
    with ThreadPoolExecutor(max_workers=api.concurrency) as pool:
        futures = [pool.submit(one, item) for item in items]
        try:
            for future in as_completed(futures):
                try:
                    future.result()
                except _Stopped:
                    continue  # the failure that stopped it comes through its own future
                done += 1
                if done % step == 0 or done == len(items):
                    log.info(
                        "augmentation %s: %d/%d replies (%.0f s)",
                        what,
                        done,
                        len(items),
                        time.monotonic() - start,
                    )
        except BaseException:
            stop.set()  # requests in flight finish (and are cached); queued ones never start
            for future in futures:
                future.cancel()
            raise


def chat(api, url: str, key: str | None, prompt: str, text: str, wait_turn, stop) -> str:
    """One chat completion with retries: 429, 408, 5xx, timeouts and connection errors back off
    exponentially (a Retry-After header wins); 401/403 and other 4xx fail at once."""
    body = json.dumps(
        {
            "model": api.model,
            "messages": [
                {"role": "system", "content": prompt},
                {"role": "user", "content": text},
            ],
            "temperature": api.temperature,
            "max_tokens": api.max_tokens,
        }
    ).encode("utf-8")
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    attempts = api.max_retries + 1
    last = ""
    for attempt in range(attempts):
        if stop.is_set():
            raise _Stopped
        wait_turn()
        backoff = min(api.max_wait, api.retry_wait * 2**attempt)
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=api.timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
            content = reply["choices"][0]["message"]["content"]
            return content if isinstance(content, str) else ""
        except urllib.error.HTTPError as e:
            detail = _error_detail(e)
            if e.code in (401, 403):
                raise UserError(
                    mask(
                        f"augmentation.api: {url} rejected the API key (HTTP {e.code}{detail}); "
                        f"check {api.key_env} (environment or .env in {Path.cwd()})",
                        key,
                    )
                ) from None
            if e.code not in (408, 429) and e.code < 500:
                raise UserError(
                    mask(
                        f"augmentation.api: {url} answered HTTP {e.code}{detail}; check "
                        f"augmentation.api.base_url and augmentation.api.model={api.model}",
                        key,
                    )
                ) from None
            last = f"HTTP {e.code}{detail}"
            backoff = _retry_after(e, backoff, api.max_wait)
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", None) or e
            last = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
        except (ValueError, KeyError, IndexError, TypeError) as e:
            last = f"unreadable reply ({type(e).__name__}: {str(e)[:100]})"
        if attempt + 1 < attempts:
            log.warning(
                "augmentation api: %s; retry %d/%d in %.1f s",
                mask(last, key),
                attempt + 1,
                api.max_retries,
                backoff,
            )
            if stop.wait(backoff):
                raise _Stopped
    raise UserError(
        mask(
            f"augmentation.api: {url} failed {attempts} time(s), last: {last} "
            "(raise augmentation.api.max_retries / .timeout, or retry later)",
            key,
        )
    )


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read().decode("utf-8", "replace")
    except Exception:
        return ""
    body = " ".join(body.split())[:200]
    return f": {body}" if body else ""


def _retry_after(e: urllib.error.HTTPError, default: float, cap: float) -> float:
    try:
        return min(cap, max(0.0, float(e.headers.get("Retry-After", ""))))
    except (TypeError, ValueError):
        return default


def rate_limiter(per_minute: float) -> Callable[[], None]:
    """A function that blocks until the next request may start (evenly spaced starts)."""
    interval = 60.0 / per_minute if per_minute > 0 else 0.0
    lock = threading.Lock()
    state = {"next": time.monotonic()}

    def wait_turn() -> None:
        if not interval:
            return
        with lock:
            now = time.monotonic()
            start = max(now, state["next"])
            state["next"] = start + interval
        time.sleep(max(0.0, start - now))

    return wait_turn


def api_key(api) -> str | None:
    """The key named by `api.key_env`, from the environment, else from `.env` in the launch folder.
    Read when a request is due, so a run served from the cache needs no key."""
    if not api.key_env:
        return None
    key = os.environ.get(api.key_env) or read_dotenv(Path.cwd() / ".env").get(api.key_env)
    if not key:
        raise UserError(
            f"augmentation.api: no API key: set {api.key_env} in the environment or in "
            f"{Path.cwd() / '.env'} (augmentation.api.key_env names the variable; null sends none)"
        )
    return key.strip()


def read_dotenv(path: Path) -> dict[str, str]:
    """`NAME=value` lines of a .env file (optional `export`, quotes, # comments)."""
    values = {}
    if not path.is_file():
        return values
    for line in path.read_text("utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, value = line.removeprefix("export ").split("=", 1)
        value = value.strip()
        if value[:1] in ("'", '"') and value.endswith(value[0]) and len(value) > 1:
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].strip()
        values[name.strip()] = value
    return values


def mask(text: str, key: str | None) -> str:
    """The text without the key (and without any bearer token an endpoint echoes back)."""
    if key:
        text = text.replace(key, "***")
    return re.sub(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+", r"\1***", text)


# --- config, cache identity, locks ---------------------------------------------------------------


def check_config(cfg, methods: list[str], language: str) -> None:
    """Fail before any work on values that cannot work, naming the key."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(f"augmentation.{message}")

    for method in methods:
        sub = cfg[method]
        if "fraction" in sub:
            need(0 <= sub.fraction <= 1, f"{method}.fraction={sub.fraction}: expected 0 to 1")
        if "copies" in sub:
            need(sub.copies >= 1, f"{method}.copies={sub.copies}: expected 1 or more")
        for name in ("prompt", "templates", "to_pivot", "from_pivot"):
            if name in sub:
                need(
                    bool(sub[name].get(language)),
                    f"{method}.{name} has no entry for data.language={language!r}: add "
                    f"augmentation.{method}.{name}.{language}=... (see conf/augmentation/{method}.yaml)",
                )
    if "instruction_variants" in methods:
        sub, n = cfg.instruction_variants, len(cfg.instruction_variants.templates[language])
        need(sub.copies <= n, f"instruction_variants.copies={sub.copies}: only {n} templates")
    if "local_paraphrase" in methods:
        need(
            "{text}" in cfg.local_paraphrase.prompt[language],
            f"local_paraphrase.prompt.{language} needs a {{text}} slot for the utterance",
        )
    if "synthetic" in methods:
        sub = cfg.synthetic
        need(sub.per_topic >= 1, f"synthetic.per_topic={sub.per_topic}: expected 1 or more")
        need(sub.max_rows >= 0, f"synthetic.max_rows={sub.max_rows}: expected 0 or more")
    f = cfg.filters
    need(
        0 < f.min_length_ratio <= f.max_length_ratio,
        f"filters: need 0 < min_length_ratio ({f.min_length_ratio}) <= max_length_ratio "
        f"({f.max_length_ratio})",
    )
    need(0 < f.max_similarity <= 1, f"filters.max_similarity={f.max_similarity}: expected (0, 1]")
    need(
        0 <= f.min_language_share <= 1,
        f"filters.min_language_share={f.min_language_share}: expected 0 to 1",
    )
    if any(m in API_METHODS for m in methods):
        api = cfg.api
        need(
            api.base_url.startswith(("http://", "https://")),
            f"api.base_url={api.base_url!r}: expected an http(s) URL",
        )
        need(api.concurrency >= 1, f"api.concurrency={api.concurrency}: expected 1 or more")
        need(api.max_retries >= 0, f"api.max_retries={api.max_retries}: expected 0 or more")
        need(api.timeout > 0, f"api.timeout={api.timeout}: expected seconds > 0")


def set_digest(cfg, methods: list[str], train: list[Example], language: str, local_model) -> str:
    """Identity of an augmented set: what shapes its rows (enabled methods' settings, filters,
    seed, model), and the training rows. Speed settings (concurrency, retries ...) are left out."""
    conf = _plain(cfg)
    shape = {m: conf[m] for m in methods}
    shape.get("local_paraphrase", {}).pop("batch_size", None)
    shape.update(filters=conf["filters"], seed=conf["seed"], language=language)
    if any(m in API_METHODS for m in methods):
        shape["api"] = {k: conf["api"][k] for k in ("model", "temperature", "max_tokens")}
    if local_model is not None:
        shape["local_model"] = _plain(local_model)
    rows = [[ex.id, ex.dialogue, ex.summary, ex.topic] for ex in train]
    blob = json.dumps({"version": 1, "shape": shape, "rows": rows}, sort_keys=True, default=str)
    return _hash(blob)[:16]


def _plain(cfg) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg)


def _local_model_config(preset: str | None, run_model):
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


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock between processes (sweep trials) on `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
