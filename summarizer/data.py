"""Load and validate task data (CSV, JSON, JSONL) and split it into train/validation.

Whatever the task, a row becomes an Example: its input field (data.dialogue_column, by default the
task's input_field) is `dialogue`, its target field (data.summary_column) is `summary`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from summarizer.config import DataConfig
from summarizer.errors import UserError
from summarizer.lists import numbered

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    id: str
    dialogue: str
    summary: str | None = None  # None for test rows
    topic: str | None = None
    instruction: str | None = None  # an augmented row's own instruction; None: the prompt preset's
    source: str = "original"  # else the augmentation that made it (the id stays its source row's)


def read_records(path: str | Path) -> list[dict]:
    """Read a CSV, JSON (a list of objects) or JSONL file into a list of dicts, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    raw = path.read_bytes()
    if not raw.strip():
        raise UserError(f"data file is empty: {path}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}: not UTF-8 text (bad byte at line {line}); re-save it as UTF-8"
        ) from e
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, text)
    if suffix == ".jsonl":
        records = []
        # Lines end at \n only: str.splitlines would also split inside strings at U+2028, U+0085 ...
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: invalid JSON line ({e.msg})") from e
        return _check_objects(path, records)
    if suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
        if isinstance(records, dict) and isinstance(records.get("data"), list):
            records = records["data"]
        if not isinstance(records, list):
            raise UserError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
        return _check_objects(path, records)
    raise UserError(f"{path}: unsupported data format '{suffix}' (use .csv, .json or .jsonl)")


def _read_csv(path: Path, text: str) -> list[dict]:
    # newline="": line breaks inside quoted fields are kept whole (str.splitlines would also break
    # unquoted fields at U+2028, form feeds ...); strict: a quote left open at the end is an error.
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    records = []
    try:
        if not reader.fieldnames:
            raise UserError(f"{path}: no header row")
        for row in reader:
            # A row with more cells than the header (a stray quote or comma) gets a None key.
            if None in row:
                raise UserError(
                    f"{path}: row {reader.line_num} has more fields than the header {reader.fieldnames}"
                )
            if None in row.values():  # fewer cells: a row cut short
                raise UserError(
                    f"{path}: row {len(records) + 1} has fewer fields than the header "
                    f"{reader.fieldnames}; is the file truncated?"
                )
            records.append(row)
    except csv.Error as e:
        raise UserError(
            f"{path}: row {len(records) + 1} is not valid CSV ({e}); is the file truncated, or a "
            "quote left open?"
        ) from e
    if not records:
        raise UserError(f"{path}: header only, no rows")
    return records


def _check_objects(path: Path, records: list) -> list[dict]:
    for n, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: record {n} is not an object")
    if not records:
        raise UserError(f"{path}: no records")
    return records


def load(cfg: DataConfig, path: str | None = None, require_summary: bool = True) -> list[Example]:
    """Load `path` (default `cfg.path`) as Examples, validating columns, ids and empty texts."""
    path = Path(path or cfg.path)
    records = read_records(path)
    columns = set().union(*(r.keys() for r in records))
    needed = [cfg.id_column, cfg.dialogue_column] + (
        [cfg.summary_column] if require_summary else []
    )
    missing = [c for c in needed if c not in columns]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {missing}; found {sorted(columns)} "
            f"(set data.id_column / data.dialogue_column / data.summary_column; the last two "
            "default to task.input_field / task.target_field)"
        )

    examples, seen, skipped = [], {}, 0
    for n, rec in enumerate(records, 1):
        ex_id = str(rec.get(cfg.id_column) or "").strip()
        where = f"{path}: row {n} (id '{ex_id}')"
        if not ex_id:
            raise UserError(f"{path}: row {n} has an empty '{cfg.id_column}'")
        if ex_id in seen:
            raise UserError(f"{path}: duplicate id '{ex_id}' in rows {seen[ex_id]} and {n}")
        seen[ex_id] = n
        # A JSON record may lack a field that others have (a CSV row always has every column).
        absent = [c for c in needed[1:] if c not in rec]
        if absent:
            if cfg.skip_invalid_rows:
                skipped += 1
                continue
            raise UserError(
                f"{where}: missing '{'/'.join(absent)}' (fix the row or set "
                "data.skip_invalid_rows=true)"
            )
        dialogue = _text(rec.get(cfg.dialogue_column), where, cfg.dialogue_column)
        summary = (
            _text(rec.get(cfg.summary_column), where, cfg.summary_column, as_list=True)
            if cfg.summary_column in rec
            else None
        )
        empty = [c for c, v in [(cfg.dialogue_column, dialogue)] if not v]
        if require_summary and not summary:
            empty.append(cfg.summary_column)
        if empty:
            if cfg.skip_invalid_rows:
                skipped += 1
                continue
            raise UserError(
                f"{where}: empty '{'/'.join(empty)}' (fix the row or set data.skip_invalid_rows=true)"
            )
        topic = (
            _text(rec.get(cfg.topic_column), where, cfg.topic_column) if cfg.topic_column else None
        )
        examples.append(Example(ex_id, dialogue, summary or None, topic or None))
    if skipped:
        log.warning("%s: skipped %d row(s) with a missing or empty input or target", path, skipped)
    if not examples:
        raise UserError(f"{path}: no usable rows")
    return examples


def _text(value, where: str = "", column: str = "", as_list: bool = False) -> str:
    """A cell as stripped text. With `as_list`, a JSON list of strings (sub-questions, say) becomes
    the numbered list "1. ...\n2. ..." that the model learns to write."""
    if value is None:
        return ""
    if isinstance(value, list) and as_list:
        for i, item in enumerate(value, 1):
            if not isinstance(item, str) or not item.strip():
                what = "empty" if isinstance(item, str) else f"not text ({type(item).__name__})"
                raise UserError(f"{where}: '{column}' item {i} is {what}")
        return numbered(value)
    if isinstance(value, (list, dict)):
        kind = "a list" if isinstance(value, list) else "an object"
        raise UserError(f"{where}: '{column}' is {kind}; expected text")
    return str(value).strip()


def split(
    examples: list[Example], val_size: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Seeded split by id: the same ids land in validation whatever the file order. `val_size=0`:
    no validation split, every row trains (a refit on all labelled rows)."""
    if val_size == 0:
        return list(examples), []
    n_val = round(val_size * len(examples)) if val_size < 1 else int(val_size)
    if not 0 < n_val < len(examples):
        raise UserError(
            f"data.val_size={val_size} gives {n_val} validation rows out of {len(examples)}; "
            "need at least one row on each side"
        )
    ids = sorted(ex.id for ex in examples)
    random.Random(seed).shuffle(ids)
    val_ids = set(ids[:n_val])
    train = [ex for ex in examples if ex.id not in val_ids]
    val = [ex for ex in examples if ex.id in val_ids]
    return train, val
