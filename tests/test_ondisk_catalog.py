"""The on-disk index of a catalog (`loupe build-index` without shards): searched by `loupe search`
and the Searcher while current (same top-k as exact search, filters, captions), left aside with a
one-line notice once the catalog's vectors changed, and shown by `loupe info`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from loupe.indexer.storage.catalog import IMAGE, TEXT
from loupe.indexer.storage.ondisk.build import build_catalog_ondisk
from loupe.indexer.storage.ondisk.layout import INFO_FILE, catalog_factory
from loupe.indexer.storage.ondisk.search import OnDiskVectorIndex
from loupe.indexer.pipeline.captions import index_captions
from loupe.indexer.pipeline.indexing import index_folder
from loupe.indexer.storage.store import Store
from loupe.indexer.storage.vectors import VectorIndex
from loupe.retrieval.engine.query import Term
from loupe.retrieval.engine.photos import CatalogPhotos
from loupe.retrieval.engine.search import Filters, Searcher
from loupe.retrieval.engine.vectors import query_vector

N_PHOTOS = 160


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, tiny_encoder, flickr_images) -> Path:
    """160 real photos in two folders and 120 captions, indexed with the tiny model, with an
    on-disk image index (IVF16,SQ8) and an on-disk caption index built from the catalog."""
    root = tmp_path_factory.mktemp("ondisk-catalog")
    photos = root / "photos"
    for n, src in enumerate(sorted(flickr_images.glob("*.jpg"))[:N_PHOTOS]):
        folder = photos / ("a" if n % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, folder / src.name)
    store = Store.open(home=root / "home")
    index_folder(store, tiny_encoder, photos)
    captions = json.loads((flickr_images.parent / "captions.json").read_text())
    lines = [c for entry in captions[:24] for c in entry["captions"]]
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    index_captions(store, tiny_encoder, root / "captions.txt")
    build_catalog_ondisk(store, IMAGE, factory="IVF16,SQ8", train_rows=N_PHOTOS)
    build_catalog_ondisk(store, TEXT)
    return root


def exact_top(store: Store, kind: str, queries: np.ndarray, k: int, allowed: np.ndarray | None = None):
    """Brute force over the catalog's float vectors (independent of FAISS)."""
    ids = store.catalog.vector_ids(kind) if allowed is None else np.sort(allowed)
    vecs = store.catalog.load_vectors(ids, store.require_meta().dim)
    sims = queries @ vecs.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), ids[order]


def text_queries(encoder) -> np.ndarray:
    return np.stack(encoder.encode_texts(["a dog running on grass", "a child in a red shirt", "people on a beach", "a mountain"]))


def assert_same_ranking(got, want) -> None:
    """Same top-k ids per query, with the same (exact) scores in the same order."""
    (gs, gi), (ws, wi) = got, want
    np.testing.assert_allclose(gs, ws, atol=1e-5)
    for g, w in zip(gi, wi):
        assert set(map(int, g)) == set(map(int, w))


def test_reader_uses_the_current_ondisk_index_with_exact_scores(catalog, tiny_encoder):
    store = Store.open(home=catalog / "home", writer=False)
    index = store.vector_index(IMAGE)
    assert isinstance(index, OnDiskVectorIndex) and index.factory == "IVF16,SQ8"
    assert (index.ntotal, index.nprobe) == (N_PHOTOS, 16) and not store.notices
    vecs = store.catalog.load_vectors(store.catalog.vector_ids(IMAGE)[::20], tiny_encoder.dim)
    queries = np.concatenate([text_queries(tiny_encoder), vecs])
    got = index.search(queries, 10)
    assert_same_ranking(got, exact_top(store, IMAGE, queries, 10))

    # one list of 16: approximate, yet an easy query (a stored vector) finds itself first, and
    # every score is still the exact cosine, from the catalog's vectors
    few = Store.open(home=catalog / "home", writer=False, search_params="nprobe=1").vector_index(IMAGE)
    assert isinstance(few, OnDiskVectorIndex) and few.nprobe == 1
    scores, ids = few.search(vecs, 5)
    np.testing.assert_array_equal(ids[:, 0], store.catalog.vector_ids(IMAGE)[::20])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    stored = {int(i): v for i, v in zip(store.catalog.vector_ids(IMAGE), store.catalog.load_vectors(store.catalog.vector_ids(IMAGE), tiny_encoder.dim))}
    for q, s_row, i_row in zip(vecs, scores, ids):  # -1: the one list visited held fewer than 5
        np.testing.assert_allclose(s_row[i_row >= 0], [stored[int(i)] @ q for i in i_row if i >= 0], atol=1e-5)
    assert (ids < 0).any() or not np.array_equal(ids, exact_top(store, IMAGE, vecs, 5)[1])  # really approximate

    captions = store.vector_index(TEXT)
    assert isinstance(captions, OnDiskVectorIndex) and captions.factory == catalog_factory(store.catalog.count_vectors(TEXT), tiny_encoder.dim)
    assert_same_ranking(captions.search(queries, 5), exact_top(store, TEXT, queries, 5))


@pytest.mark.parametrize("scan", ["exact among the allowed", "ivf lists with an id selector"])
def test_filters_apply_before_the_cut(catalog, tiny_encoder, monkeypatch, scan):
    if scan.startswith("ivf"):
        monkeypatch.setattr("loupe.indexer.storage.vectors.EXACT_FILTER_MAX", 0)  # filter inside the on-disk lists
    store = Store.open(home=catalog / "home", writer=False)
    searcher = Searcher(store, tiny_encoder)
    assert isinstance(store.vector_index(IMAGE), OnDiskVectorIndex)
    folder = catalog / "photos" / "a"
    filters = Filters.parse(folder, ["*[0-7].jpg"], None, None)
    allowed = CatalogPhotos(store.catalog).allowed_vectors(filters)
    assert 0 < len(allowed) < N_PHOTOS // 2
    terms = [Term(1.0, "text", "a dog running on grass")]
    hits = searcher.search(terms, k=8, filters=filters)
    query = query_vector(searcher, terms)
    want_scores, want_ids = exact_top(store, IMAGE, query[None, :], 8, allowed)
    assert [h.vector_id for h in hits] == [int(i) for i in want_ids[0]]
    np.testing.assert_allclose([h.score for h in hits], want_scores[0], atol=1e-5)
    assert all(h.fields["path"].startswith(str(folder)) and h.fields["path"][-5] in "01234567" for h in hits)


def test_image_and_mixed_queries(catalog, tiny_encoder):
    store = Store.open(home=catalog / "home", writer=False, search_params="nprobe=8")  # 8 lists of 16
    searcher = Searcher(store, tiny_encoder)
    assert store.vector_index(IMAGE).nprobe == 8
    photo = str(sorted((catalog / "photos" / "a").iterdir())[3])
    for terms in ([Term(1.0, "image", photo)], [Term(2.0, "text", "a dog"), Term(1.0, "image", photo), Term(-0.5, "text", "people")]):
        hits = searcher.search(terms, k=3)
        scores, ids = exact_top(store, IMAGE, query_vector(searcher, terms)[None, :], 3)
        assert [h.vector_id for h in hits] == [int(i) for i in ids[0]]  # easy queries: found in the lists visited
        np.testing.assert_allclose([h.score for h in hits], scores[0], atol=1e-5)
    assert searcher.search([Term(1.0, "image", photo)], k=1)[0].fields["path"] == photo


def test_stale_index_is_left_aside_and_a_reader_follows(tmp_path, catalog, tiny_encoder, flickr_images):
    home = tmp_path / "home"
    shutil.copytree(catalog / "home", home)
    photos = tmp_path / "photos"
    shutil.copytree(catalog / "photos", photos)
    writer = Store.open(home=home)
    index_folder(writer, tiny_encoder, photos)  # the copied folder: other paths, same contents, same vectors
    reader = Store.open(home=home, writer=False)
    assert isinstance(reader.vector_index(IMAGE), OnDiskVectorIndex)  # the catalog changed, its image vectors did not

    extra = sorted(flickr_images.glob("*.jpg"))[N_PHOTOS : N_PHOTOS + 6]
    for src in extra:
        shutil.copy2(src, photos / "a" / src.name)
    index_folder(writer, tiny_encoder, photos)
    assert reader.refresh()
    index = reader.vector_index(IMAGE)
    assert type(index) is VectorIndex and index.ntotal == N_PHOTOS + 6  # the FAISS file, current
    assert len(reader.notices) == 1 and "is behind the catalog" in reader.notices[0] and "loupe build-index" in reader.notices[0]
    from loupe.indexer.storage.check import check_store

    assert any("on-disk image index" in n and "is behind" in n for n in check_store(reader).notes)
    queries = text_queries(tiny_encoder)
    assert_same_ranking(index.search(queries, 10), exact_top(reader, IMAGE, queries, 10))
    assert isinstance(reader.vector_index(TEXT), OnDiskVectorIndex)  # captions unchanged: still current

    # an on-disk index of another catalog (same photos) is not this one's
    other = Store.open(home=tmp_path / "other")
    index_folder(other, tiny_encoder, photos / "b")
    shutil.copytree(home / "images.ondisk", tmp_path / "other" / "images.ondisk")
    fresh = Store.open(home=tmp_path / "other", writer=False)
    assert type(fresh.vector_index(IMAGE)) is VectorIndex and "belongs to another catalog" in fresh.notices[0]


def hits(stdout: str) -> list[tuple[str, float]]:
    return [(h["path"], h["score"]) for h in map(json.loads, stdout.splitlines())]


def test_cli_build_search_info_and_stale(loupe, tiny_checkpoint, tiny_encoder, flickr_images, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for src in sorted(flickr_images.glob("*.jpg"))[:40]:
        shutil.copy2(src, photos / src.name)
    loupe("index", photos, "--checkpoint", tiny_checkpoint)
    query = ["a dog running on the grass", "-k", "5", "--json"]
    built = loupe("build-index", "--json")
    report = json.loads(built.stdout.strip().splitlines()[-1])  # stdout is the report alone
    assert (report["rows"], report["factory"], report["out"]) == (40, "IVF1,SQ8", str(loupe.home / "images.ondisk"))
    r = loupe("search", *query)
    assert "loupe: " not in r.stderr  # no notice: the on-disk index is current
    got = hits(r.stdout)
    store = Store.open(home=loupe.home, writer=False)
    want_scores, want_ids = exact_top(store, IMAGE, np.stack(tiny_encoder.encode_texts([query[0]])), 5)
    rows = store.catalog.image_rows_for_vectors([int(i) for i in want_ids[0]])
    assert [p for p, _ in got] == [rows[int(i)][0].path for i in want_ids[0]]
    np.testing.assert_allclose([s for _, s in got], want_scores[0], atol=1e-5)
    shown = [line for line in loupe("info").stdout.splitlines() if line.startswith("on-disk ")]
    assert len(shown) == 1 and str(loupe.home / "images.ondisk") in shown[0] and shown[0].endswith("; in use)")

    for src in sorted(flickr_images.glob("*.jpg"))[40:44]:
        shutil.copy2(src, photos / src.name)
    loupe("index", photos)
    r = loupe("search", *query)
    notices = [line for line in r.stderr.splitlines() if line.startswith("loupe: ")]
    assert len(notices) == 1 and "on-disk image index" in notices[0] and "is behind the catalog" in notices[0]
    assert len(hits(r.stdout)) == 5  # answered by the FAISS file
    status = json.loads(loupe("info", "--json").stdout)["ondisk"]["image"]
    assert (status["state"], status["vectors"]) == ("stale", 40) and "now has 44" in status["why"]
    r = loupe("build-index", tmp_path / "shards-only", ok=False)
    assert r.returncode == 1 and r.stderr.startswith("loupe: error: ") and "needs OUT" in r.stderr
