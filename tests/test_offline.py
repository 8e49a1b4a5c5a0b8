"""Drives that go away: files not found are kept as missing and hidden, never dropped with their
vectors; an indexed folder that vanishes or looks empty is offline; the catalog's schema version
is checked and migrated; vectors deleted under a long-lived reader are never scored."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, inspect, select, text

from loupe.indexer.storage import catalog as catalog_module
from loupe.indexer.storage.catalog import IMAGE, ImageRecord, ImageRow, Vector
from loupe.indexer.errors import LoupeError
from loupe.indexer.pipeline.indexing import index_folder
from loupe.indexer.pipeline.removal import remove_items
from loupe.indexer.storage.check import check_store
from loupe.indexer.storage.store import Store
from loupe.retrieval.engine.query import Term
from loupe.retrieval.engine.search import Filters, Searcher

N = 10


def copy_photos(flickr_images: Path, folder: Path, start: int, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    out = []
    for src in sorted(flickr_images.iterdir())[start : start + count]:
        shutil.copy2(src, folder / src.name)
        out.append(folder / src.name)
    return out


@pytest.fixture
def drive(tmp_path, flickr_images) -> Path:
    """10 photos in a folder that plays an external drive's mount point."""
    folder = tmp_path / "mnt" / "drive"
    copy_photos(flickr_images, folder, 0, N)
    return folder


@pytest.fixture
def pics(tmp_path, flickr_images, drive) -> Path:
    """A second indexed folder that stays online: 2 other photos and a copy of the drive's first."""
    folder = tmp_path / "pics"
    copy_photos(flickr_images, folder, 40, 2)
    shutil.copy2(sorted(drive.iterdir())[0], folder / "copy-of-first.jpg")
    return folder


def rows(store: Store) -> dict[str, str]:
    """Path -> status of every catalogued file."""
    return {r.path: r.status for r in store.catalog.iter_image_rows()}


def stored_vectors(store: Store) -> int:
    with store.catalog.session() as s:
        return s.scalar(select(func.count()).select_from(Vector).where(Vector.kind == IMAGE))


def reopened(store: Store) -> Store:
    """The same index opened afresh (another process's view)."""
    return Store.open(home=store.location.vector_dir)


def shown(store: Store, encoder, filters: Filters | None = None) -> set[str]:
    """Every path a search can show, results and their duplicates lists (a fresh process's view)."""
    searcher = Searcher(reopened(store), encoder)
    hits = searcher.search([Term(1.0, "text", "a photo")], k=100, filters=filters)
    return {p for h in hits for p in (h.fields["path"], *h.fields["duplicates"])}


def paths_under(folder: Path) -> set[str]:
    return {str(p) for p in folder.iterdir()}


# ---- drives that go away ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["emptied", "gone"])
def test_unplugged_drive_loses_nothing_and_comes_back_without_embedding(store, tiny_encoder, drive, pics, tmp_path, how):
    """The issue's measurement: a folder unplugged for one run was re-embedded in full afterwards."""
    assert index_folder(store, tiny_encoder, drive).embedded == N
    assert index_folder(store, tiny_encoder, pics).embedded == 2  # the copy reuses the drive's vector
    everything = shown(store, tiny_encoder)
    assert everything == paths_under(drive) | paths_under(pics)
    before_rows, before_vectors = rows(store), stored_vectors(store)

    away = tmp_path / "unplugged"
    os.rename(drive, away)  # the drive is unplugged...
    if how == "emptied":
        drive.mkdir()  # ...leaving its empty mount point behind
    r = index_folder(store, tiny_encoder, drive)
    assert set(rows(store)) == set(before_rows) and stored_vectors(store) == before_vectors  # nothing deleted
    assert (r.removed, r.embedded, r.missing, r.offline) == (0, 0, N, "empty" if how == "emptied" else "missing")
    assert {p for p, status in rows(store).items() if status == "missing"} == {str(drive / p.name) for p in away.iterdir()}
    assert shown(store, tiny_encoder) == paths_under(pics)  # hidden, duplicates lists included
    assert shown(store, tiny_encoder, Filters(globs=["*.jpg"])) == paths_under(pics)
    assert check_store(reopened(store)).ok
    again = index_folder(store, tiny_encoder, drive, prune=True)  # still offline: --prune must not purge it
    assert (again.offline, again.removed, again.missing) == (r.offline, 0, 0) and stored_vectors(store) == before_vectors

    if how == "emptied":
        drive.rmdir()
    os.rename(away, drive)  # plugged back in
    back = index_folder(store, tiny_encoder, drive)
    assert (back.embedded, back.reused, back.restored, back.unchanged, back.offline) == (0, 0, N, N, None)
    assert rows(store) == before_rows and stored_vectors(store) == before_vectors
    assert shown(store, tiny_encoder) == everything
    assert check_store(reopened(store)).ok


def test_deleted_file_is_hidden_then_purged_by_prune_or_remove(store, tiny_encoder, drive, tmp_path):
    index_folder(store, tiny_encoder, drive)
    photos = sorted(drive.iterdir())
    kept = tmp_path / "kept.jpg"
    shutil.copy2(photos[3], kept)
    photos[3].unlink()
    r = index_folder(store, tiny_encoder, drive)
    assert rows(store).get(str(photos[3])) == "missing" and stored_vectors(store) == N
    assert (r.missing, r.removed, r.offline) == (1, 0, None)
    assert str(photos[3]) not in shown(store, tiny_encoder) and len(shown(store, tiny_encoder)) == N - 1
    assert check_store(reopened(store)).ok

    # restored from a backup with a new modification time: same content, so its vector is reused
    shutil.copy(kept, photos[3])
    r = index_folder(store, tiny_encoder, drive)
    assert (r.embedded, r.reused, r.missing) == (0, 1, 0) and rows(store)[str(photos[3])] == "ok"
    assert str(photos[3]) in shown(store, tiny_encoder)

    # --prune purges what is missing under the folder, and the vectors only it used
    photos[3].unlink()
    photos[4].unlink()
    r = index_folder(store, tiny_encoder, drive, prune=True)
    assert (r.missing, r.removed) == (2, 2)
    assert str(photos[3]) not in rows(store) and str(photos[4]) not in rows(store) and stored_vectors(store) == N - 2

    # `loupe remove` purges a missing file too (it no longer exists on disk)
    photos[5].unlink()
    assert index_folder(store, tiny_encoder, drive).missing == 1
    assert remove_items(store, [photos[5]]).images == 1
    assert str(photos[5]) not in rows(store) and stored_vectors(store) == N - 3
    assert check_store(reopened(store)).ok


def test_missing_file_that_reappears_elsewhere_reuses_its_vector(store, tiny_encoder, drive, tmp_path):
    index_folder(store, tiny_encoder, drive)
    photos = sorted(drive.iterdir())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(photos[2], elsewhere / "renamed.jpg")
    index_folder(store, tiny_encoder, drive)
    assert rows(store).get(str(photos[2])) == "missing"
    r = index_folder(store, tiny_encoder, elsewhere)
    assert (r.embedded, r.reused) == (0, 1)
    assert str(elsewhere / "renamed.jpg") in shown(store, tiny_encoder)
    # once its content is indexed at another path, the missing row is a move: dropped, nothing lost
    r = index_folder(store, tiny_encoder, drive)
    assert (r.removed, r.missing) == (1, 0) and str(photos[2]) not in rows(store)
    # a move inside one folder, in one run
    (drive / "sub").mkdir()
    os.rename(photos[3], drive / "sub" / "moved.jpg")
    r = index_folder(store, tiny_encoder, drive)
    assert (r.embedded, r.reused, r.removed, r.missing) == (0, 1, 1, 0)
    assert stored_vectors(store) == N
    assert check_store(reopened(store)).ok


def test_offline_folder_on_the_command_line(loupe, tiny_encoder, drive, tmp_path):
    index_folder(Store.open(home=loupe.home), tiny_encoder, drive)
    os.rename(drive, tmp_path / "unplugged")
    drive.mkdir()
    proc = loupe("index", drive)  # a cron job's run: one line of warning, not a failure
    assert "offline (no photos found" in proc.stderr and "nothing was removed" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    info = json.loads(loupe("info", "--json").stdout)
    assert (info["images_indexed"], info["images_missing"]) == (0, N)
    assert [(r["path"], r["offline"], r["missing"]) for r in info["roots"]] == [(str(drive), "empty", N)]
    drive.rmdir()
    proc = loupe("index", drive)  # the mount point itself is gone now: still no error
    assert "offline (the folder is gone" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert f"offline      {drive}: the folder is gone" in loupe("info").stdout
    assert "agree" in loupe("check").stdout
    os.rename(tmp_path / "unplugged", drive)
    out = json.loads(loupe("index", drive, "--json").stdout)
    assert (out["embedded"], out["restored"], out["offline"]) == (0, N, None)
    assert [r.offline for r in Store.open(home=loupe.home).catalog.roots()] == [None]


# ---- schema version ------------------------------------------------------------------------------


def downgrade_to_v1(store: Store) -> None:
    """Turn a catalog into the version 1 layout (no roots table, no status index, version row 1)."""
    with store.catalog.engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS roots"))
        conn.execute(text("DROP INDEX IF EXISTS ix_images_status_vector"))
        conn.execute(text("UPDATE meta SET schema_version = 1"))


def test_version_1_catalog_is_migrated_in_place(store, tiny_encoder, drive):
    index_folder(store, tiny_encoder, drive)
    downgrade_to_v1(store)
    store.catalog.engine.dispose()
    migrated = reopened(store)
    assert migrated.meta().schema_version == catalog_module.SCHEMA_VERSION >= 2
    assert {"roots"} <= set(inspect(migrated.catalog.engine).get_table_names())
    r = index_folder(migrated, tiny_encoder, drive)
    assert (r.embedded, r.unchanged) == (0, N)  # its photos are not embedded again
    sorted(drive.iterdir())[0].unlink()
    assert index_folder(migrated, tiny_encoder, drive).missing == 1
    assert check_store(migrated).ok


def test_failed_migration_leaves_the_catalog_as_it_was(store, tiny_encoder, drive, monkeypatch):
    index_folder(store, tiny_encoder, drive)
    downgrade_to_v1(store)
    store.catalog.engine.dispose()
    real = catalog_module.MIGRATIONS[1]

    def half_done(conn) -> None:
        real(conn)
        raise RuntimeError("power cut")

    monkeypatch.setitem(catalog_module.MIGRATIONS, 1, half_done)
    with pytest.raises(RuntimeError, match="power cut"):
        reopened(store)
    monkeypatch.undo()
    with store.catalog.engine.connect() as conn:
        assert conn.execute(text("SELECT schema_version FROM meta")).scalar() == 1
        assert "roots" not in inspect(conn).get_table_names()  # rolled back as one transaction
    assert reopened(store).meta().schema_version == catalog_module.SCHEMA_VERSION


def test_newer_catalog_is_refused_in_one_line(loupe, tiny_encoder, drive):
    store = Store.open(home=loupe.home)
    index_folder(store, tiny_encoder, drive)
    with store.catalog.engine.begin() as conn:
        conn.execute(text("UPDATE meta SET schema_version = 99"))
    store.catalog.engine.dispose()
    proc = loupe("info", ok=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("loupe: error:") and "schema version 99" in lines[0]
    with pytest.raises(LoupeError, match="schema version 99"):
        Store.open(home=loupe.home)


# ---- vectors deleted under a reader ---------------------------------------------------------------

DIM = 32


def synthetic_store(home: Path, n: int = 400, seed: int = 0) -> tuple[Store, np.ndarray, np.ndarray]:
    """A catalog of `n` random unit vectors as indexed files; returns (store, vector ids, vectors)."""
    store = Store.open(home=home)
    store.catalog.create_meta(model="synthetic", pretrained=None, weights_id="synthetic", dim=DIM)
    vecs = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    records = [ImageRecord(path_key=f"/syn/{i:05d}.jpg".encode(), size=1, mtime_ns=0, content_hash=f"h{i}") for i in range(n)]
    known: dict[str, int] = {}
    store.catalog.write_images(records, [(f"h{i}", v) for i, v in enumerate(vecs)], known)
    return store, np.array([known[f"h{i}"] for i in range(n)], np.int64), vecs


def delete_files_of(store: Store, vector_ids) -> None:
    with store.catalog.session() as s:
        row_ids = s.scalars(select(ImageRow.id).where(ImageRow.vector_id.in_([int(i) for i in vector_ids]))).all()
    store.catalog.delete_images(row_ids)


def test_vectors_deleted_meanwhile_are_never_scored(tmp_path):
    writer, ids, vecs = synthetic_store(tmp_path / "home")
    writer.set_index_factory("IVF4,Flat", DIM)
    writer.sync_all()
    reader = Store.open(home=tmp_path / "home", map_files=False)  # a long-lived server's view
    index = reader.vector_index(IMAGE)
    assert not index.exact  # candidates are re-scored against the catalog's vectors
    gone = ids[::4]
    delete_files_of(writer, gone)  # a writer deletes them; the reader has not refreshed yet

    found_vecs, found = reader.catalog.fetch_vectors(np.concatenate([ids[:3], gone[:3]]), DIM)
    assert found.tolist() == [False, True, True, False, False, False]  # ids[0] is gone[0]
    assert np.all(found_vecs[~found] == 0)
    with pytest.raises(LoupeError, match="no longer"):
        reader.catalog.load_vectors(gone[:2], DIM)

    queries = vecs[:5]
    scores, got = index.search(queries, len(ids))
    returned = got[got >= 0]
    assert not set(returned.tolist()) & set(gone.tolist())
    by_id = dict(zip(ids.tolist(), vecs))
    for row, q in enumerate(queries):
        for score, vid in zip(scores[row], got[row]):
            if vid >= 0:
                assert abs(score - float(by_id[int(vid)] @ q)) < 1e-5
    _, got = index.search(queries, 10, allowed=np.concatenate([gone[:20], ids[1:4]]))
    assert sorted(got[0][got[0] >= 0].tolist()) == sorted(ids[1:4].tolist())


def test_sync_drops_ids_deleted_between_listing_and_loading(tmp_path, monkeypatch):
    writer, ids, _ = synthetic_store(tmp_path / "home", n=50)
    reader = Store.open(home=tmp_path / "home")
    listed = reader.catalog.vector_ids

    def racing_writer(kind):
        want = listed(kind)
        delete_files_of(writer, ids[:5])  # lands between the listing and the loading of vectors
        return want

    monkeypatch.setattr(reader.catalog, "vector_ids", racing_writer)
    index = reader.vector_index(IMAGE)
    assert sorted(index.ids().tolist()) == sorted(ids[5:].tolist())
    monkeypatch.undo()
    fresh = Store.open(home=tmp_path / "home")
    assert fresh.vector_index(IMAGE).ntotal == 45  # the next open sees the writer's change
    writer.sync_all()  # readers never write vector files: the writer brings the file in line
    assert check_store(fresh).ok
