"""The catalog's read contract: every read statement once, in SQL with named parameters, and the rows it hands out.

Two classes read a catalog: `loupe.indexer.storage.catalog.Catalog` (SQLAlchemy, any database, also
writes) and `loupe.indexer.storage.catalog_reader.CatalogReader` (stdlib `sqlite3`, the cold search).
Both inherit `CatalogReads`, which implements the read methods over the one thing each provides:
running a statement with named parameters (`:name`, understood by `sqlite3` and by SQLAlchemy's
`text()` alike) and handing back its rows as tuples. So a read is written once, and both return
the same row shapes (`MetaView`, `ImageView`, `CaptionView`) with the attribute names of the ORM
classes. This module imports neither SQLAlchemy nor anything heavier than numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Iterator, Sequence

import numpy as np

from loupe.indexer.storage.catalog_names import IMAGE, OK, TEXT, all_found, prefix_bounds

ID_CHUNK = 900  # ids bound per statement: under SQLite's limit of 999 parameters (before 3.32)
VECTOR_CHUNK = 5000  # vectors read per statement: a chunk of blobs, not of parameters alone
KEY_CHUNK = 5000  # path keys looked up per statement
EXPORT_PAGE = 2000  # rows a streamed read buffers at once on a server database

_META_COLUMNS = (
    "id, schema_version, model, pretrained, checkpoint_path, checkpoint_size, checkpoint_mtime_ns, "
    "weights_id, dim, created_at, updated_at, generation"
)
_IMAGE_COLUMNS = "id, path_key, path, size, mtime_ns, content_hash, width, height, taken_at, vector_id, status, reason, indexed_at"
_CAPTION_COLUMNS = "id, source, position, text, image, content_hash, vector_id"

# SQLite's planner statistics (sqlite_stat1, written by ANALYZE): the rows of each table it last counted
SQLITE_STATS = (
    "SELECT tbl, MAX(CAST(substr(stat, 1, instr(stat || ' ', ' ') - 1) AS INTEGER)) FROM sqlite_stat1 "
    "WHERE tbl IN ('images', 'moments') GROUP BY tbl"
)
SQLITE_HAS_STATS = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_stat1'"
COUNT_PLANNED_TABLES = "SELECT 'images', COUNT(*) FROM images UNION ALL SELECT 'moments', COUNT(*) FROM moments"
TABLES = {"meta", "vectors", "images", "captions", "roots", "settings", "moments", "signal_text"}  # every table of the current schema
SQLITE_TABLES = "SELECT name FROM sqlite_master WHERE type = 'table'"  # the tables a SQLite file holds
META = f"SELECT {_META_COLUMNS} FROM meta WHERE id = 1"
GENERATION = "SELECT generation FROM meta WHERE id = 1"
SETTING = "SELECT value FROM settings WHERE key = :key"
# the searchable image vectors: visible photos' vectors and visible videos' moment vectors (a
# video's own row holds its pooled vector, kept for near-duplicates and out of the search index)
_SEARCHABLE_IMAGE_VECTORS = (
    "SELECT vector_id FROM images WHERE status = :ok AND vector_id IS NOT NULL "
    "AND NOT EXISTS (SELECT 1 FROM moments WHERE moments.video_hash = images.content_hash) "
    "UNION SELECT moments.vector_id FROM moments WHERE EXISTS "
    "(SELECT 1 FROM images WHERE images.content_hash = moments.video_hash AND images.status = :ok)"
)
IMAGE_VECTOR_IDS = f"SELECT vector_id FROM ({_SEARCHABLE_IMAGE_VECTORS}) AS searchable ORDER BY vector_id"
KIND_VECTOR_IDS = "SELECT id FROM vectors WHERE kind = :kind ORDER BY id"
COUNT_IMAGE_VECTORS = f"SELECT count(*) FROM ({_SEARCHABLE_IMAGE_VECTORS}) AS searchable"
COUNT_KIND_VECTORS = "SELECT count(*) FROM vectors WHERE kind = :kind"
COUNT_ALL_VECTORS = "SELECT count(*) FROM vectors"
VECTORS_BY_ID = "SELECT id, data FROM vectors WHERE id IN ({ids})"
VECTOR_FOR_HASH = "SELECT data FROM vectors WHERE kind = :kind AND content_hash = :hash"
IMAGES_FOR_VECTORS = f"SELECT {_IMAGE_COLUMNS} FROM images WHERE vector_id IN ({{ids}}) AND status = :ok ORDER BY path"
IMAGES = f"SELECT {_IMAGE_COLUMNS} FROM images"
_MOMENT_IMAGE_COLUMNS = ", ".join(f"images.{c.strip()}" for c in _IMAGE_COLUMNS.split(","))
# the visible video files of moment vectors: (moment vector id, start, time, end, the file's columns)
MOMENTS_FOR_VECTORS = (
    f"SELECT moments.vector_id, moments.start_s, moments.time_s, moments.end_s, {_MOMENT_IMAGE_COLUMNS} FROM moments "
    "JOIN images ON images.content_hash = moments.video_hash AND images.status = :ok "
    "WHERE moments.vector_id IN ({ids}) ORDER BY images.path"
)
# every visible video's moments: (moment vector id, file row id, start, time, end)
VISIBLE_MOMENTS = (
    "SELECT moments.vector_id, images.id, moments.start_s, moments.time_s, moments.end_s FROM moments "
    "JOIN images ON images.content_hash = moments.video_hash AND images.status = :ok "
    "WHERE images.vector_id IS NOT NULL ORDER BY images.path, moments.idx"
)
VISIBLE_MOMENTS_HASH = (  # the same, with the video's content hash
    "SELECT moments.vector_id, images.id, moments.start_s, moments.time_s, moments.end_s, moments.video_hash FROM moments "
    "JOIN images ON images.content_hash = moments.video_hash AND images.status = :ok"
)
MOMENTS_OF_VIDEO = "SELECT idx, start_s, time_s, end_s, vector_id FROM moments WHERE video_hash = :hash ORDER BY idx"
# `loupe export`: moment vectors of visible videos, with their times
_EXPORT_MOMENTS_FROM = (
    "FROM moments JOIN vectors ON vectors.id = moments.vector_id "
    "JOIN images ON images.content_hash = moments.video_hash AND images.status = :ok"
)
EXPORT_MOMENTS = (
    "SELECT images.path, moments.video_hash, moments.idx, moments.start_s, moments.time_s, moments.end_s, "
    f"moments.vector_id, vectors.data {_EXPORT_MOMENTS_FROM} ORDER BY images.path_key, moments.idx"
)
COUNT_EXPORT_MOMENTS = f"SELECT count(*) {_EXPORT_MOMENTS_FROM}"
IMAGES_IN_FOLDER = "path_key >= :lo AND path_key < :hi"
IMAGES_WITH_STATUS = "status = :status"
IMAGES_AT_KEYS = f"SELECT {_IMAGE_COLUMNS} FROM images WHERE path_key IN ({{keys}})"
CAPTIONS_FOR_VECTORS = f"SELECT {_CAPTION_COLUMNS} FROM captions WHERE vector_id IN ({{ids}}) ORDER BY source, position"
# file rows with a vector (missing ones included) that point at no image vector
DANGLING_IMAGES = (
    "SELECT count(*) FROM images LEFT OUTER JOIN vectors ON images.vector_id = vectors.id "
    "WHERE (images.status = :ok OR images.vector_id IS NOT NULL) AND (vectors.id IS NULL OR vectors.kind != :image)"
)
DANGLING_CAPTIONS = (
    "SELECT count(*) FROM captions LEFT OUTER JOIN vectors ON captions.vector_id = vectors.id "
    "WHERE vectors.id IS NULL OR vectors.kind != :text"
)
# what `loupe export` writes: visible files in path order, captions by source and position, each with its vector
_EXPORT_IMAGES_FROM = "FROM images JOIN vectors ON vectors.id = images.vector_id WHERE images.status = :ok"
EXPORT_IMAGES = (
    "SELECT images.path, images.content_hash, images.vector_id, images.size, images.mtime_ns, images.width, "
    f"images.height, images.taken_at, vectors.data {_EXPORT_IMAGES_FROM} ORDER BY images.path_key"
)
COUNT_EXPORT_IMAGES = f"SELECT count(*) {_EXPORT_IMAGES_FROM}"
_EXPORT_CAPTIONS_FROM = "FROM captions JOIN vectors ON vectors.id = captions.vector_id"
VISIBLE_PHOTOS = (
    "SELECT id, vector_id, path, size, width, height, taken_at, mtime_ns, content_hash FROM images "
    "WHERE status = :ok AND vector_id IS NOT NULL ORDER BY path"
)
EXPORT_CAPTIONS = (
    "SELECT captions.text, captions.image, captions.source, captions.position, captions.content_hash, "
    f"captions.vector_id, vectors.data {_EXPORT_CAPTIONS_FROM} ORDER BY captions.source, captions.position"
)
COUNT_EXPORT_CAPTIONS = f"SELECT count(*) {_EXPORT_CAPTIONS_FROM}"


def when(value) -> datetime | None:
    """A DATETIME as the database hands it back: a datetime (PostgreSQL) or SQLAlchemy's SQLite text
    ('2024-05-01 10:00:00.000000')."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _bytes(value) -> bytes:
    return value if isinstance(value, bytes) else bytes(value)


def bind_list(name: str, values: Sequence) -> tuple[str, dict]:
    """`:name0, :name1, ...` for an IN list, and the parameters they name."""
    params = {f"{name}{n}": v for n, v in enumerate(values)}
    return ", ".join(f":{k}" for k in params), params


@dataclass
class MetaView:
    """The `meta` row, with the attributes of `loupe.indexer.storage.catalog.Meta`."""

    id: int
    schema_version: int
    model: str
    pretrained: str | None
    checkpoint_path: str | None
    checkpoint_size: int | None
    checkpoint_mtime_ns: int | None
    weights_id: str
    dim: int
    created_at: datetime
    updated_at: datetime
    generation: int

    @classmethod
    def of(cls, row: Sequence) -> "MetaView":
        r = list(row)
        r[9], r[10] = when(r[9]), when(r[10])
        return cls(*r)


@dataclass
class ImageView:
    """An `images` row, with the attributes of `loupe.indexer.storage.catalog.ImageRow`."""

    id: int
    path_key: bytes
    path: str
    size: int
    mtime_ns: int
    content_hash: str | None
    width: int | None
    height: int | None
    taken_at: datetime | None
    vector_id: int | None
    status: str
    reason: str | None
    indexed_at: datetime
    moment: tuple[float, float, float] | None = None  # (start, time, end) seconds: a video's moment

    @classmethod
    def of(cls, row: Sequence) -> "ImageView":
        r = list(row)
        r[1], r[8], r[12] = _bytes(r[1]), when(r[8]), when(r[12])
        return cls(*r)


@dataclass
class CaptionView:
    """A `captions` row, with the attributes of `loupe.indexer.storage.catalog.CaptionRow`."""

    id: int
    source: str
    position: int
    text: str
    image: str | None
    content_hash: str
    vector_id: int


class CatalogReads:
    """The catalog's read methods, written once over two primitives a subclass provides:
    `_rows(sql, params)` (every row, as a list of tuples) and `_stream(sql, params)` (the rows as an
    iterator, for reads too large to hold at once)."""

    def _rows(self, sql: str, params: dict) -> list[Sequence]:
        raise NotImplementedError

    def _stream(self, sql: str, params: dict) -> Iterator[Sequence]:
        raise NotImplementedError

    dialect = "sqlite"
    text_index: str | None = None  # 'fts5' | 'pg_trgm' | None: how `signal_text` is indexed

    # ---- text in photos --------------------------------------------------------------------
    def text_matches(self, query: str, limit: int = 5000) -> dict[int, TextMatch]:
        """Image vectors whose photo text holds `query` (normalized: `textmatch.normalize`):
        {vector id: TextMatch}. Exact substrings first (tier 0), then up to `max_typos` edits (tier 1).

        Lines come from the trigram index alone (FTS5 MATCH on SQLite; LIKE, which pg_trgm's GIN
        index serves, elsewhere), then their contents' vector ids in one look-up; a candidate for
        typos must share enough trigrams with the query (k edits destroy at most 3k) before the
        edit distance is computed."""
        from loupe.indexer.signals.textmatch import MIN_INDEXED, max_typos, substring_distance, trigrams

        if not query:
            return {}
        fts = self.dialect == "sqlite" and self.text_index == "fts5"
        head = "SELECT t.content_hash, t.text, t.norm, t.conf, t.box FROM signal_text t WHERE "
        match = "t.id IN (SELECT rowid FROM signal_text_fts WHERE signal_text_fts MATCH :q) LIMIT :n"
        if fts and len(query) >= MIN_INDEXED:
            exact = self._rows(head + match, {"q": _fts_phrase(query), "n": limit})
        else:
            exact = self._rows(head + "t.norm LIKE :q ESCAPE '!' LIMIT :n", {"q": f"%{_like_escape(query)}%", "n": limit})
        found: dict[str, TextMatch] = {}
        for h, text_, norm, conf, box in exact:
            if query in norm:  # the index's answer, confirmed on the folded text
                found.setdefault(h, TextMatch(0, 0, [])).lines.append(_line(text_, conf, box))
        k = max_typos(query)
        grams = trigrams(query)
        if k and grams:
            if fts:
                near = self._rows(head + match, {"q": " OR ".join(_fts_phrase(g) for g in grams), "n": limit})
            else:
                params = {f"g{i}": f"%{_like_escape(g)}%" for i, g in enumerate(grams)}
                ors = " OR ".join(f"t.norm LIKE :g{i} ESCAPE '!'" for i in range(len(grams)))
                near = self._rows(head + f"({ors}) LIMIT :n", {**params, "n": limit})
            need = len(grams) - 3 * k  # the q-gram lemma: trigrams a match within k edits still shares
            wanted = set(grams)
            fuzzy: dict[str, TextMatch] = {}
            for h, text_, norm, conf, box in near:
                if h in found:
                    continue
                if need > 1 and len(wanted.intersection(norm[i : i + 3] for i in range(len(norm) - 2))) < need:
                    continue
                d = substring_distance(query, norm)
                if d > k:
                    continue
                m = fuzzy.get(h)
                if m is None or d < m.edits:
                    fuzzy[h] = m = TextMatch(1, d, [])
                if d == m.edits:
                    m.lines.append(_line(text_, conf, box))
            found.update(fuzzy)
        if not found:
            return {}
        hashes = list(found)
        out: dict[int, TextMatch] = {}
        for start in range(0, len(hashes), ID_CHUNK):
            part = hashes[start : start + ID_CHUNK]
            names = ", ".join(f":h{i}" for i in range(len(part)))
            rows = self._rows(f"SELECT content_hash, id FROM vectors WHERE kind = :kind AND content_hash IN ({names})",
                              {"kind": IMAGE, **{f"h{i}": h for i, h in enumerate(part)}})
            out.update((int(vid), found[h]) for h, vid in rows)
        return out

    def text_of(self, content_hash: str) -> list[dict]:
        """A content's text lines (every signal's), in reading order: [{"text", "conf", "box"}]."""
        rows = self._rows("SELECT text, conf, box FROM signal_text WHERE content_hash = :h ORDER BY id", {"h": content_hash})
        return [_line(t, c, b) for t, c, b in rows]

    def texts_by_hash(self) -> dict[str, str]:
        """Every content's text, its lines joined by newlines (for export)."""
        out: dict[str, list[str]] = {}
        for h, t in self._rows("SELECT content_hash, text FROM signal_text ORDER BY id", {}):
            out.setdefault(h, []).append(t)
        return {h: "\n".join(v) for h, v in out.items()}

    def photos_with_text(self) -> int:
        """Indexed (visible) contents that have at least one line of text."""
        return int(self._rows(
            "SELECT count(DISTINCT t.content_hash) FROM signal_text t WHERE EXISTS "
            "(SELECT 1 FROM images i WHERE i.content_hash = t.content_hash AND i.status = 'ok')", {})[0][0])

    def _value(self, sql: str, params: dict | None = None):
        """The first column of the first row, or None."""
        rows = self._rows(sql, params or {})
        return rows[0][0] if rows else None

    # ---- meta and settings ------------------------------------------------------------
    def meta(self) -> MetaView | None:
        rows = self._rows(META, {})
        return MetaView.of(rows[0]) if rows else None

    def generation(self) -> int:
        return self._value(GENERATION) or 0

    def setting(self, key: str) -> str | None:
        return self._value(SETTING, {"key": key})

    # ---- vectors ----------------------------------------------------------------------
    def vector_ids(self, kind: str) -> np.ndarray:
        """Ids of the searchable vectors of `kind`, sorted: for images, those of at least one visible
        ('ok') file; a vector only missing files use stays stored but out of the FAISS index."""
        if kind == IMAGE:
            rows = self._rows(IMAGE_VECTOR_IDS, {"ok": OK})
        else:
            rows = self._rows(KIND_VECTOR_IDS, {"kind": kind})
        return np.asarray([i for (i,) in rows], dtype=np.int64)

    def count_vectors(self, kind: str) -> int:
        """How many ids `vector_ids(kind)` holds (what the FAISS index of `kind` should hold)."""
        if kind == IMAGE:
            return self._value(COUNT_IMAGE_VECTORS, {"ok": OK}) or 0
        return self._value(COUNT_KIND_VECTORS, {"kind": kind}) or 0

    def count_stored_vectors(self) -> int:
        """Every stored vector, of both kinds, used or not."""
        return self._value(COUNT_ALL_VECTORS) or 0

    def fetch_vectors(self, ids: Sequence[int], dim: int, chunk: int = VECTOR_CHUNK) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, found) for `ids`, in that order. An id deleted meanwhile (by another process)
        has found False and a zero row: callers drop it, so nothing uninitialised is ever scored."""
        out = np.zeros((len(ids), dim), dtype=np.float32)
        found = np.zeros(len(ids), dtype=bool)
        pos: dict[int, list[int]] = {}
        for n, i in enumerate(ids):
            pos.setdefault(int(i), []).append(n)
        for start in range(0, len(ids), chunk):
            marks, params = bind_list("i", [int(i) for i in ids[start : start + chunk]])
            for vid, data in self._rows(VECTORS_BY_ID.format(ids=marks), params):
                out[pos[vid]] = np.frombuffer(data, dtype=np.float32)
                found[pos[vid]] = True
        return out, found

    def load_vectors(self, ids: Sequence[int], dim: int, chunk: int = VECTOR_CHUNK) -> np.ndarray:
        """Vectors for `ids`, in that order; a LoupeError if any is no longer stored."""
        return all_found(ids, *self.fetch_vectors(ids, dim, chunk))

    def vector_for_hash(self, kind: str, content_hash: str, dim: int) -> np.ndarray | None:
        data = self._value(VECTOR_FOR_HASH, {"kind": kind, "hash": content_hash})
        return None if data is None else np.frombuffer(data, dtype=np.float32).copy()

    # ---- rows ---------------------------------------------------------------------------
    def image_rows_for_vectors(self, vector_ids: Sequence[int]) -> dict[int, list[ImageView]]:
        """Visible indexed files per vector id (several when the same content is stored twice), by
        path; missing files are never shown, not even as duplicates."""
        out: dict[int, list[ImageView]] = {}
        ids = [int(v) for v in vector_ids]
        for start in range(0, len(ids), ID_CHUNK):
            marks, params = bind_list("v", ids[start : start + ID_CHUNK])
            for row in self._rows(IMAGES_FOR_VECTORS.format(ids=marks), {**params, "ok": OK}):
                view = ImageView.of(row)
                out.setdefault(view.vector_id, []).append(view)
        for start in range(0, len(ids), ID_CHUNK):  # moment vectors: the video files that hold them, at that moment
            marks, params = bind_list("v", ids[start : start + ID_CHUNK])
            for vid, t_start, t, t_end, *row in self._rows(MOMENTS_FOR_VECTORS.format(ids=marks), {**params, "ok": OK}):
                view = ImageView.of(row)
                view.vector_id, view.moment = vid, (float(t_start), float(t), float(t_end))
                out.setdefault(vid, []).append(view)
        if len(ids) > ID_CHUNK:  # chunks each in path order; put every list back in path order
            for rows in out.values():
                rows.sort(key=lambda r: r.path)
        return out

    def visible_moments(self) -> list[tuple]:
        """(moment vector id, file row id, start, time, end) of every visible video, by path and time."""
        return [tuple(r) for r in self._rows(VISIBLE_MOMENTS, {"ok": OK})]

    def moments_of(self, video_hash: str) -> list[tuple]:
        """(idx, start, time, end, vector id) of one video content, in time order."""
        return [tuple(r) for r in self._rows(MOMENTS_OF_VIDEO, {"hash": video_hash})]

    def count_export_moments(self) -> int:
        return self._value(COUNT_EXPORT_MOMENTS, {"ok": OK}) or 0

    def export_moments(self) -> Iterator[tuple]:
        """Moments of visible videos by path and time: (path, video hash, idx, start, time, end, vector_id, vector bytes)."""
        return self._stream(EXPORT_MOMENTS, {"ok": OK})

    def iter_image_rows(self, folder_key: bytes | None = None, status: str | None = None) -> Iterator[ImageView]:
        """File rows by path, under `folder_key` and of `status` when given."""
        where, params = [], {}
        if folder_key is not None:
            where.append(IMAGES_IN_FOLDER)
            params["lo"], params["hi"] = prefix_bounds(folder_key)
        if status is not None:
            where.append(IMAGES_WITH_STATUS)
            params["status"] = status
        sql = IMAGES + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY path"
        for row in self._stream(sql, params):
            yield ImageView.of(row)

    def image_rows_at(self, path_keys: Sequence[bytes]) -> dict[bytes, ImageView]:
        """The file rows at `path_keys` (those catalogued), by path key."""
        out: dict[bytes, ImageView] = {}
        for start in range(0, len(path_keys), KEY_CHUNK):
            marks, params = bind_list("k", list(path_keys[start : start + KEY_CHUNK]))
            for row in self._rows(IMAGES_AT_KEYS.format(keys=marks), params):
                view = ImageView.of(row)
                out[view.path_key] = view
        return out

    def caption_rows_for_vectors(self, vector_ids: Sequence[int]) -> dict[int, list[CaptionView]]:
        """Captions per vector id, by source and position."""
        out: dict[int, list[CaptionView]] = {}
        ids = [int(v) for v in vector_ids]
        for start in range(0, len(ids), ID_CHUNK):
            marks, params = bind_list("v", ids[start : start + ID_CHUNK])
            for row in self._rows(CAPTIONS_FOR_VECTORS.format(ids=marks), params):
                view = CaptionView(*row)
                out.setdefault(view.vector_id, []).append(view)
        if len(ids) > ID_CHUNK:
            for rows in out.values():
                rows.sort(key=lambda r: (r.source, r.position))
        return out

    # ---- consistency and export ---------------------------------------------------------
    def dangling_references(self) -> tuple[int, int]:
        """(file rows with a vector that point at no image vector, captions that point at no text vector)."""
        images = self._value(DANGLING_IMAGES, {"ok": OK, "image": IMAGE}) or 0
        captions = self._value(DANGLING_CAPTIONS, {"text": TEXT}) or 0
        return images, captions

    def count_export_images(self) -> int:
        return self._value(COUNT_EXPORT_IMAGES, {"ok": OK}) or 0

    def export_images(self) -> Iterator[tuple]:
        """Visible files in path-key order: (path, content_hash, vector_id, size, mtime_ns, width,
        height, taken_at, vector bytes)."""
        for row in self._stream(EXPORT_IMAGES, {"ok": OK}):
            *fields, taken_at, data = row
            yield (*fields, when(taken_at), data)

    def count_export_captions(self) -> int:
        return self._value(COUNT_EXPORT_CAPTIONS) or 0

    def export_captions(self) -> Iterable[Sequence]:
        """Captions by source and position: (text, image, source, position, content_hash, vector_id, vector bytes)."""
        return self._stream(EXPORT_CAPTIONS, {})

    def visible_photos(self) -> list[tuple]:
        """(id, vector_id, path, size, width, height, taken_at, mtime_ns, content_hash) of every visible
        indexed file, in path order: plain tuples, no ORM objects."""
        return [(*r[:6], when(r[6]), *r[7:]) for r in self._rows(VISIBLE_PHOTOS, {"ok": OK})]


@dataclass
class TextMatch:
    """A photo content whose text matched a query: `tier` 0 exact substring, 1 with typos (`edits`)."""

    tier: int
    edits: int
    lines: list[dict]


def _fts_phrase(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _like_escape(s: str) -> str:
    return s.replace("!", "!!").replace("%", "!%").replace("_", "!_")


def _line(text_: str, conf: float, box: str) -> dict:
    import json

    return {"text": text_, "conf": round(float(conf), 3), "box": json.loads(box) if box else None}
