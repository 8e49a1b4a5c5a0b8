"""The catalog: what was indexed, from where, with which model, and every vector, in SQL.

The catalog is the source of truth. Vectors are stored here too (float32 bytes), keyed by
content hash, so a renamed, moved or duplicated file reuses its vector, and the FAISS files
are a cache that can always be brought back in line (see `store.py`). Every change is one
transaction that also bumps `generation`; a FAISS file records the generation it reflects.
SQLite is the embedded default; any SQLAlchemy URL works (PostgreSQL tested by URL only).

A file that is no longer found is kept as 'missing' (with its hash and vector) and hidden from
every result, so a drive that comes back costs no re-embedding. The schema version in `meta` is
checked on open: an older catalog is migrated in place (one transaction), a newer one refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    case,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from loupe.indexer.errors import LoupeError

from loupe.indexer.storage.catalog_names import (  # noqa: F401  (the names every catalog user imports from here)
    IMAGE, MISSING, OK, SCHEMA_VERSION, SKIPPED, TEXT, all_found, display_path, path_key_of, prefix_bounds,
)
from loupe.indexer.storage.catalog_sql import (  # noqa: F401
    COUNT_PLANNED_TABLES,
    EXPORT_PAGE,
    SQLITE_HAS_STATS,
    SQLITE_STATS,
    CatalogReads,
    TextMatch,
)

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
    __table_args__ = (Index("ix_images_status_vector", "status", "vector_id"),)  # visible vectors, missing files
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
    status: Mapped[str] = mapped_column(String(8))  # 'ok' | 'skipped' | 'missing' (not found: kept, hidden)
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


class RootRow(Base):
    """A folder given to `loupe index`, and what its last run found (an offline root keeps its files)."""

    __tablename__ = "roots"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path_key: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    path: Mapped[str] = mapped_column(Text)
    files: Mapped[int] = mapped_column(BigInteger, default=0)  # images seen by the last run that found it
    scanned_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # that run
    offline: Mapped[str | None] = mapped_column(String(16), nullable=True)  # None | 'missing' | 'empty' | 'unreadable'
    offline_since: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Setting(Base):
    """A named option that outlives any one run (e.g. the FAISS factory chosen with --index-factory)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class SignalRow(Base):
    """A per-photo signal's value (or the reason it failed) for one content, at one signal version."""

    __tablename__ = "signals"
    content_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class MomentRow(Base):
    """A moment of a video content: a scene (or a stretch of at most N seconds of one), its
    representative frame's time and its vector (kind 'image', content hash `<video hash>@<idx>`).
    The video's file row holds the pooled vector (the normalised mean of its moments')."""

    __tablename__ = "moments"
    video_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    start_s: Mapped[float] = mapped_column(Float)
    time_s: Mapped[float] = mapped_column(Float)
    end_s: Mapped[float] = mapped_column(Float)
    vector_id: Mapped[int] = mapped_column(ForeignKey("vectors.id"), index=True)


class SignalTextRow(Base):
    """A line of searchable text of a signal's value (OCR): as read, folded for matching, with its
    confidence and box (JSON). Searched through a trigram index: an FTS5 `trigram` table beside it
    on SQLite (`signal_text_fts`, kept in line by triggers), a pg_trgm GIN index on PostgreSQL."""

    __tablename__ = "signal_text"
    __table_args__ = (Index("ix_signal_text_hash", "content_hash", "name"), {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    norm: Mapped[str] = mapped_column(Text)
    conf: Mapped[float] = mapped_column(Float)
    box: Mapped[str] = mapped_column(Text, default="")


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

    path_key: bytes  # os.fsencode(absolute path): any file name, decodable or not
    size: int  # bytes, as stat gave them when the file was read
    mtime_ns: int  # with size, what tells an unchanged file without reading it
    content_hash: str | None = None  # of the bytes read: identical files share one vector
    width: int | None = None  # pixels, upright (after the EXIF orientation)
    height: int | None = None
    taken_at: datetime | None = None  # EXIF capture time (original, else digitised), naive, as the camera wrote it
    vector_id: int | None = None  # the row of the vector index; None for a skipped file
    reason: str | None = None  # why it was skipped (one line, shown by `loupe info --skipped`)


def to_blob(vec: np.ndarray) -> bytes:
    return np.ascontiguousarray(vec, dtype=np.float32).tobytes()


class Catalog(CatalogReads):
    """Session-scoped access to the catalog tables; each public write is one transaction.

    The reads a search makes are `CatalogReads`' (shared with the sqlite3 reader of a cold search),
    run here through SQLAlchemy's `text()`; the rest are written with the ORM below.
    """

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
            self._open_schema()
        except OperationalError as exc:
            raise LoupeError(f"cannot open catalog {url}: {exc.orig}") from None

    # ---- schema version -------------------------------------------------------------------
    def _open_schema(self) -> None:
        """Create a new catalog, migrate an older one, refuse one newer than this code."""
        with self.engine.connect() as conn:
            version = _stored_version(conn)
        if version is not None and version > SCHEMA_VERSION:
            raise LoupeError(
                f"catalog {self.url} has schema version {version}, newer than this loupe knows ({SCHEMA_VERSION}): "
                "upgrade loupe, or use another --home/--db"
            )
        if version is not None and version < SCHEMA_VERSION:
            self._migrate()
        Base.metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            self.text_index = _create_text_index(conn)
        if version is None:  # tables made before any model was bound may predate the current layout
            with self.engine.begin() as conn:
                _create_v2_objects(conn)

    def _migrate(self) -> None:
        """Bring an older catalog to SCHEMA_VERSION in place: every step and the version bump in ONE
        transaction (DDL included), under a write lock, so a failure leaves it exactly as it was."""
        with self.engine.connect() as conn:
            if self.engine.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # pysqlite would not open a transaction for DDL
            elif self.engine.dialect.name == "postgresql":
                conn.execute(text("LOCK TABLE meta IN EXCLUSIVE MODE"))
            version = _stored_version(conn)  # again under the lock: another process may have migrated it
            while version is not None and version < SCHEMA_VERSION:
                if version not in MIGRATIONS:
                    raise LoupeError(f"catalog {self.url} has schema version {version}, which this loupe cannot migrate")
                MIGRATIONS[version](conn)
                version += 1
                conn.execute(update(Meta).where(Meta.id == 1).values(schema_version=version))
            conn.commit()

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def refresh_statistics(self, drift: float = 0.25) -> bool:
        """SQLite: run ANALYZE when `images` or `moments` has grown or shrunk by more than `drift`
        since the statistics were taken (or never had any); whether it ran. PostgreSQL keeps its own.

        Without statistics SQLite's planner takes every equality on an indexed column for selective,
        `images.status = 'ok'` (true of nearly every row) included: looking the moments of 60 vector ids
        up scanned all 100k images (14 ms a query instead of 0.04 ms). ANALYZE took 37 ms at 100k rows."""
        if self.dialect != "sqlite":
            return False
        with self.engine.connect() as conn:
            counts = dict(conn.execute(text(COUNT_PLANNED_TABLES)).all())
            known = dict(conn.execute(text(SQLITE_STATS)).all()) if conn.execute(text(SQLITE_HAS_STATS)).first() else {}
            if all(
                (counts[t] == 0 and t not in known) or (t in known and abs(counts[t] - known[t]) <= drift * max(known[t], 1))
                for t in counts
            ):
                return False
            conn.execute(text("ANALYZE"))
            conn.commit()
        return True

    def _rows(self, sql: str, params: dict) -> list[Sequence]:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).all()

    def _stream(self, sql: str, params: dict) -> Iterator[Sequence]:
        with self.engine.connect() as conn:
            yield from conn.execution_options(yield_per=EXPORT_PAGE).execute(text(sql), params)

    # ---- meta -------------------------------------------------------------------------
    def create_meta(self, **fields) -> Meta:
        with self.session() as s, s.begin():
            m = Meta(id=1, **fields)
            s.add(m)
        return m

    def update_meta(self, **fields) -> None:
        with self.session() as s, s.begin():
            s.execute(update(Meta).where(Meta.id == 1).values(**fields))

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
        videos = select(ImageRow.content_hash).where(ImageRow.vector_id.is_not(None), ImageRow.content_hash.is_not(None))
        s.execute(delete(MomentRow).where(MomentRow.video_hash.not_in(videos)))  # moments of video content no file holds
        used_img = select(ImageRow.vector_id).where(ImageRow.vector_id.is_not(None))
        used_mom = select(MomentRow.vector_id)
        used_txt = select(CaptionRow.vector_id)
        res = s.execute(
            delete(Vector).where(
                ((Vector.kind == IMAGE) & Vector.id.not_in(used_img) & Vector.id.not_in(used_mom))
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

    def has_images(self, folder_key: bytes) -> bool:
        """Whether any file under `folder_key` is catalogued (whatever its status)."""
        lo, hi = prefix_bounds(folder_key)
        with self.session() as s:
            return s.scalar(select(ImageRow.id).where(ImageRow.path_key >= lo, ImageRow.path_key < hi).limit(1)) is not None

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

    def write_video(
        self, record: ImageRecord, moments: Sequence[tuple[float, float, float]], vectors: np.ndarray, pooled: np.ndarray,
        known: dict[str, int],
    ) -> None:
        """A video file with every one of its moments, in ONE transaction: the moment vectors and
        rows, the pooled vector and the file row (a video is indexed only with all its moments)."""
        h = record.content_hash
        with self.session() as s, s.begin():
            ids = self._insert_vectors(s, IMAGE, [(f"{h}@{n}", v) for n, v in enumerate(vectors)] + [(h, pooled)])
            s.execute(delete(MomentRow).where(MomentRow.video_hash == h))  # a redone video: the new moments only
            s.add_all(
                MomentRow(video_hash=h, idx=n, start_s=float(a), time_s=float(t), end_s=float(b), vector_id=ids[f"{h}@{n}"])
                for n, (a, t, b) in enumerate(moments)
            )
            values = dict(
                path_key=record.path_key, path=display_path(record.path_key), size=record.size, mtime_ns=record.mtime_ns,
                content_hash=h, width=record.width, height=record.height, taken_at=record.taken_at, vector_id=ids[h],
                status=OK, reason=None, indexed_at=utcnow(),
            )
            _insert_or(s, ImageRow.__table__, [values], ["path_key"], update=True)
            self._bump(s)
        known[h] = ids[h]

    def video_stats(self) -> dict:
        """Visible videos, their moments, and their hours (each video's last moment end)."""
        with self.session() as s:
            visible = select(ImageRow.content_hash).where(ImageRow.status == OK)
            ends = (
                select(MomentRow.video_hash, func.max(MomentRow.end_s).label("end"), func.count().label("n"))
                .where(MomentRow.video_hash.in_(visible))
                .group_by(MomentRow.video_hash)
                .subquery()
            )
            files = s.execute(
                select(func.count(), func.coalesce(func.sum(ends.c.end), 0.0))
                .select_from(ImageRow)
                .join(ends, ends.c.video_hash == ImageRow.content_hash)
                .where(ImageRow.status == OK)
            ).one()
            moments = s.scalar(select(func.coalesce(func.sum(ends.c.n), 0))) or 0
        return {"videos": int(files[0]), "moments": int(moments), "video_hours": round(float(files[1]) / 3600.0, 4)}

    def touch_images(self, updates: Sequence[tuple[int, int, int]]) -> None:
        """Record a new (size, mtime) for files whose content did not change."""
        if not updates:
            return
        with self.session() as s, s.begin():
            for row_id, size, mtime_ns in updates:
                s.execute(update(ImageRow).where(ImageRow.id == row_id).values(size=size, mtime_ns=mtime_ns))

    def mark_missing(self, row_ids: Sequence[int], drop_moved: bool = True) -> tuple[int, int]:
        """Files a walk did not find: keep them as 'missing' (hash and vector kept, hidden from results).

        With `drop_moved`, a file whose content a visible file holds (a move or rename: nothing to
        lose) is dropped instead. Returns (newly missing, dropped); one transaction.
        """
        if not row_ids:
            return 0, 0
        chunks = [list(row_ids[start : start + 5000]) for start in range(0, len(row_ids), 5000)]
        dropped = 0
        with self.session() as s, s.begin():
            fresh: list[int] = []
            for part in chunks:
                fresh += s.scalars(select(ImageRow.id).where(ImageRow.id.in_(part), ImageRow.status != MISSING)).all()
                s.execute(update(ImageRow).where(ImageRow.id.in_(part)).values(status=MISSING))
            if drop_moved:  # after the update, so the rows marked here do not count as visible copies
                visible = select(ImageRow.content_hash).where(ImageRow.status == OK)
                for part in chunks:
                    q = delete(ImageRow).where(ImageRow.id.in_(part), ImageRow.content_hash.in_(visible))
                    dropped += s.execute(q).rowcount or 0
            newly = 0
            for start in range(0, len(fresh), 5000):
                part = fresh[start : start + 5000]
                newly += s.scalar(select(func.count()).select_from(ImageRow).where(ImageRow.id.in_(part))) or 0
            if fresh or dropped:
                self._bump(s)
        return newly, dropped

    def restore_images(self, row_ids: Sequence[int]) -> int:
        """Missing files found again unchanged: visible again (or skipped, as before), no embedding.
        Returns how many are visible again."""
        visible = 0
        with self.session() as s, s.begin():
            for start in range(0, len(row_ids), 5000):
                part = list(row_ids[start : start + 5000])
                s.execute(
                    update(ImageRow)
                    .where(ImageRow.id.in_(part), ImageRow.status == MISSING)
                    .values(status=case((ImageRow.vector_id.is_(None), SKIPPED), else_=OK))
                )
                visible += s.scalar(select(func.count()).select_from(ImageRow).where(ImageRow.id.in_(part), ImageRow.status == OK)) or 0
            self._bump(s)
        return visible

    def missing_ids(self, folder_key: bytes) -> list[int]:
        """Rows of the missing files under `folder_key`."""
        lo, hi = prefix_bounds(folder_key)
        with self.session() as s:
            return list(
                s.scalars(select(ImageRow.id).where(ImageRow.path_key >= lo, ImageRow.path_key < hi, ImageRow.status == MISSING))
            )

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

    # ---- indexed folders ----------------------------------------------------------------
    def record_root(self, path_key: bytes, files: int, offline: str | None = None) -> None:
        """Remember a folder given to `loupe index` and what this run found there."""
        now = utcnow()
        with self.session() as s, s.begin():
            root = s.scalar(select(RootRow).where(RootRow.path_key == path_key))
            if root is None:
                root = RootRow(path_key=path_key, path=display_path(path_key), files=0)
                s.add(root)
            if offline is None:
                root.files, root.scanned_at, root.offline, root.offline_since = files, now, None, None
            else:
                root.offline_since = root.offline_since if root.offline else now
                root.offline = offline

    def roots(self) -> list[RootRow]:
        with self.session() as s:
            return list(s.scalars(select(RootRow).order_by(RootRow.path)))

    def forget_roots(self, path_key: bytes) -> None:
        """Forget the folder `path_key` and any recorded folder under it (`loupe remove`)."""
        lo, hi = prefix_bounds(path_key)
        with self.session() as s, s.begin():
            s.execute(delete(RootRow).where((RootRow.path_key == path_key) | ((RootRow.path_key >= lo) & (RootRow.path_key < hi))))

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
            "images_missing": by_status.get(MISSING, 0),
            "skip_reasons": [(r, n) for r, n in reasons],
            "image_vectors": vec.get(IMAGE, 0),
            "text_vectors": vec.get(TEXT, 0),
            "captions": captions,
            "caption_sources": [(src, n) for src, n in sources],
            "indexed_bytes": int(total_bytes),
            **self.video_stats(),
        }

    # ---- per-photo signals ------------------------------------------------------------
    def write_signals(self, results: Sequence) -> None:
        """Store signal outcomes (`loupe.indexer.signals.base.SignalResult`s) in one transaction;
        the other versions of the same signal for the same content are dropped."""
        if not results:
            return
        rows = {(r.content_hash, r.name): r for r in results}  # one outcome per content and signal
        with self.session() as s, s.begin():
            for (h, name), r in rows.items():
                s.execute(delete(SignalRow).where(SignalRow.content_hash == h, SignalRow.name == name, SignalRow.version != r.version))
            values = [dict(content_hash=h, name=n, version=r.version, value=r.value, reason=r.reason) for (h, n), r in rows.items()]
            _insert_or(s, SignalRow.__table__, values, ["content_hash", "name", "version"], update=True)
            self._write_text(s, rows)

    def _write_text(self, s: Session, rows: dict) -> None:
        """A signal's text lines replace that content's previous ones (a failure keeps none)."""
        for h, n in rows:
            s.execute(delete(SignalTextRow).where(SignalTextRow.content_hash == h, SignalTextRow.name == n))
        lines = [dict(content_hash=h, name=n, text=x.text, norm=x.norm, conf=x.conf, box=x.box) for (h, n), r in rows.items() for x in r.lines]
        if lines:
            s.execute(SignalTextRow.__table__.insert(), lines)

    def signal_backlog(self, versions: dict[str, int], folder_key: bytes | None = None) -> list[tuple[str, bytes, tuple[str, ...]]]:
        """Indexed contents (visible files under `folder_key` if given) that lack an outcome of a
        signal at its current version: [(content hash, a path_key holding it, signal names)]."""
        todo: dict[str, tuple[bytes, list[str]]] = {}
        with self.session() as s:
            for name, version in versions.items():
                done = select(SignalRow.content_hash).where(
                    SignalRow.name == name, SignalRow.version == version, SignalRow.content_hash == ImageRow.content_hash
                )
                q = (  # every file holding such a content; the first path of each content is read (no min() of
                    # bytes: PostgreSQL has none for bytea)
                    select(ImageRow.content_hash, ImageRow.path_key)
                    .where(ImageRow.status == OK, ImageRow.content_hash.is_not(None), ~done.exists())
                    .where(~select(MomentRow.idx).where(MomentRow.video_hash == ImageRow.content_hash).exists())  # photos only
                    .order_by(ImageRow.content_hash, ImageRow.path_key)
                )
                if folder_key is not None:
                    lo, hi = prefix_bounds(folder_key)
                    q = q.where(ImageRow.path_key >= lo, ImageRow.path_key < hi)
                seen: set[str] = set()
                for h, key in s.execute(q):
                    if h not in seen:
                        seen.add(h)
                        todo.setdefault(h, (bytes(key), []))[1].append(name)
        return [(h, key, tuple(names)) for h, (key, names) in todo.items()]

    def signal_values(self, name: str, version: int, hashes: Iterable[str] | None = None) -> dict[str, bytes]:
        """Stored values of one signal version (content hash -> stored form); failures left out."""
        q = select(SignalRow.content_hash, SignalRow.value).where(
            SignalRow.name == name, SignalRow.version == version, SignalRow.value.is_not(None)
        )
        wanted = None if hashes is None else list(hashes)
        out: dict[str, bytes] = {}
        with self.session() as s:
            for start in range(0, len(wanted), 500) if wanted is not None else [None]:
                part = q if start is None else q.where(SignalRow.content_hash.in_(wanted[start : start + 500]))
                out.update((h, bytes(v)) for h, v in s.execute(part))
        return out

    def signal_hashes(self, name: str, version: int) -> list[str]:
        """The contents holding a value of one signal version (no values read)."""
        q = select(SignalRow.content_hash).where(SignalRow.name == name, SignalRow.version == version, SignalRow.value.is_not(None))
        with self.session() as s:
            return list(s.scalars(q.order_by(SignalRow.content_hash)))

    def visible_content_hashes(self) -> set[str]:
        """The content hashes of the visible files."""
        with self.session() as s:
            return set(s.scalars(select(ImageRow.content_hash).where(ImageRow.status == OK, ImageRow.content_hash.is_not(None)).distinct()))

    def relocate_image(self, old_key: bytes, new_key: bytes, status: str) -> bool:
        """A file moved by loupe (`loupe duplicates --move-to` and its undo): its row follows, with
        `status` ('missing' once set aside, 'ok' once back); the vector stays. False if no row."""
        if old_key == new_key:
            return False
        with self.session() as s, s.begin():
            if s.scalar(select(ImageRow.id).where(ImageRow.path_key == old_key)) is None:
                return False  # nothing at the old path (e.g. a move that never happened): leave the rest alone
            s.execute(delete(ImageRow).where(ImageRow.path_key == new_key))  # a stale row where the file lands
            n = s.execute(
                update(ImageRow).where(ImageRow.path_key == old_key).values(path_key=new_key, path=display_path(new_key), status=status)
            ).rowcount
            if n:
                self._bump(s)
        return bool(n)

    def signal_coverage(self, versions: dict[str, int]) -> dict[str, dict[str, int]]:
        """Per signal: its version, the indexed contents (visible files), how many have its value, how many failed."""
        out = {}
        with self.session() as s:
            contents = select(ImageRow.content_hash).where(ImageRow.status == OK)
            total = s.scalar(select(func.count(func.distinct(ImageRow.content_hash))).where(ImageRow.status == OK)) or 0
            for name, version in versions.items():
                counts = dict(
                    s.execute(
                        select(SignalRow.value.is_(None), func.count())
                        .where(SignalRow.name == name, SignalRow.version == version, SignalRow.content_hash.in_(contents))
                        .group_by(SignalRow.value.is_(None))
                    ).all()
                )
                out[name] = {"version": version, "photos": total, "done": counts.get(False, 0), "failed": counts.get(True, 0)}
        return out



def _stored_version(conn: Connection) -> int | None:
    """The catalog's recorded schema version; None for a new catalog (no model bound yet)."""
    if not inspect(conn).has_table("meta"):
        return None
    return conn.execute(select(Meta.schema_version).where(Meta.id == 1)).scalar()


def _create_v2_objects(conn: Connection) -> None:
    RootRow.__table__.create(conn, checkfirst=True)
    next(i for i in ImageRow.__table__.indexes if i.name == "ix_images_status_vector").create(conn, checkfirst=True)


def _v1_to_v2(conn: Connection) -> None:
    """Version 2: files not found are kept as 'missing' (no column change: status is free text),
    indexed folders are recorded in `roots`, and (status, vector_id) is indexed for visible vectors."""
    _create_v2_objects(conn)


def _v2_to_v3(conn: Connection) -> None:
    """Version 3: per-photo signal values in `signals` (a new table; nothing else changes)."""
    SignalRow.__table__.create(conn, checkfirst=True)


def _v3_to_v4(conn: Connection) -> None:
    """Version 4: video moments in `moments` (a new table; a video's file row holds its pooled vector)."""
    MomentRow.__table__.create(conn, checkfirst=True)


def _v4_to_v5(conn: Connection) -> None:
    """Version 5: text found in photos (OCR) in `signal_text`, with its trigram index."""
    SignalTextRow.__table__.create(conn, checkfirst=True)
    _create_text_index(conn)


def _create_text_index(conn: Connection) -> str | None:
    """The trigram index of `signal_text` (idempotent): 'fts5' (SQLite >= 3.34), 'pg_trgm', or None
    (then text queries scan `signal_text` with LIKE: slower, same answers)."""
    if not inspect(conn).has_table("signal_text"):
        return None
    dialect = conn.dialect.name
    if dialect == "sqlite":
        if not _sqlite_trigram():  # SQLite older than 3.34
            return None
        conn.exec_driver_sql(
            "CREATE VIRTUAL TABLE IF NOT EXISTS signal_text_fts USING fts5("
            "norm, content='signal_text', content_rowid='id', tokenize='trigram')"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER IF NOT EXISTS signal_text_ai AFTER INSERT ON signal_text BEGIN "
            "INSERT INTO signal_text_fts(rowid, norm) VALUES (new.id, new.norm); END"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER IF NOT EXISTS signal_text_ad AFTER DELETE ON signal_text BEGIN "
            "INSERT INTO signal_text_fts(signal_text_fts, rowid, norm) VALUES ('delete', old.id, old.norm); END"
        )
        return "fts5"
    if dialect == "postgresql":
        try:
            with conn.begin_nested():
                conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
                conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_signal_text_trgm ON signal_text USING gin (norm gin_trgm_ops)")
        except SQLAlchemyError:  # no right to create the extension: LIKE scans
            return None
        return "pg_trgm"
    return None


def _sqlite_trigram() -> bool:
    """Whether this process's SQLite has FTS5 with the trigram tokenizer."""
    import sqlite3

    try:
        sqlite3.connect(":memory:").execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize='trigram')")
        return True
    except sqlite3.OperationalError:
        return False


MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4, 4: _v4_to_v5}  # version -> step to version + 1


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
