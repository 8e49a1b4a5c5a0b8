"""Query language: a sentence, an image path, or a weighted sum of both.

    loupe search "a dog on a beach"
    loupe search ./dog.jpg
    loupe search '"2:beach" + ./dog.jpg - "people"'
    loupe search 2:beach + ./dog.jpg - people          (same, as separate shell words)

A term is text or, when it names an existing file, an image. `W:` in front of a term weights
it (a number only, so 'C:\\x' or 'note: x' are not weights). `+` and `-` standing alone
between terms add and subtract them; inside quotes they are plain text.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Sequence

from indexer.errors import LoupeError

_WEIGHT = re.compile(r"^([+-]?\d+(?:\.\d+)?|[+-]?\.\d+):(.+)$", re.S)


@dataclass(frozen=True)
class Term:
    weight: float
    kind: str  # 'text' | 'image'
    value: str


def _tokens(text: str) -> list[tuple[str, bool]]:
    """Split on whitespace outside double quotes; returns (token, was_quoted)."""
    out: list[tuple[str, bool]] = []
    buf: list[str] = []
    quoted = in_quote = False
    for ch in text:
        if ch == '"':
            in_quote = not in_quote
            quoted = True
            continue
        if ch.isspace() and not in_quote:
            if buf or quoted:
                out.append(("".join(buf), quoted))
            buf, quoted = [], False
            continue
        buf.append(ch)
    if in_quote:
        raise LoupeError('unbalanced double quote in query')
    if buf or quoted:
        out.append(("".join(buf), quoted))
    return out


def _make_term(raw: str, sign: float, quoted_whole: bool) -> Term:
    weight = 1.0
    m = _WEIGHT.match(raw)
    if m:
        weight, raw = float(m.group(1)), m.group(2)
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        raw, quoted_whole = raw[1:-1], True
    if not raw:
        raise LoupeError("empty term in query")
    path = os.path.expanduser(raw)
    if not quoted_whole and os.path.isfile(path):
        return Term(sign * weight, "image", os.path.abspath(path))
    return Term(sign * weight, "text", raw)


def parse_query(words: Sequence[str]) -> list[Term]:
    """Parse the query words from the command line into weighted text/image terms."""
    if not words:
        raise LoupeError("empty query")
    tokens: list[tuple[str, bool]] = []
    for w in words:
        # a whole shell word that is an existing file stays one token even with spaces in it
        m = _WEIGHT.match(w)
        if os.path.isfile(os.path.expanduser(w)) or (m and os.path.isfile(os.path.expanduser(m.group(2)))):
            tokens.append((w, False))
        else:
            tokens.extend(_tokens(w) if len(words) == 1 or '"' in w or w in "+-" else [(w, False)])
    terms: list[Term] = []
    sign = 1.0
    pending: list[str] = []
    pending_quoted = False

    def close() -> None:
        nonlocal pending, pending_quoted, sign
        if pending:
            terms.append(_make_term(" ".join(pending), sign, pending_quoted and len(pending) == 1))
            sign = 1.0
        pending, pending_quoted = [], False

    last_was_operator = False
    for tok, quoted in tokens:
        if not quoted and tok in ("+", "-"):
            if last_was_operator:
                raise LoupeError(f"two operators in a row in query near '{tok}'")
            close()
            sign = -1.0 if tok == "-" else 1.0
            last_was_operator = True
            continue
        last_was_operator = False
        if quoted and pending:
            close()
        pending.append(tok)
        pending_quoted = quoted
        if quoted:
            close()
    if last_was_operator:
        raise LoupeError("query ends with an operator")
    close()
    if all(t.weight <= 0 for t in terms):
        raise LoupeError("query has no positive term")
    return terms
