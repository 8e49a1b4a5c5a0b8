"""The web app of `loupe serve`: the page, its JSON API, thumbnails and previews (Starlette).

`create_app(service, ...)` builds the ASGI app over a loaded `SearchService`; `loupe serve` runs it
on uvicorn (retrieval/web/server.py) and tests call it through Starlette's TestClient, no socket.
The API is documented in `retrieval/web/openapi.py` (served at GET /api/openapi.json).

Handlers are `async` and call the model directly for text queries, on the event loop's thread,
which is the thread that loaded the model (see `SearchService`): queries are serial, as before.
Everything CPU- or memory-heavy runs in `WorkPool`s of a few low-priority threads with a queue
limit (503 + Retry-After when full): an upload's multipart parse, decode and embedding, and the
decoding of originals for thumbnails and previews, each within a pixel and memory budget
(`loupe.indexer.pipeline.imageio.open_within_budget`). A search never waits behind them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from loupe.indexer.storage.catalog import IMAGE
from loupe.indexer.errors import LoupeError
from loupe.indexer.pipeline.imageio import BadImage
from loupe.indexer.pipeline.media import is_video
from loupe.retrieval.engine.requests import RequestError, decode_json, parse_page_search, parse_search
from loupe.retrieval.web.media import THUMB_TYPE, NotServable, ThumbCache, exif_summary, make_preview, make_thumbnail, read_catalogued
from loupe.retrieval.web.guard import MAX_BODY, SIGNED_PATHS, UPLOAD_LIMIT, Guard, own_hosts, send_json, sign_path

WEB_DIR = Path(__file__).resolve().parent / "static"
IMMUTABLE = "private, max-age=31536000, immutable"  # never a shared cache: pictures are private
MAX_SKIPPED = 10_000
MAX_CAPTIONS = 200
MAX_PARTS = 16  # parts of a multipart upload (a browser's form sends one or two)
UPLOAD_PIXELS = 100_000_000  # pixels of an uploaded picture after JPEG draft scaling, at most
LOG = logging.getLogger("loupe.serve")  # a bug's traceback goes to the server's own log (stderr), never to a client
INTERNAL_ERROR = "the server could not answer this request (an internal error); try again, or restart `loupe serve`"


class Busy(RequestError):
    """All workers busy and the queue full: 503 with Retry-After."""

    def __init__(self, what: str, retry_after: int = 2) -> None:
        super().__init__(503, f"the server is busy with other {what}: try again in a moment")
        self.retry_after = retry_after


class WorkPool:
    """At most `workers` jobs at once on low-priority threads, at most `queue` more waiting;
    one more is refused at once (Busy: 503). Bounds CPU and memory whatever clients send."""

    def __init__(self, name: str, workers: int, queue: int) -> None:
        self.name = name
        self.limiter = anyio.CapacityLimiter(workers)
        self.capacity = workers + queue
        self.pending = 0
        self.peak = 0

    def reserve(self) -> None:
        if self.pending >= self.capacity:
            raise Busy(self.name)
        self.pending += 1
        self.peak = max(self.peak, self.pending)

    def release(self) -> None:
        self.pending -= 1

    async def run(self, fn, *args, reserved: bool = False):
        if not reserved:
            self.reserve()
        try:
            return await anyio.to_thread.run_sync(_low_priority, fn, *args, limiter=self.limiter)
        finally:
            self.release()


_niced = threading.local()


def _low_priority(fn, *args):
    """Run `fn` on this worker thread at a lower CPU priority than the event loop (Linux: per thread)."""
    if not getattr(_niced, "done", False):
        _niced.done = True
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10))
        except (AttributeError, OSError):
            pass
    return fn(*args)


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
        except Exception as exc:  # noqa: BLE001 - a request never kills the server; the client never sees a traceback
            if started or scope["type"] != "http":
                return
            headers = [("connection", "close")]
            if isinstance(exc, RequestError):
                status, message = exc.status, exc.message
                if isinstance(exc, Busy):
                    headers.append(("retry-after", str(exc.retry_after)))
            elif isinstance(exc, LoupeError):
                status, message = 400, str(exc)
            else:
                status, message = 500, INTERNAL_ERROR
                LOG.error("internal error answering %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            try:
                await send_json(send, status, {"error": message}, headers)
            except Exception:  # noqa: BLE001 - the client is gone
                return


class WebApp:
    """The handlers, over one SearchService (model, indices, catalog) and one thumbnail cache."""

    def __init__(self, service, thumbs: ThumbCache, upload_limit: int, token: str = "", previews: ThumbCache | None = None) -> None:
        self.service = service
        self.web = service.pages
        self.thumbs = thumbs
        self.previews = previews or ThumbCache(thumbs.folder.parent / f"{thumbs.folder.name}-previews", ext=".jpg")
        self.upload_limit = upload_limit
        self.token = token
        workers = 1 if (os.cpu_count() or 1) <= 2 else 2
        self.uploads = WorkPool("uploads", workers, 4)  # multipart, decode and embed an upload
        self.pictures = WorkPool("pictures", workers, 64)  # decode originals for thumbnails and previews
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
        for result in answer.get("results", []):
            self._sign(result)
        answer["took_ms"] = round((time.perf_counter() - start) * 1000, 2)
        return JSONResponse(answer)

    def _sign(self, fields: dict) -> dict:
        """Picture and video URLs of a result signed for a while (an <img> or <video> cannot send the token)."""
        for key in ("thumb", "preview", "video"):
            url = fields.get(key)
            if isinstance(url, str) and url.startswith(SIGNED_PATHS):
                url, hash_, fragment = url.partition("#")  # a video's #t=SECONDS stays last
                path, _, query = url.partition("?")
                fields[key] = f"{path}?{query + '&' if query else ''}{sign_path(self.token, path)}{hash_}{fragment}"
        return fields

    def _inline_thumbnails(self, results: list[dict]) -> None:
        """Put the cached thumbnails of `results` in the answer as data: URLs (`thumb_data`).

        The first row then paints from the search's own answer: no thumbnail request (a round
        trip through the browser's network service and this server's queue for each) stands
        between the answer and the paint. Only cached thumbnails: a search never decodes originals.
        """
        import base64

        for result in results:
            data = self.thumbs.get(self.web.photo(result["id"]).content_hash)
            if data is not None:
                result["thumb_data"] = f"data:{THUMB_TYPE};base64,{base64.b64encode(data).decode('ascii')}"

    async def upload(self, request: Request) -> Response:
        ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if not (ctype.startswith("image/") or ctype == "multipart/form-data"):
            raise RequestError(415, "send the image as image/* bytes or as multipart/form-data field 'file'")
        self.uploads.reserve()  # refused (503) before a byte of the body is read when the queue is full
        handed = False
        try:
            body = await request.body()
            self._refresh()
            full_type = request.headers["content-type"]
            image_size = self.service.searcher.encoder.image_size

            def work():
                data = _multipart_file(full_type, body) if ctype == "multipart/form-data" else body
                if not data:
                    raise RequestError(400, "the upload is empty")
                _check_upload(data, image_size)
                return self.web.add_upload(data)

            handed = True
            upload = await self.uploads.run(work, reserved=True)
        finally:
            if not handed:
                self.uploads.release()
        return JSONResponse({"id": upload.id, "width": upload.width, "height": upload.height, "query": f"upload:{upload.id}"})

    # ---- one photo --------------------------------------------------------------------------
    async def photo_info(self, request: Request) -> Response:
        self._refresh()
        photo = self.web.photo(request.path_params["id"])
        snap = self.web.snapshot()
        out = self._sign(photo.fields(duplicates=len(snap.by_vector.get(photo.vector_id, [])) - 1))
        out["content_hash"] = photo.content_hash
        out["text"] = self.web.searcher.store.catalog.text_of(photo.content_hash)  # lines read in the photo, with boxes
        out["taken_at"] = photo.taken_at.isoformat(timespec="seconds") if photo.taken_at else None
        out["modified"] = photo.modified.isoformat(timespec="seconds")
        out["duplicate_paths"] = [p.path for p in snap.by_vector.get(photo.vector_id, []) if p.id != photo.id]
        roots = self._roots()
        if is_video(photo.path):  # a video is never read whole here: only checked that it may be served
            from loupe.retrieval.web.media import open_catalogued_video

            def exif():
                with open_catalogued_video(photo.path, photo.size, photo.mtime_ns, roots):
                    return {"camera": None, "taken_at": out["taken_at"]}
        else:
            def exif():
                return exif_summary(read_catalogued(photo.path, photo.content_hash, roots)[0])
        try:
            out["exif"] = await self.pictures.run(exif)
            out["available"] = True
        except NotServable as exc:
            out["available"] = False
            out["unavailable_reason"] = str(exc)
            out["exif"] = {"camera": None, "taken_at": out["taken_at"]}
        return JSONResponse(out)

    async def photo_captions(self, request: Request) -> Response:
        limit = _int_param(request, "limit", 10, 1, MAX_CAPTIONS)
        self._refresh()
        return JSONResponse(self.web.captions_for(request.path_params["id"], limit))

    async def _render(self, make, what: str):
        """`make()` (reads and decodes a catalogued file) in the picture pool; a file that cannot be
        served is a 404 naming `what`."""
        try:
            return await self.pictures.run(make)
        except (NotServable, BadImage) as exc:
            raise RequestError(404, f"{what}: {exc}") from None

    async def thumb(self, request: Request) -> Response:
        self._refresh()
        photo = self.web.photo(request.path_params["id"])
        if is_video(photo.path):
            return await self._video_thumb(request, photo)
        digest = photo.content_hash
        wanted = request.query_params.get("h", "")
        immutable = len(wanted) >= 16 and digest.startswith(wanted)  # this URL names these bytes only
        headers = {"ETag": f'"{digest}"', "Cache-Control": IMMUTABLE if immutable else "private, no-cache"}
        early = _unchanged_or_cached(request, digest, headers, self.thumbs, THUMB_TYPE)
        if early is not None:
            return early
        roots = self._roots()

        def make() -> tuple[bytes, str, str]:
            data, actual = read_catalogued(photo.path, digest, roots)
            picture = make_thumbnail(data)
            self.thumbs.put(actual, picture.data)
            return picture.data, picture.media_type, actual

        data, media_type, actual = await self._render(make, f"photo {photo.id}")
        self.thumbs_made += 1
        if actual != digest:  # the file changed since it was indexed: not the catalogued picture
            headers = {"ETag": f'"{actual}"', "Cache-Control": "private, no-cache"}
        return Response(data, media_type=media_type, headers=headers)

    async def preview(self, request: Request) -> Response:
        full = request.query_params.get("full") in ("1", "true")
        self._refresh()
        photo = self.web.photo(request.path_params["id"])
        if is_video(photo.path):  # never read whole as a picture: its preview is the video itself
            raise RequestError(404, f"photo {photo.id} is a video: GET /api/video/{photo.id}")
        tag = f"{photo.content_hash}-{'full' if full else 'preview'}"
        headers = {"ETag": f'"{tag}"', "Cache-Control": "private, max-age=86400"}
        # only ever a re-encoded JPEG is cached (an original is not copied)
        early = _unchanged_or_cached(request, tag, headers, self.previews, "image/jpeg")
        if early is not None:
            return early
        roots = self._roots()

        def make():
            data, actual = read_catalogued(photo.path, photo.content_hash, roots)
            picture = make_preview(data, full=full)
            if picture.data is not data and actual == photo.content_hash:
                self.previews.put(tag, picture.data)
            return picture

        picture = await self._render(make, f"photo {photo.id}")
        return Response(picture.data, media_type=picture.media_type, headers=headers)

    # ---- videos -------------------------------------------------------------------------------
    async def _video_thumb(self, request: Request, photo) -> Response:
        """The frame of a catalogued video at `t` seconds (a moment's tile), cached by content and time."""
        raw = request.query_params.get("t", "0")
        try:
            t = float(raw) if len(raw) <= 16 else -1.0
        except ValueError:
            t = -1.0
        if not (0.0 <= t <= 1e6):  # also refuses nan and inf
            raise RequestError(400, "t must be a time in seconds")
        key = f"{photo.content_hash}-t{t:.3f}"
        headers = {"ETag": f'"{key}"', "Cache-Control": IMMUTABLE}
        early = _unchanged_or_cached(request, key, headers, self.thumbs, THUMB_TYPE)
        if early is not None:
            return early
        from loupe.retrieval.web.media import open_catalogued_video, video_frame_thumbnail

        roots = self._roots()

        def make():
            with open_catalogued_video(photo.path, photo.size, photo.mtime_ns, roots) as f:
                picture = video_frame_thumbnail(f, t)
            self.thumbs.put(key, picture.data)
            return picture

        picture = await self._render(make, f"video {photo.id}")
        self.thumbs_made += 1
        return Response(picture.data, media_type=picture.media_type, headers=headers)

    async def video(self, request: Request) -> Response:
        """A catalogued video's bytes, answering a single HTTP Range (at most RANGE_MAX bytes a
        request) so a player can seek; only videos in the catalog, by row id."""
        from loupe.retrieval.web.media import (
            RANGE_MAX, VIDEO_CHUNK, VIDEO_TYPES, BadRange, open_catalogued_video, parse_range,
        )

        self._refresh()
        photo = self.web.photo(request.path_params["id"])
        if not is_video(photo.path):
            raise RequestError(404, f"photo {photo.id} is not a video")
        roots = self._roots()
        try:
            f = await run_in_threadpool(open_catalogued_video, photo.path, photo.size, photo.mtime_ns, roots)
        except NotServable as exc:
            raise RequestError(404, f"video {photo.id}: {exc}") from None
        size = photo.size
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{photo.content_hash}"', "Cache-Control": "private, max-age=3600"}
        try:
            wanted = parse_range(request.headers.get("range"), size)
        except BadRange as exc:
            f.close()
            return error(416, str(exc), {**headers, "Content-Range": f"bytes */{size}"})
        first, last = wanted if wanted is not None else (0, min(size, RANGE_MAX) - 1)
        status = 206 if wanted is not None or size > RANGE_MAX else 200  # no Range: the start, as a partial answer
        if status == 206:
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        headers["Content-Length"] = str(max(0, last - first + 1))
        media_type = VIDEO_TYPES.get(os.path.splitext(photo.path)[1].lower(), "application/octet-stream")

        def read(n: int) -> bytes:
            return f.read(n)

        async def body():
            try:
                await run_in_threadpool(f.seek, first)
                left = last - first + 1
                while left > 0:
                    chunk = await run_in_threadpool(read, min(VIDEO_CHUNK, left))
                    if not chunk:
                        break
                    left -= len(chunk)
                    yield chunk
            finally:
                f.close()

        if request.method == "HEAD":
            f.close()
            return Response(status_code=status, headers=headers, media_type=media_type)
        return StreamingResponse(body(), status_code=status, headers=headers, media_type=media_type)

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

    # ---- near-duplicates (the review view) -----------------------------------------------------
    def _groups(self, tier: str | None):
        from loupe.retrieval.engine.duplicates import TIERS, find_groups

        if tier not in (None, "", *TIERS):
            raise RequestError(400, f"tier must be one of {', '.join(TIERS)}")
        return find_groups(self.service.searcher.store, (tier,) if tier else TIERS)

    def _group_json(self, group) -> dict:
        out = group.to_json()
        for f in out["files"]:
            f["thumb"] = f"/api/thumb/{f['id']}?h={f['hash'][:16]}"
            self._sign(f)
        return out

    async def duplicates(self, request: Request) -> Response:
        limit = _int_param(request, "limit", 200, 1, 2000)
        tier = request.query_params.get("tier") or None
        self._refresh()
        grouping = await self.pictures.run(self._groups, tier)
        groups = grouping.groups[:limit]
        return JSONResponse({"groups": [self._group_json(g) for g in groups], "total": len(grouping.groups),
                             "photos": grouping.contents, "lacking_signal": grouping.lacking})

    def _with_writer_lock(self, fn):
        """`fn(store)` holding the index's writer lock, for moves of files; a lock another writer
        holds, or a move refused, is a 409."""
        from loupe.indexer.storage.locking import writer_lock

        store = self.service.searcher.store
        try:
            with writer_lock(store, wait=False):
                return fn(store)
        except LoupeError as exc:
            raise RequestError(409, str(exc)) from None

    async def duplicates_resolve(self, request: Request) -> Response:
        from loupe.retrieval.engine.dup_moves import resolve

        body = await self._json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("group"), str) or len(body["group"]) > 64:
            raise RequestError(400, "send {\"group\": id, \"keep\": photo id}")
        keep_id = body.get("keep")
        if keep_id is not None and (not isinstance(keep_id, int) or isinstance(keep_id, bool)):
            raise RequestError(400, "keep must be a photo id")
        self._refresh()

        def work():
            grouping = self._groups(None)
            group = next((g for g in grouping.groups if g.id == body["group"]), None)
            if group is None:
                raise RequestError(404, "no such group (it changed: reload the groups)")
            keep = group.keep if keep_id is None else next((m.path for m in group.members if m.id == keep_id), None)
            if keep is None:
                raise RequestError(400, "keep is not a photo of this group")
            return self._with_writer_lock(lambda store: resolve(store, [group], keep={group.id: keep}))

        out = await self.pictures.run(work)
        self._refresh()
        if out.refused and not out.moved:
            raise RequestError(409, "; ".join(why for _, why in out.refused))
        return JSONResponse({"moved": [{"from": a, "to": b} for a, b in out.moved], "refused": [w for _, w in out.refused]})

    async def duplicates_undo(self, request: Request) -> Response:
        from loupe.retrieval.engine.dup_moves import undo

        out = await self.pictures.run(self._with_writer_lock, undo)
        self._refresh()
        return JSONResponse({"restored": out.restored, "problems": out.problems})

    async def openapi(self, request: Request) -> Response:
        from loupe.retrieval.web.openapi import openapi_document

        return JSONResponse(openapi_document())


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 12 else None  # parsed once, then bounded
    if value is None or not lo <= value <= hi:
        raise RequestError(400, f"{name} must be an integer from {lo} to {hi}")
    return value


def _unchanged_or_cached(request: Request, tag: str, headers: dict, cache, media_type: str) -> Response | None:
    """304 when the client holds `tag` already, else the bytes `cache` keeps under `tag`, else None."""
    if _etag_matches(request, tag):
        return Response(status_code=304, headers=headers)
    cached = cache.get(tag)
    if cached is not None:
        return Response(cached, media_type=media_type, headers=headers)
    return None


def _etag_matches(request: Request, tag: str) -> bool:
    given = request.headers.get("if-none-match")
    return given is not None and any(t.strip().removeprefix("W/").strip('"') == tag for t in given.split(","))


def _multipart_file(content_type: str, body: bytes) -> bytes:
    """The 'file' field of a multipart/form-data body, parsed in memory (never spooled to disk).

    A linear scan with bytes.find (C speed, no per-part objects): at most MAX_PARTS parts, each
    part's headers at most 8 KiB; anything else is a 400.
    """
    from email.message import Message

    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 200:
        raise RequestError(400, "malformed multipart body: no boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    start = body.find(delimiter)
    if start < 0:
        raise RequestError(400, "malformed multipart body")
    pos = start + len(delimiter)
    for _ in range(MAX_PARTS):
        if body.startswith(b"--", pos):
            break  # the closing delimiter
        if not body.startswith(b"\r\n", pos):
            raise RequestError(400, "malformed multipart body")
        head_end = body.find(b"\r\n\r\n", pos + 2, pos + 2 + 8192)
        if head_end < 0:
            raise RequestError(400, "malformed multipart body: part headers too long")
        part = Message()
        for line in body[pos + 2 : head_end].decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                part[name.strip()] = value.strip()
        end = body.find(b"\r\n" + delimiter, head_end + 4)
        if end < 0:
            raise RequestError(400, "malformed multipart body: unterminated part")
        if part.get_param("name", header="content-disposition") == "file":
            return body[head_end + 4 : end]
        pos = end + 2 + len(delimiter)
    else:
        raise RequestError(400, f"the multipart body has more than {MAX_PARTS} parts")
    raise RequestError(400, "the multipart body has no 'file' field")


def _check_upload(data: bytes, image_size: int) -> None:
    """An upload must be a format people drop (no EPS/PS or anything that runs a program) and
    decodable within the pixel and memory budgets; checked on its header, before decoding."""
    from loupe.indexer.pipeline.imageio import open_within_budget

    try:
        open_within_budget(data, image_size, max_pixels=UPLOAD_PIXELS).close()
    except BadImage as exc:
        raise RequestError(400, f"cannot use the upload as an image: {exc}") from None


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "error", getattr(exc, "headers", None))


async def _known_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, RequestError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if isinstance(exc, Busy):
            headers["Retry-After"] = str(exc.retry_after)
        return error(exc.status, exc.message, headers or None)
    if isinstance(exc, LoupeError):
        return error(400, str(exc))
    if not isinstance(exc, (ClientDisconnect, OSError)):  # a client that left is no bug of ours
        LOG.error("internal error answering %s %s", request.method, request.url.path, exc_info=exc)
    return error(500, INTERNAL_ERROR)  # a bug: JSON too, never its text (Starlette re-raises it; `_Errors` ends it)


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
    no_token: bool = False,
) -> "_Errors":
    """The ASGI app: page, JSON API, thumbnails, previews, and the CLI's /search and /health.

    `port` and `host` are what the server listens on (Host and Origin checks). Every API request
    needs the token, unless `no_token` (loopback binds only). Thumbnails are cached in `thumbs_dir`
    (default: `thumbs` beside the index files).
    """
    from loupe.retrieval.web.guard import check_bind

    check_bind(host, token, no_token)
    location = service.searcher.store.location
    thumbs = ThumbCache(thumbs_dir or location.vector_dir / f"{location.prefix}thumbs")
    web = WebApp(service, thumbs, upload_limit, token=token)
    gets = {
        "/health": web.health,
        "/api/photos/{id:int}": web.photo_info,
        "/api/photos/{id:int}/captions": web.photo_captions,
        "/api/thumb/{id:int}": web.thumb,
        "/api/photo/{id:int}": web.preview,
        "/api/video/{id:int}": web.video,  # HEAD too (Starlette)
        "/api/status": web.status,
        "/api/folders": web.folders,
        "/api/duplicates": web.duplicates,
        "/api/openapi.json": web.openapi,
    }
    posts = {
        "/search": web.cli_search,
        "/api/search": web.search,
        "/api/uploads": web.upload,
        "/api/duplicates/resolve": web.duplicates_resolve,
        "/api/duplicates/undo": web.duplicates_undo,
    }
    routes = [
        Route(path, handler, methods=[method])
        for method, handlers in (("GET", gets), ("POST", posts))
        for path, handler in handlers.items()
    ]
    routes.append(Mount("/", StaticFiles(directory=web_dir, html=True), name="page"))
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, RequestError: _known_error, LoupeError: _known_error,
                            Exception: _known_error},
    )
    app.state.web = web
    guard = Guard(
        app, token=token, port=port, hosts=own_hosts(host, port, allowed_hosts), no_token=no_token,
        json_limit=MAX_BODY, upload_limit=upload_limit,
    )
    outer = _Errors(guard)
    outer.state = app.state  # tests reach the handlers' counters
    outer.routes = app.routes
    return outer
