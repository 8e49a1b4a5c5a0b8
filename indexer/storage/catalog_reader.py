"""A read-only view of a SQLite catalog through the stdlib `sqlite3`, for the cold `loupe search`.

Importing SQLAlchemy and building its ORM costs a cold search more than all its queries together
(see benchmarks/RESULTS.md). A search only reads, so for a SQLite catalog at the current schema
version it reads the same tables with the same SQL as `loupe.indexer.storage.catalog.Catalog` would, through
`sqlite3`, and hands out rows with the same attribute names as the ORM's. Anything else (a
PostgreSQL URL, a URL with options, a missing file, an older schema to migrate or a newer one to
refuse, a missing table) is left to `Catalog`: `open_reader` returns None and the caller takes the
SQLAlchemy path, with its errors and migrations. The catalog stays the one source of truth; nothing
is written here.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator, Sequence

import numpy as np

from loupe.indexer.storage.catalog_names import IMAGE, OK, SCHEMA_VERSION, all_found, prefix_bounds

TABLES = {"meta", "vectors", "images", "captions", "roots", "settings"}
_IMAGE_COLUMNS = "id, path_key, path, size, mtime_ns, content_hash, width, height, taken_at, vector_id, status, reason, indexed_at"
_CAPTION_COLUMNS = "id, source, position, text, image, content_hash, vector_id"


def _when(value: str | None) -> datetime | None:
    """A DATETIME as SQLAlchemy stores it in SQLite ('2024-05-01 10:00:00.000000'), as it reads it."""
    return None if value is None else datetime.fromisoformat(value)


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

    @classmethod
    def of(cls, row: tuple) -> "ImageView":
        r = list(row)
        r[8], r[12] = _when(r[8]), _when(r[12])
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


def sqlite_file(url: str) -> str | None:
    """The database file of a plain `sqlite:///PATH` URL (no options, not in memory); else None."""
    if not url.startswith("sqlite:///") or url == "sqlite:///:memory:" or "?" in url:
        return None
    return url[len("sqlite:///") :]


def open_reader(url: str) -> "CatalogReader | None":
    """A reader for the catalog at `url`, or None when `loupe.indexer.storage.catalog.Catalog` must open it.

    None for any URL but a plain SQLite file, a file that does not exist (Catalog reports it),
    a schema version other than this loupe's (Catalog migrates or refuses), missing tables or
    no model bound yet, or any SQLite error on the way.
    """
    path = sqlite_file(url)
    if path is None or not os.path.isfile(path):
        return None
    try:
        reader = CatalogReader(url, path)
        tables = {name for (name,) in reader.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not TABLES <= tables:
            reader.close()
            return None
        meta = reader.meta()
        if meta is None or meta.schema_version != SCHEMA_VERSION:
            reader.close()
            return None
        return reader
    except (sqlite3.Error, ValueError, TypeError):
        return None


class CatalogReader:
    """The read methods of `loupe.indexer.storage.catalog.Catalog` a search uses, in the same SQL over `sqlite3`.

    Each call is its own read (autocommit), as each of Catalog's is its own session.
    """

    read_only = True

    def __init__(self, url: str, path: str) -> None:
        self.url = url
        self.db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)

    def close(self) -> None:
        self.db.close()

    # ---- meta and settings ------------------------------------------------------------
    def meta(self) -> MetaView | None:
        row = self.db.execute(
            "SELECT id, schema_version, model, pretrained, checkpoint_path, checkpoint_size, checkpoint_mtime_ns, "
            "weights_id, dim, created_at, updated_at, generation FROM meta WHERE id = 1"
        ).fetchone()
        if row is None:
            return None
        r = list(row)
        r[9], r[10] = _when(r[9]), _when(r[10])
        return MetaView(*r)

    def generation(self) -> int:
        row = self.db.execute("SELECT generation FROM meta WHERE id = 1").fetchone()
        return (row[0] if row else None) or 0

    def setting(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # ---- vectors ----------------------------------------------------------------------
    def vector_ids(self, kind: str) -> np.ndarray:
        """As `Catalog.vector_ids`: images' vectors of at least one visible file; sorted."""
        if kind == IMAGE:
            q, args = "SELECT DISTINCT vector_id FROM images WHERE status = ? ORDER BY vector_id", (OK,)
        else:
            q, args = "SELECT id FROM vectors WHERE kind = ? ORDER BY id", (kind,)
        return np.asarray([i for (i,) in self.db.execute(q, args)], dtype=np.int64)

    def count_vectors(self, kind: str) -> int:
        if kind == IMAGE:
            row = self.db.execute("SELECT count(DISTINCT vector_id) FROM images WHERE status = ?", (OK,)).fetchone()
        else:
            row = self.db.execute("SELECT count(*) FROM vectors WHERE kind = ?", (kind,)).fetchone()
        return row[0] or 0

    def fetch_vectors(self, ids: Sequence[int], dim: int, chunk: int = 5000) -> tuple[np.ndarray, np.ndarray]:
        """As `Catalog.fetch_vectors`: (vectors, found) in the order of `ids`."""
        out = np.zeros((len(ids), dim), dtype=np.float32)
        found = np.zeros(len(ids), dtype=bool)
        pos: dict[int, list[int]] = {}
        for n, i in enumerate(ids):
            pos.setdefault(int(i), []).append(n)
        for start in range(0, len(ids), chunk):
            part = [int(i) for i in ids[start : start + chunk]]
            q = f"SELECT id, data FROM vectors WHERE id IN ({','.join('?' * len(part))})"
            for vid, data in self.db.execute(q, part):
                out[pos[vid]] = np.frombuffer(data, dtype=np.float32)
                found[pos[vid]] = True
        return out, found

    def load_vectors(self, ids: Sequence[int], dim: int, chunk: int = 5000) -> np.ndarray:
        """As `Catalog.load_vectors`: vectors for `ids`, in that order; a LoupeError if any is gone."""
        return all_found(ids, *self.fetch_vectors(ids, dim, chunk))

    def vector_for_hash(self, kind: str, content_hash: str, dim: int) -> np.ndarray | None:
        row = self.db.execute("SELECT data FROM vectors WHERE kind = ? AND content_hash = ?", (kind, content_hash)).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype=np.float32).copy()

    # ---- rows ---------------------------------------------------------------------------
    def image_rows_for_vectors(self, vector_ids: Sequence[int]) -> dict[int, list[ImageView]]:
        """As `Catalog.image_rows_for_vectors`: visible files per vector id, by path."""
        out: dict[int, list[ImageView]] = {}
        ids = [int(v) for v in vector_ids]
        for start in range(0, len(ids), 900):  # SQLite's default limit on bound parameters is 999 before 3.32
            part = ids[start : start + 900]
            q = (f"SELECT {_IMAGE_COLUMNS} FROM images WHERE vector_id IN ({','.join('?' * len(part))}) "
                 "AND status = ? ORDER BY path")
            for row in self.db.execute(q, [*part, OK]):
                view = ImageView.of(row)
                out.setdefault(view.vector_id, []).append(view)
        if len(ids) > 900:  # chunks each in path order; put every list back in path order
            for rows in out.values():
                rows.sort(key=lambda r: r.path)
        return out

    def iter_image_rows(self, folder_key: bytes | None = None, status: str | None = None) -> Iterator[ImageView]:
        q, args = f"SELECT {_IMAGE_COLUMNS} FROM images", []
        where = []
        if folder_key is not None:
            lo, hi = prefix_bounds(folder_key)
            where += ["path_key >= ?", "path_key < ?"]
            args += [lo, hi]
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if where:
            q += " WHERE " + " AND ".join(where)
        for row in self.db.execute(q + " ORDER BY path", args).fetchall():
            yield ImageView.of(row)

    def caption_rows_for_vectors(self, vector_ids: Sequence[int]) -> dict[int, list[CaptionView]]:
        out: dict[int, list[CaptionView]] = {}
        ids = [int(v) for v in vector_ids]
        for start in range(0, len(ids), 900):
            part = ids[start : start + 900]
            q = (f"SELECT {_CAPTION_COLUMNS} FROM captions WHERE vector_id IN ({','.join('?' * len(part))}) "
                 "ORDER BY source, position")
            for row in self.db.execute(q, part):
                view = CaptionView(*row)
                out.setdefault(view.vector_id, []).append(view)
        if len(ids) > 900:
            for rows in out.values():
                rows.sort(key=lambda r: (r.source, r.position))
        return out

    def visible_photos(self) -> list[tuple]:
        """As `Catalog.visible_photos`: (id, vector_id, path, size, width, height, taken_at, mtime_ns,
        content_hash) of every visible indexed file, in path order."""
        q = ("SELECT id, vector_id, path, size, width, height, taken_at, mtime_ns, content_hash FROM images "
             "WHERE status = ? AND vector_id IS NOT NULL ORDER BY path")
        return [(*r[:6], _when(r[6]), *r[7:]) for r in self.db.execute(q, (OK,))]
