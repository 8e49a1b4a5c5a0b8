"""ANN indices: choice by size, IVF/HNSW kept in sync by id difference, recall against exact search."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import delete, update

from loupe.indexer.storage.synthetic import ClipLike, bind_meta, insert_images
from loupe.indexer.storage import vectors
from loupe.indexer.storage.catalog import IMAGE, ImageRow, Meta, Vector
from loupe.indexer.errors import LoupeError
from loupe.indexer.storage.check import check_store
from loupe.indexer.storage.store import Store
from loupe.indexer.storage.vectors import VectorIndex, auto_factory, choose_factory, read_label

DIM = 512  # CLIP-sized: the tuned defaults are for vectors like ViT-B-32's
WORLD = ClipLike(dim=DIM, topics=20, subtopics=10, seed=3)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def exact_top(queries: np.ndarray, ids: np.ndarray, vecs: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(queries @ vecs.T), axis=1, kind="stable")[:, :k]]


def remove_vectors(store: Store, ids: np.ndarray) -> None:
    """Drop catalog rows as `loupe remove` would (file rows, vectors, one generation bump)."""
    with store.catalog.session() as s, s.begin():
        s.execute(delete(ImageRow).where(ImageRow.vector_id.in_([int(i) for i in ids])))
        s.execute(delete(Vector).where(Vector.id.in_([int(i) for i in ids])))
        s.execute(update(Meta).where(Meta.id == 1).values(generation=Meta.generation + 1))


@pytest.fixture
def synthetic_store(tmp_path) -> Store:
    store = Store.open(home=tmp_path / "home")
    bind_meta(store, DIM)
    return store


# ---- choice ---------------------------------------------------------------------------------


def test_factory_is_chosen_by_size_with_hysteresis():
    assert auto_factory(1_000) == "Flat"
    assert auto_factory(vectors.FLAT_MAX) == "IVF256,SQ8"
    assert auto_factory(1_000_000) == "IVF1024,SQ8"
    assert choose_factory(10, None) == "Flat"
    assert choose_factory(vectors.FLAT_MAX - 1, "auto", "Flat") == "Flat"
    # grown a little past the size it was built for: keep it; 16x larger: rebuild with more lists
    assert choose_factory(300_000, None, "IVF256,SQ8") == "IVF256,SQ8"
    assert choose_factory(1_000_000, None, "IVF256,SQ8") == "IVF1024,SQ8"
    # shrunk well below the threshold: back to exact
    assert choose_factory(vectors.FLAT_MAX // 2 - 1, None, "IVF256,SQ8") == "Flat"
    assert choose_factory(vectors.FLAT_MAX - 1, None, "IVF256,SQ8") == "IVF256,SQ8"
    # an explicit factory wins once there is enough to train it; a dropped override goes back to auto
    assert choose_factory(100, "IVF16,SQ8") == "Flat"
    assert choose_factory(1_000, "IVF16,SQ8") == "IVF16,SQ8"
    assert choose_factory(1_000, "HNSW32,Flat") == "HNSW32,Flat"
    assert choose_factory(1_000, None, "HNSW32,Flat") == "Flat"


def test_bad_factory_is_one_line_error(synthetic_store):
    with pytest.raises(LoupeError, match="bad FAISS factory"):
        synthetic_store.set_index_factory("IVF-nonsense", DIM)
    assert synthetic_store.index_factory() == "auto"


# ---- sync by difference ------------------------------------------------------------------------


def test_ivf_sync_adds_and_removes_in_place(synthetic_store):
    store = synthetic_store
    store.set_index_factory("IVF16,SQ8", DIM)
    ids = insert_images(store, WORLD.images(1_500))
    index, report = store.sync(IMAGE)
    assert index.factory == "IVF16,SQ8" and report.rebuilt and index.ntotal == 1_500 and index.can_remove
    more = insert_images(store, WORLD.images(200, seed=5), root="/more")
    index, report = store.sync(IMAGE)
    assert (report.added, report.removed, report.rebuilt) == (200, 0, False)
    gone = np.concatenate([ids[:100], more[-10:]])
    remove_vectors(store, gone)
    index, report = store.sync(IMAGE)
    assert (report.added, report.removed, report.rebuilt) == (0, 110, False)
    assert sorted(index.ids()) == sorted(store.catalog.vector_ids(IMAGE))
    label = read_label(store.location.vector_file(IMAGE))
    assert (label.factory, label.ntotal) == ("IVF16,SQ8", 1_590)
    assert check_store(store).ok


def test_hnsw_is_rebuilt_when_ids_go_away(synthetic_store):
    store = synthetic_store
    store.set_index_factory("HNSW16,Flat", DIM)
    ids = insert_images(store, WORLD.images(800))
    index, report = store.sync(IMAGE)
    assert index.factory == "HNSW16,Flat" and report.rebuilt and not index.can_remove
    insert_images(store, WORLD.images(50, seed=9), root="/more")
    index, report = store.sync(IMAGE)
    assert (report.added, report.rebuilt) == (50, False)
    remove_vectors(store, ids[:30])
    index, report = store.sync(IMAGE)
    assert report.rebuilt and index.ntotal == 820
    assert sorted(index.ids()) == sorted(store.catalog.vector_ids(IMAGE))


def test_factory_setting_persists_and_switches(synthetic_store, tmp_path):
    store = synthetic_store
    insert_images(store, WORLD.images(1_000))
    assert store.sync(IMAGE)[0].factory == "Flat"
    assert store.set_index_factory("IVF8,Flat", DIM)
    assert not store.set_index_factory("IVF8,Flat", DIM)  # unchanged: no generation bump
    path = store.location.vector_file(IMAGE)
    path.unlink()  # even a lost file is rebuilt with the remembered factory
    reopened = Store.open(home=tmp_path / "home")
    assert reopened.index_factory() == "IVF8,Flat"
    assert reopened.vector_index(IMAGE).factory == "IVF8,Flat"
    reopened.set_index_factory("auto", DIM)
    again = Store.open(home=tmp_path / "home")
    index, report = again.sync(IMAGE)
    assert index.factory == "Flat" and report.rebuilt


def test_sync_all_does_not_read_current_files(synthetic_store, monkeypatch):
    store = synthetic_store
    insert_images(store, WORLD.images(300))
    store.sync_all()
    monkeypatch.setattr(VectorIndex, "load", classmethod(lambda cls, path: pytest.fail("read a current file")))
    assert all(r == (0, 0, False) for r in ((x.added, x.removed, x.rebuilt) for x in store.sync_all().values()))


def test_refresh_applies_changes_in_memory(synthetic_store, tmp_path):
    writer = synthetic_store
    writer.set_index_factory("IVF8,SQ8", DIM)
    insert_images(writer, WORLD.images(1_000))
    writer.sync_all()
    reader = Store.open(home=tmp_path / "home")
    assert reader.vector_index(IMAGE).ntotal == 1_000
    assert reader.vector_index(IMAGE).mmapped  # a current IVF file is mapped, not read
    server_side = Store.open(home=tmp_path / "home", map_files=False)  # long-lived: read, faster queries
    assert not server_side.vector_index(IMAGE).mmapped and server_side.vector_index(IMAGE).ntotal == 1_000
    assert not reader.refresh()
    new = insert_images(writer, WORLD.images(5, seed=11), root="/late")  # catalog only, no FAISS save
    assert reader.refresh()
    index = reader.vector_index(IMAGE)
    assert index.ntotal == 1_005 and index.factory == "IVF8,SQ8"
    q = writer.catalog.load_vectors(new[:1], DIM)
    assert index.search(q, 1)[1][0, 0] == new[0]


# ---- results ---------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", ["IVF32,SQ8", "IVF32,Flat", "HNSW32,Flat"])
def test_text_query_recall_against_exact(synthetic_store, factory):
    store = synthetic_store
    images = WORLD.images(4_000)
    ids = insert_images(store, images)
    store.set_index_factory(factory, DIM)
    index = store.vector_index(IMAGE)
    queries = WORLD.texts(200)
    scores, found = index.search(queries, 10)
    truth = exact_top(queries, ids, images, 10)
    assert recall_at(found, truth) >= 0.98
    # every returned score is the exact inner product (re-scored against the catalog's floats)
    by_id = dict(zip(ids.tolist(), images))
    expected = np.array([[queries[r] @ by_id[i] for i in row] for r, row in enumerate(found)])
    assert np.allclose(scores, expected, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


@pytest.mark.parametrize("exact_filter_max", [50_000, 10])
def test_filtered_search_on_ivf_is_exact_within_the_filter(synthetic_store, monkeypatch, exact_filter_max):
    monkeypatch.setattr(vectors, "EXACT_FILTER_MAX", exact_filter_max)  # 10: the selector path
    store = synthetic_store
    images = WORLD.images(3_000)
    ids = insert_images(store, images)
    store.set_index_factory("IVF16,SQ8", DIM)
    index = store.vector_index(IMAGE)
    keep = np.arange(0, 3_000, 3)
    queries = WORLD.texts(50)
    scores, found = index.search(queries, 10, allowed=ids[keep])
    assert set(found.ravel()) <= set(ids[keep])
    if exact_filter_max > 3_000:  # exact within the filter: only near-ties (within rounding) may swap
        exact = queries @ images[keep].T
        column = {int(i): c for c, i in enumerate(ids[keep])}
        got = np.array([[exact[r, column[int(i)]] for i in row] for r, row in enumerate(found)])
        assert np.all(got >= -np.sort(-exact, axis=1)[:, 9:10] - 1e-5)
    else:
        assert recall_at(found, exact_top(queries, ids[keep], images[keep], 10)) >= 0.95
    few = ids[[5, 17]]
    scores, found = index.search(queries[:2], 10, allowed=few)
    assert sorted(found[0][found[0] >= 0]) == sorted(few)
