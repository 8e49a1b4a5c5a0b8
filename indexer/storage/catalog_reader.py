"""A read-only view of a SQLite catalog through the stdlib `sqlite3`, for the cold `loupe search`.

Importing SQLAlchemy and building its ORM costs a cold search more than all its queries together
(see benchmarks/RESULTS.md). A search only reads, so for a SQLite catalog at the current schema
version it reads the same tables with the same statements as `loupe.indexer.storage.catalog.Catalog`
(both inherit `loupe.indexer.storage.catalog_sql.CatalogReads`), through `sqlite3`. Anything else (a
PostgreSQL URL, a URL with options, a missing file, an older schema to migrate or a newer one to
refuse, a missing table) is left to `Catalog`: `open_reader` returns None and the caller takes the
SQLAlchemy path, with its errors and migrations. The catalog stays the one source of truth; nothing
is written here.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Iterator, Sequence

from loupe.indexer.storage.catalog_names import SCHEMA_VERSION
from loupe.indexer.storage.catalog_sql import SQLITE_TABLES, TABLES, CatalogReads


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
        tables = {name for (name,) in reader.db.execute(SQLITE_TABLES)}
        if not TABLES <= tables:
            reader.close()
            return None
        meta = reader.meta()
        if meta is None or meta.schema_version != SCHEMA_VERSION:
            reader.close()
            return None
        reader.text_index = "fts5" if "signal_text_fts" in tables else None
        return reader
    except (sqlite3.Error, ValueError, TypeError):
        return None


class CatalogReader(CatalogReads):
    """The read methods of `loupe.indexer.storage.catalog.Catalog` (`CatalogReads`), over `sqlite3`.

    Each call is its own read (autocommit), as each of Catalog's is its own connection.
    """

    read_only = True

    def __init__(self, url: str, path: str) -> None:
        self.url = url
        self.db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)

    def close(self) -> None:
        self.db.close()

    def _rows(self, sql: str, params: dict) -> list[Sequence]:
        return self.db.execute(sql, params).fetchall()

    def _stream(self, sql: str, params: dict) -> Iterator[Sequence]:
        return iter(self.db.execute(sql, params))
