"""Minimum Bayes risk selection (generate.strategy=mbr): among one dialogue's sampled summaries,
the one with the highest expected task.objective against the others, each sample standing in for
a reference the model might have written.

Identical candidates are scored once: the utility matrix is over distinct texts, and a text that
was sampled k times counts k times as evidence (k - 1 times for itself), so the model's mode
gains what repeated sampling says about it. Ties go to the earliest candidate (the greedy one
when generate.mbr.include_greedy).
"""

from __future__ import annotations

from collections.abc import Callable

from summarizer import metrics
from summarizer.config import TaskConfig


def expected_utility(matrix: list[list[float]], counts: list[int]) -> list[float]:
    """Per distinct text i: its mean utility against the other samples, text j sampled
    counts[j] times (i's own copies beyond itself included)."""
    total = sum(counts)
    if total < 2:
        return [0.0] * len(counts)
    return [
        sum(u * (c - (i == j)) for j, (u, c) in enumerate(zip(row, counts))) / (total - 1)
        for i, row in enumerate(matrix)
    ]


def select(candidates: list[str], utility: Callable[[list[str]], list[list[float]]]) -> int:
    """The index of the candidate of highest expected utility; `utility(texts)` gives the
    matrix of distinct texts (higher is better)."""
    distinct = list(dict.fromkeys(candidates))  # first-seen order: ties keep the earliest
    counts = [candidates.count(t) for t in distinct]
    if len(distinct) == 1:
        return 0
    scores = expected_utility(utility(distinct), counts)
    best = max(range(len(distinct)), key=lambda i: (scores[i], -i))
    return candidates.index(distinct[best])


def selector(
    task: TaskConfig, tokenizer: str, keep_special_tokens: bool
) -> Callable[[list[str]], int]:
    """The pipeline's select function: task.objective with the run's metric tokenizer (an
    objective where lower is better, subq_count_mae, is negated)."""
    key = task.objective
    sign = -1.0 if key in metrics.LOWER_IS_BETTER else 1.0

    def utility(texts: list[str]) -> list[list[float]]:
        matrix = metrics.pairwise(task, texts, key, tokenizer, keep_special_tokens)
        return [[sign * u for u in row] for row in matrix]

    return lambda candidates: select(candidates, utility)
