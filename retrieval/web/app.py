"""The web app of `loupe serve`: the page, its JSON API, thumbnails and previews (Starlette).

`create_app(service, ...)` builds the ASGI app over a loaded `SearchService`; `loupe serve` runs it
on uvicorn (retrieval/web/server.py) and tests call it through Starlette's TestClient, no socket.
The API is documented in `retrieval/web/openapi.py` (served at GET /api/openapi.json).

Handlers are `async` and call the model directly, on the event loop's thread, which is the
thread that loaded the model (see `SearchService`): queries are serial, as before. Reading and
decoding originals (thumbnails, previews) runs in worker threads, which Pillow allows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from loupe.indexer.storage.catalog import IMAGE
from loupe.indexer.errors import LoupeError
from loupe.indexer.pipeline.imageio import BadImage
from loupe.retrieval.engine.requests import RequestError, decode_json, parse_page_search, parse_search
from loupe.retrieval.web.media import NotServable, ThumbCache, exif_summary, make_preview, make_thumbnail, read_catalogued
from loupe.retrieval.web.guard import MAX_BODY, UPLOAD_LIMIT, Guard, own_hosts, send_json

WEB_DIR = Path(__file__).resolve().parent / "static"
IMMUTABLE = "public, max-age=31536000, immutable"
MAX_SKIPPED = 10_000
MAX_CAPTIONS = 200


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _Errors:
    """Outermost middleware: any exception becomes a JSON error; a client that left is let go."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        started = False

        async def watched(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except (ClientDisconnect, OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
        except Exception as exc:  # noqa: BLE001 - a request never kills the server nor prints a traceback
            if started or scope["type"] != "http":
                return
            if isinstance(exc, RequestError):
                status, message = exc.status, exc.message
            elif isinstance(exc, LoupeError):
                status, message = 400, str(exc)
            else:
                status, message = 500, f"{type(exc).__name__}: {exc}"
            try:
                await send_json(send, status, {"error": message})
            except Exception:  # noqa: BLE001 - the client is gone
                return


class WebApp:
    """The handlers, over one SearchService (model, indices, catalog) and one thumbnail cache."""

    def __init__(self, service, thumbs: ThumbCache, upload_limit: int) -> None:
        self.service = service
        self.web = service.pages
        self.thumbs = thumbs
        self.upload_limit = upload_limit
        self.thumbs_made = 0  # thumbnails decoded from an original (tests: a cached one is not)
        self._roots_cache: tuple[int, list[str]] | None = None

    def _refresh(self) -> None:
        self.service.refresh()

    def _roots(self) -> list[str]:
        """Indexed folders (read once per catalog generation: every thumbnail asks)."""
        generation = self.service.searcher.meta.generation
        if self._roots_cache is None or self._roots_cache[0] != generation:
            self._roots_cache = (generation, [r.path for r in self.service.searcher.store.catalog.roots()])
        return self._roots_cache[1]

    async def _json_body(self, request: Request) -> Any:
        if not (request.headers.get("content-type") or "").startswith("application/json"):
            raise RequestError(415, "send the body as application/json")
        body = await request.body()
        if len(body) < int(request.headers.get("content-length", "0")):
            raise RequestError(400, "the body was shorter than its Content-Length")
        return decode_json(body)

    # ---- the CLI's endpoints (schema unchanged) --------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse(self.service.health())

    async def cli_search(self, request: Request) -> Response:
        body = await self._json_body(request)
        return JSONResponse(self.service.search(parse_search(body)))

    # ---- search -------------------------------------------------------------------------------
    async def search(self, request: Request) -> Response:
        start = time.perf_counter()
        query = parse_page_search(await self._json_body(request))
        answer = self.service.page_search(query)
        if query.inline and query.target == IMAGE:
            self._inline_thumbnails(answer["results"][: query.inline])
        answer["took_ms"] = round((time.perf_counter() - start) * 1000, 2)
        return JSONResponse(answer)

    def _inline_thumbnails(self, results: list[dict]) -> None:
        """Put the cached thumbnails of `results` in the answer as data: URLs (`thumb_data`).

        The first row then paints from the search's own answer: no thumbnail request (a round
        trip through the browser's network service and this server's queue for each) stands
        between the answer and the paint. Only cached thumbnails: a search never decodes originals.
        """
        import base64

        from loupe.retrieval.web.media import THUMB_TYPE

        for result in results:
            data = self.thumbs.get(self.web.photo(result["id"]).content_hash)
            if data is not None:
                result["thumb_data"] = f"data:{THUMB_TYPE};base64,{base64.b64encode(data).decode('ascii')}"

    async def upload(self, request: Request) -> Response:
        ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if not (ctype.startswith("image/") or ctype == "multipart/form-data"):
            raise RequestError(415, "send the image as image/* bytes or as multipart/form-data field 'file'")
        body = await request.body()
        if ctype == "multipart/form-data":
            body = _multipart_file(request.headers["content-type"], body)
        if not body:
            raise RequestError(400, "the upload is empty")
        self._refresh()
        upload = self.web.add_upload(body)
        return JSONResponse({"id": upload.id, "width": upload.width, "height": upload.height, "query": f"upload:{upload.id}"})

    # ---- one photo --------------------------------------------------------------------------
    async def photo_info(self, request: Request) -> Response:
        self._refresh()
        photo = self.web.photo(request.path_params["id"])
        snap = self.web.snapshot()
        out = photo.fields(duplicates=len(snap.by_vector.get(photo.vector_id, [])) - 1)
        out["content_hash"] = photo.content_hash
        out["taken_at"] = photo.taken_at.isoformat(timespec="seconds") if photo.taken_at else None
        out["modified"] = photo.modified.isoformat(timespec="seconds")
        out["duplicate_paths"] = [p.path for p in snap.by_vector.get(photo.vector_id, []) if p.id != photo.id]
        roots = self._roots()
        try:
            data, _ = await anyio.to_thread.run_sync(read_catalogued, photo.path, photo.content_hash, roots)
            out["available"] = True
            out["exif"] = await anyio.to_thread.run_sync(exif_summary, data)
        except NotServable as exc:
            out["available"] = False
            out["unavailable_reason"] = str(exc)
            out["exif"] = {"camera": None, "taken_at": out["taken_at"]}
        return JSONResponse(out)

    async def photo_captions(self, request: Request) -> Response:
        limit = _int_param(request, "limit", 10, 1, MAX_CAPTIONS)
        self._refresh()
        return JSONResponse(self.web.captions_for(request.path_params["id"], limit))

    async def thumb(self, request: Request) -> Response:
        self._refresh()
        photo = self.web.photo(request.path_params["id"])
        digest = photo.content_hash
        wanted = request.query_params.get("h", "")
        headers = {"ETag": f'"{digest}"', "Cache-Control": IMMUTABLE if wanted and digest.startswith(wanted) else "no-cache"}
        if _etag_matches(request, digest):
            return Response(status_code=304, headers=headers)
        from loupe.retrieval.web.media import THUMB_TYPE

        cached = self.thumbs.get(digest)
        if cached is not None:
            return Response(cached, media_type=THUMB_TYPE, headers=headers)
        roots = self._roots()

        def make() -> tuple[bytes, str, str]:
            data, actual = read_catalogued(photo.path, digest, roots)
            picture = make_thumbnail(data)
            self.thumbs.put(actual, picture.data)
            return picture.data, picture.media_type, actual

        try:
            data, media_type, actual = await anyio.to_thread.run_sync(make)
        except (NotServable, BadImage) as exc:
            raise RequestError(404, f"photo {photo.id}: {exc}") from None
        self.thumbs_made += 1
        if actual != digest:  # the file changed since it was indexed: not the catalogued picture
            headers = {"ETag": f'"{actual}"', "Cache-Control": "no-cache"}
        return Response(data, media_type=media_type, headers=headers)

    async def preview(self, request: Request) -> Response:
        full = request.query_params.get("full") in ("1", "true")
        self._refresh()
        photo = self.web.photo(request.path_params["id"])
        tag = f"{photo.content_hash}-{'full' if full else 'preview'}"
        headers = {"ETag": f'"{tag}"', "Cache-Control": "private, max-age=86400"}
        if _etag_matches(request, tag):
            return Response(status_code=304, headers=headers)
        roots = self._roots()

        def make():
            data, _ = read_catalogued(photo.path, photo.content_hash, roots)
            return make_preview(data, full=full)

        try:
            picture = await anyio.to_thread.run_sync(make)
        except (NotServable, BadImage) as exc:
            raise RequestError(404, f"photo {photo.id}: {exc}") from None
        return Response(picture.data, media_type=picture.media_type, headers=headers)

    # ---- the index ----------------------------------------------------------------------------
    async def status(self, request: Request) -> Response:
        from loupe.retrieval.engine.status import index_status

        limit = _int_param(request, "skipped_limit", 100, 0, MAX_SKIPPED)
        self._refresh()
        store = self.service.searcher.store
        info = index_status(store, skipped_limit=limit)
        encoder = self.service.searcher.encoder
        return JSONResponse({
            "catalog": info["catalog"],
            "images": {"ok": info["images_indexed"], "skipped": info["images_skipped"], "missing": info["images_missing"],
                       "distinct": info["image_vectors"], "bytes": info["indexed_bytes"]},
            "captions": {"count": info["captions"], "distinct": info["text_vectors"],
                         "sources": [{"path": p, "count": n} for p, n in info["caption_sources"]]},
            "vectors": {kind: index.ntotal for kind, index in store.loaded_indices().items()}
            | {"image": info["image_vectors"], "text": info["text_vectors"]},
            "model": {"name": info["model"], "pretrained": info["pretrained"], "checkpoint": info["checkpoint"],
                      "weights": info["weights"], "dim": info["dim"], "text_precision": encoder.text_precision},
            "index_factory": info["index_factory"],
            "created": info["created"],
            "updated": info["updated"],
            "roots": info["roots"],
            "skip_reasons": [{"reason": r, "count": n} for r, n in info["skip_reasons"]],
            "skipped": info["skipped_files"],
            "server": {"queries": self.service.queries, "generation": self.service.searcher.meta.generation},
        })

    async def folders(self, request: Request) -> Response:
        from loupe.retrieval.engine.status import indexed_folders

        self._refresh()
        return JSONResponse({"roots": indexed_folders(self.service.searcher.store), "folders": self.web.folders()})

    async def openapi(self, request: Request) -> Response:
        from loupe.retrieval.web.openapi import openapi_document

        return JSONResponse(openapi_document())


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not lo <= int(raw[:12]) <= hi:
        raise RequestError(400, f"{name} must be an integer from {lo} to {hi}")
    return int(raw)


def _etag_matches(request: Request, tag: str) -> bool:
    given = request.headers.get("if-none-match")
    return given is not None and any(t.strip().removeprefix("W/").strip('"') == tag for t in given.split(","))


def _multipart_file(content_type: str, body: bytes) -> bytes:
    """The 'file' field of a multipart/form-data body, parsed in memory (never spooled to disk)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise RequestError(400, "malformed multipart body")
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_payload(decode=True) or b""
    raise RequestError(400, "the multipart body has no 'file' field")


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "error", getattr(exc, "headers", None))


async def _known_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, RequestError):
        return error(exc.status, exc.message, {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)
    if isinstance(exc, LoupeError):
        return error(400, str(exc))
    return error(500, f"{type(exc).__name__}: {exc}")  # a bug: JSON too (Starlette re-raises it; `_Errors` ends it)


def create_app(
    service,
    *,
    token: str,
    port: int,
    host: str = "127.0.0.1",
    allowed_hosts: tuple[str, ...] = (),
    upload_limit: int = UPLOAD_LIMIT,
    thumbs_dir: Path | None = None,
    web_dir: Path = WEB_DIR,
) -> "_Errors":
    """The ASGI app: page, JSON API, thumbnails, previews, and the CLI's /search and /health.

    `port` and `host` are what the server listens on (Host and Origin checks; a non-loopback
    `host` requires the token on every request). Thumbnails are cached in `thumbs_dir`
    (default: `thumbs` beside the index files).
    """
    from loupe.retrieval.web.guard import is_loopback

    location = service.searcher.store.location
    thumbs = ThumbCache(thumbs_dir or location.vector_dir / f"{location.prefix}thumbs")
    web = WebApp(service, thumbs, upload_limit)
    routes = [
        Route("/health", web.health, methods=["GET"]),
        Route("/search", web.cli_search, methods=["POST"]),
        Route("/api/search", web.search, methods=["POST"]),
        Route("/api/uploads", web.upload, methods=["POST"]),
        Route("/api/photos/{id:int}", web.photo_info, methods=["GET"]),
        Route("/api/photos/{id:int}/captions", web.photo_captions, methods=["GET"]),
        Route("/api/thumb/{id:int}", web.thumb, methods=["GET"]),
        Route("/api/photo/{id:int}", web.preview, methods=["GET"]),
        Route("/api/status", web.status, methods=["GET"]),
        Route("/api/folders", web.folders, methods=["GET"]),
        Route("/api/openapi.json", web.openapi, methods=["GET"]),
        Mount("/", StaticFiles(directory=web_dir, html=True), name="page"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, RequestError: _known_error, LoupeError: _known_error,
                            Exception: _known_error},
    )
    app.state.web = web
    guard = Guard(
        app, token=token, port=port, hosts=own_hosts(host, port, allowed_hosts), local=is_loopback(host),
        json_limit=MAX_BODY, upload_limit=upload_limit,
    )
    outer = _Errors(guard)
    outer.state = app.state  # tests reach the handlers' counters
    outer.routes = app.routes
    return outer
