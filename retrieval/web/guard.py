"""Who may talk to `loupe serve`, and how much: the web server's security rules in one place.

- Private by default, on loopback too: every API request (/api/..., and the CLI's /search, /health)
  needs the access token; only the static page (HTML, JS, CSS: no data) is served without it.
  `no_token` (`loupe serve --no-token`, loopback binds only) turns this off for single-user machines.
- The token travels as `Authorization: Bearer <token>`, never in a cookie (cookies ignore ports:
  any other service on the host would receive it). The printed URL carries it in the fragment
  (`/#token=...`, never sent to any server); the page keeps it in localStorage (per origin, so
  per port) and sends the header. Pictures (`<img>` cannot send headers) are addressed by URLs
  signed with the token for a short while (`sign_path`), handed out by authenticated answers only.
- Host must be one of the server's own names (DNS rebinding); a foreign Origin, a cross-site
  `Sec-Fetch-Site`, or (on a state-changing request without Origin) a foreign Referer is refused.
- Bodies: a Content-Length is required (no chunked uploads), JSON at most 1 MiB, uploads at most
  `upload_limit`; checked before a byte is read, and counted while reading.
- `DeadlineH11Protocol`: the whole request (line, headers, body) must arrive in time, however
  slowly it trickles (slow-loris); the deadline never grows for a body that will not be read; a
  refused request (4xx/5xx), or one answered before its body was read, closes its connection; at
  most `MAX_CONNECTIONS` connections at once. Protocol-level refusals are JSON too, with the
  security headers.

Every refusal is a 4xx `{"error": message}`; the checks of `loupe.retrieval.engine.requests` are reused.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from loupe.indexer.errors import LoupeError
from loupe.retrieval.engine.requests import MAX_BODY, REQUEST_TIMEOUT, RequestError

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

UPLOAD_LIMIT = 32 << 20  # bytes in one uploaded image
CLI_PATHS = ("/search", "/health")  # the CLI's endpoints: the token is always required there
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
LOOPBACK_NAMES = ("localhost",)
# Sent with every answer: scripts, styles and images from this server only (a file name is never
# markup), no framing by other pages (clickjacking), no MIME sniffing, no Referer to other sites.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


# ---- binding ------------------------------------------------------------------------------


def canonical_host(host: str) -> str:
    """An address in its one standard spelling: '127.1' and '0x7f.1' (what inet_aton and
    the bind accept) -> '127.0.0.1', '[::1]' -> '::1'; names are kept (lower case)."""
    bare = host.strip().strip("[]")
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if bare and all(c.isalnum() or c == "." for c in bare) and not bare.isalpha():
        try:
            return socket.inet_ntoa(socket.inet_aton(bare))  # the short and octal/hex IPv4 forms
        except OSError:
            pass
    return bare.lower()


def is_loopback(host: str) -> bool:
    """Whether `host` (an address in any spelling, or 'localhost') is reachable from this machine only."""
    name = canonical_host(host)
    if name in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def bind_needs_token(host: str, no_token: bool = False) -> bool:
    """Whether every API request must carry the access token: always, unless `no_token` on loopback."""
    return not (no_token and is_loopback(host))


def check_bind(host: str, token: str | None, no_token: bool = False) -> None:
    """Refuse to serve without an access token, and `no_token` beyond loopback (a LoupeError, printed by the CLI)."""
    if no_token and not is_loopback(host):
        raise LoupeError(f"--no-token is for loopback binds only: binding {host} makes the photos reachable from other machines")
    if bind_needs_token(host, no_token) and not token:
        raise LoupeError(f"binding {host}: an access token is required")


def own_hosts(bind_host: str, port: int, extra: Iterable[str] = ()) -> frozenset[str]:
    """Host header values this server answers to (lower case, with and without the port)."""
    names = {"127.0.0.1", "localhost", "[::1]"}
    wildcard = bind_host in ("0.0.0.0", "::", "")
    if not wildcard:
        bind_host = canonical_host(bind_host)
        names.add(f"[{bind_host}]" if ":" in bind_host else bind_host)
    else:  # every address and name of this machine
        hostname = socket.gethostname()
        names.update({hostname, socket.getfqdn()})
        try:
            for info in socket.getaddrinfo(hostname, None):
                addr = info[4][0]
                names.add(f"[{addr}]" if ":" in addr else addr)
        except OSError:
            pass
    names.update(extra)
    names = {n.lower() for n in names if n}
    return frozenset(names | {f"{n}:{port}" for n in names})


# ---- the middleware -----------------------------------------------------------------------


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in scope.get("headers", []):
        name = k.decode("latin-1").lower()
        if name in out and name in ("content-length", "host", "authorization", "origin"):
            out[name] = "\x00duplicate"  # never silently pick one of two
        else:
            out[name] = v.decode("latin-1")
    return out


async def send_json(send: Send, status: int, body: dict, headers: Iterable[tuple[str, str]] = ()) -> None:
    data = json.dumps(body, ensure_ascii=False, default=str).encode("utf-8")
    raw = [(b"content-type", b"application/json; charset=utf-8"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


SIGNED_PATHS = ("/api/thumb/", "/api/photo/", "/api/video/")  # what an <img> or <video> asks for: a signed URL instead of the header
SIGNATURE_LIFETIME = 1800  # seconds a signed picture URL stays valid, at least (one more period at most)


def sign_path(token: str, path: str, now: float | None = None) -> str:
    """`path` (no query) signed with the token until the end of the next period: `exp=...&sig=...`.
    The expiry is rounded to a period, so a picture keeps one URL (and browser cache) meanwhile."""
    now = time.time() if now is None else now
    expires = (int(now) // SIGNATURE_LIFETIME + 2) * SIGNATURE_LIFETIME
    return f"exp={expires}&sig={_signature(token, path, expires)}"


def _signature(token: str, path: str, expires: int) -> str:
    return hmac.new(token.encode("utf-8"), f"picture\n{path}\n{expires}".encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def signed_ok(token: str, path: str, query: dict[str, str], now: float | None = None) -> bool:
    """Whether `query` holds a valid, unexpired signature of `path`."""
    exp, sig = query.get("exp", ""), query.get("sig", "")
    if not token or not (exp.isascii() and exp.isdigit() and len(exp) <= 12) or len(sig) != 32:
        return False
    expires = int(exp)
    now = time.time() if now is None else now
    if not now <= expires <= now + 2 * SIGNATURE_LIFETIME:
        return False
    return hmac.compare_digest(sig.encode("ascii", "replace"), _signature(token, path, expires).encode("ascii"))


class Guard:
    """ASGI middleware that applies the rules above before the app sees a request."""

    def __init__(
        self, app: Callable, *, token: str, port: int, hosts: frozenset[str], no_token: bool = False,
        json_limit: int = MAX_BODY, upload_limit: int = UPLOAD_LIMIT, upload_paths: tuple[str, ...] = ("/api/uploads",),
    ) -> None:
        self.app = app
        self.token = token
        self.port = port
        self.hosts = hosts
        self.origins = frozenset(f"http://{h}" for h in hosts if h.endswith(f":{port}"))
        self.no_token = no_token
        self.json_limit = json_limit
        self.upload_limit = upload_limit
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            return await self.app(scope, receive, send)
        send = _with_security_headers(send, scope.get("path", "/"))
        try:
            headers = _headers(scope)
            self.check_host(headers.get("host"))
            self.check_origin(scope["method"], headers, scope["path"])
            if self._token_in_query(scope):
                return await self._enter_with_token(scope, send)
            self.check_auth(scope["path"], headers, scope.get("query_string", b""))
            limit = self.check_body(scope["method"], scope["path"], headers)
        except RequestError as exc:
            extra = [("www-authenticate", "Bearer")] if exc.status == 401 else []
            return await send_json(send, exc.status, {"error": exc.message}, [*extra, ("connection", "close")])
        if limit is None:
            return await self.app(scope, receive, send)
        await self.app(scope, _bounded(receive, limit), send)

    # ---- the checks, one per rule (tests call them too) ----------------------------------
    def check_host(self, host: str | None) -> None:
        if (host or "").strip().lower() not in self.hosts:
            raise RequestError(403, "loupe serve answers requests for its own address only (Host)")

    def check_origin(self, method: str, headers: dict[str, str], path: str = "/api") -> None:
        origin = headers.get("origin")
        if origin is not None and origin.strip().lower() not in self.origins:
            raise RequestError(403, "loupe serve refuses requests from other web origins")
        site = headers.get("sec-fetch-site")
        if site is not None and site.strip().lower() not in ("same-origin", "none") and not _opens_the_page(method, path, headers):
            raise RequestError(403, "loupe serve refuses cross-site requests")
        referer = headers.get("referer")
        if method not in SAFE_METHODS and origin is None and referer is not None:
            parts = urlsplit(referer.strip())
            if f"{parts.scheme}://{parts.netloc}".lower() not in self.origins:
                raise RequestError(403, "loupe serve refuses requests from other web pages (Referer)")

    def has_token(self, headers: dict[str, str]) -> bool:
        """The token in an Authorization header (cookies are ignored: they reach every port)."""
        scheme, _, given = (headers.get("authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and self._same(given.strip())

    def check_auth(self, path: str, headers: dict[str, str], query: bytes = b"") -> None:
        """Every API request needs the token (or, for a picture, a signed URL); the static page does not."""
        if not (path.startswith("/api/") or path in CLI_PATHS or path == "/api"):
            return  # the page's own files: no data in them
        if self.no_token and path not in CLI_PATHS:
            return
        if self.has_token(headers):
            return
        if path.startswith(SIGNED_PATHS) and b"sig=" in query:
            if signed_ok(self.token, path, dict(parse_qsl(query.decode("latin-1")))):
                return
            raise RequestError(401, "this picture's link has expired: search again")
        where = "send 'Authorization: Bearer <token from serve.json>'" if path in CLI_PATHS else "open the URL `loupe serve` printed"
        raise RequestError(401, f"missing or wrong token: {where}")

    def check_body(self, method: str, path: str, headers: dict[str, str]) -> int | None:
        """The body limit for this request (None: no body expected), checked on its headers."""
        if method not in BODY_METHODS:
            return None
        if "transfer-encoding" in headers:
            raise RequestError(411, "send the body with a Content-Length, not chunked")
        limit = self.upload_limit if path in self.upload_paths else self.json_limit
        value = headers.get("content-length")
        if value is None:
            raise RequestError(411, "send the body with a Content-Length")
        value = value.strip()
        if not value.isascii() or not value.isdigit():
            raise RequestError(400, "bad Content-Length")
        if len(value) > 18 or int(value) > limit:
            raise RequestError(413, f"request body over {limit} bytes")
        return int(value)

    # ---- the printed URL: ?token=... -> cookie -> / -------------------------------------
    def _same(self, given: str) -> bool:
        return bool(self.token) and hmac.compare_digest(given.encode("utf-8", "surrogatepass"), self.token.encode("utf-8"))

    def _token_in_query(self, scope: Scope) -> bool:
        query = scope.get("query_string", b"")
        return scope["method"] in ("GET", "HEAD") and b"token=" in query and "token" in parse_qs(query.decode("latin-1"))

    async def _enter_with_token(self, scope: Scope, send: Send) -> None:
        """An old-style printed URL (`/?token=...`): check the token and move it to the fragment,
        where the page reads it (no cookie: cookies reach every port of the host)."""
        pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = next((v for k, v in pairs if k == "token"), "")
        if not self._same(given):
            return await send_json(send, 401, {"error": "wrong token: open the URL `loupe serve` printed"}, [("connection", "close")])
        rest = urlencode([(k, v) for k, v in pairs if k != "token"])
        location = ("/" + (f"?{rest}" if rest else "") + f"#token={self.token}").encode("latin-1")
        await send({
            "type": "http.response.start", "status": 303,
            "headers": [(b"location", location), (b"cache-control", b"no-store"),
                        (b"referrer-policy", b"no-referrer"), (b"content-length", b"0")],
        })
        await send({"type": "http.response.body", "body": b""})


def _opens_the_page(method: str, path: str, headers: dict[str, str]) -> bool:
    """A link from elsewhere opening the page itself in a tab (a shared or bookmarked URL): allowed,
    it reads nothing (the token is never in a cookie); a frame or a fetch is not."""
    return (
        method == "GET" and not path.startswith("/api/") and path not in CLI_PATHS
        and headers.get("sec-fetch-mode") == "navigate" and headers.get("sec-fetch-dest") == "document"
    )


def _with_security_headers(send: Send, path: str = "/") -> Send:
    """Add the security headers; API answers (JSON) are never stored by a cache; a 4xx/5xx closes
    its connection (whatever the client still sends is not read)."""
    api = path.startswith("/api/") or path in CLI_PATHS

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            present = {k.lower() for k, _ in message.get("headers", [])}
            extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
            if api and b"cache-control" not in present:
                extra.append((b"cache-control", b"no-store"))
            if message.get("status", 200) >= 400 and b"connection" not in present:
                extra.append((b"connection", b"close"))
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


def _bounded(receive: Receive, limit: int) -> Receive:
    """`receive` that refuses a body longer than announced (h11 checks it too) or than `limit`."""
    seen = 0

    async def wrapped() -> dict:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise RequestError(413, f"request body over {limit} bytes")
        return message

    return wrapped


# ---- the protocol: a deadline for the whole request; JSON for protocol errors -----------------


MIN_RATE = 1 << 20  # bytes/s a body must at least arrive at: a 32 MiB upload gets 5 + 32 s
MAX_CONNECTIONS = 128  # open connections per server; one more is answered 503 and closed
LINGER = 2.0  # seconds a refused request's unread body is drained (so the client reads the answer), at most
LINGER_BYTES = 8 << 20  # bytes drained at most, then the connection is closed at once


class _LingeringTransport:
    """The connection's transport, whose `close()` on a request whose body was not read first
    sends the answer and FIN, then discards what the client still sends for at most LINGER
    seconds / LINGER_BYTES (closing at once would reset the connection and could destroy the
    answer in the client's buffers). The deadline never grows: the client cannot hold it longer."""

    def __init__(self, transport, protocol: "DeadlineH11Protocol") -> None:
        self._transport = transport
        self._protocol = protocol
        self.lingering = False

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        protocol = self._protocol
        if self.lingering or self._transport.is_closing():
            return self._transport.close() if not self.lingering else None
        if protocol.conn.their_state is h11.SEND_BODY and self._transport.can_write_eof():
            self.lingering = True
            protocol._disarm()
            protocol._deadline = protocol.loop.call_later(LINGER, self._transport.close)
            self._transport.write_eof()  # after what is buffered: the answer arrives, then EOF
            return
        self._transport.close()


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: each request must arrive completely before its deadline
    (408 JSON, connection closed), a body cut short by the client is answered 400 JSON, and
    h11's own refusals (bad Content-Length, malformed request line...) are JSON.
    """

    request_timeout = REQUEST_TIMEOUT
    min_rate = MIN_RATE
    max_body = UPLOAD_LIMIT  # the longest body any route reads: the deadline never grows beyond its time
    max_connections = MAX_CONNECTIONS

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._drained = 0
        super().connection_made(_LingeringTransport(transport, self))
        self._deadline = None
        self._started = False  # bytes of the current request arrived
        self._extended = False
        if len(self.server_state.connections) > self.max_connections:
            self._raw_error(503, "too many connections: try again in a moment", retry_after=1)
            return
        self._arm(self.request_timeout)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:
            self._drained += len(data)  # the unread body of a refused request: discarded
            if self._drained > LINGER_BYTES:
                self.transport._transport.close()
            return
        if self.transport.is_closing():
            return  # answered and closing: nothing more is read
        if self.cycle is not None and self.cycle.response_complete and self.conn.their_state is h11.SEND_BODY:
            self.transport.close()  # body bytes of a request already answered: never read, never waited for
            return
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm(self.request_timeout)  # the next request on a kept-alive connection
            self._extended = False
        self._started = True
        super().data_received(data)
        state = self.conn.their_state
        answered = self.cycle is not None and self.cycle.response_started
        if state is h11.SEND_BODY and not self._extended and self._deadline is not None and not answered:
            self._extended = True  # headers are in: allow the body time by its announced size
            length = next((int(v) for k, v in (self.headers or []) if k == b"content-length" and v.isdigit() and len(v) <= 18), 0)
            extra = min(length, self.max_body) / self.min_rate
            if extra > 0:
                when = self._deadline.when() + extra
                self._disarm()
                self._deadline = self.loop.call_at(when, self._expired)
        elif state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            self._disarm()  # the request is complete; the app answers in its own time
            self._started = False

    def on_response_complete(self) -> None:
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self.transport.close()  # answered before its body was read: the rest is never read
            return
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:
            self._started = False

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            if self.transport.lingering:
                self.transport._transport.close()
            return
        answered = self.cycle is not None and self.cycle.response_started
        if self._started and not answered and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._raw_error(408, f"the request did not arrive within {self.request_timeout:g} s")
        else:
            self.transport.close()

    def eof_received(self) -> bool | None:
        if self.conn.their_state is h11.SEND_BODY and not (self.cycle and self.cycle.response_started):
            self._raw_error(400, "the body was shorter than its Content-Length")
            return True
        return None

    def send_400_response(self, msg: str) -> None:
        self._raw_error(400, f"malformed HTTP request: {msg.rstrip('.')}")

    def _raw_error(self, status: int, message: str, retry_after: int | None = None) -> None:
        """Answer outside the ASGI app (no request parsed, or it never finished) and close."""
        self._disarm()
        body = json.dumps({"error": message}).encode()
        security = "".join(f"{k.decode()}: {v.decode()}\r\n" for k, v in SECURITY_HEADERS)
        retry = f"Retry-After: {retry_after}\r\n" if retry_after is not None else ""
        head = (
            f"HTTP/1.0 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n{retry}{security}Connection: close\r\n\r\n"
        ).encode("latin-1")
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.response_started = self.cycle.disconnected = True  # the app's late answer is dropped
            self.cycle.message_event.set()  # and a read it waits on ends
        self.transport.write(head + body)
        transport = self.transport
        getattr(transport, "_transport", transport).close()  # cut off: no lingering for a late or broken request
