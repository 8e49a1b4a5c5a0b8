"""Searches for the web page: one ranking per query, paged; images by upload or by catalog id.

The page asks for a query page by page (offset/limit), so a ranking is computed once, kept in a
small LRU (with its query vector) and extended on demand: page 2 costs no encoding and no new
FAISS search unless it reaches past what was ranked. A new ranking costs what the CLI's search
costs for as many results (`loupe search -k 60` for a first page of 60): sentences go through
`Searcher.text_vectors` (the on-disk query cache shared with the CLI), and FAISS is asked for
exactly the results the page shows (at 100k vectors an IVF index re-scores 4x k candidates
from the catalog: asking for 256 first cost as much again as the whole search). Photos are
addressed by catalog row id only: the web never names a file on the server. A snapshot of the visible catalog rows (ids,
paths, sizes, dates, hashes) is read once per catalog generation, so filters, date browsing and
result fields need no SQL per request.

Everything here runs on the thread that loaded the model (see `loupe.retrieval.web.server.SearchService`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, Sequence

import numpy as np

from loupe.indexer.storage.catalog import IMAGE, OK, TEXT
from loupe.indexer.errors import LoupeError
from loupe.retrieval.engine.query import Term, parse_query
from loupe.retrieval.engine.search import DATE_FIELDS, parse_date

SORTS = ("relevance", "newest", "oldest")
TARGETS = {"images": IMAGE, "captions": TEXT}
MAX_LIMIT = 200
MAX_INLINE = 24  # thumbnails a search may carry inline (`WebQuery.inline`)
DEFAULT_LIMIT = 60
DATE_POOL = 1000  # a query sorted by date orders its best DATE_POOL results (all above min_score, when given)
RANKINGS_KEPT = 32
UPLOADS_KEPT = 64
MAX_QUERY = 4096
UNBOUNDED_START = 256  # FAISS k of a first search for "everything above min_score"
FIRST_DEPTH = 0  # FAISS k of a new ranking, at least; else what the page asks for (a deeper page extends it, 4x at a time)


class WebError(Exception):
    """A request the API refuses: answered `status` with {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Photo(NamedTuple):
    """A visible (status ok) catalog image row, as the web shows it (a tuple: 100k load fast)."""

    id: int
    vector_id: int
    path: str
    size: int
    width: int | None
    height: int | None
    taken_at: datetime | None
    mtime_ns: int
    content_hash: str

    @property
    def modified(self) -> datetime:
        return datetime.fromtimestamp(self.mtime_ns / 1e9)

    def date(self, date_field: str = "auto") -> tuple[datetime | None, str]:
        """The date filters and sorting use, and where it came from ('taken' or 'modified')."""
        if date_field == "taken" or (date_field == "auto" and self.taken_at is not None):
            return self.taken_at, "taken"
        return self.modified, "modified"

    def fields(self, score: float | None = None, duplicates: int = 0, date_field: str = "auto") -> dict[str, Any]:
        """The JSON of an image result (also the base of GET /api/photos/{id})."""
        when, source = self.date("auto" if date_field == "taken" else date_field)
        return {
            "id": self.id,
            "name": os.path.basename(self.path),
            "path": self.path,
            "folder": os.path.dirname(self.path),
            "score": None if score is None else round(float(score), 6),
            "width": self.width,
            "height": self.height,
            "size": self.size,
            "date": when.isoformat(timespec="seconds") if when else None,
            "date_source": source,
            "duplicates": duplicates,
            "thumb": f"/api/thumb/{self.id}?h={(self.content_hash or '')[:16]}",
            "preview": f"/api/photo/{self.id}",
        }


class Snapshot:
    """The visible photos of one catalog generation, indexed by row id, vector id and folder."""

    def __init__(self, photos: list[Photo], generation: int) -> None:
        self.generation = generation
        self.photos = photos  # path order
        self.by_id = {p.id: p for p in photos}
        self.by_vector: dict[int, list[Photo]] = {}
        for p in photos:
            self.by_vector.setdefault(p.vector_id, []).append(p)
        self.folder_counts: dict[str, int] = {}
        counts = self.folder_counts
        for p in photos:
            folder = p.path.rpartition("/")[0] or "/"
            counts[folder] = counts.get(folder, 0) + 1
        self.known_folders: set[str] = set()
        for folder in self.folder_counts:
            while folder not in self.known_folders and folder not in ("", "/"):
                self.known_folders.add(folder)
                folder = os.path.dirname(folder)
        n = len(photos)  # columns for filtering and date order without a Python loop per photo
        self.vector_ids = np.fromiter((p.vector_id for p in photos), np.int64, n)
        self.modified_ts = np.fromiter((p.mtime_ns for p in photos), np.float64, n) / 1e9
        self.taken_ts = np.fromiter((p.taken_at.timestamp() if p.taken_at else np.nan for p in photos), np.float64, n)

    def dates(self, date_field: str) -> np.ndarray:
        """Seconds (local time, as naive datetimes compare) per photo; NaN where unknown."""
        if date_field == "taken":
            return self.taken_ts
        if date_field == "modified":
            return self.modified_ts
        return np.where(np.isnan(self.taken_ts), self.modified_ts, self.taken_ts)

    def mask(self, filters: "WebFilters") -> np.ndarray:
        """Which photos pass `filters`."""
        keep = np.ones(len(self.photos), dtype=bool)
        if filters.folder:
            prefix = filters.folder.rstrip("/") + "/"
            keep &= np.fromiter((p.path.startswith(prefix) for p in self.photos), bool, len(self.photos))
        if filters.after or filters.before:
            ts = self.dates(filters.date_field)
            with np.errstate(invalid="ignore"):
                if filters.after:
                    keep &= ts >= filters.after.timestamp()
                if filters.before:
                    keep &= ts < filters.before.timestamp()
            keep &= ~np.isnan(ts)
        return keep

    @classmethod
    def load(cls, catalog, generation: int) -> "Snapshot":
        """Read the visible photos: plain SQL, no ORM objects (100k rows in a fraction of a second)."""
        from sqlalchemy import bindparam, text

        query = text(
            "SELECT id, vector_id, path, size, width, height, taken_at, mtime_ns, content_hash FROM images "
            "WHERE status = :ok AND vector_id IS NOT NULL ORDER BY path"
        ).bindparams(bindparam("ok", OK))
        photos = []
        with catalog.session() as s:
            rows = s.execute(query).fetchall()
        for row in rows:
            taken = row[6]
            if isinstance(taken, str):  # SQLite hands back the stored text
                taken = datetime.fromisoformat(taken)
            photos.append(Photo(row[0], row[1], row[2], row[3], row[4], row[5], taken, row[7], row[8]))
        return cls(photos, generation)


@dataclass(frozen=True)
class WebFilters:
    """Checked filters of a web search (images only)."""

    folder: str | None = None
    after: datetime | None = None
    before: datetime | None = None
    date_field: str = "auto"

    def active(self) -> bool:
        return bool(self.folder or self.after or self.before)

    def passes(self, photo: Photo) -> bool:
        if self.folder and not photo.path.startswith(self.folder + "/"):
            return False
        if self.after or self.before:
            when, _ = photo.date(self.date_field)
            if when is None or (self.after and when < self.after) or (self.before and when >= self.before):
                return False
        return True


@dataclass(frozen=True)
class WebQuery:
    """A checked POST /api/search body."""

    q: str = ""
    target: str = IMAGE
    offset: int = 0
    limit: int = DEFAULT_LIMIT
    min_score: float | None = None
    filters: WebFilters = field(default_factory=WebFilters)
    sort: str = "relevance"
    collapse: bool = True
    inline: int = 0  # the first `inline` image results carry their cached thumbnail (`thumb_data`)

    def ranking_key(self) -> tuple:
        return (self.q, self.target, self.min_score, self.filters, self.sort, self.collapse)


SEARCH_FIELDS = frozenset({"q", "target", "offset", "limit", "min_score", "folder", "after", "before", "date_field", "sort", "collapse",
                           "inline"})


def _bad(message: str) -> WebError:
    return WebError(400, f"bad request: {message}")


def _optional_str(body: dict, key: str, limit: int = 64) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > limit or "\x00" in value:
        raise _bad(f"{key} must be a string of at most {limit} characters or null")
    return value


def parse_web_search(body: Any) -> WebQuery:
    """Check every field of a POST /api/search body; the first problem raises a 400 WebError."""
    import math

    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    unknown = sorted(set(body) - SEARCH_FIELDS)
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r}")
    q = body.get("q", "")
    if q is None:
        q = ""
    if not isinstance(q, str) or len(q) > MAX_QUERY or "\x00" in q:
        raise _bad(f"q must be a string of at most {MAX_QUERY} characters")
    target = body.get("target", "images")
    if target not in TARGETS:
        raise _bad("target must be 'images' or 'captions'")
    offset = body.get("offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= 10**7:
        raise _bad("offset must be an integer >= 0")
    limit = body.get("limit", DEFAULT_LIMIT)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise _bad(f"limit must be an integer from 1 to {MAX_LIMIT}")
    min_score = body.get("min_score")
    if min_score is not None:
        if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not math.isfinite(min_score):
            raise _bad("min_score must be a finite number or null")
        min_score = float(min_score)
    date_field = body.get("date_field", "auto") or "auto"
    if date_field not in DATE_FIELDS:
        raise _bad(f"date_field must be one of {', '.join(DATE_FIELDS)}")
    sort = body.get("sort", "relevance") or "relevance"
    if sort not in SORTS:
        raise _bad(f"sort must be one of {', '.join(SORTS)}")
    collapse = body.get("collapse", True)
    if not isinstance(collapse, bool):
        raise _bad("collapse must be true or false")
    inline = body.get("inline", 0)
    if isinstance(inline, bool) or not isinstance(inline, int) or not 0 <= inline <= MAX_INLINE:
        raise _bad(f"inline must be an integer from 0 to {MAX_INLINE}")
    folder = _optional_str(body, "folder", 4096)
    try:
        after = _optional_str(body, "after")
        before = _optional_str(body, "before")
        filters = WebFilters(
            folder=folder.rstrip("/") or "/" if folder else None,
            after=parse_date(after) if after else None,
            before=parse_date(before, end=True) if before else None,
            date_field=date_field,
        )
    except LoupeError as exc:
        raise _bad(str(exc)) from None
    return WebQuery(q.strip(), TARGETS[target], offset, limit, min_score, filters, sort, collapse, inline)


@dataclass
class Upload:
    """An uploaded query image, kept in memory only (its vector, never its bytes)."""

    id: str
    vector: np.ndarray
    width: int
    height: int


@dataclass
class _Ranking:
    """Results of one query so far: (score, photos) entries; extended on demand."""

    entries: list[tuple[float | None, list]]
    exhausted: bool
    vector: np.ndarray | None = None
    allowed: np.ndarray | None = None
    depth: int = 0  # FAISS k used so far


class WebSearch:
    """The web API's searches over one `Searcher` (model, indices, catalog)."""

    def __init__(self, searcher) -> None:
        self.searcher = searcher
        self._snapshot: Snapshot | None = None
        self._rankings: OrderedDict[tuple, _Ranking] = OrderedDict()
        self.uploads: OrderedDict[str, Upload] = OrderedDict()
        self.encodings = 0  # text encodings run (tests check that page 2 runs none)

    # ---- catalog ------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The visible photos, re-read when the catalog generation changed (the caller refreshed)."""
        generation = self.searcher.meta.generation
        if self._snapshot is None or self._snapshot.generation != generation:
            self._snapshot = Snapshot.load(self.searcher.store.catalog, generation)
            self._rankings.clear()
        return self._snapshot

    def photo(self, photo_id: int) -> Photo:
        photo = self.snapshot().by_id.get(photo_id)
        if photo is None:
            raise WebError(404, f"no photo {photo_id} in the catalog")
        return photo

    def folders(self) -> list[dict[str, Any]]:
        """Folders that hold visible photos (directly), with their counts, in path order."""
        snap = self.snapshot()
        return [{"path": f, "count": n} for f, n in sorted(snap.folder_counts.items())]

    # ---- query vectors ----------------------------------------------------------------------
    def text_vectors(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Sentence vectors through the CLI's path (`Searcher.text_vectors`: the on-disk query cache)."""
        if not texts:
            return []
        encoded = self.searcher.stats["encoded"]
        vectors = self.searcher.text_vectors(list(texts))
        self.encodings += self.searcher.stats["encoded"] - encoded
        return vectors

    def stored_vector(self, photo: Photo) -> np.ndarray:
        """The indexed vector of a photo (no re-embedding)."""
        vectors = self.searcher.store.catalog.load_vectors([photo.vector_id], self.searcher.meta.dim)
        return np.asarray(vectors[0], dtype=np.float32)

    def image_ref_vector(self, ref: str) -> np.ndarray:
        kind, _, ident = ref.partition(":")
        if kind == "photo":
            return self.stored_vector(self.photo(int(ident)))
        upload = self.uploads.get(ident)
        if upload is None:
            raise WebError(404, f"no upload {ident} (uploads are kept in memory for a while only: upload it again)")
        self.uploads.move_to_end(ident)
        return upload.vector

    def query_vector(self, terms: Sequence[Term]) -> np.ndarray:
        """Weighted sum of the normalised term vectors, normalised again (as `Searcher.query_vector`)."""
        total = np.zeros(self.searcher.meta.dim, dtype=np.float32)
        texts = [t for t in terms if t.kind == "text"]
        for term, vec in zip(texts, self.text_vectors([t.value for t in texts])):
            total += term.weight * vec
        for term in terms:
            if term.kind != "text":
                total += term.weight * self.image_ref_vector(term.value)
        norm = float(np.linalg.norm(total))
        if norm < 1e-8:
            raise WebError(400, "the query terms cancel out: nothing left to search for")
        return total / norm

    # ---- uploads ----------------------------------------------------------------------------
    def add_upload(self, data: bytes) -> Upload:
        """Decode (the indexer's bomb-safe decoder) and embed an uploaded image; kept in memory only."""
        import torch

        from loupe.indexer.pipeline.imageio import BadImage, decode_image
        from loupe.indexer.pipeline.stages import content_hash

        ident = content_hash(data)
        known = self.uploads.get(ident)
        if known is not None:
            self.uploads.move_to_end(ident)
            return known
        enc = self.searcher.encoder
        try:
            tensor, info = decode_image(data, enc.image_size, enc.preprocess)
        except BadImage as exc:
            raise WebError(400, f"cannot use the upload as an image: {exc}") from None
        stored = self.searcher.store.catalog.vector_for_hash(IMAGE, ident, self.searcher.meta.dim)
        vector = stored if stored is not None else enc.encode_images(torch.stack([tensor]))[0]
        upload = Upload(ident, np.asarray(vector, dtype=np.float32), info.width, info.height)
        self.uploads[ident] = upload
        while len(self.uploads) > UPLOADS_KEPT:
            self.uploads.popitem(last=False)
        return upload

    # ---- search -----------------------------------------------------------------------------
    def search(self, query: WebQuery) -> dict[str, Any]:
        """One page of results: {"results", "offset", "limit", "has_more"}."""
        snap = self.snapshot()
        if query.target == IMAGE and query.filters.folder and query.filters.folder not in snap.known_folders:
            raise WebError(400, f"not an indexed folder: {query.filters.folder}")
        key = query.ranking_key()
        ranking = self._rankings.get(key)
        if ranking is None:
            ranking = self._new_ranking(query, snap)
            self._rankings[key] = ranking
            while len(self._rankings) > RANKINGS_KEPT:
                self._rankings.popitem(last=False)
        else:
            self._rankings.move_to_end(key)
        need = query.offset + query.limit
        if len(ranking.entries) < need and not ranking.exhausted:
            self._deepen(ranking, query, snap, need)
        page = ranking.entries[query.offset : query.offset + query.limit]
        if query.target == IMAGE:
            df = query.filters.date_field
            results = [photos[0].fields(score, len(photos) - 1, df) for score, photos in page]
        else:
            results = [
                {"id": rows[0].id, "text": rows[0].text, "score": round(float(score), 6), "source": rows[0].source, "image": rows[0].image}
                for score, rows in page
            ]
        return {
            "results": results, "offset": query.offset, "limit": query.limit,
            "has_more": len(ranking.entries) > need or not ranking.exhausted,
        }

    def _new_ranking(self, query: WebQuery, snap: Snapshot) -> _Ranking:
        if not query.q:
            if query.target != IMAGE:
                raise WebError(400, "empty query: type a sentence, or use upload:ID / photo:ID")
            return self._browse(query, snap)
        try:
            terms = parse_query([query.q], web=True)
        except LoupeError as exc:
            raise WebError(400, str(exc)) from None
        index = self.searcher.store.vector_index(query.target)
        if index.ntotal == 0:
            what = "images" if query.target == IMAGE else "captions (run `loupe index-text FILE`)"
            raise WebError(400, f"the index holds no {what}")
        allowed = None
        if query.target == IMAGE and query.filters.active():
            allowed = np.unique(snap.vector_ids[snap.mask(query.filters)])
        ranking = _Ranking([], allowed is not None and len(allowed) == 0, self.query_vector(terms), allowed)
        if query.sort != "relevance":  # the best DATE_POOL (or all above min_score), ordered by date
            self._deepen(ranking, query, snap, DATE_POOL if query.min_score is None else None)
            ranking.entries = self._by_date(ranking.entries, query)
            ranking.exhausted = True
        return ranking

    def _deepen(self, ranking: _Ranking, query: WebQuery, snap: Snapshot, need: int | None) -> None:
        """Rank until `need` entries exist (None: all above min_score) or nothing is left."""
        if ranking.exhausted:
            return
        index = self.searcher.store.vector_index(query.target)
        total = index.ntotal if ranking.allowed is None else len(ranking.allowed)
        if total == 0:
            ranking.exhausted = True
            return
        # first exactly what is needed (the CLI's k); then 4x deeper, with room for collapsed duplicates
        if ranking.depth == 0:
            k = max(FIRST_DEPTH, need if need is not None else UNBOUNDED_START)
        else:
            k = max(ranking.depth * 4, (need or 0) * 2)
        while True:
            k = min(k, total)
            scores, ids = index.search(ranking.vector[None, :], k, ranking.allowed)
            ranking.depth = k
            entries, below = self._entries(scores[0], ids[0], query, snap)
            ranking.entries = entries
            found = int((ids[0] >= 0).sum())
            ranking.exhausted = below or found < k or k >= total
            if ranking.exhausted or (need is not None and len(entries) >= need):
                return
            k *= 4

    def _entries(self, scores: np.ndarray, ids: np.ndarray, query: WebQuery, snap: Snapshot) -> tuple[list, bool]:
        """Result entries for ranked vector ids; True when min_score cut the list."""
        pairs = []
        below = False
        for s, i in zip(scores, ids):
            if i < 0:
                break
            if query.min_score is not None and s < query.min_score:
                below = True
                break
            pairs.append((float(s), int(i)))
        entries: list[tuple[float | None, list]] = []
        if query.target == TEXT:
            rows = self.searcher.store.catalog.caption_rows_for_vectors([i for _, i in pairs])
            return [(s, rows[i]) for s, i in pairs if i in rows], below
        filters = query.filters if query.filters.active() else None
        for s, i in pairs:
            photos = snap.by_vector.get(i, [])
            if filters is not None:
                photos = [p for p in photos if filters.passes(p)]
            if not photos:
                continue
            if query.collapse:
                entries.append((s, photos))
            else:
                entries.extend((s, [p]) for p in photos)
        return entries, below

    def _by_date(self, entries: list, query: WebQuery) -> list:
        newest = query.sort == "newest"
        df = query.filters.date_field

        def when(entry) -> float:
            d, _ = entry[1][0].date(df)
            return d.timestamp() if d else (-np.inf if newest else np.inf)

        return sorted(entries, key=when, reverse=newest)

    def _browse(self, query: WebQuery, snap: Snapshot) -> _Ranking:
        """The whole collection (filtered) by date, newest first unless sort=oldest: no model call."""
        rows = np.nonzero(snap.mask(query.filters))[0] if query.filters.active() else np.arange(len(snap.photos))
        if query.collapse:  # one entry per content: its first file (path order) among those shown
            _, first = np.unique(snap.vector_ids[rows], return_index=True)
            rows = rows[np.sort(first)]
        ts = snap.dates(query.filters.date_field)[rows]
        newest = query.sort != "oldest"
        key = np.where(np.isnan(ts), -np.inf if newest else np.inf, ts)  # unknown dates last
        order = np.argsort(-key if newest else key, kind="stable")
        photos = snap.photos
        if query.collapse:
            filters = query.filters if query.filters.active() else None
            entries = []
            for i in rows[order]:
                group = snap.by_vector[photos[i].vector_id]
                if filters is not None and len(group) > 1:
                    group = [p for p in group if filters.passes(p)]
                entries.append((None, group if group[0] is photos[i] else [photos[i], *(p for p in group if p is not photos[i])]))
        else:
            entries = [(None, [photos[i]]) for i in rows[order]]
        return _Ranking(entries, True)

    # ---- one photo --------------------------------------------------------------------------
    def captions_for(self, photo_id: int, limit: int) -> dict[str, Any]:
        """Image -> text: the captions nearest to a photo's stored vector."""
        photo = self.photo(photo_id)
        index = self.searcher.store.vector_index(TEXT)
        if index.ntotal == 0:
            raise WebError(404, "no caption corpus is indexed (run `loupe index-text FILE`)")
        scores, ids = index.search(self.stored_vector(photo)[None, :], min(limit, index.ntotal), None)
        pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        rows = self.searcher.store.catalog.caption_rows_for_vectors([i for _, i in pairs])
        results = [
            {"id": rows[i][0].id, "text": rows[i][0].text, "score": round(s, 6), "source": rows[i][0].source, "image": rows[i][0].image}
            for s, i in pairs if i in rows
        ]
        return {"photo": photo_id, "results": results}
