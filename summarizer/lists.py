"""Numbered lists as targets and predictions: split one into its items, write items as one.

A model writes lists in many shapes — "1. ...", "2) ...", "(3) ...", "①", "- ..." bullets, "Q1: ...",
a list run together on one line ("1. A? 2. B?"), a label echoed before it — and the sub-question count
metric must see the same items a reader would. Korean text needs no special care beyond "1번." and
full-stop variants: the markers are digits and punctuation.
"""

from __future__ import annotations

import re

# A list marker at the start of a line. Digits may touch the text ("1.서울") but not another digit,
# so "1.5배 늘어난 이유는?" is a sentence, not item 1. Bullets need a space after them ("-5도" is text).
MARKER = re.compile(
    r"^\s*(?:"
    r"\(?\d{1,2}\s*[.)．:](?!\d)"  # 1.  1)  (1)  1:
    r"|\d{1,2}\s*번\s*[.):]?"  # 1번.  1번)
    r"|(?:Q|q|질문)\s*\d{1,2}\s*[.:)]?"  # Q1:  질문 1.
    r"|[①-⑳]"  # ① ... ⑳
    r"|[-*•·▪‣–](?=\s)"  # bullets
    r")\s*"
)
# A numbered item run on after the end of a sentence on the same line: "1. A? 2. B?". A full stop
# after a digit is not a sentence end ("2024. 3. 1." is a date).
_INLINE = re.compile(r"(?:(?<=[?？!。])|(?<=[^\d\s]\.))\s+(?=\(?\d{1,2}\s*[.)](?!\d)\s)")


def split_items(text: str) -> list[str]:
    """The items of a list written as text, without their markers.

    Lines that start with a marker begin an item; an unmarked line after one continues it (a wrapped
    item), unmarked lines before the first marker (a heading such as "Sub-questions:") are dropped.
    Text with no marker at all is read as one item per non-empty line.
    """
    lines = [line.strip() for line in _INLINE.sub("\n", text).splitlines() if line.strip()]
    if not any(MARKER.match(line) for line in lines):
        return lines
    items: list[str] = []
    for line in lines:
        marker = MARKER.match(line)
        if marker:
            items.append(line[marker.end() :].strip())
        elif items:
            items[-1] = f"{items[-1]} {line}".strip()
    return [item for item in items if item]


def count_items(text: str) -> int:
    return len(split_items(text))


def numbered(items: list[str]) -> str:
    """Items as "1. ...\\n2. ..." (an item's own marker, if it has one, is replaced)."""
    return "\n".join(
        f"{n}. {MARKER.sub('', item.strip(), count=1)}" for n, item in enumerate(items, 1)
    )
