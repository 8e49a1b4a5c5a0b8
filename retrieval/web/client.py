"""The CLI's side of `loupe serve`: find a running server for this index and model, and search there.

A server announces itself in a 0600 state file beside the index (port, pid, catalog URL, model,
token); `loupe search` reads it and sends `POST /search` (`loupe.retrieval.engine.requests`),
falling back to an in-process search when no server matches. Imports nothing heavy: no torch,
faiss, SQLAlchemy or uvicorn, and not the server.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from loupe.indexer.errors import LoupeError
from loupe.indexer.storage.locations import Location, redact_url, resolve_location
from loupe.retrieval.engine.query import Term
from loupe.retrieval.engine.requests import RequestError, parse_search

HOST = "127.0.0.1"
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
    if state is None or state.catalog != redact_url(resolve_location(home, db).url) or not _alive(state.pid):
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
