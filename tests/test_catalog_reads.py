"""One read contract: the SQLAlchemy catalog and the sqlite3 reader of a cold search run the same
statements (`catalog_sql.CatalogReads`) and hand out the same rows, for every read method."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from loupe.indexer.storage.synthetic import ClipLike, bind_meta, insert_images
from loupe.indexer.storage.catalog import IMAGE, MISSING, TEXT, Catalog
from loupe.indexer.storage.catalog_reader import CatalogReader, open_reader
from loupe.indexer.storage.catalog_sql import ID_CHUNK, CatalogReads
from loupe.indexer.storage.store import Store

DIM = 16


def _catalogs(tmp_path) -> tuple[Catalog, CatalogReader]:
    store = Store.open(home=tmp_path)
    bind_meta(store, DIM)
    insert_images(store, ClipLike(dim=DIM, seed=3).images(ID_CHUNK + 50, seed=1), root="/photos")
    catalog = store.catalog
    ids = catalog.vector_ids(IMAGE)
    catalog.replace_captions("corpus", [(0, "a dog", None, "h0"), (1, "a cat", "x.jpg", "h1")],
                             [("h0", np.ones(DIM, np.float32)), ("h1", np.full(DIM, 2, np.float32))], {})
    missing = [r.id for r in catalog.iter_image_rows() if r.vector_id in (int(ids[0]), int(ids[1]))]
    catalog.mark_missing(missing, drop_moved=False)
    catalog.set_setting("index_factory", "Flat")
    reader = open_reader(catalog.url)
    assert isinstance(reader, CatalogReader) and isinstance(catalog, CatalogReads)
    return catalog, reader


def test_both_catalogs_read_the_same(tmp_path):
    catalog, reader = _catalogs(tmp_path)
    assert asdict(catalog.meta()) == asdict(reader.meta())
    assert catalog.generation() == reader.generation() > 0
    assert catalog.setting("index_factory") == reader.setting("index_factory") == "Flat"
    assert catalog.setting("nothing") is reader.setting("nothing") is None
    for kind in (IMAGE, TEXT):
        assert np.array_equal(catalog.vector_ids(kind), reader.vector_ids(kind))
        assert catalog.count_vectors(kind) == reader.count_vectors(kind) == len(reader.vector_ids(kind))
    assert catalog.count_vectors(IMAGE) == ID_CHUNK + 48  # vectors only missing files use are not searchable
    assert catalog.count_stored_vectors() == reader.count_stored_vectors() == ID_CHUNK + 52
    ids = np.concatenate([catalog.vector_ids(IMAGE), [10**9]])  # more than one chunk of ids, one gone
    a, b = catalog.fetch_vectors(ids, DIM, chunk=300), reader.fetch_vectors(ids, DIM, chunk=300)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not a[1][-1] and a[1][:-1].all()
    assert np.array_equal(catalog.vector_for_hash(TEXT, "h1", DIM), reader.vector_for_hash(TEXT, "h1", DIM))
    assert reader.vector_for_hash(IMAGE, "h1", DIM) is None

    def rows(found):
        return {k: [asdict(r) for r in v] for k, v in found.items()}

    image_rows = rows(reader.image_rows_for_vectors(ids))
    assert image_rows == rows(catalog.image_rows_for_vectors(ids)) and len(image_rows) == ID_CHUNK + 48
    assert all(r["status"] == "ok" and isinstance(r["path_key"], bytes) for v in image_rows.values() for r in v)
    text_ids = catalog.vector_ids(TEXT)
    assert rows(reader.caption_rows_for_vectors(text_ids)) == rows(catalog.caption_rows_for_vectors(text_ids))
    for folder, status in ((None, None), (b"/photos", MISSING), (b"/elsewhere", None)):
        got = [asdict(r) for r in reader.iter_image_rows(folder, status)]
        assert got == [asdict(r) for r in catalog.iter_image_rows(folder, status)]
    assert len(list(reader.iter_image_rows(b"/photos", MISSING))) == 2
    keys = [b"/photos/%09d.jpg" % i for i in (1, 5, 10**8)]
    at = reader.image_rows_at(keys)
    assert {k: asdict(v) for k, v in at.items()} == {k: asdict(v) for k, v in catalog.image_rows_at(keys).items()}
    assert sorted(at) == keys[:2]
    assert catalog.dangling_references() == reader.dangling_references() == (0, 0)
    assert catalog.count_export_images() == reader.count_export_images() == ID_CHUNK + 48
    assert catalog.count_export_captions() == reader.count_export_captions() == 2
    assert list(map(tuple, catalog.export_images())) == list(map(tuple, reader.export_images()))
    assert list(map(tuple, catalog.export_captions())) == list(map(tuple, reader.export_captions()))


def test_writers_keep_sqlites_planner_statistics(tmp_path):
    """A writer's sync runs ANALYZE when the tables it plans over changed size by more than a quarter:
    with statistics, looking up the moments of vector ids starts from those ids and reaches the files
    through their content hash, instead of walking every visible file (`images.status` is one value)."""
    import sqlite3

    from loupe.indexer.storage import catalog_sql as sql

    store = Store.open(home=tmp_path)
    bind_meta(store, DIM)
    clip = ClipLike(dim=DIM, seed=3)
    insert_images(store, clip.images(2000, seed=1), root="/photos")
    catalog = store.catalog
    db = sqlite3.connect(tmp_path / "catalog.db")

    def plan() -> str:
        marks, params = sql.bind_list("v", [1, 2, 3])
        return " | ".join(r[-1] for r in db.execute("EXPLAIN QUERY PLAN " + sql.MOMENTS_FOR_VECTORS.format(ids=marks),
                                                     {**params, "ok": "ok"}))

    assert db.execute(sql.SQLITE_HAS_STATS).fetchone() is None
    store.sync_all()  # what every writer does last
    assert dict(db.execute(sql.SQLITE_STATS).fetchall())["images"] == 2000
    assert "ix_moments_vector_id" in plan() and "ix_images_content_hash" in plan(), plan()
    assert catalog.refresh_statistics() is False  # nothing changed
    insert_images(store, clip.images(400, seed=2), root="/more")  # +20%: within the drift
    assert catalog.refresh_statistics() is False
    insert_images(store, clip.images(400, seed=3), root="/more2")  # +40% since the statistics
    assert catalog.refresh_statistics() is True
    assert dict(db.execute(sql.SQLITE_STATS).fetchall())["images"] == 2800
