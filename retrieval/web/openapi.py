"""The web API of `loupe serve`, described by hand as OpenAPI 3 (Starlette generates none).

tests/test_webapp.py checks that every mounted route is documented here and every documented
route is mounted, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    why = {400: "bad request", 401: "missing or wrong token", 403: "foreign Host, Origin or Referer", 404: "not found",
           408: "the request did not arrive in time", 411: "no Content-Length", 413: "body too large",
           409: "refused: files changed since grouping, or another loupe process is writing the index",
           415: "wrong Content-Type", 416: "range not satisfiable", 500: "internal error",
           503: "busy: try again after Retry-After seconds"}
    return {str(c): _json(ERROR, why[c]) for c in codes}


def _id_param(description: str) -> dict:
    return {"name": "id", "in": "path", "required": True, "description": description,
            "schema": {"type": "integer", "minimum": 0}}


def _nullable(kind: str, **extra) -> dict:
    return {"type": [kind, "null"], **extra}


IMAGE_RESULT = {
    "type": "object",
    "required": ["id", "name", "path", "folder", "score", "width", "height", "size", "date", "date_source", "duplicates", "thumb", "preview"],
    "properties": {
        "id": {"type": "integer", "description": "catalog image row id"},
        "name": {"type": "string"},
        "path": {"type": "string"},
        "folder": {"type": "string"},
        "score": _nullable("number", description="cosine similarity; null when browsing by date"),
        "width": _nullable("integer"),
        "height": _nullable("integer"),
        "size": {"type": "integer", "description": "bytes"},
        "date": _nullable("string", format="date-time"),
        "date_source": {"enum": ["taken", "modified"]},
        "duplicates": {"type": "integer", "description": "other identical files collapsed into this result"},
        "text_match": {"type": "object", "description": "present when the photo's text (OCR) matched the query",
                       "properties": {"match": {"enum": ["exact", "typo"]}, "edits": {"type": "integer"},
                                      "lines": {"type": "array", "items": {"$ref": "#/components/schemas/TextLine"}}}},
        "thumb": {"type": "string", "description": "/api/thumb/ID?h=<content-hash prefix>"},
        "thumb_data": {"type": "string", "description": (
            "the cached thumbnail as a data: URL, on the first `inline` results of a search that asked (absent when not cached)")},
        "preview": {"type": "string", "description": "/api/photo/ID; a video's: /api/video/ID#t=SECONDS (plays from the moment)"},
        "kind": {"enum": ["image", "video"]},
        "time": {"type": "number", "description": "a video moment: the time of its frame (the tile), seconds"},
        "start": {"type": "number", "description": "a video moment: the scene's start, seconds"},
        "end": _nullable("number", description="a video moment: the scene's end, seconds"),
        "video": {"type": "string", "description": "a video: /api/video/ID (its bytes, HTTP Range)"},
        "ref": {"type": "string", "description": "a video: the image term of this moment for \"more like this\" (moment:ID)"},
        "moments": {"type": "array", "description": "a video: its other moments that ranked, collapsed into this best one",
                    "items": {"type": "object", "properties": {
                        "time": {"type": "number"}, "start": {"type": "number"}, "end": {"type": "number"}, "score": {"type": "number"}}}},
    },
}

DUPLICATE_GROUP = {
    "type": "object",
    "required": ["id", "tier", "paths", "keep", "reason", "files"],
    "properties": {
        "id": {"type": "string"}, "tier": {"enum": ["same", "similar"]}, "paths": {"type": "array", "items": {"type": "string"}},
        "keep": {"type": "string", "description": "the suggested keeper's path"}, "reason": {"type": "string"},
        "files": {"type": "array", "items": {"type": "object", "description": (
            "id, path, hash, size, width, height, taken_at, format, sharpness, modified, cropped, upscaled, camera_metadata, thumb")}},
    },
}

CAPTION_RESULT = {
    "type": "object",
    "required": ["id", "text", "score", "source"],
    "properties": {
        "id": {"type": "integer", "description": "caption row id"},
        "text": {"type": "string"},
        "score": {"type": "number"},
        "source": {"type": "string", "description": "the caption file"},
        "image": _nullable("string", description="the image the caption belongs to, when the corpus names one"),
    },
}

SEARCH_REQUEST = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "q": {"type": "string", "maxLength": 4096, "description": (
            "The CLI query grammar (`loupe search --help`): words, \"quoted text\", W: weights, + and -. "
            "Image terms are `upload:ID` (POST /api/uploads) and `photo:ID` (an indexed photo's stored vector); "
            "a file path (./x.jpg, /x.jpg, img:PATH) is refused. Empty: browse the whole collection by date.")},
        "target": {"enum": ["images", "captions"], "default": "images"},
        "offset": {"type": "integer", "minimum": 0, "default": 0},
        "limit": {"type": "integer", "minimum": 1, "maximum": 200, "default": 60},
        "min_score": _nullable("number"),
        "folder": _nullable("string", description="an indexed folder (GET /api/folders): photos under it"),
        "after": _nullable("string", description="YYYY, YYYY-MM or YYYY-MM-DD (inclusive)"),
        "before": _nullable("string", description="YYYY, YYYY-MM or YYYY-MM-DD (inclusive: the whole day/month/year)"),
        "date_field": {"enum": ["auto", "taken", "modified"], "default": "auto"},
        "sort": {"enum": ["relevance", "newest", "oldest"], "default": "relevance",
                 "description": "a query sorted by date orders its best 1000 results (all above min_score, when given)"},
        "collapse": {"type": "boolean", "default": True, "description": "identical files as one result"},
        "inline": {"type": "integer", "minimum": 0, "maximum": 24, "default": 0, "description": (
            "the first N image results carry their cached thumbnail inline (thumb_data): the page's first row "
            "paints without further requests")},
    },
}

CLI_SEARCH_REQUEST = {
    "type": "object",
    "required": ["terms"],
    "properties": {
        "terms": {"type": "array", "minItems": 1, "maxItems": 64, "items": {
            "type": "object", "required": ["weight", "kind", "value"],
            "properties": {"weight": {"type": "number"}, "kind": {"enum": ["text", "image"]},
                           "value": {"type": "string", "description": "text, or an absolute image path"}}}},
        "target": {"enum": ["image", "text"]}, "k": {"type": "integer", "minimum": 1, "maximum": 1000},
        "min_score": _nullable("number"), "folder": _nullable("string"), "globs": {"type": "array", "items": {"type": "string"}},
        "after": _nullable("string"), "before": _nullable("string"), "date_field": {"enum": ["auto", "taken", "modified"]},
    },
}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of every route `loupe.retrieval.web.app.create_app` mounts."""
    image = {"description": "image bytes", "content": {"image/webp": {}, "image/jpeg": {}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "loupe serve",
            "version": "1",
            "description": (
                "JSON API of the loupe web page. Errors are {\"error\": message} with a 4xx/5xx status "
                "(503 with Retry-After when the workers are busy). Every /api request, and the CLI's /search and "
                "/health, needs the token as Authorization: Bearer, on loopback too (unless the server runs with "
                "--no-token); never a cookie. /api/thumb/{id}, /api/photo/{id} and /api/video/{id} also accept the signed URLs "
                "(exp, sig) that search results and /api/photos/{id} hand out. Requests with a foreign Host, Origin or cross-site Sec-Fetch-Site, "
                "and state-changing requests with a foreign Referer, are refused (403)."),
        },
        "components": {
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "ImageResult": IMAGE_RESULT,
                "CaptionResult": CAPTION_RESULT,
                "TextLine": {"type": "object", "properties": {
                    "text": {"type": "string"}, "conf": {"type": "number"},
                    "box": {"type": "array", "description": "4 corners [x, y] as fractions of the photo's width and height",
                            "items": {"type": "array", "items": {"type": "number"}}}}},
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
        "paths": {
            "/": {"get": {
                "summary": "The page (index.html; no data, no token needed); ?token=... redirects to /#token=... (the page reads it there)",
                "parameters": [{"name": "token", "in": "query", "required": False, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the page", "content": {"text/html": {}}},
                              "303": {"description": "token accepted: redirect to /#token=..."}, **_errors(401, 403)}}},
            "/{file}": {"get": {
                "summary": "The page's static files (retrieval/web/)",
                "parameters": [{"name": "file", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the file"}, **_errors(401, 403, 404)}}},
            "/health": {"get": {
                "summary": "Server health (the CLI's; token required)",
                "responses": {"200": _json({"type": "object"}), **_errors(401, 403)}}},
            "/search": {"post": {
                "summary": "The CLI's search (token required; schema of retrieval/engine/requests.py parse_search)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": CLI_SEARCH_REQUEST}}},
                "responses": {"200": _json({"type": "object", "properties": {"hits": {"type": "array"}}}),
                              **_errors(400, 401, 403, 411, 413, 415)}}},
            "/api/search": {"post": {
                "summary": "Search (or browse) photos or captions, one page at a time",
                "requestBody": {"required": True, "content": {"application/json": {"schema": SEARCH_REQUEST}}},
                "responses": {"200": _json({"type": "object", "required": ["results", "offset", "limit", "has_more", "took_ms"],
                                            "properties": {
                                                "results": {"type": "array", "items": {"oneOf": [
                                                    {"$ref": "#/components/schemas/ImageResult"},
                                                    {"$ref": "#/components/schemas/CaptionResult"}]}},
                                                "offset": {"type": "integer"}, "limit": {"type": "integer"},
                                                "has_more": {"type": "boolean"}, "took_ms": {"type": "number"}}}),
                              **_errors(400, 401, 403, 404, 411, 413, 415)}}},
            "/api/uploads": {"post": {
                "summary": "Upload a query image (kept in memory only); use it as upload:ID in q",
                "requestBody": {"required": True, "content": {
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}}}},
                "responses": {"200": _json({"type": "object", "required": ["id", "width", "height"], "properties": {
                    "id": {"type": "string"}, "width": {"type": "integer"}, "height": {"type": "integer"},
                    "query": {"type": "string", "description": "upload:ID"}}}),
                    **_errors(400, 401, 403, 411, 413, 415)}}},
            "/api/photos/{id}": {"get": {
                "summary": "One photo: the result fields plus content_hash, exif (camera, taken_at), duplicate_paths, available, text (lines read in it)",
                "parameters": [_id_param("catalog image row id")],
                "responses": {"200": _json({"allOf": [{"$ref": "#/components/schemas/ImageResult"}, {"type": "object", "properties": {
                    "content_hash": {"type": "string"}, "taken_at": _nullable("string"), "modified": {"type": "string"},
                    "duplicate_paths": {"type": "array", "items": {"type": "string"}}, "available": {"type": "boolean"},
                    "text": {"type": "array", "items": {"$ref": "#/components/schemas/TextLine"}},
                    "exif": {"type": "object", "properties": {"camera": _nullable("string"), "taken_at": _nullable("string")}}}}]}),
                    **_errors(401, 403, 404)}}},
            "/api/photos/{id}/captions": {"get": {
                "summary": "Image -> text: the captions nearest to this photo (its stored vector)",
                "parameters": [_id_param("catalog image row id"),
                               {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 10}}],
                "responses": {"200": _json({"type": "object", "properties": {
                    "photo": {"type": "integer"}, "results": {"type": "array", "items": {"$ref": "#/components/schemas/CaptionResult"}}}}),
                    **_errors(400, 401, 403, 404)}}},
            "/api/thumb/{id}": {"get": {
                "summary": "~256 px thumbnail (WebP), cached by content hash; immutable when h matches; ETag, 304",
                "parameters": [_id_param("catalog image row id"),
                               {"name": "h", "in": "query", "schema": {"type": "string"}, "description": "content-hash prefix"},
                               {"name": "t", "in": "query", "schema": {"type": "number", "minimum": 0},
                                "description": "a video: the frame at this time, seconds (a moment's tile)"}],
                "responses": {"200": image, "304": {"description": "not modified"}, **_errors(401, 403, 404)}}},
            "/api/photo/{id}": {"get": {
                "summary": "Large preview: EXIF-rotated JPEG, long side <= 2048; full=1: the original bytes when no rotation is needed",
                "parameters": [_id_param("catalog image row id"),
                               {"name": "full", "in": "query", "schema": {"enum": ["0", "1"]}}],
                "responses": {"200": {"description": "image bytes", "content": {"image/jpeg": {}, "image/png": {}, "image/gif": {}, "image/webp": {}}},
                              "304": {"description": "not modified"}, **_errors(401, 403, 404)}}},
            "/api/video/{id}": {"get": {
                "summary": ("A catalogued video's bytes (only videos in the catalog, under an indexed folder, unchanged since "
                            "indexed); one HTTP Range per request, at most 4 MiB answered (206 + Content-Range); 416 for a bad range"),
                "parameters": [_id_param("catalog video row id"),
                               {"name": "Range", "in": "header", "schema": {"type": "string"}, "description": "bytes=FIRST-[LAST] or bytes=-N"}],
                "responses": {"200": {"description": "the start of the video"}, "206": {"description": "the range asked for",
                              "content": {"video/mp4": {}, "video/webm": {}, "video/quicktime": {}, "video/x-matroska": {}}},
                              **_errors(401, 403, 404, 416)}}},
            "/api/status": {"get": {
                "summary": "Index status: counts, model, index factory, last update, folders, skipped files with reasons",
                "parameters": [{"name": "skipped_limit", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 10000, "default": 100}}],
                "responses": {"200": _json({"type": "object", "properties": {
                    "images": {"type": "object"}, "captions": {"type": "object"}, "vectors": {"type": "object"},
                    "model": {"type": "object"}, "index_factory": {"type": "string"}, "created": {"type": "string"},
                    "updated": {"type": "string"}, "roots": {"type": "array"}, "skip_reasons": {"type": "array"},
                    "skipped": {"type": "array"}, "server": {"type": "object"}}}), **_errors(400, 401, 403)}}},
            "/api/folders": {"get": {
                "summary": "Indexed folders (roots, offline marked) and every folder holding photos, with counts",
                "responses": {"200": _json({"type": "object", "properties": {
                    "roots": {"type": "array"}, "folders": {"type": "array", "items": {"type": "object", "properties": {
                        "path": {"type": "string"}, "count": {"type": "integer"}}}}}}), **_errors(401, 403)}}},
            "/api/duplicates": {"get": {
                "summary": "Near-duplicate groups (tier same: one picture in several files; similar: bursts), each with the suggested keeper and why",
                "parameters": [
                    {"name": "tier", "in": "query", "schema": {"enum": ["same", "similar"]}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 2000, "default": 200}}],
                "responses": {"200": _json({"type": "object", "properties": {
                    "groups": {"type": "array", "items": DUPLICATE_GROUP}, "total": {"type": "integer"},
                    "photos": {"type": "integer"}, "lacking_signal": {"type": "integer"}}}), **_errors(400, 401, 403, 503)}}},
            "/api/duplicates/resolve": {"post": {
                "summary": "Move every photo of one group but the keeper aside (journalled; never deleted); refused (409) for files changed since grouping",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["group"], "properties": {
                        "group": {"type": "string", "maxLength": 64}, "keep": {"type": "integer", "description": "photo id (default: the suggestion)"}}}}}},
                "responses": {"200": _json({"type": "object", "properties": {
                    "moved": {"type": "array", "items": {"type": "object"}}, "refused": {"type": "array", "items": {"type": "string"}}}}),
                    **_errors(400, 401, 403, 404, 409, 413, 415, 503)}}},
            "/api/duplicates/undo": {"post": {
                "summary": "Put back every photo a resolve moved, byte-identical",
                "responses": {"200": _json({"type": "object", "properties": {
                    "restored": {"type": "array", "items": {"type": "string"}}, "problems": {"type": "array", "items": {"type": "string"}}}}),
                    **_errors(401, 403, 409, 503)}}},
            "/api/openapi.json": {"get": {
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}), **_errors(401, 403)}}},
        },
    }
