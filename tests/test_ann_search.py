"""Approximate search as it really runs: fewer lists probed than exist, filters, any index shape.

The index here is big enough (IVF256 over 24k vectors) that loupe's default nprobe (128) leaves
half the lists unvisited, so the approximate path, the exact re-scoring and the filtered-search
fallback are all exercised. Vectors are CLIP-like synthetic ones (indexer/storage/synthetic.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from loupe.indexer.storage.synthetic import ClipLike
from loupe.indexer.storage import vectors
from loupe.indexer.errors import LoupeError
from loupe.indexer.storage.vectors import EF_SEARCH, VectorIndex, default_nprobe, faiss_module

N = 24_000
DIM = 512
NLIST = 256


def exact_top(queries: np.ndarray, vecs: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(queries @ vecs.T), axis=1, kind="stable")[:, :k]]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def build(factory: str, vecs: np.ndarray, ids: np.ndarray, search_params: str | None = None) -> VectorIndex:
    """A trained, filled index that re-scores against `vecs` (as the Store does against the catalog)."""
    index = VectorIndex.create(vecs.shape[1], factory)
    index.train(vecs[np.random.default_rng(0).choice(len(vecs), min(len(vecs), 40 * NLIST), replace=False)])
    index.add(ids, vecs)
    pos = {int(i): n for n, i in enumerate(ids)}
    index.exact_vectors = lambda want: (vecs[[pos[int(i)] for i in want]], np.ones(len(want), dtype=bool))
    if search_params:
        index.configure(search_params)
    return index


@pytest.fixture(scope="module")
def world():
    w = ClipLike(dim=DIM, topics=40, subtopics=10, seed=11)
    vecs = w.images(N)
    ids = np.arange(N, dtype=np.int64) * 7 + 3  # ids are not positions
    return vecs, ids, w.texts(100)


@pytest.fixture(scope="module")
def ivf(world) -> VectorIndex:
    vecs, ids, _ = world
    return build(f"IVF{NLIST},SQ8", vecs, ids)


def probed_lists(index: VectorIndex, query: np.ndarray) -> set[int]:
    ivf = faiss_module().extract_index_ivf(index.index)
    return set(ivf.quantizer.search(query[None, :], index.nprobe)[1][0].tolist())


# ---- the approximate path (nprobe < nlist) ----------------------------------------------------


def test_approximate_results_are_rescored_exactly_and_recall_is_high(world, ivf):
    vecs, ids, queries = world
    assert ivf.nprobe == default_nprobe(NLIST) < NLIST  # half the lists stay unvisited
    scores, found = ivf.search(queries, 10)
    assert recall_at(found, exact_top(queries, vecs, ids, 10)) >= 0.95
    pos = {int(i): n for n, i in enumerate(ids)}
    exact = np.array([[queries[r] @ vecs[pos[int(i)]] for i in row] for r, row in enumerate(found)])
    assert np.allclose(scores, exact, atol=1e-5)  # SQ8 codes ranked, float vectors scored
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_filter_held_only_by_unprobed_lists_still_returns_the_exact_top_k(world, ivf, monkeypatch):
    vecs, ids, queries = world
    q = queries[0]
    faiss = faiss_module()
    lists = faiss.extract_index_ivf(ivf.index).quantizer.search(vecs, 1)[1][:, 0]
    unprobed = ~np.isin(lists, list(probed_lists(ivf, q)))
    allowed = ids[np.flatnonzero(unprobed)[:60]]
    monkeypatch.setattr(vectors, "EXACT_FILTER_MAX", 10)  # take the selector path for 60 ids
    raw = ivf.index.search(q[None, :], 10, params=ivf._params(faiss.IDSelectorBatch(allowed)))[1]
    assert (raw < 0).all()  # the probed lists hold none of them: this is the fallback's case
    scores, found = ivf.search(q, 10, allowed=allowed)
    sub = np.isin(ids, allowed)
    truth = exact_top(q[None, :], vecs[sub], ids[sub], 10)
    assert found.tolist() == truth.tolist()
    assert np.allclose(scores[0], vecs[sub][np.searchsorted(ids[sub], truth[0])] @ q, atol=1e-5)


def test_large_filter_searches_the_index_with_a_selector(world, ivf, monkeypatch):
    vecs, ids, queries = world
    monkeypatch.setattr(vectors, "EXACT_FILTER_MAX", 1_000)
    keep = np.random.default_rng(3).random(N) < 0.5
    allowed = ids[keep]
    assert len(allowed) > vectors.EXACT_FILTER_MAX
    scores, found = ivf.search(queries, 10, allowed=allowed)
    assert np.isin(found, allowed).all()
    assert recall_at(found, exact_top(queries, vecs[keep], allowed, 10)) >= 0.95
    pos = {int(i): n for n, i in enumerate(ids)}
    exact = np.array([[queries[r] @ vecs[pos[int(i)]] for i in row] for r, row in enumerate(found)])
    assert np.allclose(scores, exact, atol=1e-5)


# ---- search parameters for any index shape ------------------------------------------------------


@pytest.fixture(scope="module")
def subspace_world():
    """Clustered unit vectors (300 centred clusters) in a 32-d subspace of 128-d: PCA32 loses
    nothing, so the transform itself costs no recall and only the search parameters decide it."""
    rng = np.random.default_rng(1)
    centres = _unit(rng.standard_normal((300, 32)))
    points = _unit(centres[rng.integers(0, 300, 16_000)] + 1.5 * _unit(rng.standard_normal((16_000, 32))))
    queries = _unit(centres[rng.integers(0, 300, 100)] + 1.5 * _unit(rng.standard_normal((100, 32))))
    basis = np.linalg.qr(rng.standard_normal((128, 32)))[0].T.astype(np.float32)
    ids = np.arange(len(points), dtype=np.int64) + 1
    return np.ascontiguousarray(points @ basis), ids, np.ascontiguousarray(queries @ basis)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_ivf_under_a_transform_is_probed_like_a_bare_one(subspace_world):
    vecs, ids, queries = subspace_world
    truth = exact_top(queries, vecs, ids, 10)
    bare = build(f"IVF{NLIST},Flat", vecs, ids)
    wrapped = build(f"PCA32,IVF{NLIST},Flat", vecs, ids)
    bare_recall = recall_at(bare.search(queries, 10)[1], truth)
    assert bare_recall >= 0.95
    assert recall_at(wrapped.search(queries, 10)[1], truth) >= bare_recall - 0.01
    nested = faiss_module().extract_index_ivf(wrapped.index)
    assert nested.nprobe == bare.nprobe == wrapped.nprobe == default_nprobe(NLIST)


@pytest.mark.parametrize("factory", [f"PCA32,IVF{NLIST},Flat", f"IVF{NLIST},SQ8,RFlat", "PCA32,HNSW16,Flat"])
def test_filtered_search_through_wrapped_indices(subspace_world, factory, monkeypatch):
    vecs, ids, queries = subspace_world
    index = build(factory, vecs, ids)
    monkeypatch.setattr(vectors, "EXACT_FILTER_MAX", 100)  # the selector path, through the wrappers
    keep = np.arange(len(ids)) % 3 == 0
    scores, found = index.search(queries, 10, allowed=ids[keep])
    assert np.isin(found[found >= 0], ids[keep]).all()
    assert recall_at(found, exact_top(queries, vecs[keep], ids[keep], 10)) >= 0.9


def test_hnsw_depth_is_set_under_a_transform(subspace_world):
    vecs, ids, _ = subspace_world
    faiss = faiss_module()
    for factory in ("HNSW16,Flat", "PCA32,HNSW16,Flat"):
        index = build(factory, vecs[:500], ids[:500])
        layer = index.index
        while not isinstance(layer, faiss.IndexHNSW):
            layer = faiss.downcast_index(layer.index)
        assert layer.hnsw.efSearch == EF_SEARCH


def test_user_search_parameters_override_the_defaults(subspace_world):
    vecs, ids, queries = subspace_world
    index = build(f"PCA32,IVF{NLIST},Flat", vecs, ids, search_params="nprobe=3")
    assert faiss_module().extract_index_ivf(index.index).nprobe == 3 and index.nprobe == 3
    index.configure(vectors.parse_search_params("nprobe=256,efSearch=64"))  # efSearch: no HNSW here, ignored
    assert index.nprobe == 256
    assert vectors.join_search_params(None, 64, 128) == "nprobe=64,efSearch=128"
    assert vectors.join_search_params("nprobe=8,ht=20", 64, None) == "nprobe=8,ht=20,nprobe=64"
    assert vectors.parse_search_params("nprobe=8,ht=20,nprobe=64") == {"nprobe": 64, "ht": 20}


@pytest.mark.parametrize("bad", ["nprobe", "nprobe=abc", "nprob=4", "nprobe=0", "efSearch=-3", "nprobe=4,,", "verbose=1"])
def test_bad_search_parameters_are_one_line_errors(bad):
    with pytest.raises(LoupeError, match="search parameter") as err:
        vectors.parse_search_params(bad)
    assert "\n" not in str(err.value)


def test_search_parameters_on_the_command_line(loupe):
    proc = loupe("search", "a dog", "--search-params", "nprobe=many", ok=False)
    assert proc.returncode == 1 and proc.stderr.startswith("loupe: error:") and "nprobe" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = loupe("search", "a dog", "--nprobe", "0", ok=False)
    assert proc.returncode != 0
