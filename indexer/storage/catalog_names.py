"""The catalog's names and keys, without SQLAlchemy: schema version, vector kinds, file statuses, path keys.

Shared by `loupe.indexer.storage.catalog` (SQLAlchemy, every catalog) and `loupe.indexer.storage.catalog_reader` (the stdlib
sqlite3 reader of a cold search), so both read one layout by the same names.
"""

from __future__ import annotations

import os

SCHEMA_VERSION = 5  # 2: 'missing' files, the roots table, an index on (status, vector_id); 3: the signals table; 4: video moments; 5: signal_text (OCR)
IMAGE, TEXT = "image", "text"
OK, SKIPPED, MISSING = "ok", "skipped", "missing"  # ImageRow.status


def display_path(path_key: bytes) -> str:
    """A printable path: bytes that are not UTF-8 are shown as U+FFFD."""
    return path_key.decode("utf-8", "replace")


def prefix_bounds(folder_key: bytes) -> tuple[bytes, bytes]:
    """Byte range [lo, hi) of every path_key strictly inside `folder_key` (one indexed range scan)."""
    lo = folder_key.rstrip(b"/") + b"/"
    return lo, lo[:-1] + b"0"  # '0' is the byte after '/'


def path_key_of(path: str | os.PathLike) -> bytes:
    """The catalog key of a path: its absolute form as raw bytes (survives non-UTF-8 names)."""
    return os.fsencode(os.path.abspath(path))


def all_found(ids, out, found):
    """`out` when every one of `ids` was found (`found`, a bool array), else a one-line LoupeError:
    the catalog changed between listing the ids and reading their vectors."""
    if not found.all():
        import numpy as np

        from loupe.indexer.errors import LoupeError

        lost = np.asarray(ids)[~found]
        raise LoupeError(f"{len(lost)} vectors are no longer in the catalog (e.g. id {int(lost[0])}): it changed meanwhile, retry")
    return out


def catalog_identity(meta) -> str:
    """Which catalog this is, as index file labels record it: its creation time (`meta.created_at`),
    to the microsecond.

    A catalog deleted and rebuilt from scratch gets another one, so a file left by the old one is
    not taken for current just because the new catalog reached the same generation.
    """
    return meta.created_at.isoformat(timespec="microseconds")
