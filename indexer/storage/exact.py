"""Exact search with numpy over the catalog's vectors: a small flat index without importing FAISS.

A cold `loupe search` of a small collection spent more time importing FAISS (and reading its
file) than searching: for a collection whose index is exact ("Flat") anyway and no larger than
`NUMPY_FLAT_MAX` vectors, the catalog's float vectors (the source of truth the FAISS file is
derived from) are scored with one matrix product instead. Same scores within float rounding, the same order as
FAISS's flat index (exact ties aside: `top_k`).
"""

from __future__ import annotations

import numpy as np

from loupe.indexer.storage.catalog_names import catalog_identity
from loupe.indexer.storage.vectors import DEFAULT_FACTORY, choose_factory, read_label

# the largest flat collection scored with numpy: reading its vectors from SQLite costs less than
# importing FAISS up to about this size (benchmarks/RESULTS.md)
NUMPY_FLAT_MAX = 4_000


class ExactIndex:
    """What `Searcher` uses of a `VectorIndex` (`ntotal`, `search`), over vectors held in numpy."""

    exact = True
    factory = DEFAULT_FACTORY
    mmapped = False

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, generation: int = -1, catalog: str | None = None) -> None:
        order = np.argsort(ids, kind="stable")  # id order: the order FAISS holds a flat index loupe built
        self._ids = np.ascontiguousarray(ids[order], dtype=np.int64)
        self._vectors = np.ascontiguousarray(vectors[order], dtype=np.float32)
        self.generation, self.catalog = generation, catalog
        self.search_params: dict[str, int] = {}

    @property
    def ntotal(self) -> int:
        return len(self._ids)

    @property
    def dim(self) -> int:
        return int(self._vectors.shape[1])

    def ids(self) -> np.ndarray:
        return self._ids.copy()

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row, as `VectorIndex.search` of a flat index returns them:
        k = min(k, ntotal) columns, padded with (-inf, -1) where fewer ids are allowed."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        nq = len(queries)
        if self.ntotal == 0:
            return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
        k = max(1, min(int(k), self.ntotal))
        ids, vectors = self._ids, self._vectors
        if allowed is not None:
            keep = np.isin(ids, np.asarray(allowed, dtype=np.int64))
            ids, vectors = ids[keep], vectors[keep]
        scores = queries @ vectors.T  # (queries, candidates)
        return top_k(scores, ids, k)


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best `k` per row, highest score first, the lower id first among exactly equal scores.

    Exactly equal scores come only from identical vectors of different content (identical files
    share one vector), and FAISS itself breaks such ties by its code path and CPU (its heap for
    k > 1, SIMD lanes for k = 1, blocks when filtered): here the rule is fixed."""
    nq, n = scores.shape
    out_scores = np.full((nq, k), -np.finfo(np.float32).max, dtype=np.float32)  # what FAISS pads with
    out_ids = np.full((nq, k), -1, dtype=np.int64)
    take = min(k, n)
    for row in range(nq):
        best = np.lexsort((ids, -scores[row]))[:take]
        out_scores[row, :take] = scores[row, best]
        out_ids[row, :take] = ids[best]
    return out_scores, out_ids


def exact_index(store, kind: str, meta, factory: str | None = None, limit: int = NUMPY_FLAT_MAX) -> ExactIndex | None:
    """The `kind` collection of `store` as an `ExactIndex`, if its index is flat and at most `limit` vectors.

    None when the index is (or is set to become) approximate, or larger: the caller opens FAISS.
    The vectors come straight from the catalog, so the FAISS file being behind does not matter.
    """
    catalog = store.catalog
    n = catalog.count_vectors(kind)
    if n > limit:
        return None
    identity = catalog_identity(meta)
    label = read_label(store.location.vector_file(kind))
    ours = label is not None and label.catalog == identity and label.dim == meta.dim
    if choose_factory(n, factory or store.index_factory(), label.factory if ours else None) != DEFAULT_FACTORY:
        return None
    generation = catalog.generation()  # before the ids, as `Store` reads them
    ids = catalog.vector_ids(kind)
    vectors, found = catalog.fetch_vectors(ids, meta.dim)  # an id deleted meanwhile is left out
    return ExactIndex(ids[found], vectors[found], generation, identity)
