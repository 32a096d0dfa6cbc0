"""The two caches under `augmentation.cache_dir`, and the file lock that guards them between the
processes of a sweep.

- replies/<2 hex>/<key>.json: one model reply, keyed by (model, prompt, text, copy number). A
  rerun, every sweep trial and a run resumed after a failure ask only for what is missing.
- sets/<digest>.jsonl: the finished augmented rows per (augmentation settings that shape rows,
  training rows), with <digest>.json (figures) and <digest>.sample.csv. Written last, the .jsonl
  marks a set complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from summarizer.augment import methods
from summarizer.augment.text import digest
from summarizer.data import Example
from summarizer.errors import UserError
from summarizer.files import write_atomic, write_csv

SPEED_KEYS = ("batch_size",)  # method options that change how fast, not which rows


# --- reply cache ---------------------------------------------------------------------------------


def reply_key(model: str, prompt: str, text: str, copy: int) -> str:
    return digest(json.dumps([model, prompt, text, copy], ensure_ascii=False))


def reply_path(folder: Path, key: str) -> Path:
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
    with locked(folder / "replies.lock"):  # parallel trials never ask for the same reply twice
        missing = {}
        for key, request in zip(keys, requests):
            path = reply_path(folder, key)
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
            write_atomic(reply_path(folder, key), json.dumps(record, ensure_ascii=False))
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


# --- set cache -----------------------------------------------------------------------------------


def set_digest(cfg, names: list[str], train: list[Example], language: str, local_model) -> str:
    """Identity of an augmented set: what shapes its rows (enabled methods' settings, filters,
    seed, model), and the training rows. Speed settings (concurrency, retries ...) are left out."""
    conf = _plain(cfg)
    shape = {name: conf[name] for name in names}
    for settings in shape.values():
        for key in SPEED_KEYS:
            settings.pop(key, None)
    shape.update(filters=conf["filters"], seed=conf["seed"], language=language)
    if any(methods.get(name).api for name in names):
        shape["api"] = {k: conf["api"][k] for k in ("model", "temperature", "max_tokens")}
    if local_model is not None:
        shape["local_model"] = _plain(local_model)
    rows = [[ex.id, ex.dialogue, ex.summary, ex.topic] for ex in train]
    blob = json.dumps({"version": 1, "shape": shape, "rows": rows}, sort_keys=True, default=str)
    return digest(blob)[:16]


def load_set(path: Path) -> tuple[list[Example], dict] | None:
    """(rows, figures) of a complete set at `path` (sets/<digest>.jsonl), else None."""
    if not (path.is_file() and path.with_suffix(".json").is_file()):
        return None
    rows = [Example(**json.loads(line)) for line in path.read_text("utf-8").splitlines()]
    return rows, json.loads(path.with_suffix(".json").read_text("utf-8"))["stats"]


def save_set(path: Path, rows: list[Example], info: dict, header: list, sample: list) -> None:
    """The sample CSV, the figures (`info`) and the rows; the rows last: they mark it complete."""
    write_csv(path.with_suffix(".sample.csv"), header, sample)
    write_atomic(path.with_suffix(".json"), json.dumps(info, indent=1))
    lines = [json.dumps(dataclasses.asdict(ex), ensure_ascii=False) for ex in rows]
    write_atomic(path, "".join(line + "\n" for line in lines))


def _plain(cfg) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg)


# --- lock ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock between processes (sweep trials) on `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
