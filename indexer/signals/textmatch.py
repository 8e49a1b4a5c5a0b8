"""Matching text read in photos: one folding for stored text and queries, and the typo rule.

`normalize` folds case (casefold), accents (stripped), full-width and compatibility forms (NFKC)
and whitespace, so "ＲＥ１６" == "re16" and "Bréval" == "breval"; CJK passes through. Stored
lines and queries both go through it, in Python, so SQLite and PostgreSQL match identically.

Typos (`max_typos`): none below 5 characters (so "RE16" never finds "RE61" or "RF16"), one for
5-8 characters, two from 9. `substring_distance` is the edit distance between a query and the
best-matching stretch of a line (Sellers' approximate substring match).
"""

from __future__ import annotations

import re
import unicodedata

MIN_INDEXED = 3  # trigram indexes (FTS5 trigram, pg_trgm) cannot serve shorter queries: those scan


def normalize(text: str) -> str:
    """Fold text for matching: NFKC, casefold, accents stripped, whitespace collapsed."""
    t = unicodedata.normalize("NFKC", text).casefold()
    t = "".join(c for c in unicodedata.normalize("NFD", t) if unicodedata.category(c) != "Mn")
    t = unicodedata.normalize("NFC", t)
    return re.sub(r"\s+", " ", t).strip()


def max_typos(query: str) -> int:
    """Edits a fuzzy match may have for a (normalized) query of this length."""
    n = len(query)
    return 0 if n < 5 else 1 if n < 9 else 2


def substring_distance(query: str, text: str) -> int:
    """The smallest Levenshtein distance between `query` and any substring of `text`."""
    prev = [0] * (len(text) + 1)
    for i, qc in enumerate(query, 1):
        cur = [i] + [0] * len(text)
        for j, tc in enumerate(text, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (qc != tc))
        prev = cur
    return min(prev)


def trigrams(query: str) -> list[str]:
    """The distinct 3-character stretches of a (normalized) query, in order."""
    return list(dict.fromkeys(query[i : i + 3] for i in range(len(query) - 2)))
