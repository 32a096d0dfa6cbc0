"""Dialogue text helpers: speaker turns and #...# tokens, model replies in the data's layout,
character n-grams and script shares for the filters, and a stable hash for seeded picks."""

from __future__ import annotations

import hashlib
import re

from summarizer.data import Example

TOKEN = re.compile(r"#[A-Za-z]+\d*#")  # #Person1#, #PhoneNumber#, #Address#, #DateOfBirth# ...
TURN = re.compile(r"^(#[A-Za-z]+\d*#)\s*:\s*")  # a dialogue line's speaker tag
HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
LATIN = re.compile(r"[A-Za-z]")


def swap_speakers(text: str) -> str:
    """#Person1# <-> #Person2# everywhere (speaker tags and mentions); other tokens unchanged."""
    return re.sub(r"#Person([12])#", lambda m: f"#Person{3 - int(m.group(1))}#", text)


def split_turn(line: str) -> tuple[str, str]:
    """(speaker tag with its colon and space, utterance); ('', line) for a line without a tag."""
    m = TURN.match(line)
    return (line[: m.end()], line[m.end() :]) if m else ("", line)


def turns(dialogue: str) -> list[str | None]:
    """Each line's speaker token, None for a line without one."""
    return [m.group(1) if (m := TURN.match(line)) else None for line in dialogue.split("\n")]


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


def script_share(text: str, language: str) -> float:
    """Share of letters written in the language's script (Hangul for ko, Latin for en)."""
    text = TOKEN.sub(" ", text)
    letters = sum(ch.isalpha() for ch in text)
    if not letters:
        return 0.0
    script = HANGUL if language == "ko" else LATIN
    return len(script.findall(text)) / letters


def grams(text: str) -> set[str]:
    """Character 3-grams of the text without its #...# tokens, spacing normalised."""
    text = " ".join(TOKEN.sub(" ", text).split())
    return {text[i : i + 3] for i in range(max(1, len(text) - 2))}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def method_of(row: Example) -> str:
    """The method that made a generated row (`source` is `<method>` or `<method>.<copy>`)."""
    return row.source.split(".")[0]


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
