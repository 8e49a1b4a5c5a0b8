"""`loupe serve` against hostile local clients: raw sockets on 127.0.0.1, one real server per module.

Every refusal must be a 4xx JSON {"error": ...} that comes back quickly, and the server must keep
answering afterwards; a slow sender must not hold the single-threaded server past the deadline.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import shutil
import signal
import stat
import time
from dataclasses import dataclass

import pytest

from loupe.indexer.storage.locations import resolve_location
from loupe.retrieval.engine.requests import REQUEST_TIMEOUT
from loupe.retrieval.web.client import read_state, state_file
from tests.conftest import LoupeRunner, wait_for_state
from tests.rawsocket import exchange, read_answer, slow_sender

MARGIN = 5.0  # seconds of slack on a busy 2-core machine
QUICK = REQUEST_TIMEOUT - 1.0  # a refusal must come before the request deadline would have fired
GOOD = {"terms": [{"weight": 1, "kind": "text", "value": "a dog"}], "k": 2}


@dataclass
class Served:
    port: int
    token: str
    proc: object
    path: object
    loupe: LoupeRunner


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint, flickr_images):
    root = tmp_path_factory.mktemp("hardening")
    photos = root / "photos"
    photos.mkdir()
    for src in sorted(flickr_images.iterdir())[:6]:
        shutil.copy2(src, photos / src.name)
    loupe = LoupeRunner(root / "home")
    loupe("index", photos, "--checkpoint", tiny_checkpoint)
    proc = loupe.popen("serve", "--port", "0")
    path = state_file(resolve_location(loupe.home))
    try:
        state = wait_for_state(path, proc)
        token = json.loads(path.read_text()).get("token", "")
        yield Served(state.port, token, proc, path, loupe)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def call(s: Served, method: str, path: str, body=None, headers: dict | None = None, token: bool = True) -> tuple[int, dict]:
    """One request through http.client; `body` is a dict (sent as JSON) or raw bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=REQUEST_TIMEOUT + MARGIN)
    try:
        h = {"Authorization": f"Bearer {s.token}"} if token else {}
        if body is not None:
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


def raw_exchange(s: Served, head: list[str], body: bytes = b"", close_write: bool = False) -> tuple[int, dict, float]:
    """Send hand-made request bytes; (status, JSON body, seconds until the server closed)."""
    data = "\r\n".join([*head, "", ""]).encode("latin-1") + body
    status, top, payload, elapsed = exchange(s.port, data, REQUEST_TIMEOUT + MARGIN, close_write)
    assert status == 0 or b"application/json" in top, top
    return status, json.loads(payload) if payload else {}, elapsed


def post_head(s: Served, length: str | None, token: bool = True) -> list[str]:
    head = ["POST /search HTTP/1.0", f"Host: 127.0.0.1:{s.port}", "Content-Type: application/json"]
    if token:
        head.append(f"Authorization: Bearer {s.token}")
    if length is not None:
        head.append(f"Content-Length: {length}")
    return head


def assert_works(s: Served) -> None:
    status, body = call(s, "POST", "/search", GOOD)
    assert status == 200 and [h["rank"] for h in body["hits"]] == [1, 2]


# ---- state file and token ---------------------------------------------------------------------


def test_state_file_is_private_and_holds_a_token(served):
    mode = stat.S_IMODE(os.stat(served.path).st_mode)
    assert mode == 0o600, oct(mode)
    assert len(served.token) >= 32 and read_state(served.path).token == served.token


def test_requests_without_the_right_token_are_refused(served):
    for path, body in (("/health", None), ("/search", GOOD)):
        method = "GET" if body is None else "POST"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {served.token}"},
                        {"Authorization": f"Bearer {served.token}x"}, {"Authorization": "Bearer \u00e9t\u00e9"}):
            status, answer = call(served, method, path, body, headers=headers, token=False)
            assert status == 401 and "token" in answer["error"], (path, headers, status, answer)
    status, health = call(served, "GET", "/health")
    assert status == 200 and health["status"] == "ok"


def test_foreign_origin_and_host_are_refused(served):
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": f"http://127.0.0.1:{served.port + 1}"},
                    {"Host": "evil.example"}, {"Host": f"localhost:{served.port + 1}"}):
        status, answer = call(served, "POST", "/search", GOOD, headers=headers)
        assert status == 403 and answer["error"], (headers, status, answer)
    for origin in (f"http://127.0.0.1:{served.port}", f"http://localhost:{served.port}"):
        assert call(served, "POST", "/search", GOOD, headers={"Origin": origin})[0] == 200


# ---- Content-Length and the request deadline ----------------------------------------------------


@pytest.mark.parametrize(
    "length, expected",
    [(None, 411), ("-1", 400), ("abc", 400), ("1e3", 400), ("+5", 400), (str(10**12), 413), (str((1 << 20) + 1), 413)],
)
def test_bad_content_length_is_refused_without_reading_the_body(served, length, expected):
    status, answer, elapsed = raw_exchange(served, post_head(served, length))  # no body sent, connection kept open
    assert status == expected and answer["error"], (status, answer)
    assert elapsed < QUICK, elapsed
    assert_works(served)


def test_an_oversized_body_is_answered_413_not_reset(served):
    """A client that sends its whole 2 MiB body anyway still reads the refusal."""
    for _ in range(3):
        status, answer = call(served, "POST", "/search", b'{"terms": "' + b"x" * (2 << 20) + b'"}')
        assert status == 413 and answer["error"], (status, answer)
    assert_works(served)


def test_a_body_shorter_than_announced_does_not_hang_the_server(served):
    body = json.dumps(GOOD).encode()
    status, answer, elapsed = raw_exchange(served, post_head(served, str(len(body) + 50)), body, close_write=True)
    assert status == 400 and "shorter" in answer["error"] and elapsed < QUICK
    start = time.monotonic()
    status, answer, elapsed = raw_exchange(served, post_head(served, str(len(body) + 50)), body)  # and then silence
    assert status == 408 and answer["error"], (status, answer)
    assert elapsed < REQUEST_TIMEOUT + MARGIN
    assert_works(served)
    assert time.monotonic() - start < REQUEST_TIMEOUT + 2 * MARGIN


def test_a_slow_sender_cannot_hold_the_server(served):
    """A client trickling a byte every 0.25 s is cut off at the whole-request deadline."""
    head = f"POST /search HTTP/1.0\r\nHost: 127.0.0.1:{served.port}\r\n".encode()
    with slow_sender(served.port, head, interval=0.25, count=int((REQUEST_TIMEOUT + 2 * MARGIN) / 0.25), timeout=REQUEST_TIMEOUT + MARGIN) as slow:
        time.sleep(0.3)  # the server is now busy with the slow request
        status, health = call(served, "GET", "/health")
        assert status == 200 and health["status"] == "ok"
        assert time.monotonic() - slow.start < REQUEST_TIMEOUT + MARGIN
        answer = read_answer(slow.sock)  # the slow connection was answered 408 and closed
        assert time.monotonic() - slow.start < REQUEST_TIMEOUT + MARGIN
        assert answer == b"" or answer.startswith(b"HTTP/1.0 408"), answer[:200]


# ---- the search request ---------------------------------------------------------------------


def term(**changes) -> dict:
    return {"terms": [{"weight": 1, "kind": "text", "value": "a dog", **changes}]}


BAD_SEARCHES = [
    pytest.param(b'{"terms": [{"weight": NaN, "kind": "text", "value": "a dog"}]}', id="weight-NaN"),
    pytest.param(b'{"terms": [{"weight": Infinity, "kind": "text", "value": "a dog"}]}', id="weight-Infinity"),
    pytest.param(b'{"terms": [{"weight": 1e999, "kind": "text", "value": "a dog"}]}', id="weight-1e999"),
    pytest.param(b'{"terms": [{"weight": -1e999, "kind": "text", "value": "a dog"}]}', id="weight--1e999"),
    pytest.param(term(weight="1e999"), id="weight-string"),
    pytest.param(term(weight=True), id="weight-bool"),
    pytest.param(term(weight=None), id="weight-null"),
    pytest.param(term(weight=1e300), id="weight-huge"),
    pytest.param({**GOOD, "k": 10**9}, id="k-1e9"),
    pytest.param({**GOOD, "k": -1}, id="k-negative"),
    pytest.param({**GOOD, "k": 0}, id="k-zero"),
    pytest.param({**GOOD, "k": "x"}, id="k-string"),
    pytest.param({**GOOD, "k": 2.5}, id="k-float"),
    pytest.param({**GOOD, "k": True}, id="k-bool"),
    pytest.param({**GOOD, "min_score": "high"}, id="min-score-string"),
    pytest.param(b'{"terms": [{"weight": 1, "kind": "text", "value": "a dog"}], "min_score": NaN}', id="min-score-NaN"),
    pytest.param({**GOOD, "target": "audio"}, id="target"),
    pytest.param({**GOOD, "globs": "*.jpg"}, id="globs-string"),
    pytest.param({**GOOD, "globs": [1]}, id="globs-number"),
    pytest.param({**GOOD, "globs": ["x" * 5000]}, id="glob-long"),
    pytest.param({**GOOD, "after": 2021}, id="after-number"),
    pytest.param({**GOOD, "folder": ["/"]}, id="folder-list"),
    pytest.param({**GOOD, "extra": 1}, id="unknown-field"),
    pytest.param(term(kind="audio"), id="kind"),
    pytest.param(term(value=""), id="value-empty"),
    pytest.param(term(value=7), id="value-number"),
    pytest.param(term(value="x" * 5000), id="value-long"),
    pytest.param(term(value="a\x00b"), id="value-nul"),
    pytest.param(term(kind="image", value="relative.jpg"), id="image-relative"),
    pytest.param(term(kind="image", value="/dev/zero"), id="image-device"),
    pytest.param({"terms": []}, id="terms-empty"),
    pytest.param({"terms": "a dog"}, id="terms-string"),
    pytest.param({"terms": [["a dog"]]}, id="term-list"),
    pytest.param({"terms": [{"weight": 1, "kind": "text", "value": "a"}] * 1000}, id="terms-many"),
    pytest.param({"k": 2}, id="terms-missing"),
    pytest.param(b"[1, 2]", id="body-list"),
    pytest.param(b'"a dog"', id="body-string"),
    pytest.param(b"null", id="body-null"),
    pytest.param(b"", id="body-empty"),
    pytest.param(b"{not json", id="body-garbage"),
    pytest.param(b"\xff\xfe{}", id="body-not-utf8"),
    pytest.param(b"[" * 100_000, id="body-deeply-nested"),
]


@pytest.mark.parametrize("body", BAD_SEARCHES)
def test_bad_search_requests_are_400_json(served, body):
    status, answer = call(served, "POST", "/search", body)
    assert status == 400 and isinstance(answer.get("error"), str) and answer["error"], (status, answer)


def test_server_keeps_serving_after_bad_requests(served):
    for body in [b'{"terms": [{"weight": NaN, "kind": "text", "value": "a"}]}', b"[", {**GOOD, "k": 10**9}, b"[" * 100_000]:
        assert call(served, "POST", "/search", body)[0] == 400
    assert_works(served)
    health = call(served, "GET", "/health")[1]
    assert health["status"] == "ok" and health["pid"] == served.proc.pid


def test_the_client_sends_the_token_and_falls_back_beyond_server_limits(served):
    from loupe.retrieval.engine.query import Term
    from loupe.retrieval.web.client import search_via_server

    before = call(served, "GET", "/health")[1]["queries"]
    terms = [Term(1.0, "text", "a dog")]
    hits = search_via_server(served.loupe.home, None, terms, k=3)
    assert hits is not None and [h.rank for h in hits] == [1, 2, 3]
    assert call(served, "GET", "/health")[1]["queries"] == before + 1  # answered by the server
    assert search_via_server(served.loupe.home, None, terms, k=5000) is None  # over the server's cap: in-process
    assert call(served, "GET", "/health")[1]["queries"] == before + 1


# ---- the checks on their own (what a future ASGI app reuses) ------------------------------------


def test_request_checks_in_isolation():
    from loupe.indexer.errors import LoupeError
    from loupe.retrieval.engine.requests import MAX_K, RequestError, decode_json, parse_page_search, parse_search

    with pytest.raises(RequestError):
        decode_json(b'{"a": NaN}')
    query = parse_search({"terms": [{"weight": -0.5, "kind": "text", "value": "x"}], "k": MAX_K, "min_score": None})
    assert query.limit == MAX_K and query.terms[0].weight == -0.5 and math.isfinite(query.terms[0].weight)
    # one set of rules for both bodies: the same date and weight errors, one error type (a LoupeError with a status)
    for bad in ({"terms": [{"weight": 1, "kind": "text", "value": "x"}], "after": "last week"},
                {"terms": [{"weight": 1e7, "kind": "text", "value": "x"}]}):
        with pytest.raises(RequestError) as cli:
            parse_search(bad)
        page = {"q": "x", "after": bad["after"]} if "after" in bad else {"q": '"10000000:x" + "y"'}
        with pytest.raises(RequestError) as web:
            parse_page_search(page)
        assert cli.value.status == web.value.status == 400 and isinstance(cli.value, LoupeError)
        assert cli.value.message.split(":")[0] == web.value.message.split(":")[0]


def test_no_tracebacks_and_a_clean_stop(served):
    """Last in the module: nothing above made the server print a traceback."""
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=30) == 0
    err = served.proc.stderr.read()
    assert "Traceback" not in err and "request failed" not in err and "server stopped" in err, err[-2000:]
