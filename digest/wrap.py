"""Break opportunities in long unbroken runs of text, for the HTML part.

A word longer than a line (a pasted URL, a hostile feed's 200-character title or image
credit) makes a table cell as wide as the word, and the 640px round-up becomes thousands
of pixels wide, on phones too. The CSS that would wrap it (``word-break``,
``overflow-wrap``, ``word-wrap``) is unsupported in Yahoo Mail and parts of Outlook (see
caniemail), so the break opportunity goes into the text itself: a zero-width space
(U+200B) every :data:`CHUNK` characters of a run longer than :data:`LONGEST`. A browser
breaks there only when the run does not fit; otherwise nothing shows. Only the HTML part
gets them: the plain-text part, and every link target, stay as written.
"""

from __future__ import annotations

import re
import unicodedata

ZWSP = "\u200b"
LONGEST = 20  # runs up to this long are left alone (most words and short URLs)
CHUNK = 10  # ten of the widest letters fit the narrowest headline cell (215px on a phone)

_RUN = re.compile(rf"[^\s\u200b]{{{LONGEST + 1},}}")
# Never cut before these: they belong to the character before them (a combining accent,
# a variation selector, the joiner of an emoji sequence, the joined character after it).
_JOINER = "\u200d"


def _regional(ch: str) -> bool:
    return "\U0001f1e6" <= ch <= "\U0001f1ff"  # flags are pairs of these


def _glued(run: str, i: int) -> bool:
    ch = run[i]
    if _regional(ch):
        before = 0
        while i - before - 1 >= 0 and _regional(run[i - before - 1]):
            before += 1
        return before % 2 == 1  # the second letter of a flag
    return (
        unicodedata.combining(ch) != 0
        or unicodedata.category(ch) in ("Mn", "Me", "Sk")
        or "\ufe00" <= ch <= "\ufe0f"
        or ch == _JOINER
        or run[i - 1] == _JOINER
    )


def _cut(match: re.Match[str]) -> str:
    run = match.group(0)
    out: list[str] = []
    start = 0
    i = CHUNK
    while i < len(run):
        while i < len(run) and _glued(run, i):
            i += 1
        if i >= len(run):
            break
        out.append(run[start:i])
        start = i
        i += CHUNK
    out.append(run[start:])
    return ZWSP.join(out)


def breakable(text: str) -> str:
    """``text`` with a zero-width space every few characters of each overlong run."""
    if len(text) <= LONGEST:
        return text
    return _RUN.sub(_cut, text)
