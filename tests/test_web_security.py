"""Every security rule of the web server, one test each (retrieval/web/guard.py, retrieval/web/media.py).

In process through Starlette's TestClient where a header is enough; on a real uvicorn socket
(in a thread, the app over the same real index) where the bytes on the wire matter: raw paths
with `..`, slow senders, bodies sent anyway.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import struct
import threading
import time
import zlib
from contextlib import contextmanager

import pytest

from tests.rawsocket import exchange, read_answer, slow_sender
from tests.test_webapp import AUTH, BASE, PORT, TOKEN, make_service

GOOD = {"q": "a dog", "limit": 3}


@pytest.fixture(scope="module")
def service(web_index):
    return make_service(web_index.home, web_index.encoder)


def app_for(service, tmp_path, **options):
    from loupe.retrieval.web.app import create_app

    options.setdefault("port", PORT)
    return create_app(service, token=TOKEN, thumbs_dir=tmp_path / "thumbs", **options)


@pytest.fixture(scope="module")
def client(service, tmp_path_factory):
    from starlette.testclient import TestClient

    with TestClient(app_for(service, tmp_path_factory.mktemp("sec")), base_url=BASE, headers=AUTH) as c:
        yield c


def photo_id(client, name: str) -> int:
    results = client.post("/api/search", json={"q": "", "sort": "newest", "limit": 200, "collapse": False}).json()["results"]
    return next(r["id"] for r in results if r["name"] == name)


def assert_json_error(response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert isinstance(message, str) and message
    return message


# ---- a real socket ----------------------------------------------------------------------------


@contextmanager
def live(service, tmp_path, request_timeout: float = 1.0, host: str = "127.0.0.1", **options):
    """The app on uvicorn (loupe's protocol and settings) in a thread, on a free port."""
    from loupe.retrieval.web.server import listening_socket, uvicorn_server

    sock = listening_socket(host, 0)
    port = sock.getsockname()[1]
    server = uvicorn_server(app_for(service, tmp_path, port=port, host=host, **options), request_timeout=request_timeout)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def raw(port: int, data: bytes, timeout: float = 10.0, close_write: bool = False) -> tuple[int, bytes, float]:
    """Send bytes as they are; (status, body, seconds until one whole answer arrived)."""
    status, _, body, elapsed = exchange(port, data, timeout, close_write, until_closed=False)
    return status, body, elapsed


def get(port: int, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=AUTH if headers is None else headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ---- binding and the token --------------------------------------------------------------------


def test_binding_beyond_loopback_requires_a_token():
    from loupe.indexer.errors import LoupeError
    from loupe.retrieval.web.guard import bind_needs_token, check_bind, is_loopback

    for host in ("127.0.0.1", "127.0.0.2", "127.1", "127.0.1", "0x7f.1", "localhost", "::1", "[::1]", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
        assert bind_needs_token(host) and not bind_needs_token(host, no_token=True)  # private by default, on loopback too
        check_bind(host, None, no_token=True)
        with pytest.raises(LoupeError, match="token"):
            check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.5", "10.0.0.1", "example.com", "128.0.0.1"):
        assert not is_loopback(host) and bind_needs_token(host) and bind_needs_token(host, no_token=True)
        with pytest.raises(LoupeError, match="token"):
            check_bind(host, None)
        with pytest.raises(LoupeError, match="loopback"):
            check_bind(host, "secret", no_token=True)
        check_bind(host, "secret")


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_every_api_request_needs_the_token_in_a_header_never_a_cookie(service, tmp_path, host):
    """Loopback or not: the API needs `Authorization: Bearer`; a cookie (which every port of the host
    receives) is ignored; the printed URL's old ?token= form moves the token to the fragment."""
    from starlette.testclient import TestClient

    app = app_for(service, tmp_path, host=host)
    with TestClient(app, base_url=BASE, follow_redirects=False) as c:
        assert c.get("/").status_code == 200  # the page's own files hold no data
        for method, path, body in (("GET", "/api/status", None), ("POST", "/api/search", GOOD), ("GET", "/api/photos/1", None),
                                   ("GET", "/api/photo/1?full=1", None), ("GET", "/api/thumb/1", None),
                                   ("GET", "/api/openapi.json", None), ("GET", "/api/folders", None)):
            assert_json_error(c.request(method, path, json=body), 401)
            assert_json_error(c.request(method, path, json=body, headers={"Authorization": "Bearer wrong"}), 401)
            assert_json_error(c.request(method, path, json=body, headers={"Cookie": f"loupe_token_{PORT}={TOKEN}"}), 401)
        assert_json_error(c.get("/?token=wrong"), 401)
        r = c.get(f"/?q=a+dog&token={TOKEN}&sort=newest")  # an old printed link keeps its query
        assert r.status_code == 303 and r.headers["location"] == f"/?q=a+dog&sort=newest#token={TOKEN}"
        assert "set-cookie" not in r.headers
        assert c.get("/api/status", headers=AUTH).status_code == 200
        assert c.post("/api/search", json=GOOD, headers=AUTH).status_code == 200


def test_no_token_opt_out_serves_the_api_on_loopback_but_the_cli_endpoints_keep_their_token(service, tmp_path):
    from starlette.testclient import TestClient

    with TestClient(app_for(service, tmp_path, no_token=True), base_url=BASE) as client:
        assert client.get("/").status_code == 200 and client.get("/api/status").status_code == 200
        assert_json_error(client.get("/health"), 401)
        cli = {"terms": [{"weight": 1, "kind": "text", "value": "a dog"}], "k": 2}
        assert_json_error(client.post("/search", json=cli), 401)
        assert client.post("/search", json=cli, headers=AUTH).status_code == 200


def test_pictures_are_served_by_signed_urls_only(client):
    """An <img> cannot send the header: results carry thumbnail and preview URLs signed for a
    while; a URL without a signature, with another photo's, or expired is refused."""
    from loupe.retrieval.web.guard import SIGNATURE_LIFETIME, sign_path

    result = client.post("/api/search", json=GOOD).json()["results"][0]
    for key in ("thumb", "preview"):
        assert "sig=" in result[key] and "exp=" in result[key]
        assert client.get(result[key], headers={"Authorization": ""}).status_code == 200
    path = result["thumb"].split("?")[0]
    other = f"/api/thumb/{result['id'] + 1}"
    assert_json_error(client.get(path, headers={"Authorization": ""}), 401)
    assert_json_error(client.get(f"{other}?{sign_path(TOKEN, path)}", headers={"Authorization": ""}), 401)
    assert_json_error(client.get(f"{path}?{sign_path(TOKEN, path, now=time.time() - 3 * SIGNATURE_LIFETIME)}", headers={"Authorization": ""}), 401)
    assert_json_error(client.get(f"{path}?{sign_path('x' * 43, path)}", headers={"Authorization": ""}), 401)


# ---- Host, Origin, Referer --------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", f"evil.example:{PORT}", f"127.0.0.1:{PORT + 1}", f"localhost:{PORT}.evil.example",
                                  "127.0.0.1.nip.io", ""])
def test_wrong_host_is_refused(client, host):
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 still sends Host: evil.example."""
    for method, path, body in (("GET", "/", None), ("GET", "/api/status", None), ("POST", "/api/search", GOOD),
                               ("GET", "/api/thumb/1", None)):
        assert_json_error(client.request(method, path, json=body, headers={"Host": host}), 403)
    assert client.get("/api/status", headers={"Host": f"localhost:{PORT}"}).status_code == 200


@pytest.mark.parametrize("origin", ["http://evil.example", "null", f"http://127.0.0.1:{PORT + 1}", f"https://127.0.0.1:{PORT}",
                                    f"http://127.0.0.1:{PORT}.evil.example"])
def test_foreign_origin_is_refused(client, origin):
    for method, path, body in (("POST", "/api/search", GOOD), ("GET", "/api/status", None)):
        assert_json_error(client.request(method, path, json=body, headers={"Origin": origin}), 403)
    r = client.post("/api/uploads", content=b"x", headers={"Origin": origin, "Content-Type": "image/png"})
    assert_json_error(r, 403)


def test_same_origin_is_accepted(client):
    for origin in (f"http://127.0.0.1:{PORT}", f"http://localhost:{PORT}"):
        assert client.post("/api/search", json=GOOD, headers={"Origin": origin}).status_code == 200


def test_foreign_referer_on_a_state_changing_request_is_refused(client):
    """Without Origin (older browsers, some form posts), the Referer decides."""
    for referer in ("http://evil.example/page", f"http://127.0.0.1:{PORT + 1}/", "null"):
        assert_json_error(client.post("/api/search", json=GOOD, headers={"Referer": referer}), 403)
        assert_json_error(client.post("/api/uploads", content=b"x", headers={"Referer": referer, "Content-Type": "image/png"}), 403)
    assert client.post("/api/search", json=GOOD, headers={"Referer": f"http://127.0.0.1:{PORT}/?q=dog"}).status_code == 200


def test_cross_site_fetch_metadata_is_refused(client):
    for site in ("cross-site", "same-site"):  # another port of 127.0.0.1 is same-site, not same-origin
        assert_json_error(client.get("/api/status", headers={"Sec-Fetch-Site": site}), 403)
        assert_json_error(client.get("/api/thumb/1", headers={"Sec-Fetch-Site": site}), 403)
    for site in ("same-origin", "none"):
        assert client.get("/api/status", headers={"Sec-Fetch-Site": site}).status_code == 200
    # a link elsewhere may open the page itself in a tab (a shared URL), but not frame it or read the API
    tab = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    assert client.get("/?q=dog", headers=tab).status_code == 200
    assert_json_error(client.get("/", headers={**tab, "Sec-Fetch-Dest": "iframe"}), 403)
    assert_json_error(client.get("/api/status", headers=tab), 403)
    assert_json_error(client.post("/api/search", json=GOOD, headers=tab), 403)


def test_every_answer_forbids_framing_sniffing_and_foreign_scripts(client):
    for r in (client.get("/"), client.get("/api/status"), client.get("/api/thumb/0"), client.get("/", headers={"Host": "evil"})):
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"


# ---- only catalogued files ----------------------------------------------------------------------


def test_ids_not_in_the_catalog_are_404(client):
    for path in ("/api/thumb/0", "/api/thumb/99999999", "/api/photo/99999999", "/api/photos/99999999",
                 "/api/photos/99999999/captions", f"/api/thumb/{10**30}", "/api/thumb/-1", "/api/thumb/abc",
                 "/api/thumb/1.5", "/api/photo/%2Fetc%2Fpasswd", "/api/photo/", "/api/thumb"):
        assert_json_error(client.get(path), 404)
    skipped = client.get("/api/status").json()["skipped"][0]["path"]
    assert skipped.endswith("broken.jpg")  # in the catalog, but skipped: no id is ever handed out for it


def test_path_traversal_on_the_wire_is_404(service, client, tmp_path):
    """Raw request targets (no client normalises the dots): nothing outside the catalog comes back."""
    paths = [
        "/api/thumb/../../../../etc/passwd", "/api/thumb/..%2f..%2f..%2fetc%2fpasswd", "/api/photo/1/../../../../etc/passwd",
        "/../../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2f..%2fetc%2fpasswd", "//etc/passwd",
        "/api/photos/1/../../../etc/passwd", "/static/../../../etc/passwd", "/index.html/../../../../etc/passwd",
    ]
    with live(service, tmp_path) as port:
        for path in paths:
            status, body, _ = raw(port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n".encode())
            assert status in (400, 404), (path, status, body[:200])
            assert b"root:" not in body and json.loads(body)["error"], (path, body[:200])
        pid = photo_id(client, "dup.jpg")
        status, body = get(port, f"/api/photo/{pid}?path=/etc/passwd&file=/etc/passwd&full=1")  # no parameter names a file
        assert status == 200 and b"root:" not in body and body[:2] == b"\xff\xd8"


def test_a_catalogued_file_swapped_for_a_symlink_or_fifo_is_not_served(client, web_index):
    """The catalogued path must still be a regular file whose real path lies in an indexed folder."""
    victim = web_index.path("a/victim.jpg")
    pid = photo_id(client, "victim.jpg")
    kept = victim.with_name("victim.keep")
    os.rename(victim, kept)
    try:
        victim.symlink_to(web_index.outside / "secret.jpg")
        secret = (web_index.outside / "secret.jpg").read_bytes()
        for path in (f"/api/thumb/{pid}", f"/api/photo/{pid}", f"/api/photo/{pid}?full=1"):
            assert "outside the indexed folders" in assert_json_error(client.get(path), 404)
        info = client.get(f"/api/photos/{pid}").json()
        assert info["available"] is False and info["exif"]["camera"] is None
        victim.unlink()
        victim.symlink_to("/etc/passwd")
        r = client.get(f"/api/photo/{pid}?full=1")
        assert_json_error(r, 404)
        assert b"root:" not in r.content and secret not in r.content
        victim.unlink()
        os.mkfifo(victim)  # reading it would block forever
        start = time.monotonic()
        assert "not a regular file" in assert_json_error(client.get(f"/api/photo/{pid}"), 404)
        assert time.monotonic() - start < 5
        victim.unlink()
        victim.write_bytes(b"\xff\xd8\xff garbage now")  # overwritten in place with something undecodable
        assert_json_error(client.get(f"/api/photo/{pid}"), 404)
        victim.unlink()
        assert_json_error(client.get(f"/api/thumb/{pid}"), 404)  # gone (not yet re-indexed): 404, not 500
    finally:
        if victim.is_symlink() or victim.exists():
            victim.unlink()
        os.rename(kept, victim)
    assert client.get(f"/api/thumb/{pid}").status_code == 200  # back in place: served again


def test_a_photo_reached_through_a_folder_symlink_is_served(tmp_path, web_index, tiny_encoder):
    """Indexing follows folder symlinks; such a photo is served while its bytes are the catalogued ones."""
    from starlette.testclient import TestClient

    from loupe.indexer.pipeline.indexing import index_folder
    from loupe.indexer.storage.store import Store

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy2(web_index.outside / "secret.jpg", elsewhere / "linked.jpg")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(elsewhere)
    index_folder(Store.open(home=tmp_path / "h"), tiny_encoder, root, workers=1)
    with TestClient(app_for(make_service(tmp_path / "h", tiny_encoder), tmp_path), base_url=BASE, headers=AUTH) as c:
        pid = c.post("/api/search", json={"q": "", "sort": "newest"}).json()["results"][0]["id"]
        assert c.get(f"/api/photo/{pid}?full=1").content == (elsewhere / "linked.jpg").read_bytes()
        (elsewhere / "linked.jpg").write_bytes((web_index.outside / "secret.jpg").read_bytes()[:-10] + b"0123456789")
        assert_json_error(c.get(f"/api/photo/{pid}?full=1"), 404)  # other bytes, outside the root: refused


# ---- bodies and uploads ------------------------------------------------------------------------


def tiny_png_header(width: int, height: int) -> bytes:
    """A valid PNG whose header claims width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_upload_is_refused(client):
    r = client.post("/api/uploads", content=tiny_png_header(60_000, 60_000), headers={"Content-Type": "image/png"})
    assert "decompression bomb" in assert_json_error(r, 400)
    r = client.post("/api/uploads", files={"file": ("bomb.png", tiny_png_header(60_000, 60_000), "image/png")})
    assert "decompression bomb" in assert_json_error(r, 400)
    assert client.get("/api/status").status_code == 200


def test_oversized_uploads_and_bodies_are_413(service, tmp_path, web_index):
    from starlette.testclient import TestClient

    photos_before = sorted(p.name for p in web_index.photos.rglob("*"))
    limit = 64 << 10
    with TestClient(app_for(service, tmp_path, upload_limit=limit), base_url=BASE, headers=AUTH) as c:
        assert "bytes" in assert_json_error(c.post("/api/uploads", content=b"\x89PNG" + b"0" * limit, headers={"Content-Type": "image/png"}), 413)
        assert_json_error(c.post("/api/uploads", files={"file": ("big.png", b"0" * limit, "image/png")}), 413)
        assert_json_error(c.post("/api/search", content=b'{"q": "' + b"a" * (1 << 20) + b'"}',
                                 headers={"Content-Type": "application/json"}), 413)
        small = web_index.path("b/dup.jpg").read_bytes()
        assert len(small) < limit and c.post("/api/uploads", content=small, headers={"Content-Type": "image/jpeg"}).status_code == 200
    assert sorted(p.name for p in web_index.photos.rglob("*")) == photos_before  # nothing written into the photos
    with live(service, tmp_path, upload_limit=limit) as port:  # a client that sends its whole body anyway reads the 413
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/api/uploads", body=b"0" * (4 * limit), headers={"Content-Type": "image/png", **AUTH})
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"]
        conn.close()
        assert get(port, "/api/status")[0] == 200


BAD_BODIES = [
    pytest.param(b"{not json", id="garbage"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\xff\xfe{}", id="not-utf8"),
    pytest.param(b"[" * 100_000, id="deeply-nested"),
    pytest.param(b'{"q": NaN}', id="nan"),
    pytest.param(b"[1, 2]", id="list"),
    pytest.param(b"null", id="null"),
    pytest.param(json.dumps({**GOOD, "extra": 1}).encode(), id="unknown-field"),
    pytest.param(json.dumps({**GOOD, "path": "/etc/passwd"}).encode(), id="path-field"),
    pytest.param(json.dumps({"q": 5}).encode(), id="q-number"),
    pytest.param(json.dumps({"q": "a\x00b"}).encode(), id="q-nul"),
    pytest.param(json.dumps({"q": "x" * 5000}).encode(), id="q-long"),
    pytest.param(json.dumps({**GOOD, "limit": 0}).encode(), id="limit-0"),
    pytest.param(json.dumps({**GOOD, "limit": 201}).encode(), id="limit-201"),
    pytest.param(json.dumps({**GOOD, "limit": True}).encode(), id="limit-bool"),
    pytest.param(json.dumps({**GOOD, "offset": -1}).encode(), id="offset-negative"),
    pytest.param(json.dumps({**GOOD, "offset": "1"}).encode(), id="offset-string"),
    pytest.param(b'{"q": "a dog", "min_score": Infinity}', id="min-score-inf"),
    pytest.param(json.dumps({**GOOD, "min_score": "high"}).encode(), id="min-score-string"),
    pytest.param(json.dumps({**GOOD, "target": "audio"}).encode(), id="target"),
    pytest.param(json.dumps({**GOOD, "sort": "random"}).encode(), id="sort"),
    pytest.param(json.dumps({**GOOD, "date_field": "exif"}).encode(), id="date-field"),
    pytest.param(json.dumps({**GOOD, "collapse": "yes"}).encode(), id="collapse"),
    pytest.param(json.dumps({**GOOD, "folder": ["/"]}).encode(), id="folder-list"),
    pytest.param(json.dumps({**GOOD, "after": 2021}).encode(), id="after-number"),
    pytest.param(json.dumps({**GOOD, "before": "yesterday"}).encode(), id="before-words"),
    pytest.param(json.dumps({"q": '"unbalanced'}).encode(), id="q-unbalanced-quote"),
    pytest.param(json.dumps({"q": "a dog +"}).encode(), id="q-dangling-operator"),
]


@pytest.mark.parametrize("body", BAD_BODIES)
def test_malformed_search_bodies_are_400_json(client, body):
    assert_json_error(client.post("/api/search", content=body, headers={"Content-Type": "application/json"}), 400)


def test_wrong_content_type_is_415(client):
    assert_json_error(client.post("/api/search", content=json.dumps(GOOD), headers={"Content-Type": "text/plain"}), 415)
    assert_json_error(client.post("/api/uploads", content=b"x", headers={"Content-Type": "application/json"}), 415)


def test_body_framing_on_the_wire(service, tmp_path):
    """No Content-Length, chunked, a bad or short Content-Length: 4xx JSON, quickly."""
    with live(service, tmp_path) as port:
        head = f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        cases = [
            (head + "Connection: close\r\n\r\n", 411),
            (head + "Transfer-Encoding: chunked\r\n\r\n5\r\n{}{}{\r\n0\r\n\r\n", 411),
            (head + "Content-Length: abc\r\n\r\n", 400),
            (head + "Content-Length: -1\r\n\r\n", 400),
            (head + f"Content-Length: {10**15}\r\n\r\n", 413),
            ("GARBAGE\r\n\r\n", 400),
        ]
        for request, expected in cases:
            status, body, elapsed = raw(port, request.encode())
            assert status == expected and json.loads(body)["error"], (request, status, body)
            assert elapsed < 5
        status, body, _ = raw(port, (head + "Content-Length: 100\r\n\r\n{}").encode(), close_write=True)
        assert status == 400 and "shorter" in json.loads(body)["error"]
        assert get(port, "/api/status")[0] == 200


def test_a_slow_sender_is_cut_off_at_the_deadline(service, tmp_path):
    """Slow-loris on the real socket: the whole request must arrive in time; others are served meanwhile."""
    timeout = 1.0
    with live(service, tmp_path, request_timeout=timeout) as port:
        head = f"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\nX-Slow: ".encode()
        with slow_sender(port, head, interval=0.1, count=40, timeout=10) as slow:
            status, _ = get(port, "/api/status")  # answered while the slow client trickles
            assert status == 200 and time.monotonic() - slow.start < timeout
            answer = read_answer(slow.sock)
            elapsed = time.monotonic() - slow.start
            assert answer.startswith(b"HTTP/1.0 408") and b"did not arrive" in answer, answer[:200]
            assert timeout - 0.2 < elapsed < timeout + 3
            # a slow body is cut off too (its time grows with its announced size only)
            status, body, elapsed = raw(port, (f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
                                               "Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{").encode())
            assert status == 408 and elapsed < timeout + 3
            # an idle connection is closed too, without an answer
            status, body, elapsed = raw(port, b"")
            assert status == 0 and elapsed < timeout + 3
        assert get(port, "/api/status")[0] == 200  # and the server still answers


def test_the_server_keeps_serving_after_bad_requests(service, tmp_path):
    with live(service, tmp_path) as port:
        for request in (b"GET / HTTP/1.1\r\nHost: evil\r\n\r\n", b"\x00\x01\x02\r\n\r\n", b"POST /api/search HTTP/1.1\r\n\r\n",
                        f"GET /api/thumb/99999 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()):
            status, body, _ = raw(port, request)
            assert 400 <= status < 500 and json.loads(body)["error"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/api/search", body=json.dumps(GOOD), headers={"Content-Type": "application/json", **AUTH})
        resp = conn.getresponse()
        assert resp.status == 200 and len(json.loads(resp.read())["results"]) == 3
        conn.close()
