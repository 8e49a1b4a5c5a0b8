"""Interruptions, kills and concurrent writers: nothing lost, nothing stored wrong.

Interrupts are raised at exact points of a batch commit (in process), real `loupe index`
processes are killed with SIGINT (once or twice) and SIGKILL at random moments, and two
writers run at once on one index (SQLite lock file; PostgreSQL advisory lock when a server
can be started, see test_postgres.py).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import event, update
from sqlalchemy.orm import Session

from loupe.indexer.storage.catalog import IMAGE, Catalog, ImageRecord, ImageRow
from loupe.indexer.storage.critical import critical_section
from loupe.indexer.errors import LoupeError
from loupe.indexer.storage.locking import writer_lock
from loupe.indexer.pipeline.indexing import index_folder
from loupe.indexer.storage.check import check_store
from loupe.indexer.storage.store import Store
from tests.conftest import REPO
from tests.test_postgres import pg_url  # noqa: F401  (fixture: a throwaway PostgreSQL cluster)


def _rows(store: Store) -> list[ImageRow]:
    return list(store.catalog.iter_image_rows())


def _assert_all_indexed_once(store: Store, folder: Path) -> None:
    rows = _rows(store)
    on_disk = sorted(str(p) for p in folder.rglob("*.jpg"))
    assert sorted(r.path for r in rows) == on_disk  # one row per file
    bad = [(os.path.basename(r.path), r.status, r.reason) for r in rows if r.status != "ok" or r.vector_id is None]
    assert not bad, f"spurious skips: {bad}"
    distinct = {r.content_hash for r in rows}
    assert len(store.catalog.vector_ids(IMAGE)) == len(distinct)
    assert check_store(store).ok


@pytest.fixture
def dup_dir(photo_dir) -> Path:
    """12 photos plus 3 copies (copies take the reuse / waiting path of the pipeline)."""
    names = sorted(p.name for p in photo_dir.iterdir())
    for n in (1, 5, 9):
        shutil.copy2(photo_dir / names[n], photo_dir / f"zz-copy-{n}.jpg")
    return photo_dir


class _Interrupt:
    """Raise KeyboardInterrupt at `point` of the `nth` catalog commit that stores new vectors."""

    def __init__(self, monkeypatch, point: str, nth: int) -> None:
        self.point, self.nth, self.calls, self.armed, self.fired = point, nth, 0, False, False
        original = Catalog.write_images

        def write_images(catalog, records, new_vectors, known):
            if new_vectors and not self.fired:
                self.calls += 1
                if self.calls == self.nth:
                    if point == "before_transaction":
                        self.fired = True
                        raise KeyboardInterrupt
                    self.armed = True
            try:
                return original(catalog, records, new_vectors, known)
            finally:
                self.armed = False

        monkeypatch.setattr(Catalog, "write_images", write_images)
        event.listen(Session, point if point != "before_transaction" else "after_commit", self._hook)

    def _hook(self, session) -> None:
        if self.armed and not self.fired:
            self.fired = True
            raise KeyboardInterrupt

    def remove(self) -> None:
        event.remove(Session, self.point if self.point != "before_transaction" else "after_commit", self._hook)


@pytest.mark.parametrize("point", ["before_transaction", "before_commit", "after_commit"])
def test_interrupt_at_each_point_of_a_commit_stores_no_skips(tmp_path, tiny_encoder, dup_dir, monkeypatch, point):
    store = Store.open(home=tmp_path / "home")
    hook = _Interrupt(monkeypatch, point, nth=3)
    try:
        r1 = index_folder(store, tiny_encoder, dup_dir, batch_size=2, workers=1)
    finally:
        hook.remove()
        monkeypatch.undo()
    assert hook.fired and r1.interrupted
    rows = _rows(store)
    assert rows and all(r.status == "ok" and r.vector_id is not None for r in rows), [
        (os.path.basename(r.path), r.reason) for r in rows if r.status != "ok"
    ]
    assert check_store(store).ok  # usable as it stands
    committed = {r.content_hash for r in rows}
    r2 = index_folder(store, tiny_encoder, dup_dir, batch_size=2, workers=1)
    assert not r2.interrupted and r2.skipped == 0
    _assert_all_indexed_once(store, dup_dir)
    distinct = {r.content_hash for r in _rows(store)}
    assert r2.embedded == len(distinct - committed)  # only what was never committed is redone


def test_row_without_vector_and_real_reason_is_retried(store, tiny_encoder, photo_dir):
    """A legacy 'no vector' row (written by the old interrupt path) is redone despite same size+mtime."""
    index_folder(store, tiny_encoder, photo_dir)
    victim = sorted(str(p) for p in photo_dir.iterdir())[4]
    with store.catalog.session() as s, s.begin():
        s.execute(update(ImageRow).where(ImageRow.path == victim).values(vector_id=None, status="skipped", reason="no vector"))
    store.catalog.collect_garbage()
    r = index_folder(store, tiny_encoder, photo_dir)
    assert (r.embedded, r.skipped) == (1, 0)
    _assert_all_indexed_once(store, photo_dir)


def test_write_images_never_stores_a_row_without_vector_or_reason(store, tiny_encoder, photo_dir):
    index_folder(store, tiny_encoder, photo_dir)
    rec = ImageRecord(path_key=os.fsencode(photo_dir / "new.jpg"), size=1, mtime_ns=1, content_hash="f" * 32)
    store.catalog.write_images([rec], [], {})  # its vector is in neither the catalog nor the batch
    assert store.catalog.image_id(rec.path_key) is None
    bad = ImageRecord(path_key=os.fsencode(photo_dir / "bad.jpg"), size=1, mtime_ns=1, reason="not an image")
    store.catalog.write_images([bad], [], {})  # a real failure is kept, with its reason
    assert [(r.status, r.reason) for r in _rows(store) if r.path.endswith("bad.jpg")] == [("skipped", "not an image")]


def _race_two_writers(url_home: dict, tiny_encoder, photo_dir) -> None:
    """Two catalogs on one index write the same new vector and file without any lock: no crash."""
    a, b = Store.open(**url_home), Store.open(**url_home)
    index_folder(a, tiny_encoder, photo_dir)
    known_b = b.catalog.hash_to_vector(IMAGE)  # b's view, before a writes
    first = sorted(photo_dir.iterdir())[0]
    key = os.fsencode(first.parent / "new.jpg")
    vec = tiny_encoder.encode_images(__import__("torch").zeros(1, 3, tiny_encoder.image_size, tiny_encoder.image_size))[0]
    rec = ImageRecord(path_key=key, size=10, mtime_ns=1, content_hash="e" * 32)
    known_a = a.catalog.hash_to_vector(IMAGE)
    a.catalog.write_images([rec], [("e" * 32, vec)], known_a)
    rec2 = ImageRecord(path_key=key, size=11, mtime_ns=2, content_hash="e" * 32)
    b.catalog.write_images([rec2], [("e" * 32, vec)], known_b)  # inserted meanwhile: update / reuse
    rows = [r for r in _rows(a) if r.path_key == key]
    assert [(r.size, r.vector_id) for r in rows] == [(11, known_a["e" * 32])]
    assert known_b["e" * 32] == known_a["e" * 32]


def test_inserts_are_upserts_sqlite(tmp_path, tiny_encoder, photo_dir):
    _race_two_writers(dict(home=tmp_path / "home"), tiny_encoder, photo_dir)


def test_inserts_are_upserts_without_on_conflict(tmp_path, tiny_encoder, photo_dir, monkeypatch):
    """Catalogs whose dialect has no ON CONFLICT take the savepoint path (run here on SQLite)."""
    from sqlalchemy.dialects.sqlite.base import SQLiteDialect

    monkeypatch.setattr(SQLiteDialect, "name", "other")
    _race_two_writers(dict(home=tmp_path / "home"), tiny_encoder, photo_dir)


def test_inserts_are_upserts_postgres(pg_url, tmp_path, tiny_encoder, photo_dir):  # noqa: F811
    _race_two_writers(dict(home=tmp_path / "home", db=pg_url), tiny_encoder, photo_dir)


# ---- the critical section ----------------------------------------------------------------------


def test_critical_section_defers_sigint_and_sigterm():
    previous = signal.getsignal(signal.SIGTERM)
    previous_int = signal.getsignal(signal.SIGINT)
    # a test run started in the background by a shell without job control starts with SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    seen = []
    signal.signal(signal.SIGTERM, lambda *_: seen.append("term"))
    try:
        with pytest.raises(KeyboardInterrupt):
            with critical_section():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)  # pressed twice
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                with critical_section():  # nesting is fine
                    pass
                done = True  # reached: nothing was raised inside
        assert done and seen == ["term"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # off the main thread it is a no-op (signal handlers can only be set there)
        errors = []

        def worker():
            try:
                with critical_section():
                    pass
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert not errors
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


# ---- real processes ----------------------------------------------------------------------------


def _db_counts(home: Path) -> tuple[int, int]:
    """(rows, skipped rows) of a SQLite catalog, read as any other process would."""
    try:
        with sqlite3.connect(f"file:{home / 'catalog.db'}?mode=ro", uri=True, timeout=5) as con:
            n = con.execute("select count(*) from images").fetchone()[0]
            skipped = con.execute("select count(*) from images where status != 'ok' or vector_id is null").fetchone()[0]
            return n, skipped
    except sqlite3.Error:
        return 0, 0


def test_kill_loop_then_every_photo_indexed_once(loupe, tiny_checkpoint, flickr_images, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in sorted(flickr_images.iterdir())[:40]:
        shutil.copy2(src, folder / src.name)
    rng = random.Random(9)
    log = []
    for how in ["int-int", "kill", "int", "kill", "int-int"]:
        before, _ = _db_counts(loupe.home)
        if before >= 40:
            break
        proc = loupe.popen("index", folder, "--checkpoint", tiny_checkpoint, "--batch-size", "2", "--workers", "1")
        target = before + rng.randint(1, 8)  # a random moment, in commits: independent of the machine's speed
        deadline = time.time() + 120
        while _db_counts(loupe.home)[0] < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        try:
            if how == "kill":
                proc.send_signal(signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGINT)
                if how == "int-int":
                    time.sleep(rng.uniform(0.0, 0.05))
                    proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            pass
        _, stderr = proc.communicate(timeout=60)
        rows, skipped = _db_counts(loupe.home)
        log.append((how, proc.returncode, before, rows))
        assert "Traceback" not in stderr, stderr[-2000:]
        finished = rows == 40  # a signal that lands after the last commit may meet the interpreter's teardown
        allowed = (0, 130, -signal.SIGKILL) + ((-signal.SIGINT,) if finished else ())
        assert proc.returncode in allowed, (how, proc.returncode, stderr[-500:])
        assert skipped == 0, f"run {len(log)} ({how}) stored {skipped} rows without a vector: {log}"
    print("kill loop (signal, exit, rows before, rows after):", log)
    assert any(before < rows < 40 for _, _, before, rows in log), f"no run was stopped mid-way: {log}"
    out = loupe("index", folder, "--json").stdout
    assert '"skipped": 0' in out
    store = Store.open(home=loupe.home)
    _assert_all_indexed_once(store, folder)
    assert len(_rows(store)) == 40
    assert loupe("check").returncode == 0


def _popen(loupe, err, *args) -> subprocess.Popen:
    """A `loupe` process whose stderr goes to a file (read while it runs)."""
    return subprocess.Popen(
        [sys.executable, "-m", "loupe", *map(str, args)], cwd=REPO, env=loupe.env(),
        stdout=subprocess.DEVNULL, stderr=err, text=True,
    )


def _wait_for(predicate, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_concurrent_writers_wait_and_both_succeed(loupe, tiny_checkpoint, flickr_images, tmp_path):
    folders = [tmp_path / "one", tmp_path / "two"]
    images = sorted(flickr_images.iterdir())
    for n, folder in enumerate(folders):
        folder.mkdir()
        for src in images[n * 6 : n * 6 + 10]:  # 4 photos in both: the same vectors, written twice
            shutil.copy2(src, folder / src.name)
    store = Store.open(home=loupe.home)
    logs = [tmp_path / "a.err", tmp_path / "b.err"]
    with writer_lock(store):  # another writer holds the index: both runs must wait for it, then for each other
        procs = []
        for folder, log in zip(folders, logs):
            with open(log, "w") as err:
                procs.append(_popen(loupe, err, "index", folder, "--checkpoint", tiny_checkpoint, "--batch-size", "2"))
        _wait_for(lambda: all("waiting for another loupe process" in log.read_text() for log in logs))
        assert all(p.poll() is None for p in procs)
        busy = loupe("index", folders[0], "--no-wait", ok=False)
        assert busy.returncode != 0
        lines = busy.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("loupe: error:") and f"pid {os.getpid()}" in lines[0], busy.stderr
    for p, log in zip(procs, logs):
        assert p.wait(timeout=120) == 0, log.read_text()[-2000:]
        assert f"(pid {os.getpid()})" in log.read_text()
    store = Store.open(home=loupe.home)
    for folder in folders:
        assert len([r for r in _rows(store) if r.path.startswith(str(folder) + os.sep)]) == 10
    assert all(r.status == "ok" for r in _rows(store))
    assert len(store.catalog.vector_ids(IMAGE)) == 16
    assert loupe("check").returncode == 0


def test_search_does_not_wait_for_a_writer(loupe, tiny_encoder, tiny_checkpoint, photo_dir):
    store = Store.open(home=loupe.home)
    index_folder(store, tiny_encoder, photo_dir)
    with writer_lock(store):
        t = time.time()
        out = loupe("search", "a dog", "-k", "3", "--json", timeout=60)
        assert len(out.stdout.splitlines()) == 3 and time.time() - t < 60
        assert "waiting" not in out.stderr
        assert "writing this index" in _in_thread(lambda: writer_lock(Store.open(home=loupe.home), wait=False))


def _in_thread(make_lock) -> str:
    """Take a writer lock in another thread (the lock is reentrant per thread); '' or the error."""
    out = []

    def run():
        try:
            with make_lock():
                out.append("")
        except LoupeError as exc:
            out.append(str(exc))

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=30)
    return out[0]


def test_postgres_advisory_lock(pg_url, tmp_path, tiny_encoder, photo_dir):  # noqa: F811
    a = Store.open(home=tmp_path / "home", db=pg_url)
    index_folder(a, tiny_encoder, photo_dir)
    b = Store.open(home=tmp_path / "home2", db=pg_url)
    messages = []
    with writer_lock(a):
        with writer_lock(a):  # reentrant in the thread that holds it
            pass
        assert f"pid {os.getpid()}" in _in_thread(lambda: writer_lock(b, wait=False))
        got = threading.Event()

        def second():
            with writer_lock(b, on_wait=messages.append):
                got.set()

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.5)
        assert not got.is_set() and messages  # waits, with one message
    t.join(timeout=30)
    assert got.is_set()
    assert _in_thread(lambda: writer_lock(b, wait=False)) == ""  # released with the holder


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["info"], 1)])
def test_signals_during_shutdown_are_unheard(tmp_path, args, code):
    """A finished command exits silently with its own code when SIGINT and SIGTERM (twice each)
    arrive while the interpreter shuts down: sent by an exit handler, which runs after `run()`."""
    script = (
        "import atexit, os, signal, sys, weakref\n"
        "def late():\n"
        "    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGTERM):\n"
        "        os.kill(os.getpid(), sig)\n"
        "        weakref.WeakValueDictionary()  # some Python code for the handlers to run in\n"
        "atexit.register(late)\n"
        "from loupe.cli.main import run\n"
        f"sys.argv = ['loupe', *{args!r}, *(['--home', {str(tmp_path)!r}] if {args!r} != ['--help'] else [])]\n"
        "run()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-2000:]
