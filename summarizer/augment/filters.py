"""The checks every generated row must pass (`augmentation.filters`), and the sample CSV of kept
and dropped rows beside their sources.

A row is dropped, with its reason counted in MLflow, when it is empty, lost or changed speaker
turns or #...# tokens (what is expected depends on its method's kind, see methods.KINDS), its
length ratio to the source is out of bounds, too little of it is in the data's script, it repeats
a training row or a kept row, or (new wording) it is a near-duplicate of its source or a sibling.
"""

from __future__ import annotations

from collections import Counter

from summarizer.augment import methods
from summarizer.augment.text import (
    TOKEN,
    grams,
    jaccard,
    method_of,
    script_share,
    split_turn,
    swap_speakers,
    turns,
)
from summarizer.data import Example


def filter_rows(
    candidates: list[tuple[Example, Example]], train: list[Example], f, language: str
) -> tuple[list[tuple[Example, Example]], list[tuple[Example, Example, str]]]:
    """(kept, dropped-with-reason). Reasons: empty, tokens, length, language, duplicate,
    near_duplicate (new wording too close to its source or to a kept sibling)."""
    known = {t for ex in train for t in TOKEN.findall(f"{ex.dialogue} {ex.summary or ''}")}
    seen = {(ex.instruction, ex.dialogue, ex.summary) for ex in train}
    siblings: dict[str, list[set[str]]] = {}  # per source row: its n-grams and its kept rewrites'
    kept, dropped = [], []
    for row, ref in candidates:
        reason = check_row(row, ref, f, language, known)
        if reason is None and (row.instruction, row.dialogue, row.summary) in seen:
            reason = "duplicate"
        if reason is None and methods.get(method_of(row)).kind in ("rewrite", "new"):
            mine = grams(row.dialogue)
            group = siblings.setdefault(ref.id, [grams(ref.dialogue)])
            if any(jaccard(mine, g) > f.max_similarity for g in group):
                reason = "near_duplicate"
            else:
                group.append(mine)
        if reason is None:
            seen.add((row.instruction, row.dialogue, row.summary))
            kept.append((row, ref))
        else:
            dropped.append((row, ref, reason))
    return kept, dropped


def check_row(row: Example, ref: Example, f, language: str, known: set[str]) -> str | None:
    """Why a generated row fails the filters, or None. `ref` is the row it comes from; `known`
    the #...# tokens of the training data."""
    kind = methods.get(method_of(row)).kind
    lines = row.dialogue.split("\n")
    speakers = turns(row.dialogue)
    if not row.dialogue.strip() or not (row.summary or "").strip():
        return "empty"
    if any(tag and not split_turn(line)[1].strip() for tag, line in zip(speakers, lines)):
        return "empty"  # a turn with a speaker tag and nothing said
    if f.keep_tokens:
        if kind == "new":
            # Every line a turn, two speakers or more, only tokens the data uses, and the summary
            # names only who is in the dialogue.
            tokens = set(TOKEN.findall(row.dialogue))
            if (
                None in speakers
                or len(set(speakers)) < 2
                or not tokens <= known
                or not set(TOKEN.findall(row.summary)) <= tokens
            ):
                return "tokens"
        else:
            want = ref
            if kind == "swap":
                want = Example(ref.id, swap_speakers(ref.dialogue), swap_speakers(ref.summary))
            if (
                speakers != turns(want.dialogue)
                or Counter(TOKEN.findall(row.dialogue)) != Counter(TOKEN.findall(want.dialogue))
                or set(TOKEN.findall(row.summary)) != set(TOKEN.findall(want.summary))
            ):
                return "tokens"
    pairs = [(row.dialogue, ref.dialogue)]
    if row.summary != ref.summary and kind != "swap":
        pairs.append((row.summary, ref.summary))
    for new, old in pairs:
        if not f.min_length_ratio <= len(new) / max(1, len(old)) <= f.max_length_ratio:
            return "length"
    for new, old in pairs:
        if script_share(new, language) < min(f.min_language_share, script_share(old, language)):
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


def sample_rows(kept, dropped, names: list[str], n: int) -> list[list]:
    """Up to n kept rows and n/2 dropped ones, spread over the methods, beside their sources."""
    per = max(1, n // len(names))
    rows = []
    for name in names:
        mine = [(r, s, "") for r, s in kept if method_of(r) == name][:per]
        mine += [d for d in dropped if method_of(d[0]) == name][: max(1, per // 2)]
        for row, ref, reason in mine:
            rows.append(
                [
                    name,
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
