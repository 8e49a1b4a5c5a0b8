"""`loupe serve`: keep the model and the indices loaded, answer searches over local HTTP JSON.

A cold `loupe search` spends nearly all its time importing torch and loading the model; a
long-lived server pays that once. It listens on 127.0.0.1 only (queries name local image files,
which the server reads), writes a small state file beside the index (port, pid, catalog URL,
model) so that `loupe search` finds it, and before each query checks the catalog generation, so
a concurrent `loupe index` is picked up without a restart.

Endpoints (JSON in and out):
    GET  /health   -> {"status": "ok", "pid", "catalog", "model", "text_precision", "generation",
                       "queries", "vectors"}
    POST /search   <- {"terms": [{"weight", "kind", "value"}], "target": "image"|"text", "k",
                       "min_score", "folder", "globs", "after", "before", "date_field"}
                   -> {"hits": [{"rank", "score", "kind", "vector_id", "fields", "json"}]}
A query error (bad date, empty index...) answers 400 {"error": message}, the message `loupe
search` would print.

Every request is treated as hostile (retrieval/api.py holds the checks): it must carry
`Authorization: Bearer <token>`, the secret in the 0600 state file (401 otherwise), a loopback
Host and no foreign Origin (403); a POST body is at most `MAX_BODY` bytes with a valid
Content-Length (411/400/413) and a well-formed query (400); the whole request must arrive within
`REQUEST_TIMEOUT` seconds, however slowly it trickles in (408). Errors are JSON too.

The client half (`search_via_server`) imports nothing heavy: no torch, faiss or SQLAlchemy.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import stat
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Callable, Sequence

from indexer.errors import LoupeError
from indexer.locations import Location, resolve_location
from retrieval.api import (
    RequestError, SearchRequest, check_auth, check_host, check_origin, content_length, decode_json, new_token, parse_search,
)
from retrieval.query import Term

HOST = "127.0.0.1"
STATE_VERSION = 2  # 2: the token
CLIENT_TIMEOUT = 60.0  # seconds for one search; a server that does not answer is bypassed
REQUEST_TIMEOUT = 5.0  # seconds for a whole request (line, headers, body) to arrive, and for each reply write


def state_file(location: Location) -> Path:
    """Where a running server for this index announces itself."""
    return location.vector_dir / f"{location.prefix}serve.json"


@dataclass
class ServerState:
    """What `loupe search` needs to decide whether a running server answers for it."""

    pid: int
    port: int
    catalog: str
    model: str
    pretrained: str | None
    checkpoint: str | None
    device: str
    started: float
    text_precision: str = "fp32"
    token: str = ""  # required on every request; the file is mode 0600
    version: int = STATE_VERSION

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


# ---- server --------------------------------------------------------------------------------


class SearchService:
    """A Searcher that answers one query at a time on the thread that loaded the model.

    The HTTP server runs on that same thread, one request after another: torch gives every
    thread that runs ops its own OpenMP team, and once more OpenMP threads exist than cores,
    libgomp stops spinning between operations; a text query answered from a second thread took
    ~25 ms instead of ~14 ms on two cores, and handing requests from HTTP threads to the model
    thread still cost 1-1.5 ms a query (measured, RESULTS.md). Queries are serial either way.
    """

    def __init__(self, searcher) -> None:
        self.searcher = searcher
        self.queries = 0

    def _refresh(self) -> None:
        """Catch up with changes made by `loupe index` since the last query (one query when none)."""
        store = self.searcher.store
        if store.catalog.generation() == self.searcher.meta.generation:
            return
        meta = store.require_meta()
        if (meta.weights_id, meta.dim) != (self.searcher.meta.weights_id, self.searcher.meta.dim):
            raise RuntimeError("the index was rebuilt with another model: restart `loupe serve`")
        self.searcher.meta = meta
        store.refresh()

    def health(self) -> dict:
        self._refresh()
        store = self.searcher.store
        return {
            "status": "ok",
            "pid": os.getpid(),
            "catalog": store.location.url,
            "model": self.searcher.encoder.spec.describe(),
            "text_precision": self.searcher.encoder.text_precision,
            "generation": self.searcher.meta.generation,
            "queries": self.queries,
            "vectors": {kind: index.ntotal for kind, index in store.loaded_indices().items()},
        }

    def search(self, request: dict | SearchRequest) -> dict:
        """Answer one query; a dict is checked first (`parse_search` raises a 400 RequestError)."""
        from retrieval.search import Filters

        query = request if isinstance(request, SearchRequest) else parse_search(request)
        for term in query.terms:
            if term.kind == "image":
                _regular_file(term.value)
        filters = Filters.parse(query.folder, query.globs, query.after, query.before, query.date_field)

        self._refresh()
        hits = self.searcher.search(list(query.terms), target=query.target, k=query.k, filters=filters, min_score=query.min_score)
        self.queries += 1
        return {
            "hits": [
                {"rank": h.rank, "score": h.score, "kind": h.kind, "vector_id": h.vector_id, "fields": h.fields, "json": h.to_json()}
                for h in hits
            ]
        }

    def warm_up(self) -> None:
        """Load what the first query would (indices, first text encoding), so it is fast too."""
        from indexer.catalog import IMAGE, TEXT

        store = self.searcher.store
        for kind in (IMAGE, TEXT):
            if store.catalog.count_vectors(kind):
                store.vector_index(kind)
        self.searcher.encoder.encode_texts(["a photo"])


def _regular_file(path: str) -> None:
    """Refuse a query image that is not a regular file: reading /dev/zero or a FIFO would never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise LoupeError(f"cannot read query image {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise LoupeError(f"cannot read query image {path}: not a regular file")


class _DeadlineReader(io.RawIOBase):
    """The request's socket, read under one deadline for the whole request.

    A socket timeout bounds each read only, so a client trickling a byte every few seconds
    could hold the single-threaded server forever; here every read waits at most until the
    deadline. `expired` tells the handler to answer 408.
    """

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.sock = sock
        self.deadline = time.monotonic() + seconds
        self.expired = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError("request deadline passed")
            self.sock.settimeout(remaining)
            return self.sock.recv_into(buffer)
        except TimeoutError:
            self.expired = True
            raise


DRAIN_SECONDS = 1.0  # how long a refused request's unread body is drained, at most
DRAIN_BYTES = 4 << 20


def _drain(sock: socket.socket) -> None:
    """Read and drop what a refused client is still sending, briefly, before the socket closes.

    Closing a socket with unread data makes the kernel send a reset, and a client still busy
    sending its body would see 'connection reset' instead of the 4xx it was answered.
    """
    deadline = time.monotonic() + DRAIN_SECONDS
    left = DRAIN_BYTES
    try:
        sock.shutdown(socket.SHUT_WR)
        while left > 0 and (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            chunk = sock.recv(min(left, 1 << 16))
            if not chunk:
                return
            left -= len(chunk)
    except OSError:
        pass


class _Server(HTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that went away is not worth a traceback; anything else gets one line."""
        import sys

        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            print(f"loupe serve: request failed: {type(exc).__name__}: {exc}", file=sys.stderr)


def _handler(service: SearchService, port_ref: list[int], token: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "loupe"
        protocol_version = "HTTP/1.0"  # one request per connection: an idle client cannot hold the server
        timeout = REQUEST_TIMEOUT  # nor can one that stalls mid-request (reads: `_DeadlineReader`)
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

        def setup(self) -> None:
            super().setup()
            self.rfile.close()  # the default reader; ours bounds the whole request, not each read
            self.reader = _DeadlineReader(self.connection, REQUEST_TIMEOUT)
            self.rfile = io.BufferedReader(self.reader)
            self.answered = False
            self.unread_body = False  # refused before reading a body the client may still be sending
            self.request_version = "HTTP/1.0"  # for a 408 before the request line was read

        def handle(self) -> None:
            self.close_connection = True
            self.handle_one_request()  # catches a TimeoutError while reading the line or headers
            if self.reader.expired and not self.answered:
                self._send(408, {"error": f"the request did not arrive within {REQUEST_TIMEOUT:g} s"})

        def finish(self) -> None:
            super().finish()
            if self.unread_body:
                _drain(self.connection)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per error only
            pass

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's own refusals (bad request line, headers, method) in JSON as well."""
            self._send(code, {"error": message or self.responses.get(code, ("error",))[0]})

        def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body, ensure_ascii=False, default=str).encode("utf-8")
            self.connection.settimeout(REQUEST_TIMEOUT)  # each write; the reads' deadline may be spent
            self.answered = True
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _guard(self) -> None:
            """Who may ask, checked before anything else is read."""
            check_host(self.headers.get("Host"), port_ref[0])
            check_origin(self.headers.get("Origin"), port_ref[0])
            check_auth(self.headers.get("Authorization"), token)

        def _answer(self, fn: Callable[[], dict]) -> None:
            try:
                self._send(200, fn())
            except RequestError as exc:
                self._refuse(exc)
            except LoupeError as exc:
                self._send(400, {"error": str(exc)})
            except (KeyError, TypeError, ValueError) as exc:
                self._send(400, {"error": f"bad request: {exc}"})
            except Exception as exc:  # noqa: BLE001 - reported to the client, which falls back
                self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

        def _refuse(self, exc: RequestError) -> None:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            self._send(exc.status, {"error": exc.message}, headers)

        def do_GET(self) -> None:
            try:
                self._guard()
            except RequestError as exc:
                return self._refuse(exc)
            if self.path.split("?", 1)[0] == "/health":
                self._answer(service.health)
            else:
                self._send(404, {"error": "unknown path: use GET /health or POST /search"})

        def do_POST(self) -> None:
            self.unread_body = True
            try:
                self._guard()
                if self.path.split("?", 1)[0] != "/search":
                    raise RequestError(404, "unknown path: use GET /health or POST /search")
                if not (self.headers.get("Content-Type") or "").startswith("application/json"):
                    raise RequestError(415, "send the query as application/json")
                if "Transfer-Encoding" in self.headers:
                    raise RequestError(411, "send the query with a Content-Length, not chunked")
                n = content_length(self.headers.get_all("Content-Length") or [])
                try:
                    body = self.rfile.read(n)
                    self.unread_body = False
                except TimeoutError:
                    self.unread_body = False  # a slow sender is not waited for again
                    raise RequestError(408, f"the request did not arrive within {REQUEST_TIMEOUT:g} s") from None
                if len(body) < n:
                    raise RequestError(400, f"the body is shorter than its Content-Length ({len(body)} < {n} bytes)")
                request = decode_json(body)
            except RequestError as exc:
                return self._refuse(exc)
            self._answer(lambda: service.search(request))

    return Handler


def _write_private(path: Path, text: str) -> None:
    """Write `path` atomically, readable by its owner only from the first byte (it holds the token)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # created 0600
    try:
        os.fchmod(fd, 0o600)  # whatever mkstemp or the umask did
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            fd = -1
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def serve(
    searcher,
    port: int = 0,
    device: str = "auto",
    on_ready: Callable[[ServerState], None] | None = None,
) -> None:
    """Answer searches on 127.0.0.1:`port` (0: any free port) until SIGTERM or Ctrl-C.

    The state file is written once the socket listens and removed on the way out (if it is
    still ours), so `loupe search` never waits on a server that is not there.
    """
    service = SearchService(searcher)
    service.warm_up()
    port_ref = [port]
    token = new_token()
    httpd = _Server((HOST, port), _handler(service, port_ref, token))
    port_ref[0] = httpd.server_address[1]
    spec = searcher.encoder.spec
    state = ServerState(
        pid=os.getpid(), port=port_ref[0], catalog=searcher.store.location.url, model=spec.model,
        pretrained=spec.pretrained, checkpoint=spec.checkpoint, device=device, started=time.time(),
        text_precision=searcher.encoder.text_precision, token=token,
    )
    path = state_file(searcher.store.location)
    _write_private(path, json.dumps(asdict(state)))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if on_ready is not None:
            on_ready(state)
        httpd.serve_forever(poll_interval=0.2)  # on this (the model's) thread, until SIGTERM or Ctrl-C
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        httpd.server_close()
        current = read_state(path)
        if current is not None and current.pid == os.getpid():
            path.unlink(missing_ok=True)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


# ---- client --------------------------------------------------------------------------------


class RemoteHit:
    """A result as the server ranked it; prints exactly like an in-process `Hit`."""

    def __init__(self, data: dict) -> None:
        self.rank: int = data["rank"]
        self.score: float = data["score"]
        self.kind: str = data["kind"]
        self.vector_id: int = data["vector_id"]
        self.fields: dict = data["fields"]
        self._json: dict = data["json"]

    def to_json(self) -> dict:
        return self._json


def read_state(path: Path) -> ServerState | None:
    try:
        data = json.loads(path.read_text())
        if data.get("version") != STATE_VERSION:
            return None
        return ServerState(**data)
    except (OSError, ValueError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _serves_model(
    state: ServerState, model: str | None, pretrained: str | None, checkpoint: Any, device: str, text_precision: str = "auto"
) -> bool:
    """Whether the server's model is the one `loupe search` with these options would load."""
    if device not in ("auto", state.device) or text_precision not in ("auto", state.text_precision):
        return False
    if not (model or pretrained or checkpoint):
        return True  # the server opened this index, so its model is the one the index is bound to
    if checkpoint and os.path.realpath(os.path.expanduser(str(checkpoint))) != state.checkpoint:
        return False  # (a copy of the same weights elsewhere: searched in-process, which checks it)
    from indexer.encoder import ModelSpec, resolve_spec

    served = ModelSpec(model=state.model, pretrained=state.pretrained, checkpoint=state.checkpoint)
    try:  # the server's model is the index's: resolve the options as `loupe search` would
        return resolve_spec(model, pretrained, checkpoint, served, check_tags=False) == served
    except LoupeError:
        return False  # the in-process search reports the error


def find_server(
    home: Any = None, db: str | None = None, model: str | None = None, pretrained: str | None = None,
    checkpoint: Any = None, device: str = "auto", text_precision: str = "auto",
) -> ServerState | None:
    """The running server for this index and model, if there is one."""
    if os.environ.get("LOUPE_NO_SERVER") == "1":
        return None
    state = read_state(state_file(resolve_location(home, db)))
    if state is None or state.catalog != resolve_location(home, db).url or not _alive(state.pid):
        return None
    return state if _serves_model(state, model, pretrained, checkpoint, device, text_precision) else None


def request(state: ServerState, method: str, path: str, body: dict | None = None, timeout: float = CLIENT_TIMEOUT) -> tuple[int, dict]:
    """One JSON request to the server: (HTTP status, decoded body)."""
    import http.client

    conn = http.client.HTTPConnection(HOST, state.port, timeout=timeout)
    try:
        data = json.dumps(body).encode("utf-8") if body is not None else None
        headers = {"Authorization": f"Bearer {state.token}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def search_via_server(
    home: Any,
    db: str | None,
    terms: Sequence[Term],
    target: str = "image",
    k: int = 10,
    min_score: float | None = None,
    folder: Any = None,
    globs: Sequence[str] | None = None,
    after: str | None = None,
    before: str | None = None,
    date_field: str = "auto",
    model: str | None = None,
    pretrained: str | None = None,
    checkpoint: Any = None,
    device: str = "auto",
    text_precision: str = "auto",
) -> list[RemoteHit] | None:
    """Run the search on a matching `loupe serve`; None when there is none (search in-process then).

    Paths are made absolute here, since the server runs in another directory. A query error
    from the server is raised as the same LoupeError the in-process search would raise; a
    server that fails in any other way, or a query beyond the server's limits (`retrieval.api`),
    is bypassed.
    """
    state = find_server(home, db, model, pretrained, checkpoint, device, text_precision)
    if state is None:
        return None
    body = {
        "terms": [{"weight": t.weight, "kind": t.kind, "value": t.value} for t in terms],
        "target": target,
        "k": k,
        "min_score": min_score,
        "folder": os.path.abspath(os.path.expanduser(str(folder))) if folder else None,
        "globs": list(globs or []),
        "after": after,
        "before": before,
        "date_field": date_field,
    }
    try:
        parse_search(body)
    except RequestError:
        return None  # e.g. -k over MAX_K: the in-process search has no such limit
    try:
        status, answer = request(state, "POST", "/search", body)
    except (OSError, ValueError):
        return None
    if status == 400:
        raise LoupeError(answer.get("error", "the server refused the query"))
    if status != 200:
        return None
    return [RemoteHit(h) for h in answer["hits"]]
