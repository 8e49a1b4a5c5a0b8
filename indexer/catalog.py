"""The catalog: what was indexed, from where, with which model, and every vector, in SQL.

The catalog is the source of truth. Vectors are stored here too (float32 bytes), keyed by
content hash, so a renamed, moved or duplicated file reuses its vector, and the FAISS files
are a cache that can always be brought back in line (see `store.py`). Every change is one
transaction that also bumps `generation`; a FAISS file records the generation it reflects.
SQLite is the embedded default; any SQLAlchemy URL works (PostgreSQL tested by URL only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from indexer.errors import LoupeError

SCHEMA_VERSION = 1
IMAGE, TEXT = "image", "text"
LEGACY_NO_VECTOR = "no vector"  # what an interrupted commit could once store in place of a vector


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """One row: the model the index is bound to, and bookkeeping."""

    __tablename__ = "meta"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    schema_version: Mapped[int] = mapped_column(Integer, default=SCHEMA_VERSION)
    model: Mapped[str] = mapped_column(String(200))
    pretrained: Mapped[str | None] = mapped_column(String(200), nullable=True)
    checkpoint_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    checkpoint_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    checkpoint_mtime_ns: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    weights_id: Mapped[str] = mapped_column(String(200))
    dim: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    generation: Mapped[int] = mapped_column(BigInteger, default=0)


class Vector(Base):
    """One embedding per distinct content (kind + content hash); its id is the FAISS id."""

    __tablename__ = "vectors"
    __table_args__ = (UniqueConstraint("kind", "content_hash"), {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(8))
    content_hash: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ImageRow(Base):
    """A file seen on disk: indexed (vector_id set) or skipped (reason set)."""

    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path_key: Mapped[bytes] = mapped_column(LargeBinary, unique=True)  # os.fsencode(abs path)
    path: Mapped[str] = mapped_column(Text)  # display form (undecodable bytes replaced)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    content_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    taken_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    vector_id: Mapped[int | None] = mapped_column(ForeignKey("vectors.id"), nullable=True, index=True)
    status: Mapped[str] = mapped_column(String(8))  # 'ok' | 'skipped'
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    indexed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class CaptionRow(Base):
    """A sentence from a caption corpus file."""

    __tablename__ = "captions"
    __table_args__ = (Index("ix_captions_source", "source"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    image: Mapped[str | None] = mapped_column(Text, nullable=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    vector_id: Mapped[int] = mapped_column(ForeignKey("vectors.id"), index=True)


class Setting(Base):
    """A named option that outlives any one run (e.g. the FAISS factory chosen with --index-factory)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


@dataclass
class ImageState:
    """What a re-scan needs to decide whether a file changed: one row per path, one query."""

    id: int
    size: int
    mtime_ns: int
    content_hash: str | None
    status: str
    reason: str | None = None

    @property
    def needs_work(self) -> bool:
        """A row with no vector and no real failure reason (an interrupted run's, e.g. 'no vector')."""
        return self.status == "skipped" and self.reason in (None, "", LEGACY_NO_VECTOR)


@dataclass
class ImageRecord:
    """A file to write: `vector_id` None + `reason` for skipped files."""

    path_key: bytes
    size: int
    mtime_ns: int
    content_hash: str | None = None
    width: int | None = None
    height: int | None = None
    taken_at: datetime | None = None
    vector_id: int | None = None
    reason: str | None = None


def display_path(path_key: bytes) -> str:
    """A printable path: bytes that are not UTF-8 are shown as U+FFFD."""
    return path_key.decode("utf-8", "replace")


def prefix_bounds(folder_key: bytes) -> tuple[bytes, bytes]:
    """Byte range [lo, hi) of every path_key strictly inside `folder_key` (one indexed range scan)."""
    lo = folder_key.rstrip(b"/") + b"/"
    return lo, lo[:-1] + b"0"  # '0' is the byte after '/'


def to_blob(vec: np.ndarray) -> bytes:
    return np.ascontiguousarray(vec, dtype=np.float32).tobytes()


class Catalog:
    """Session-scoped access to the catalog tables; each public write is one transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url[len("sqlite:///") :].split("?", 1)[0]).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = create_engine(url)
        except (ImportError, ModuleNotFoundError) as exc:
            raise LoupeError(f"database driver missing for {url.split(':', 1)[0]}: {exc.msg}") from None
        except SQLAlchemyError as exc:
            raise LoupeError(f"bad catalog URL {url!r}: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            Base.metadata.create_all(self.engine)
        except OperationalError as exc:
            raise LoupeError(f"cannot open catalog {url}: {exc.orig}") from None

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # ---- meta -------------------------------------------------------------------------
    def meta(self) -> Meta | None:
        with self.session() as s:
            return s.get(Meta, 1)

    def create_meta(self, **fields) -> Meta:
        with self.session() as s, s.begin():
            m = Meta(id=1, **fields)
            s.add(m)
        return m

    def update_meta(self, **fields) -> None:
        with self.session() as s, s.begin():
            s.execute(update(Meta).where(Meta.id == 1).values(**fields))

    def generation(self) -> int:
        with self.session() as s:
            return s.scalar(select(Meta.generation).where(Meta.id == 1)) or 0

    def setting(self, key: str) -> str | None:
        with self.session() as s:
            return s.scalar(select(Setting.value).where(Setting.key == key))

    def set_setting(self, key: str, value: str | None) -> bool:
        """Store (or, with None, clear) a setting; a change bumps the generation so readers notice it."""
        with self.session() as s, s.begin():
            old = s.get(Setting, key)
            if (old.value if old else None) == value:
                return False
            if value is None:
                s.delete(old)
            elif old is None:
                s.add(Setting(key=key, value=value))
            else:
                old.value = value
            self._bump(s)
        return True

    def _bump(self, s: Session) -> None:
        s.execute(update(Meta).where(Meta.id == 1).values(generation=Meta.generation + 1, updated_at=utcnow()))

    # ---- vectors ----------------------------------------------------------------------
    def hash_to_vector(self, kind: str) -> dict[str, int]:
        with self.session() as s:
            return dict(s.execute(select(Vector.content_hash, Vector.id).where(Vector.kind == kind)).all())

    def vector_ids(self, kind: str) -> np.ndarray:
        with self.session() as s:
            ids = s.scalars(select(Vector.id).where(Vector.kind == kind)).all()
        return np.asarray(ids, dtype=np.int64)

    def count_vectors(self, kind: str) -> int:
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(Vector).where(Vector.kind == kind)) or 0

    def load_vectors(self, ids: Sequence[int], dim: int, chunk: int = 5000) -> np.ndarray:
        """Vectors for `ids`, in that order."""
        out = np.empty((len(ids), dim), dtype=np.float32)
        pos = {int(i): n for n, i in enumerate(ids)}
        with self.session() as s:
            for start in range(0, len(ids), chunk):
                part = [int(i) for i in ids[start : start + chunk]]
                for vid, data in s.execute(select(Vector.id, Vector.data).where(Vector.id.in_(part))):
                    out[pos[vid]] = np.frombuffer(data, dtype=np.float32)
        return out

    def vector_for_hash(self, kind: str, content_hash: str, dim: int) -> np.ndarray | None:
        with self.session() as s:
            data = s.scalar(select(Vector.data).where(Vector.kind == kind, Vector.content_hash == content_hash))
        return None if data is None else np.frombuffer(data, dtype=np.float32).copy()

    def _insert_vectors(self, s: Session, kind: str, items: list[tuple[str, np.ndarray]]) -> dict[str, int]:
        """Store vectors by content hash; a hash stored meanwhile (by another writer) keeps its vector.

        Returns the vector id of every hash in `items`, whoever inserted it.
        """
        rows: dict[str, dict] = {}
        for content_hash, vec in items:
            rows.setdefault(content_hash, dict(kind=kind, content_hash=content_hash, data=to_blob(vec)))
        if not rows:
            return {}
        _insert_or(s, Vector.__table__, list(rows.values()), ["kind", "content_hash"])
        return self._vector_ids(s, kind, rows)

    def _vector_ids(self, s: Session, kind: str, hashes: Iterable[str]) -> dict[str, int]:
        """Content hash -> vector id for those of `hashes` the catalog holds now."""
        hashes = list(hashes)
        out: dict[str, int] = {}
        for start in range(0, len(hashes), 5000):
            part = hashes[start : start + 5000]
            out.update(s.execute(select(Vector.content_hash, Vector.id).where(Vector.kind == kind, Vector.content_hash.in_(part))).all())
        return out

    def _gc_vectors(self, s: Session) -> int:
        used_img = select(ImageRow.vector_id).where(ImageRow.vector_id.is_not(None))
        used_txt = select(CaptionRow.vector_id)
        res = s.execute(
            delete(Vector).where(
                ((Vector.kind == IMAGE) & Vector.id.not_in(used_img))
                | ((Vector.kind == TEXT) & Vector.id.not_in(used_txt))
            )
        )
        return res.rowcount or 0

    # ---- images -----------------------------------------------------------------------
    def image_states(self, folder_key: bytes | None = None) -> dict[bytes, ImageState]:
        """Every catalogued file (under `folder_key` if given) with what a re-scan compares."""
        q = select(
            ImageRow.path_key, ImageRow.id, ImageRow.size, ImageRow.mtime_ns, ImageRow.content_hash, ImageRow.status,
            ImageRow.reason,
        )
        if folder_key is not None:
            lo, hi = prefix_bounds(folder_key)
            q = q.where(ImageRow.path_key >= lo, ImageRow.path_key < hi)
        with self.session() as s:
            return {
                bytes(row[0]): ImageState(row[1], row[2], row[3], row[4], row[5], row[6]) for row in s.execute(q)
            }

    def image_id(self, path_key: bytes) -> int | None:
        with self.session() as s:
            return s.scalar(select(ImageRow.id).where(ImageRow.path_key == path_key))

    def write_images(
        self, records: Iterable[ImageRecord], new_vectors: list[tuple[str, np.ndarray]], known: dict[str, int]
    ) -> int:
        """Insert or update file rows and any new vectors in ONE transaction; returns rows written.

        A file row is stored either with its vector or with the reason it failed, never with
        neither: a record whose vector is in neither the catalog nor `new_vectors` is left out
        (the next run redoes it). Vectors and rows written meanwhile by another writer are
        reused and updated, not duplicated. `known` (content hash -> vector id) is brought in
        line with the catalog for every hash seen here, once the transaction is committed.
        """
        records = list(records)
        wanted = {r.content_hash for r in records if r.reason is None and r.content_hash}
        with self.session() as s, s.begin():
            ids = self._insert_vectors(s, IMAGE, new_vectors)  # a hash stored already keeps its vector
            ids.update(self._vector_ids(s, IMAGE, wanted.difference(ids)))
            now = utcnow()
            rows: dict[bytes, dict] = {}  # by path: a file listed twice is written once (its last record)
            for r in records:
                vid = ids.get(r.content_hash) if r.reason is None and r.content_hash else None
                if vid is None and r.reason is None:
                    continue
                values = dict(
                    path_key=r.path_key,
                    path=display_path(r.path_key),
                    size=r.size,
                    mtime_ns=r.mtime_ns,
                    content_hash=r.content_hash,
                    width=r.width,
                    height=r.height,
                    taken_at=r.taken_at,
                    vector_id=vid,
                    status="ok" if vid is not None else "skipped",
                    reason=None if vid is not None else r.reason,
                    indexed_at=now,
                )
                rows[r.path_key] = values
            if rows:
                _insert_or(s, ImageRow.__table__, list(rows.values()), ["path_key"], update=True)
            self._bump(s)
        for h in wanted.difference(ids):
            known.pop(h, None)  # gone from the catalog (another writer's clean-up): embed it again
        known.update(ids)  # only once the transaction is committed
        return len(rows)

    def touch_images(self, updates: Sequence[tuple[int, int, int]]) -> None:
        """Record a new (size, mtime) for files whose content did not change."""
        if not updates:
            return
        with self.session() as s, s.begin():
            for row_id, size, mtime_ns in updates:
                s.execute(update(ImageRow).where(ImageRow.id == row_id).values(size=size, mtime_ns=mtime_ns))

    def delete_images(self, row_ids: Sequence[int]) -> int:
        """Remove file rows and every vector no longer used; returns the rows removed."""
        removed = 0
        with self.session() as s, s.begin():
            for start in range(0, len(row_ids), 5000):
                part = list(row_ids[start : start + 5000])
                removed += s.execute(delete(ImageRow).where(ImageRow.id.in_(part))).rowcount or 0
            self._gc_vectors(s)
            self._bump(s)
        return removed

    def collect_garbage(self) -> int:
        """Drop vectors no file or caption uses any more (e.g. the old content of an edited photo)."""
        with self.session() as s, s.begin():
            n = self._gc_vectors(s)
            if n:
                self._bump(s)
        return n

    def image_rows_for_vectors(self, vector_ids: Sequence[int]) -> dict[int, list[ImageRow]]:
        """Indexed files per vector id (several when the same content is stored twice)."""
        out: dict[int, list[ImageRow]] = {}
        with self.session() as s:
            q = select(ImageRow).where(ImageRow.vector_id.in_([int(v) for v in vector_ids])).order_by(ImageRow.path)
            for row in s.scalars(q):
                out.setdefault(row.vector_id, []).append(row)
        return out

    def iter_image_rows(self, folder_key: bytes | None = None, status: str | None = None) -> Iterator[ImageRow]:
        q = select(ImageRow).order_by(ImageRow.path)
        if folder_key is not None:
            lo, hi = prefix_bounds(folder_key)
            q = q.where(ImageRow.path_key >= lo, ImageRow.path_key < hi)
        if status is not None:
            q = q.where(ImageRow.status == status)
        with self.session() as s:
            yield from s.scalars(q)

    # ---- captions ---------------------------------------------------------------------
    def caption_hashes(self, source: str) -> dict[tuple[int, str], int]:
        with self.session() as s:
            rows = s.execute(
                select(CaptionRow.position, CaptionRow.content_hash, CaptionRow.id).where(CaptionRow.source == source)
            ).all()
        return {(p, h): i for p, h, i in rows}

    def replace_captions(
        self,
        source: str,
        rows: list[tuple[int, str, str | None, str]],
        new_vectors: list[tuple[str, np.ndarray]],
        known: dict[str, int],
    ) -> None:
        """Make the captions of `source` exactly `rows` (position, text, image, hash), in one transaction."""
        with self.session() as s, s.begin():
            inserted = self._insert_vectors(s, TEXT, [(h, v) for h, v in new_vectors if h not in known])
            s.execute(delete(CaptionRow).where(CaptionRow.source == source))
            s.add_all(
                CaptionRow(source=source, position=p, text=t, image=img, content_hash=h, vector_id=inserted.get(h) or known[h])
                for p, t, img, h in rows
            )
            self._gc_vectors(s)
            self._bump(s)
        known.update(inserted)

    def delete_captions(self, source: str | None = None) -> int:
        with self.session() as s, s.begin():
            q = delete(CaptionRow)
            if source is not None:
                q = q.where(CaptionRow.source == source)
            n = s.execute(q).rowcount or 0
            self._gc_vectors(s)
            self._bump(s)
        return n

    def caption_rows_for_vectors(self, vector_ids: Sequence[int]) -> dict[int, list[CaptionRow]]:
        out: dict[int, list[CaptionRow]] = {}
        with self.session() as s:
            q = select(CaptionRow).where(CaptionRow.vector_id.in_([int(v) for v in vector_ids]))
            for row in s.scalars(q.order_by(CaptionRow.source, CaptionRow.position)):
                out.setdefault(row.vector_id, []).append(row)
        return out

    # ---- reports ----------------------------------------------------------------------
    def stats(self) -> dict:
        with self.session() as s:
            by_status = dict(s.execute(select(ImageRow.status, func.count()).group_by(ImageRow.status)).all())
            reasons = s.execute(
                select(ImageRow.reason, func.count())
                .where(ImageRow.status == "skipped")
                .group_by(ImageRow.reason)
                .order_by(func.count().desc())
            ).all()
            vec = dict(s.execute(select(Vector.kind, func.count()).group_by(Vector.kind)).all())
            captions = s.scalar(select(func.count()).select_from(CaptionRow)) or 0
            sources = s.execute(select(CaptionRow.source, func.count()).group_by(CaptionRow.source)).all()
            total_bytes = s.scalar(select(func.sum(ImageRow.size)).where(ImageRow.status == "ok")) or 0
        return {
            "images_indexed": by_status.get("ok", 0),
            "images_skipped": by_status.get("skipped", 0),
            "skip_reasons": [(r, n) for r, n in reasons],
            "image_vectors": vec.get(IMAGE, 0),
            "text_vectors": vec.get(TEXT, 0),
            "captions": captions,
            "caption_sources": [(src, n) for src, n in sources],
            "indexed_bytes": int(total_bytes),
        }


def _insert_or(s: Session, table, rows: list[dict], conflict: list[str], update: bool = False) -> None:
    """INSERT `rows`; one whose `conflict` columns match a stored row updates it (`update`) or is dropped.

    An upsert, so two writers that meet (no writer lock, or a row written since it was read)
    never fail with an IntegrityError: ON CONFLICT on SQLite and PostgreSQL, a savepoint per
    row elsewhere.
    """
    dialect = s.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        stmt = dialect_insert(table)
        if update:
            cols = [c for c in rows[0] if c not in conflict]
            stmt = stmt.on_conflict_do_update(index_elements=conflict, set_={c: stmt.excluded[c] for c in cols})
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=conflict)
        s.execute(stmt, rows)
        return
    from sqlalchemy import insert
    from sqlalchemy.exc import IntegrityError

    for row in rows:
        try:
            with s.begin_nested():
                s.execute(insert(table).values(**row))
        except IntegrityError:
            if update:
                where = [table.c[c] == row[c] for c in conflict]
                s.execute(table.update().where(*where).values(**{c: v for c, v in row.items() if c not in conflict}))


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the indexer; crash-safe commits
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def path_key_of(path: str | os.PathLike) -> bytes:
    """The catalog key of a path: its absolute form as raw bytes (survives non-UTF-8 names)."""
    return os.fsencode(os.path.abspath(path))
