"""Query vectors already computed, kept on disk beside the index: a repeated sentence costs no encoding.

One small SQLite file (`query-cache.sqlite`), keyed by the model's weights id, its precision
(fp32 from torch or the exported ONNX tower agree within float rounding; bf16 is kept apart) and
the sentence with its whitespace collapsed. At most `MAX_ENTRIES` vectors are kept; the least
recently used go first. Vectors of another model never match (another weights id), and are
evicted in time. The cache is an optimisation only: a file that cannot be read or written
(a read-only home, a locked database) is skipped silently and the query is encoded as usual.

`open_cache` hands out one `QueryCache` per file and model in a process, which remembers what its
lookups found: a cold search reads the file once, however many steps ask (whether to start the
text encoder ask `ahead`, then the query's vectors).
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from loupe.indexer.storage.locations import Location

MAX_ENTRIES = 10_000
MEMO_ENTRIES = 256  # lookups remembered in memory per cache (found or not)


def cache_path(location: Location) -> Path:
    return location.vector_dir / f"{location.prefix}query-cache.sqlite"


def normalise(text: str) -> str:
    """The form of a sentence the cache is keyed by: whitespace runs collapsed, ends stripped."""
    return " ".join(text.split())


def uncached(texts: Sequence[str], cached: Sequence[np.ndarray | None]) -> list[str]:
    """The sentences to encode, once each, in the order they are encoded: those `get` found no vector for."""
    return sorted({t for t, v in zip(texts, cached) if v is None})


class QueryCache:
    """Get and put text query vectors for one model (its weights id and dimension)."""

    def __init__(self, path: Path, weights_id: str, dim: int, max_entries: int = MAX_ENTRIES) -> None:
        self.path = Path(path)
        self.prefix = f"{weights_id}\n"
        self.dim = dim
        self.max_entries = max_entries
        self._db: sqlite3.Connection | None = None
        self._broken = False
        self._memo: dict[str, np.ndarray | None] = {}  # key -> what the file held when last asked
        self._lock = threading.RLock()  # one object serves every thread of a process (a server's too)

    def _conn(self) -> sqlite3.Connection | None:
        if self._db is None and not self._broken:
            try:
                if not self.path.parent.is_dir():
                    raise sqlite3.OperationalError("no index folder")
                db = sqlite3.connect(self.path, timeout=0.2, isolation_level=None, check_same_thread=False)
                # write-ahead log, synced at checkpoints only: a put or a hit costs no fsync on a
                # query's path (10-40 ms otherwise); a crash loses at most the latest entries
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, vector BLOB NOT NULL, used REAL NOT NULL)")
                self._db = db
            except sqlite3.Error:
                self._broken = True
        return self._db

    def _key(self, text: str, precision: str) -> str:
        return hashlib.sha256(f"{self.prefix}{precision}\n{normalise(text)}".encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, texts: Sequence[str], precision: str, ahead: bool = False) -> list[np.ndarray | None]:
        """Cached vectors of `texts` (None where not cached); hits are marked as recently used.

        The file is read only for sentences not looked up before in this process. A miss is
        remembered for the lookups that follow `ahead=True` ones (a step that only looks ahead,
        e.g. whether to start the text encoder) and forgotten once an ordinary lookup returns it,
        as another process may cache that sentence in the meantime; a hit is remembered.
        """
        keys = [self._key(t, precision) for t in texts]
        with self._lock:
            todo = [k for k in dict.fromkeys(keys) if k not in self._memo]
            if todo:
                self._remember(self._read(todo))
            out = [None if self._memo.get(k) is None else self._memo[k].copy() for k in keys]
            if not ahead:
                for k in keys:
                    if k in self._memo and self._memo[k] is None:
                        del self._memo[k]
        return out

    def _remember(self, found: dict[str, np.ndarray | None]) -> None:
        self._memo.update(found)
        while len(self._memo) > MEMO_ENTRIES:
            del self._memo[next(iter(self._memo))]

    def _read(self, keys: list[str]) -> dict[str, np.ndarray | None]:
        out: dict[str, np.ndarray | None] = dict.fromkeys(keys)
        db = self._conn()
        if db is None:
            return out
        try:
            rows = {}
            for start in range(0, len(keys), 500):  # SQLite's limit on bound parameters
                chunk = keys[start : start + 500]
                rows.update(db.execute(
                    f"SELECT key, vector FROM vectors WHERE key IN ({','.join('?' * len(chunk))})", chunk
                ).fetchall())
            found = [k for k in keys if k in rows]
            if found:
                db.executemany("UPDATE vectors SET used = ? WHERE key = ?", [(time.time(), k) for k in found])
        except sqlite3.Error:
            rows = {}
        for key in keys:
            blob = rows.get(key)
            if blob is not None and len(blob) == 4 * self.dim:
                out[key] = np.frombuffer(blob, dtype=np.float32).copy()
        return out

    def put(self, texts: Sequence[str], vectors: np.ndarray, precision: str) -> None:
        """Store vectors for `texts`, then evict the least recently used beyond the bound."""
        with self._lock:
            self._put(texts, vectors, precision)

    def _put(self, texts: Sequence[str], vectors: np.ndarray, precision: str) -> None:
        db = self._conn()
        if db is None or not len(texts):
            return
        now = time.time()
        rows = [(self._key(t, precision), np.asarray(v, dtype=np.float32).tobytes(), now) for t, v in zip(texts, vectors)]
        for key, _, _ in rows:  # the next lookup reads the file, and marks them used there
            self._memo.pop(key, None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT OR REPLACE INTO vectors (key, vector, used) VALUES (?, ?, ?)", rows)
            (count,) = db.execute("SELECT COUNT(*) FROM vectors").fetchone()
            if count > self.max_entries:
                db.execute(
                    "DELETE FROM vectors WHERE key IN (SELECT key FROM vectors ORDER BY used LIMIT ?)",
                    (count - self.max_entries,),
                )
            db.execute("COMMIT")
        except sqlite3.Error:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


_open: dict[tuple[Path, str, int], QueryCache] = {}


def open_cache(location: Location, weights_id: str, dim: int) -> QueryCache:
    """This process's cache of `location` for one model (the same object each time it is asked)."""
    key = (cache_path(location), weights_id, dim)
    if key not in _open:
        _open[key] = QueryCache(*key)
    return _open[key]
