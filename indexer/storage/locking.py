"""One writer at a time per index: a lock file beside a SQLite catalog, an advisory lock on PostgreSQL.

Every command that writes the catalog or the vector files holds the writer lock for its whole
run; a second writer waits for it (saying so once on stderr) or, asked not to wait, fails with
a one-line error. Readers (searches, the server) never take it: SQLite's WAL and PostgreSQL's
MVCC let them read while a writer commits. The lock is reentrant within a thread, so the CLI can
hold it around library calls that take it too. It dies with its process (flock and a
PostgreSQL session lock are released by the kernel / server), so a killed run never leaves a
stale lock behind.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

from loupe.indexer.errors import LoupeError
from loupe.indexer.storage.locations import Location

if TYPE_CHECKING:
    from loupe.indexer.storage.store import Store

PG_LOCK_KEY = (0x6C6F7570, 0x77726974)  # 'loup', 'writ': one writer per PostgreSQL database
POLL_SECONDS = 0.2
T = TypeVar("T")

_held = threading.local()  # lock identity -> depth, per thread


def lock_file(location: Location) -> Path:
    """The lock file of an index whose catalog is not on PostgreSQL: beside its vector files."""
    return location.vector_dir / f"{location.prefix}writer.lock"


def _print_wait(message: str) -> None:
    print(f"loupe: {message}", file=sys.stderr, flush=True)


@contextmanager
def writer_lock(
    store: "Store", wait: bool = True, on_wait: Callable[[str], None] | None = _print_wait
) -> Iterator[None]:
    """Hold the index's writer lock for the block.

    `wait=False` raises LoupeError at once if another process (or thread) holds it; otherwise
    `on_wait` gets one line saying who is being waited for, and the call blocks until the
    holder finishes (Ctrl-C still works while waiting).
    """
    postgres = store.catalog.engine.dialect.name == "postgresql"
    ident = store.location.url if postgres else str(lock_file(store.location))
    depth = getattr(_held, "locks", None)
    if depth is None:
        depth = _held.locks = {}
    if depth.get(ident):
        depth[ident] += 1
        try:
            yield
        finally:
            depth[ident] -= 1
        return
    release = _lock_postgres(store, wait, on_wait) if postgres else _lock_file(lock_file(store.location), wait, on_wait)
    depth[ident] = 1
    try:
        yield
    finally:
        depth.pop(ident, None)
        release()


def holds_writer_lock(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a library function whose first argument is a Store: it runs holding the writer lock."""

    @functools.wraps(fn)
    def locked(store: "Store", *args, **kwargs) -> T:
        with writer_lock(store):
            return fn(store, *args, **kwargs)

    return locked


def _busy(holder: str, wait: bool, on_wait: Callable[[str], None] | None) -> None:
    who = f" ({holder})" if holder else ""
    if not wait:
        raise LoupeError(f"another loupe process{who} is writing this index; try again when it is done")
    if on_wait is not None:
        on_wait(f"waiting for another loupe process{who} writing this index...")


def _lock_file(path: Path, wait: bool, on_wait) -> Callable[[], None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _busy(_pid_in(fd), wait, on_wait)
            fcntl.flock(fd, fcntl.LOCK_EX)  # interruptible: Ctrl-C raises here
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # who holds it, for the next one's message
    except BaseException:
        os.close(fd)
        raise

    def release() -> None:
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # drops the lock; the file stays (unlinking it would race the next locker)

    return release


def _pid_in(fd: int) -> str:
    try:
        pid = int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return ""
    return f"pid {pid}"


def _lock_postgres(store: "Store", wait: bool, on_wait) -> Callable[[], None]:
    """A session-level advisory lock on a connection of its own, outside any transaction."""
    from sqlalchemy import text

    conn = store.catalog.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        conn.execute(text("SELECT set_config('application_name', :name, false)"), {"name": f"loupe writer pid {os.getpid()}"})
        k1, k2 = PG_LOCK_KEY
        try_lock = text("SELECT pg_try_advisory_lock(:k1, :k2)")
        if not conn.execute(try_lock, {"k1": k1, "k2": k2}).scalar():
            holder = conn.execute(
                text(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.classid = :k1 AND l.objid = :k2 AND l.objsubid = 2 "
                    "AND l.granted AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
                {"k1": k1, "k2": k2},
            ).scalar()
            prefix = "loupe writer "
            _busy(holder[len(prefix):] if holder and holder.startswith(prefix) else "", wait, on_wait)
            while not conn.execute(try_lock, {"k1": k1, "k2": k2}).scalar():
                time.sleep(POLL_SECONDS)  # polled, so Ctrl-C is never stuck inside the driver
    except BaseException:
        conn.invalidate()  # never hand a connection that may hold the lock back to the pool
        conn.close()
        raise

    def release() -> None:
        try:
            conn.execute(text("SELECT pg_advisory_unlock(:k1, :k2)"), {"k1": k1, "k2": k2})
        finally:
            conn.invalidate()
            conn.close()

    return release
