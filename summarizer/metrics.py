"""ROUGE-1/2/L F1 with a tokenizer that suits the language (mecab morphemes for Korean).

`rouge_score`'s default tokenizer keeps only [a-z0-9], so identical Korean sentences score 0. The
competition scores morphemes; mecab splits `#Person1#` into four tokens, which rewards copying speaker
tags, so by default such tags are kept whole (the honest variant). Scores are F1 x 100.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

from summarizer.config import TaskConfig
from summarizer.errors import UserError
from summarizer.lists import count_items, split_items

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# task.metrics names and the scores each adds (any of them can be task.objective)
METRICS = {
    "rouge": (*ROUGE_TYPES, "rouge_sum", "final"),
    "subq_count": ("subq_count_acc", "subq_count_mae"),
}
LOWER_IS_BETTER = ("subq_count_mae",)  # every other score: higher is better
TARGET_FORMATS = ("text", "numbered_list")
_SPECIAL = re.compile(r"(#[A-Za-z]+\d*#)")  # #Person1#, #PhoneNumber#, #Address# ...


# rouge_score calls only .tokenize(text) on a tokenizer; it is imported where scores are made, so
# that preflight (which checks metric settings) does not pay its import (nltk, absl: ~1.7 s).
class MecabTokenizer:
    def __init__(self, keep_special_tokens: bool = True):
        from mecab import MeCab

        self._mecab = MeCab()
        self.keep_special_tokens = keep_special_tokens

    def tokenize(self, text: str) -> list[str]:
        if not self.keep_special_tokens:
            return self._mecab.morphs(text)
        tokens = []
        for piece in _SPECIAL.split(text):
            if _SPECIAL.fullmatch(piece):
                tokens.append(piece)
            elif piece.strip():
                tokens.extend(self._mecab.morphs(piece))
        return tokens


class WhitespaceTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return text.split()


def resolve_tokenizer(name: str, language: str) -> str:
    if name == "auto":
        return "mecab" if language == "ko" else "default"
    if name not in ("mecab", "whitespace", "default"):
        raise UserError(f"metric.tokenizer={name!r}: expected auto, mecab, whitespace or default")
    return name


@lru_cache(maxsize=4)
def _tokenizer(tokenizer: str, keep_special_tokens: bool):
    """The object ROUGE tokenizes with (anything with .tokenize(text) -> list[str])."""
    if tokenizer == "mecab":
        return MecabTokenizer(keep_special_tokens)
    if tokenizer == "whitespace":
        return WhitespaceTokenizer()
    # rouge_score's own: lowercased [a-z0-9] words with Porter stemming (standard English ROUGE)
    from rouge_score import tokenizers

    return tokenizers.DefaultTokenizer(use_stemmer=True)


@lru_cache(maxsize=4)
def _scorer(tokenizer: str, keep_special_tokens: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(
        list(ROUGE_TYPES), tokenizer=_tokenizer(tokenizer, keep_special_tokens)
    )


def token_count(text: str, tokenizer: str = "mecab", keep_special_tokens: bool = True) -> int:
    """The length of `text` in the tokens ROUGE counts (mecab morphemes for Korean)."""
    return len(_tokenizer(tokenizer, keep_special_tokens).tokenize(text))


def rouge_rows(
    predictions: list[str],
    references: list[str | list[str]],
    tokenizer: str = "mecab",
    keep_special_tokens: bool = True,
) -> list[dict[str, float]]:
    """ROUGE-1/2/L F1 x 100 of each example, plus their sum and mean (the competition's `final`).

    A reference may be a list of references; the best-scoring one counts (rouge_score's score_multi).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = _scorer(tokenizer, keep_special_tokens)
    rows = []
    for pred, ref in zip(predictions, references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        scores = scorer.score_multi(refs, pred)
        row = {key: 100 * scores[key].fmeasure for key in ROUGE_TYPES}
        row["rouge_sum"] = sum(row[k] for k in ROUGE_TYPES)
        row["final"] = row["rouge_sum"] / 3
        rows.append(row)
    return rows


def rouge(
    predictions: list[str],
    references: list[str | list[str]],
    tokenizer: str = "mecab",
    keep_special_tokens: bool = True,
) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 x 100 over examples, plus their sum and mean (the competition's `final`)."""
    if not predictions:
        raise ValueError("no predictions to score")
    return mean_rows(rouge_rows(predictions, references, tokenizer, keep_special_tokens))


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each score's mean over rows (the keys of the first row)."""
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}


def check_task(cfg: TaskConfig) -> None:
    """Fail before training, not after, on a metric name or objective that cannot be computed."""
    unknown = [name for name in cfg.metrics if name not in METRICS]
    if unknown or not cfg.metrics:
        raise UserError(
            f"task.metrics={list(cfg.metrics)}: expected one or more of {', '.join(METRICS)}"
        )
    keys = [key for name in cfg.metrics for key in METRICS[name]]
    if cfg.objective not in keys:
        raise UserError(
            f"task.objective={cfg.objective!r} is not a score of task.metrics={list(cfg.metrics)} "
            f"(they give {', '.join(keys)})"
        )
    if cfg.target_format not in TARGET_FORMATS:
        raise UserError(
            f"task.target_format={cfg.target_format!r}: expected {' or '.join(TARGET_FORMATS)}"
        )


def score_rows(
    cfg: TaskConfig,
    predictions: list[str],
    references: list[str],
    tokenizer: str = "mecab",
    keep_special_tokens: bool = True,
) -> list[dict[str, float]]:
    """The task's metrics of each validation row (their means are `score`): what paired tests
    (the Wilcoxon pruner, the sweep report's bootstrap) and MBR compare row by row."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    rows: list[dict[str, float]] = [{} for _ in predictions]
    for name in cfg.metrics:
        if name == "rouge":
            # A list's words, not its "1." "2." markers, which every list shares for free.
            as_items = cfg.target_format == "numbered_list"
            preds = _items(predictions) if as_items else predictions
            refs = _items(references) if as_items else references
            for row, s in zip(rows, rouge_rows(preds, refs, tokenizer, keep_special_tokens)):
                row.update(s)
        elif name == "subq_count":
            for row, p, r in zip(rows, predictions, references):
                d = abs(count_items(p) - count_items(r))
                row.update({"subq_count_acc": float(d == 0), "subq_count_mae": float(d)})
        else:
            check_task(cfg)  # names the unknown metric
    return rows


def score(
    cfg: TaskConfig,
    predictions: list[str],
    references: list[str],
    tokenizer: str = "mecab",
    keep_special_tokens: bool = True,
) -> dict[str, float]:
    """The task's metrics over the validation rows, in the order task.metrics lists them."""
    if not predictions:
        raise ValueError("no predictions to score")
    return mean_rows(score_rows(cfg, predictions, references, tokenizer, keep_special_tokens))


def pairwise(
    cfg: TaskConfig,
    texts: list[str],
    key: str,
    tokenizer: str = "mecab",
    keep_special_tokens: bool = True,
) -> list[list[float]]:
    """Score `key` (one of task.metrics' scores) of every text against every other, as
    score_rows gives it with text i as prediction and text j as reference: matrix[i][j].
    For MBR's N x N pairs each text is tokenized and counted once, and the LCS runs bit-parallel
    (rouge_score tokenizes both texts per call and fills an LCS table in Python: ~4x slower);
    the arithmetic is rouge_score's own (tests check the numbers are equal). Every score here
    is symmetric (F1, a count difference), so each pair is scored once."""
    n = len(texts)
    if key in METRICS["rouge"]:
        from rouge_score.scoring import fmeasure

        tok = _tokenizer(tokenizer, keep_special_tokens)
        as_items = cfg.target_format == "numbered_list"
        tokens = [tok.tokenize(t) for t in (_items(texts) if as_items else texts)]
        grams = [(Counter(_ngrams(t, 1)), Counter(_ngrams(t, 2))) for t in tokens]
        masks = [_lcs_masks(t) for t in tokens]

        def f1(overlap: int, pred: int, ref: int) -> float:
            return 100 * fmeasure(overlap / max(pred, 1), overlap / max(ref, 1))

        def one(i: int, j: int) -> float:
            row = {}
            for name, (a, b) in zip(("rouge1", "rouge2"), zip(grams[i], grams[j])):
                overlap = sum(min(count, a[g]) for g, count in b.items())
                row[name] = f1(overlap, sum(a.values()), sum(b.values()))
            pred, ref = tokens[i], tokens[j]
            lcs = _lcs_length(masks[j], len(ref), pred) if pred and ref else 0
            row["rougeL"] = f1(lcs, len(pred), len(ref)) if pred and ref else 0.0
            row["rouge_sum"] = sum(row[k] for k in ROUGE_TYPES)
            row["final"] = row["rouge_sum"] / 3
            return row[key]

    elif key in METRICS["subq_count"]:
        counts = [count_items(t) for t in texts]

        def one(i: int, j: int) -> float:
            d = abs(counts[i] - counts[j])
            return float(d == 0) if key == "subq_count_acc" else float(d)

    else:
        raise ValueError(f"{key!r} is not a score of {', '.join(METRICS)}")
    matrix = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            matrix[i][j] = matrix[j][i] = one(i, j)
    return matrix


def _ngrams(tokens: list[str], n: int):
    return (tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _lcs_masks(tokens: list[str]) -> dict[str, int]:
    """Per token: the bit set of the positions where it occurs."""
    masks: dict[str, int] = {}
    for i, t in enumerate(tokens):
        masks[t] = masks.get(t, 0) | (1 << i)
    return masks


def _lcs_length(masks: dict[str, int], n: int, other: list[str]) -> int:
    """Length of the longest common subsequence of a sequence of n tokens (its `_lcs_masks`) and
    `other`: the bit-parallel recurrence of Allison and Dix (1986), one big-int step per token of
    `other`; the zero bits of v among the low n count the LCS."""
    full = (1 << n) - 1
    v = full
    for t in other:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return n - v.bit_count()


def subq_count(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Sub-question count: the share of rows whose prediction lists as many items as the reference
    (0-1), and the mean absolute difference in items."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    diffs = [abs(count_items(p) - count_items(r)) for p, r in zip(predictions, references)]
    return {
        "subq_count_acc": sum(d == 0 for d in diffs) / len(diffs),
        "subq_count_mae": sum(diffs) / len(diffs),
    }


def _items(texts: list[str]) -> list[str]:
    return ["\n".join(split_items(text)) for text in texts]
