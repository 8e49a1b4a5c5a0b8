"""What a request to `loupe serve` may contain and who may send it: checks on untrusted input.

Every function here takes plain values (header strings, bytes, decoded JSON) and either returns
the checked value or raises `RequestError` with the HTTP status to answer, so the http.server
handler of today and an ASGI app later share them. Standard library only: `loupe search` runs
`parse_search` on its own request before sending it (a query the server would refuse is searched
in-process instead), and must stay import-light.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from loupe.retrieval.engine.query import Term

MAX_BODY = 1 << 20  # bytes of JSON in one request
REQUEST_TIMEOUT = 5.0  # seconds for a whole request (line, headers, body) to arrive
MAX_K = 1000
MAX_TERMS = 64
MAX_STRING = 4096  # characters in a term, a folder, a glob (PATH_MAX on Linux)
MAX_GLOBS = 64
MAX_DATE = 64
MAX_WEIGHT = 1e6  # a larger weight overflows the float32 sum of term vectors
KINDS = ("text", "image")
TARGETS = ("image", "text")
SEARCH_FIELDS = frozenset({"terms", "target", "k", "min_score", "folder", "globs", "after", "before", "date_field"})

_DIGITS = re.compile(r"[0-9]+")  # ASCII digits only: int() would also take '+5', ' 5', '٣', '1_0'


class RequestError(Exception):
    """A refused request: answer `status` with {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---- who may ask ---------------------------------------------------------------------------


def new_token() -> str:
    """A fresh secret for one server run (written to the 0600 state file, sent by `loupe search`)."""
    import secrets  # server side only: the client stays import-light

    return secrets.token_urlsafe(32)


def check_auth(authorization: str | None, token: str) -> None:
    """Require `Authorization: Bearer <token>`: other local users cannot probe which files exist."""
    import hmac

    scheme, _, given = (authorization or "").partition(" ")
    if not token or scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("utf-8", "surrogatepass"), token.encode("utf-8")
    ):
        raise RequestError(401, "missing or wrong token: send 'Authorization: Bearer <token from serve.json>'")


def _local_names(port: int) -> tuple[str, ...]:
    return (f"127.0.0.1:{port}", f"localhost:{port}")


def check_host(host: str | None, port: int) -> None:
    """Refuse a Host that is not this loopback address and port (DNS-rebinding guard)."""
    host = (host or "").strip().lower()
    if host not in ("127.0.0.1", "localhost") + _local_names(port):
        raise RequestError(403, "loupe serve answers local requests only")


def check_origin(origin: str | None, port: int) -> None:
    """Refuse a request a web page of another origin makes (browsers send Origin; tools do not)."""
    if origin is not None and origin.strip().lower() not in tuple(f"http://{name}" for name in _local_names(port)):
        raise RequestError(403, "loupe serve refuses requests from other web origins")


# ---- the body ------------------------------------------------------------------------------


def content_length(values: list[str]) -> int:
    """The announced body size, checked before a byte of the body is read."""
    if not values:
        raise RequestError(411, "send the query with a Content-Length")
    value = values[0].strip()
    if len(values) > 1 or not _DIGITS.fullmatch(value):
        raise RequestError(400, "bad Content-Length")
    if len(value) > 18 or int(value) > MAX_BODY:
        raise RequestError(413, f"request body over {MAX_BODY} bytes")
    return int(value)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def decode_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, bounded nesting (a deep array is a RecursionError)."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise RequestError(400, f"the body is not valid JSON: {str(exc)[:200]}") from None


def _bad(message: str) -> RequestError:
    return RequestError(400, f"bad request: {message}")


def _string(value: Any, what: str, limit: int = MAX_STRING, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty) or len(value) > limit or "\x00" in value:
        raise _bad(f"{what} must be a non-empty string of at most {limit} characters")
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


def _optional_string(request: dict, key: str, limit: int = MAX_STRING) -> str | None:
    value = request.get(key)
    return None if value is None else _string(value, key, limit)


@dataclass(frozen=True)
class SearchRequest:
    """A checked POST /search body, ready for `Searcher.search` and `Filters.parse`."""

    terms: tuple[Term, ...]
    target: str = "image"
    k: int = 10
    min_score: float | None = None
    folder: str | None = None
    globs: tuple[str, ...] = ()
    after: str | None = None
    before: str | None = None
    date_field: str = "auto"


def parse_search(request: Any) -> SearchRequest:
    """Check every field of a search request; the first problem raises a 400 RequestError."""
    if not isinstance(request, dict):
        raise _bad("the body must be a JSON object")
    unknown = sorted(set(request) - SEARCH_FIELDS)
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r}")
    raw_terms = request.get("terms")
    if not isinstance(raw_terms, list) or not 1 <= len(raw_terms) <= MAX_TERMS:
        raise _bad(f"terms must be a list of 1 to {MAX_TERMS} terms")
    terms = []
    for t in raw_terms:
        if not isinstance(t, dict) or set(t) != {"weight", "kind", "value"}:
            raise _bad('each term must be {"weight": number, "kind": "text"|"image", "value": string}')
        weight = _number(t["weight"], "weight")
        if abs(weight) > MAX_WEIGHT:
            raise _bad(f"weight must be within ±{MAX_WEIGHT:g}")
        if t["kind"] not in KINDS:
            raise _bad("kind must be 'text' or 'image'")
        value = _string(t["value"], "value")
        if t["kind"] == "image" and not os.path.isabs(value):
            raise _bad("an image term must be an absolute path")
        terms.append(Term(weight, t["kind"], value))
    target = request.get("target", "image")
    if target not in TARGETS:
        raise _bad("target must be 'image' or 'text'")
    k = request.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise _bad(f"k must be an integer from 1 to {MAX_K}")
    min_score = request.get("min_score")
    if min_score is not None:
        min_score = _number(min_score, "min_score")
    globs = request.get("globs") or []
    if not isinstance(globs, list) or len(globs) > MAX_GLOBS:
        raise _bad(f"globs must be a list of at most {MAX_GLOBS} strings")
    return SearchRequest(
        terms=tuple(terms), target=target, k=k, min_score=min_score,
        folder=_optional_string(request, "folder"), globs=tuple(_string(g, "glob") for g in globs),
        after=_optional_string(request, "after", MAX_DATE), before=_optional_string(request, "before", MAX_DATE),
        date_field=_optional_string(request, "date_field", MAX_DATE) or "auto",
    )
