"""Prompt building and tokenization, shared by training and inference.

A prompt is kept in three parts — text before the dialogue, the dialogue, text after it — so that
tokenization can cut the dialogue alone when the whole does not fit `max_length`: the instruction,
the few-shot examples and the summary are never truncated.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from summarizer.config import FewShotConfig, PromptConfig
from summarizer.data import Example
from summarizer.errors import UserError

IGNORE_INDEX = -100  # label value that the loss skips
_SLOT = "@@DIALOGUE@@"  # placeholder for the dialogue while a chat template renders


@dataclass(frozen=True)
class Prompt:
    prefix: str  # instruction, examples and input label
    dialogue: str
    suffix: str  # text after the dialogue, up to where the summary starts


def resolve_format(fmt: str, tokenizer) -> str:
    if fmt == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "prompt.format=chat but this model's tokenizer has no chat template; use plain"
        )
    if fmt not in ("plain", "chat"):
        raise UserError(f"prompt.format={fmt!r}: expected auto, plain or chat")
    return fmt


def _texts(cfg: PromptConfig, language: str) -> tuple[str, str, str]:
    try:
        return cfg.instruction[language], cfg.input_label[language], cfg.output_label[language]
    except KeyError as e:
        raise UserError(
            f"prompt.{'instruction/input_label/output_label'} has no text for language {e.args[0]!r} "
            f"(data.language); add e.g. prompt.instruction.{e.args[0]}=..."
        ) from None


def clip_chars(text: str, max_chars: int) -> str:
    """Cut a few-shot dialogue to `max_chars`, at a line break when one is near, and never inside a
    #...# token (#Person1#, #PhoneNumber#)."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    newline = cut.rfind("\n")
    cut = cut[:newline] if newline > max_chars // 2 else cut
    token = re.search(r"#[^#\s]*$", cut)  # a '#' at the end whose token closes after the cut
    if token and re.match(r"#[^#\s]*#", text[token.start() :]):
        cut = cut[: token.start()]
    return cut


def build(
    cfg: PromptConfig,
    language: str,
    fmt: str,
    dialogue: str,
    shots: list[Example],
    tokenizer=None,
    *,
    instruction: str | None = None,
) -> Prompt:
    """Assemble the prompt for one dialogue; `fmt` is 'plain' or 'chat' (see `resolve_format`).
    `instruction` replaces the preset's (an augmented training row's own wording)."""
    default_instruction, input_label, output_label = _texts(cfg, language)
    instruction = instruction or default_instruction
    max_chars = cfg.fewshot.max_chars
    if fmt == "plain":
        parts = [instruction, ""]
        for shot in shots:
            parts += [
                input_label,
                clip_chars(shot.dialogue, max_chars),
                f"{output_label} {shot.summary}",
                "",
            ]
        parts.append(input_label)
        prefix = "\n".join(parts) + "\n"
        return Prompt(prefix, dialogue, f"\n{output_label}")

    messages = []
    for i, shot in enumerate(shots):
        head = f"{instruction}\n\n" if i == 0 else ""
        messages.append(
            {
                "role": "user",
                "content": f"{head}{input_label}\n{clip_chars(shot.dialogue, max_chars)}",
            }
        )
        messages.append({"role": "assistant", "content": shot.summary})
    head = "" if shots else f"{instruction}\n\n"
    messages.append({"role": "user", "content": f"{head}{input_label}\n{_SLOT}"})
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    if rendered.count(_SLOT) != 1:
        raise UserError("the model's chat template alters message text; use prompt.format=plain")
    prefix, suffix = rendered.split(_SLOT)
    return Prompt(prefix, dialogue, suffix)


class ShotSelector:
    """Picks the few-shot examples for each dialogue from a pool (the training split)."""

    def __init__(self, cfg: FewShotConfig, pool: list[Example]):
        self.cfg = cfg
        self.pool = [ex for ex in pool if ex.summary]
        if cfg.k < 0:
            raise UserError(f"prompt.fewshot.k={cfg.k} must be >= 0")
        if cfg.selection not in ("fixed", "random", "similar"):
            raise UserError(
                f"prompt.fewshot.selection={cfg.selection!r}: expected fixed, random or similar"
            )
        # A training row is never its own example, so the pool needs k + 1 rows.
        if cfg.k and cfg.k + 1 > len(self.pool):
            raise UserError(
                f"prompt.fewshot.k={cfg.k} is larger than the few-shot pool allows "
                f"({len(self.pool)} training rows with summaries; need k + 1)"
            )
        self._vectorizer = self._matrix = None
        if cfg.k and cfg.selection == "similar":
            from sklearn.feature_extraction.text import TfidfVectorizer

            # Character n-grams work for Korean without a morpheme analyser.
            self._vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 3))
            self._matrix = self._vectorizer.fit_transform([ex.dialogue for ex in self.pool])

    def __call__(self, target: Example) -> list[Example]:
        k = self.cfg.k
        if k == 0:
            return []
        if self.cfg.selection == "fixed":
            candidates = self.pool[: k + 1]
        elif self.cfg.selection == "random":
            # Seeded per row id: the same row gets the same examples in every run and trial.
            candidates = random.Random(f"{self.cfg.seed}:{target.id}").sample(self.pool, k + 1)
        else:
            sims = (
                (self._matrix @ self._vectorizer.transform([target.dialogue]).T).toarray().ravel()
            )
            order = sorted(range(len(self.pool)), key=lambda i: (-sims[i], i))[: k + 1]
            candidates = [self.pool[i] for i in order]
        return [ex for ex in candidates if ex.id != target.id][:k]


def encode(
    tokenizer,
    prompt: Prompt,
    completion: str | None,
    *,
    max_length: int,
    stop_token_id: int,
    reserve: int = 0,
    min_dialogue_tokens: int = 32,
    add_bos: bool = True,
    row_id: str = "?",
) -> dict:
    """Token ids (and labels when `completion` is given) for one example.

    Only the completion (summary + stop token) is supervised. The dialogue is cut so that
    prompt + completion (+ `reserve` tokens, the generation budget at inference) fit `max_length`.
    """

    def ids(text: str, special: bool = False) -> list[int]:
        return tokenizer(text, add_special_tokens=special)["input_ids"] if text else []

    prefix, dialogue, suffix = ids(prompt.prefix, add_bos), ids(prompt.dialogue), ids(prompt.suffix)
    target = [] if completion is None else ids(completion) + [stop_token_id]
    budget = max_length - reserve - len(prefix) - len(suffix) - len(target)
    if budget < min(min_dialogue_tokens, len(dialogue)):
        what = "generation budget" if completion is None else "summary"
        raise UserError(
            f"row '{row_id}': max_length={max_length} is too short: instruction and examples take "
            f"{len(prefix) + len(suffix)} tokens and the {what} {len(target) + reserve}, leaving "
            f"{budget} for the dialogue (need {min_dialogue_tokens}); raise train.max_length or "
            "lower prompt.fewshot.k / prompt.fewshot.max_chars"
        )
    prompt_ids = prefix + dialogue[:budget] + suffix
    out = {"input_ids": prompt_ids + target, "truncated": len(dialogue) > budget}
    if completion is not None:
        out["labels"] = [IGNORE_INDEX] * len(prompt_ids) + target
    return out


def completion_text(summary: str, fmt: str) -> str:
    """What the model learns to write after the prompt (plain prompts end with 'label:')."""
    return f" {summary}" if fmt == "plain" else summary
