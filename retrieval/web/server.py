"""`loupe serve`: the process that keeps the model and the indices loaded and serves the page,
its API and `loupe search` (uvicorn running the Starlette app of `loupe.retrieval.web.app` over a
`loupe.retrieval.engine.service.SearchService`), on 127.0.0.1 by default.

It writes the state file `loupe search` finds it by (`loupe.retrieval.web.client`) once the socket
listens, and removes it on the way out. The CLI's endpoints:
    GET  /health   -> {"status": "ok", "pid", "catalog", "model", "text_precision", "generation",
                       "queries", "vectors"}
    POST /search   <- {"terms": [{"weight", "kind", "value"}], "target": "image"|"text", "k",
                       "min_score", "folder", "globs", "after", "before", "date_field"}
                   -> {"hits": [{"rank", "score", "kind", "vector_id", "fields", "json"}]}
A query error (bad date, empty index...) answers 400 {"error": message}, the message `loupe
search` would print. The web API (/api/...) is described in `retrieval/web/openapi.py`. Every
request is treated as hostile (`loupe.retrieval.web.guard`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from loupe.indexer.errors import LoupeError
from loupe.retrieval.engine.requests import REQUEST_TIMEOUT, new_token
from loupe.retrieval.engine.service import SearchService
from loupe.indexer.storage.locations import redact_url
from loupe.retrieval.web.client import HOST, ServerState, read_state, state_file

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
    no_token: bool = False,
) -> None:
    """Serve the page, its API and the CLI's searches on `host`:`port` (0: any free port) until
    SIGTERM or Ctrl-C (uvicorn, one process, the model on this thread).

    The state file is written once the socket listens and removed on the way out (if it is
    still ours), so `loupe search` never waits on a server that is not there.
    """
    from loupe.retrieval.web.app import create_app
    from loupe.retrieval.web.guard import UPLOAD_LIMIT, canonical_host, check_bind

    host = canonical_host(host) if host not in ("", "0.0.0.0", "::") else host
    token = new_token()
    check_bind(host, token, no_token)
    service = SearchService(searcher)
    service.warm_up()
    sock = listening_socket(host, port)
    port = sock.getsockname()[1]
    app = create_app(
        service, token=token, port=port, host=host, allowed_hosts=tuple(allowed_hosts),
        upload_limit=upload_limit or UPLOAD_LIMIT, no_token=no_token,
    )
    server = uvicorn_server(app)
    spec = searcher.encoder.spec
    state = ServerState(
        pid=os.getpid(), port=port, catalog=redact_url(searcher.store.location.url), model=spec.model,
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
