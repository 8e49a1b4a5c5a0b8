"""`loupe serve`: keep the model and the indices loaded; serve the web page, its API, and `loupe search`.

A cold `loupe search` spends nearly all its time importing torch and loading the model; a
long-lived server pays that once. It listens on 127.0.0.1 by default (uvicorn running the
Starlette app of `loupe.retrieval.web.app`), writes a small state file beside the index (port, pid,
catalog URL, model, token) so that `loupe search` finds it, and before each query checks the
catalog generation, so a concurrent `loupe index` is picked up without a restart.

The CLI's endpoints (JSON in and out; unchanged):
    GET  /health   -> {"status": "ok", "pid", "catalog", "model", "text_precision", "generation",
                       "queries", "vectors"}
    POST /search   <- {"terms": [{"weight", "kind", "value"}], "target": "image"|"text", "k",
                       "min_score", "folder", "globs", "after", "before", "date_field"}
                   -> {"hits": [{"rank", "score", "kind", "vector_id", "fields", "json"}]}
A query error (bad date, empty index...) answers 400 {"error": message}, the message `loupe
search` would print. The web API (/api/...) is described in `retrieval/web/openapi.py`.

Every request is treated as hostile (`loupe.retrieval.web.guard`, with the checks of `loupe.retrieval.engine.requests`):
the CLI's endpoints need `Authorization: Bearer <token>`, the secret in the 0600 state file (401
otherwise), every request a Host of this server and no foreign Origin (403); a body needs a valid
Content-Length and is bounded (411/400/413), a query is checked (400), and the whole request must
arrive within `REQUEST_TIMEOUT` seconds, however slowly it trickles in (408). Errors are JSON too.

The client half (`search_via_server`) imports nothing heavy: no torch, faiss, SQLAlchemy or uvicorn.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from loupe.indexer.errors import LoupeError
from loupe.indexer.storage.locations import Location, resolve_location
from loupe.retrieval.engine.requests import REQUEST_TIMEOUT, RequestError, SearchRequest, new_token, parse_search
from loupe.retrieval.engine.query import Term

HOST = "127.0.0.1"
QUERY_THREADS = 1  # torch threads that encode a query's sentences in the server (see `query_threads`)
STATE_VERSION = 2  # 2: the token
CLIENT_TIMEOUT = 60.0  # seconds for one search; a server that does not answer is bypassed


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
    host: str = HOST  # the address it listens on

    @property
    def connect_host(self) -> str:
        """Where a client on this machine reaches it (a wildcard bind answers on loopback)."""
        return HOST if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def url(self) -> str:
        host = f"[{self.connect_host}]" if ":" in self.connect_host else self.connect_host
        return f"http://{host}:{self.port}"


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

    def refresh(self) -> None:
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
        self.refresh()
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
        from loupe.retrieval.engine.search import Filters

        query = request if isinstance(request, SearchRequest) else parse_search(request)
        for term in query.terms:
            if term.kind == "image":
                _regular_file(term.value)
        filters = Filters.parse(query.folder, query.globs, query.after, query.before, query.date_field)

        self.refresh()
        with query_threads():
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
        from loupe.indexer.storage.catalog import IMAGE, TEXT

        store = self.searcher.store
        for kind in (IMAGE, TEXT):
            if store.catalog.count_vectors(kind):
                store.vector_index(kind)
        with query_threads():
            self.searcher.encoder.encode_texts(["a photo"])


@contextlib.contextmanager
def query_threads(threads: int = QUERY_THREADS) -> Iterator[None]:
    """Run torch on `threads` threads meanwhile (a query's sentences; images keep every core).

    One short sentence through the text tower reads all its weights (150 MB for ViT-B-32) for a
    dozen tokens: two threads were no faster than one on an idle two-core machine (36 against
    38 ms), but while anything else wanted a core (the browser painting the page that asked,
    thumbnail requests, another job) the second thread's OpenMP barriers cost 100-1400 ms where
    one thread kept to ~2x (benchmarks/RESULTS.md). Switching costs microseconds.
    """
    torch = sys.modules.get("torch")
    if torch is None:  # no torch model in this process: nothing to tune
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(min(threads, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _regular_file(path: str) -> None:
    """Refuse a query image that is not a regular file: reading /dev/zero or a FIFO would never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise LoupeError(f"cannot read query image {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise LoupeError(f"cannot read query image {path}: not a regular file")


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


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (port 0: any free port); a bind error is a LoupeError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise LoupeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(False)
    return sock


def uvicorn_server(app, request_timeout: float = REQUEST_TIMEOUT):
    """A quiet uvicorn server for `app`: h11 with the whole-request deadline, no proxy headers,
    no websockets, no lifespan, errors only on stderr. Run it with `.run(sockets=[sock])`."""
    import uvicorn

    from loupe.retrieval.web.guard import DeadlineH11Protocol

    protocol = DeadlineH11Protocol
    if request_timeout != DeadlineH11Protocol.request_timeout:
        protocol = type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"request_timeout": request_timeout})
    config = uvicorn.Config(
        app, http=protocol, ws="none", lifespan="off", log_config=None, log_level="error",
        access_log=False, proxy_headers=False, server_header=False, timeout_keep_alive=int(REQUEST_TIMEOUT),
        timeout_graceful_shutdown=2,
    )
    return uvicorn.Server(config)


def serve(
    searcher,
    port: int = 0,
    device: str = "auto",
    on_ready: Callable[[ServerState], None] | None = None,
    host: str = HOST,
    allowed_hosts: Sequence[str] = (),
    upload_limit: int | None = None,
) -> None:
    """Serve the page, its API and the CLI's searches on `host`:`port` (0: any free port) until
    SIGTERM or Ctrl-C (uvicorn, one process, the model on this thread).

    The state file is written once the socket listens and removed on the way out (if it is
    still ours), so `loupe search` never waits on a server that is not there.
    """
    from loupe.retrieval.web.app import create_app
    from loupe.retrieval.web.guard import UPLOAD_LIMIT, check_bind

    token = new_token()
    check_bind(host, token)
    service = SearchService(searcher)
    service.warm_up()
    sock = listening_socket(host, port)
    port = sock.getsockname()[1]
    app = create_app(
        service, token=token, port=port, host=host, allowed_hosts=tuple(allowed_hosts),
        upload_limit=upload_limit or UPLOAD_LIMIT,
    )
    app.state.web.web.snapshot()  # the web's view of the catalog, read before the first page asks
    server = uvicorn_server(app)
    spec = searcher.encoder.spec
    state = ServerState(
        pid=os.getpid(), port=port, catalog=searcher.store.location.url, model=spec.model,
        pretrained=spec.pretrained, checkpoint=spec.checkpoint, device=device, started=time.time(),
        text_precision=searcher.encoder.text_precision, token=token, host=host,
    )
    path = state_file(searcher.store.location)
    _write_private(path, json.dumps(asdict(state)))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # uvicorn re-raises it after a graceful stop
    try:
        if on_ready is not None:
            on_ready(state)
        server.run(sockets=[sock])  # on this (the model's) thread, until SIGTERM or Ctrl-C
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
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
    from loupe.indexer.models.spec import ModelSpec, resolve_spec

    served = ModelSpec(state.model, state.pretrained, state.checkpoint, text_precision=state.text_precision)
    if checkpoint and os.path.realpath(os.path.expanduser(str(checkpoint))) != state.checkpoint:
        return False  # (a copy of the same weights elsewhere: searched in-process, which checks it)
    try:  # the server's model is the index's: resolve the options as `loupe search` would
        asked = resolve_spec(model, pretrained, checkpoint, served, check_tags=False)
    except LoupeError:
        return False  # the in-process search reports the error
    return device in ("auto", state.device) and served.answers(asked.replace(text_precision=text_precision))


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

    conn = http.client.HTTPConnection(state.connect_host, state.port, timeout=timeout)
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
    server that fails in any other way, or a query beyond the server's limits (`loupe.retrieval.engine.requests`),
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
