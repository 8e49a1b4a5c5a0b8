"""FAISS vector indices: keyed by catalog vector ids, chosen by collection size, saved atomically.

One factory string names a whole index, as in FAISS itself. Below `FLAT_MAX` vectors the index
is exact ("Flat"); above it, `auto_factory` picks an inverted file with 8-bit scalar-quantised
storage ("IVF<n>,SQ8") whose candidates are re-scored exactly against the catalog's float
vectors. Why IVF and not HNSW: text queries sit on the other side of CLIP's modality gap, and
graph indices lose far more recall on such out-of-distribution queries (see
benchmarks/RESULTS.md); IVF also removes ids in place, while HNSW must be rebuilt.

Ids are always those of the catalog's `vectors` table: an IVF index stores them itself (with a
hash-table direct map, so ids can be removed and vectors reconstructed); every other kind is
wrapped in an IndexIDMap2.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from indexer.errors import LoupeError

DEFAULT_FACTORY = "Flat"
AUTO = "auto"
FLAT_MAX = 50_000  # exact search below this many vectors (~5 ms per query on one core)
PROBES_PER_SQRT_LIST = 8  # IVF lists a query visits = 8 * sqrt(lists): tuned on text queries, see RESULTS.md
RERANK_FACTOR = 4  # candidates per result fetched from an approximate index before exact re-scoring
EF_SEARCH = 256  # HNSW search depth when a factory override asks for HNSW
EXACT_FILTER_MAX = 50_000  # filtered searches over at most this many ids are done exactly
BLAS_THRESHOLD = 16  # faiss' default (128000 here) kept 100 batched flat queries off BLAS: ~16x slower

_IVF = re.compile(r"(?:^|,)IVF(\d+)")

VectorLoader = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # ids -> (vectors, found)


def faiss_module():
    """Import faiss (configured for batched BLAS searches), or say exactly what to install."""
    try:
        import faiss
    except ImportError:
        raise LoupeError(
            "faiss is not installed: pip install 'loupe[cpu]' (faiss-cpu), or 'loupe[gpu]' (faiss-gpu) on a CUDA machine"
        ) from None
    if faiss.cvar.distance_compute_blas_threshold > BLAS_THRESHOLD:
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    return faiss


# ---- which index for how many vectors ----------------------------------------------------


def auto_nlist(n: int) -> int:
    """Inverted lists for `n` vectors: the power of two nearest sqrt(n) (few, large lists suit text queries)."""
    return max(16, 2 ** round(math.log2(max(1.0, math.sqrt(n)))))


def auto_factory(n: int) -> str:
    """The factory loupe picks for `n` vectors when none is set."""
    return DEFAULT_FACTORY if n < FLAT_MAX else f"IVF{auto_nlist(n)},SQ8"


def ivf_lists(factory: str) -> int | None:
    m = _IVF.search(factory)
    return int(m.group(1)) if m else None


def min_train_size(factory: str) -> int:
    """Vectors needed to train `factory` well (0: no training); smaller collections use Flat."""
    nlist = ivf_lists(factory)
    if nlist:
        return 39 * nlist  # FAISS' own minimum for k-means of good quality
    if any(tag in factory for tag in ("PQ", "SQ", "LSH", "PCA", "OPQ", "ITQ", "RR")):
        return 1_000
    return 0


def choose_factory(n: int, setting: str | None, current: str | None = None) -> str:
    """The factory the index of `n` vectors should have, given the stored setting and the current one.

    An explicit setting wins once the collection is large enough to train it (until then the
    exact index serves, so a small collection never gets a poorly trained index). Automatic
    choice keeps the current index until the collection has grown or shrunk well past what it
    was built for (a factor of 4 in lists, or half the flat threshold), so an index is not
    rebuilt back and forth around a boundary.
    """
    if setting and setting != AUTO:
        return setting if n >= min_train_size(setting) else DEFAULT_FACTORY
    ideal = auto_factory(n)
    if current is None or current == ideal:
        return ideal
    if current == DEFAULT_FACTORY:
        return current if n < FLAT_MAX else ideal
    have, want = ivf_lists(current), ivf_lists(ideal)
    if have and current == f"IVF{have},SQ8":  # an automatic choice made earlier
        if n < FLAT_MAX // 2:
            return DEFAULT_FACTORY
        if want is None or max(want / have, have / want) < 4:
            return current
    return ideal


def default_nprobe(nlist: int) -> int:
    """Lists to visit per query. Text queries (across the modality gap) need far more than image
    queries; the share needed falls as lists multiply: 128 of 256 at 100k, 256 of 1024 at 1M."""
    return max(1, min(nlist, math.ceil(PROBES_PER_SQRT_LIST * math.sqrt(nlist))))


class VectorIndex:
    """A FAISS index whose ids are catalog vector ids, plus the catalog generation it reflects."""

    def __init__(self, index, factory: str, generation: int = -1) -> None:
        self.index = index
        self.factory = factory
        self.generation = generation
        self.exact_vectors: VectorLoader | None = None  # set by the Store: float vectors by id
        faiss = faiss_module()
        self._ivf = index if isinstance(index, faiss.IndexIVF) else None
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
        self._hnsw = inner if isinstance(inner, faiss.IndexHNSW) else None
        self.nprobe = default_nprobe(self._ivf.nlist) if self._ivf is not None else None
        self.exact = factory == DEFAULT_FACTORY
        self.mmapped = False  # lists mapped from the file, read-only (see `load`)

    @classmethod
    def create(cls, dim: int, factory: str = DEFAULT_FACTORY) -> "VectorIndex":
        faiss = faiss_module()
        try:
            inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise LoupeError(f"bad FAISS factory string {factory!r}: {str(exc).splitlines()[0]}") from None
        if isinstance(inner, faiss.IndexIVF):  # stores our ids itself and can remove them in place
            inner.set_direct_map_type(faiss.DirectMap.Hashtable)
            return cls(inner, factory)
        return cls(faiss.IndexIDMap2(inner), factory)

    @classmethod
    def load(cls, path: Path, mmap: bool = False) -> "VectorIndex":
        """Read an index written by `save`.

        `mmap` maps an IVF index's lists instead of reading them (1M vectors: 0.05 s instead of
        0.35 s, and no copy in memory); such an index is read-only, so it is for searching a
        file already current, and `Store` reads it fully before changing it.
        """
        faiss = faiss_module()
        generation, factory, _ = read_side_file(path)
        mmap = mmap and ivf_lists(factory) is not None and factory.startswith("IVF")
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0)
        out = cls(index, factory, generation)
        out.mmapped = mmap
        return out

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    @property
    def can_remove(self) -> bool:
        """Whether ids can be removed in place (else the Store rebuilds the index)."""
        return self.exact or self._ivf is not None

    def train(self, vectors: np.ndarray) -> None:
        if not self.is_trained:
            self.index.train(np.ascontiguousarray(vectors, dtype=np.float32))

    def ids(self) -> np.ndarray:
        faiss = faiss_module()
        if self._ivf is None:
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        lists = self._ivf.invlists
        parts = []
        for i in range(self._ivf.nlist):
            size = lists.list_size(i)
            if size:
                parts.append(faiss.rev_swig_ptr(lists.get_ids(i), size).copy())
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def _writable(self) -> None:
        if self.mmapped:  # FAISS would abort the process, not raise
            raise LoupeError("a memory-mapped index is read-only: load it without mmap to change it")

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._writable()
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        self._writable()
        if not len(ids):
            return
        if not self.can_remove:
            raise LoupeError(f"a {self.factory} index cannot remove vectors: it must be rebuilt")
        faiss = faiss_module()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        sel = faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids)) if self._ivf is not None else faiss.IDSelectorBatch(ids)
        self.index.remove_ids(sel)

    def reconstruct(self, vector_id: int) -> np.ndarray:
        return self.index.reconstruct(int(vector_id))

    def _params(self, sel=None, nq: int = 1):
        """Search parameters of this kind of index (nprobe / efSearch), optionally with an id filter."""
        faiss = faiss_module()
        if self._ivf is not None:
            # one query: let both cores scan lists; many queries: one query per core
            self._ivf.parallel_mode = 1 if nq < faiss.omp_get_max_threads() else 0
            return faiss.SearchParametersIVF(nprobe=self.nprobe, sel=sel) if sel else faiss.SearchParametersIVF(nprobe=self.nprobe)
        if self._hnsw is not None:
            return faiss.SearchParametersHNSW(efSearch=EF_SEARCH, sel=sel) if sel else faiss.SearchParametersHNSW(efSearch=EF_SEARCH)
        return faiss.SearchParameters(sel=sel) if sel else None

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row; `allowed` restricts the search to those ids first.

        Scores are exact inner products whatever the index: candidates of an approximate index
        are re-scored against the float vectors (`exact_vectors`) before the cut.
        """
        faiss = faiss_module()
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        nq = len(queries)
        if self.ntotal == 0:
            return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
        k = max(1, min(int(k), self.ntotal))
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=np.int64)
            if self.exact:
                return self.index.search(queries, k, params=self._params(faiss.IDSelectorBatch(allowed), nq))
            if len(allowed) <= EXACT_FILTER_MAX:
                return self._exact_among(queries, k, allowed)
        fetch = k if self.exact else min(self.ntotal, k * RERANK_FACTOR)
        sel = faiss.IDSelectorBatch(allowed) if allowed is not None else None
        scores, ids = self.index.search(queries, fetch, params=self._params(sel, nq))
        if self.exact:
            return scores, ids
        if allowed is not None and (ids[:, : min(k, len(allowed))] < 0).any():
            return self._exact_among(queries, k, allowed)  # the probed lists held too few allowed ids
        return self._rerank(queries, k, ids)

    def _vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float vectors, found) for `ids`: an id the catalog deleted meanwhile is not found."""
        if self.exact_vectors is not None:
            return self.exact_vectors(ids)
        vecs = np.stack([self.index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, self.dim), np.float32)
        return vecs, np.ones(len(ids), dtype=bool)

    def _rerank(self, queries: np.ndarray, k: int, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among each row's candidate ids (-1 = none)."""
        valid = candidates >= 0
        uniq = np.unique(candidates[valid])
        if not len(uniq):
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        vecs, found = self._vectors(uniq)
        sims = np.where(found[:, None], vecs @ queries.T, -np.inf)  # (unique candidates, queries); gone: never ranked
        pos = np.searchsorted(uniq, np.where(valid, candidates, uniq[0]))
        scores = np.where(valid, sims[pos, np.arange(len(queries))[:, None]], -np.inf)
        return _top_k(scores, candidates, k)

    def _exact_among(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over the allowed ids' float vectors (a filter small enough to scan)."""
        allowed = np.unique(allowed)
        vecs, found = self._vectors(allowed)
        allowed, vecs = allowed[found], vecs[found]  # ids deleted meanwhile are not candidates
        scores = (vecs @ queries.T).T if len(allowed) else np.zeros((len(queries), 0), np.float32)
        return _top_k(scores, np.broadcast_to(allowed, scores.shape), min(k, len(allowed)))

    def save(self, path: Path, generation: int) -> None:
        """Write to a temporary file in the same folder, fsync, then rename over the old one.

        A reader (or a crash) sees the old index or the new one, never half of one. The
        generation, factory and size go in a small side file written the same way, after the index.
        """
        faiss = faiss_module()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: faiss.write_index(self.index, tmp))
        atomic_write(side_file(path), lambda tmp: Path(tmp).write_text(f"{generation}\n{self.factory}\n{self.ntotal}\n"))
        self.generation = generation


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best `k` per row, highest score first; missing entries are (-inf, -1)."""
    if k <= 0:
        return np.zeros((len(scores), 0), np.float32), np.zeros((len(scores), 0), np.int64)
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.take_along_axis(part, np.argsort(-part_scores, axis=1, kind="stable"), axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    top_ids = np.where(np.isfinite(top_scores), np.take_along_axis(ids, order, axis=1), -1)
    return top_scores, top_ids.astype(np.int64)


def side_file(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".gen")


def read_side_file(path: Path) -> tuple[int, str, int | None]:
    """(generation, factory, ntotal) recorded beside an index file; (-1, Flat, None) if unreadable.

    Lets a caller decide whether an index file is current without loading it.
    """
    try:
        lines = side_file(path).read_text().split("\n")
        generation = int(lines[0])
    except (OSError, ValueError, IndexError):
        return -1, DEFAULT_FACTORY, None
    factory = (lines[1].strip() if len(lines) > 1 else "") or DEFAULT_FACTORY
    try:
        ntotal = int(lines[2])
    except (IndexError, ValueError):
        ntotal = None
    return generation, factory, ntotal


def atomic_write(path: Path, writer) -> None:
    """Have `writer` fill a temporary file beside `path`, fsync it, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
