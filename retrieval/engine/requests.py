"""What a search request may contain: one schema (`SearchRequest`), one set of rules, one error.

The CLI's `POST /search` body (`parse_search`: terms as a list, `k`) and the page's `POST /api/search`
body (`parse_page_search`: a query string, `offset`/`limit`, sort, collapse) are read into the same
checked `SearchRequest` by the same field checks (terms, weights, target, bounds, filters, dates);
only their JSON names differ. A refusal is a `RequestError`, a `LoupeError` carrying the HTTP status
to answer. Standard library only: `loupe search` runs `parse_search` on its own request before
sending it (a query the server would refuse is searched in-process instead), and must stay import-light.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Sequence

from loupe.indexer.errors import LoupeError
from loupe.indexer.storage.catalog_names import IMAGE, TEXT, display_path, path_key_of, prefix_bounds
from loupe.retrieval.engine.query import Term, parse_query

MAX_BODY = 1 << 20  # bytes of JSON in one request
REQUEST_TIMEOUT = 5.0  # seconds for a whole request (line, headers, body) to arrive
MAX_K = 1000
MAX_TERMS = 64
MAX_STRING = 4096  # characters in a term, a folder, a glob, a page query (PATH_MAX on Linux)
MAX_GLOBS = 64
MAX_DATE = 64
MAX_WEIGHT = 1e6  # a larger weight overflows the float32 sum of term vectors
MAX_OFFSET = 10**7
MAX_LIMIT = 200  # results in one page
DEFAULT_LIMIT = 60
MAX_INLINE = 24  # thumbnails a page search may carry inline (`SearchRequest.inline`)
KINDS = ("text", "image", "ocr")  # ocr: text:"..." (the text read in photos alone)
TARGETS = (IMAGE, TEXT)
PAGE_TARGETS = {"images": IMAGE, "captions": TEXT}
DATE_FIELDS = ("auto", "taken", "modified")
SORTS = ("relevance", "newest", "oldest")
SEARCH_FIELDS = frozenset({"terms", "target", "k", "min_score", "folder", "globs", "after", "before", "date_field"})
PAGE_SEARCH_FIELDS = frozenset({"q", "target", "offset", "limit", "min_score", "folder", "after", "before", "date_field",
                                "sort", "collapse", "inline"})


class RequestError(LoupeError):
    """A refused request or query: answered `status` with {"error": message}; printed as any LoupeError."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def new_token() -> str:
    """A fresh secret for one server run (written to the 0600 state file, sent by `loupe search`)."""
    import secrets  # server side only: the client stays import-light

    return secrets.token_urlsafe(32)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def decode_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, bounded nesting (a deep array is a RecursionError)."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise RequestError(400, f"the body is not valid JSON: {str(exc)[:200]}") from None


# ---- filters -------------------------------------------------------------------------------


def parse_date(text: str, end: bool = False) -> datetime:
    """'2021', '2021-06', '2021-06-30' or an ISO time; `end` rounds a partial date up (exclusive)."""
    text = text.strip()
    try:
        if len(text) == 4 and text.isdigit():
            year = int(text)
            return datetime(year + 1 if end else year, 1, 1)
        if len(text) == 7 and text[4] == "-":
            year, month = int(text[:4]), int(text[5:])
            if end:
                year, month = (year + 1, 1) if month == 12 else (year, month + 1)
            return datetime(year, month, 1)
        value = datetime.fromisoformat(text)
        if end and len(text) == 10:
            value += timedelta(days=1)
        return value.replace(tzinfo=None)
    except ValueError:
        raise RequestError(400, f"cannot read date '{text}': use YYYY, YYYY-MM, YYYY-MM-DD or an ISO time") from None


@dataclass(frozen=True)
class Filters:
    """Restrictions applied before the top-k cut (image results only): folder, path globs, date range.

    A date is the capture time when known, else the modification time (`date_field` 'auto'),
    or always one of them ('taken', 'modified').
    """

    folder: str | None = None
    globs: tuple[str, ...] = ()
    after: datetime | None = None
    before: datetime | None = None
    date_field: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "globs", tuple(self.globs))  # hashable: a key of the page's rankings
        if self.date_field not in DATE_FIELDS:
            raise RequestError(400, f"the date field must be one of {', '.join(DATE_FIELDS)}, not '{self.date_field}'")

    def active(self) -> bool:
        return bool(self.folder or self.globs or self.after or self.before)

    @classmethod
    def parse(
        cls, folder: str | os.PathLike | None, globs: Sequence[str] | None, after: str | None, before: str | None,
        date_field: str = "auto",
    ) -> "Filters":
        """Filters from request values (dates as YYYY[-MM[-DD]] or ISO); a bad value is a 400 RequestError."""
        return cls(
            folder=os.path.abspath(str(folder)) if folder else None,
            globs=tuple(globs or ()),
            after=parse_date(after) if after else None,
            before=parse_date(before, end=True) if before else None,
            date_field=date_field or "auto",
        )

    @property
    def folder_key(self) -> bytes | None:
        """The folder's catalog key (`path_key_of`), or None."""
        return path_key_of(self.folder) if self.folder else None

    def date_of(self, row) -> datetime | None:
        """The date of a catalog row (anything with `taken_at` and `mtime_ns`) these filters use."""
        if self.date_field == "taken" or (self.date_field == "auto" and row.taken_at is not None):
            return row.taken_at
        return datetime.fromtimestamp(row.mtime_ns / 1e9)

    def passes(self, row) -> bool:
        """Whether one file (a catalog row or a page photo: `path`, `taken_at`, `mtime_ns`) passes."""
        if self.folder and not row.path.startswith(self.folder_prefix()):
            return False
        if self.globs and not any(
            fnmatch.fnmatch(row.path, g) or fnmatch.fnmatch(os.path.basename(row.path), g) for g in self.globs
        ):
            return False
        if self.after or self.before:
            when = self.date_of(row)
            if when is None or (self.after and when < self.after) or (self.before and when >= self.before):
                return False
        return True

    def folder_prefix(self) -> str:
        """The displayed path every file inside the folder starts with (as rows show their paths)."""
        return display_path(prefix_bounds(path_key_of(self.folder))[0])


# ---- the request ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchRequest:
    """A checked search: what the engine ranks (`loupe.retrieval.engine.search.Searcher.rank`).

    `terms` empty: browse the collection by date (the page's empty query). `sort` other than
    relevance orders the best results by date; `collapse` shows identical files as one result;
    `inline` is the number of first image results that carry their cached thumbnail (the page).
    """

    terms: tuple[Term, ...]
    target: str = IMAGE
    offset: int = 0
    limit: int = 10
    min_score: float | None = None
    filters: Filters = field(default_factory=Filters)
    sort: str = "relevance"
    collapse: bool = True
    inline: int = 0

    def ranking_key(self) -> tuple:
        """What a ranking depends on (not the page asked for)."""
        return (self.terms, self.target, self.min_score, self.filters, self.sort, self.collapse)


def _bad(message: str) -> RequestError:
    return RequestError(400, f"bad request: {message}")


def _string(value: Any, what: str, limit: int = MAX_STRING, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty) or len(value) > limit or "\x00" in value:
        raise _bad(f"{what} must be a non-empty string of at most {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") decodes from JSON but is no text
        raise _bad(f"{what} must be valid Unicode text") from None
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{what} must be a number")
    try:
        x = float(value)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        raise _bad(f"{what} must be finite")
    return x


def _integer(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(f"{what} must be an integer from {lo} to {hi}")
    return value


def _optional_string(body: dict, key: str, limit: int = MAX_STRING) -> str | None:
    value = body.get(key)
    return None if value is None or value == "" else _string(value, key, limit)


def _fields(body: Any, allowed: frozenset) -> dict:
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r}")
    return body


def _checked_terms(terms: Sequence[Term]) -> tuple[Term, ...]:
    """The rules every query's terms follow, however they were written."""
    if not 1 <= len(terms) <= MAX_TERMS:
        raise _bad(f"a query has 1 to {MAX_TERMS} terms")
    for term in terms:
        if not abs(term.weight) <= MAX_WEIGHT:  # NaN too
            raise _bad(f"weight must be within ±{MAX_WEIGHT:g}")
    return tuple(terms)


def _min_score(body: dict) -> float | None:
    value = body.get("min_score")
    return None if value is None else _number(value, "min_score")


def _filters(body: dict, globs: Sequence[str] = ()) -> Filters:
    folder = _optional_string(body, "folder")
    after, before = _optional_string(body, "after", MAX_DATE), _optional_string(body, "before", MAX_DATE)
    date_field = _optional_string(body, "date_field", MAX_DATE) or "auto"
    if date_field not in DATE_FIELDS:
        raise _bad(f"date_field must be one of {', '.join(DATE_FIELDS)}")
    return Filters.parse(folder, globs, after, before, date_field)


def parse_search(body: Any) -> SearchRequest:
    """Check the CLI's POST /search body ({"terms": [...], "k", ...}); the first problem raises a RequestError."""
    body = _fields(body, SEARCH_FIELDS)
    raw_terms = body.get("terms")
    if not isinstance(raw_terms, list) or not 1 <= len(raw_terms) <= MAX_TERMS:
        raise _bad(f"terms must be a list of 1 to {MAX_TERMS} terms")
    terms = []
    for t in raw_terms:
        if not isinstance(t, dict) or set(t) != {"weight", "kind", "value"}:
            raise _bad('each term must be {"weight": number, "kind": "text"|"image", "value": string}')
        weight = _number(t["weight"], "weight")
        if t["kind"] not in KINDS:
            raise _bad("kind must be 'text', 'image' or 'ocr'")
        value = _string(t["value"], "value")
        if t["kind"] == "image" and not os.path.isabs(value):
            raise _bad("an image term must be an absolute path")
        terms.append(Term(weight, t["kind"], value))
    target = body.get("target", IMAGE)
    if target not in TARGETS:
        raise _bad("target must be 'image' or 'text'")
    k = _integer(body.get("k", 10), "k", 1, MAX_K)
    globs = body.get("globs") or []
    if not isinstance(globs, list) or len(globs) > MAX_GLOBS:
        raise _bad(f"globs must be a list of at most {MAX_GLOBS} strings")
    globs = [_string(g, "glob") for g in globs]
    return SearchRequest(_checked_terms(terms), target, 0, k, _min_score(body), _filters(body, globs))


def parse_page_search(body: Any) -> SearchRequest:
    """Check the page's POST /api/search body ({"q": "...", "offset", "limit", ...}); the first problem
    raises a RequestError. The query string is read by the web grammar (`parse_query(web=True)`)."""
    body = _fields(body, PAGE_SEARCH_FIELDS)
    q = body.get("q") or ""
    q = _string(q, "q", MAX_STRING, empty=True).strip()
    target = body.get("target", "images")
    if target not in PAGE_TARGETS:
        raise _bad("target must be 'images' or 'captions'")
    offset = _integer(body.get("offset", 0), "offset", 0, MAX_OFFSET)
    limit = _integer(body.get("limit", DEFAULT_LIMIT), "limit", 1, MAX_LIMIT)
    min_score = _min_score(body)
    sort = body.get("sort") or "relevance"
    if sort not in SORTS:
        raise _bad(f"sort must be one of {', '.join(SORTS)}")
    collapse = body.get("collapse", True)
    if not isinstance(collapse, bool):
        raise _bad("collapse must be true or false")
    inline = _integer(body.get("inline", 0), "inline", 0, MAX_INLINE)
    filters = _filters(body)
    terms: tuple[Term, ...] = ()
    if q:
        try:
            parsed = parse_query([q], web=True)
        except LoupeError as exc:
            raise RequestError(400, str(exc)) from None
        except (ValueError, OverflowError):
            raise _bad("a weight in the query is not a number loupe can use") from None
        terms = _checked_terms(parsed)
    elif PAGE_TARGETS[target] != IMAGE:
        raise RequestError(400, "empty query: type a sentence, or use upload:ID / photo:ID")
    return SearchRequest(terms, PAGE_TARGETS[target], offset, limit, min_score, filters, sort, collapse, inline)
