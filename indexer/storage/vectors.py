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

A file is one atomic unit: the FAISS bytes, then a label (`Label`: which catalog, which
generation, how many vectors, a digest of their ids, the factory), written to a temporary file
and renamed into place once. A reader sees either the old unit or the new one, and a label can
only describe the content it was written with.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from loupe.indexer.errors import LoupeError

DEFAULT_FACTORY = "Flat"
AUTO = "auto"
FLAT_MAX = 50_000  # exact search below this many vectors (~5 ms per query on one core)
PROBES_PER_SQRT_LIST = 8  # IVF lists a query visits = 8 * sqrt(lists): tuned on text queries, see RESULTS.md
RERANK_FACTOR = 4  # candidates per result fetched from an approximate index before exact re-scoring
EF_SEARCH = 256  # HNSW search depth when a factory override asks for HNSW
EXACT_FILTER_MAX = 50_000  # filtered searches over at most this many ids are done exactly
BLAS_THRESHOLD = 16  # faiss' default (128000 here) kept 100 batched flat queries off BLAS: ~16x slower

_IVF = re.compile(r"(?:^|,)IVF(\d+)")

FILE_FORMAT = 1  # version of the label written after the FAISS bytes
_MAGIC = b"LOUPEIX1"
_FOOTER = struct.Struct("<Q8s")  # label length, magic: the last 16 bytes of every file `save` writes
_LABEL_MAX = 1 << 20

# FAISS search parameters (faiss.ParameterSpace names, whole numbers) a user may set; "quantizer_"
# + a name sets it on an IVF's coarse quantizer. Those in _POSITIVE must be >= 1 (nprobe=0 finds nothing).
SEARCH_PARAMS = ("nprobe", "efSearch", "max_codes", "ht", "k_factor", "k_factor_rf")
_POSITIVE = ("nprobe", "efSearch", "k_factor", "k_factor_rf")

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


def default_nprobe(nlist: int, per_sqrt_list: float = PROBES_PER_SQRT_LIST) -> int:
    """Lists to visit per query. Text queries (across the modality gap) need far more than image
    queries; the share needed falls as lists multiply: 128 of 256 at 100k, 256 of 1024 at 1M."""
    return max(1, min(nlist, math.ceil(per_sqrt_list * math.sqrt(nlist))))


def parse_search_params(text: str | None) -> dict[str, int]:
    """FAISS search parameters from 'nprobe=64,efSearch=128' (a later value of a name wins).

    Names are faiss.ParameterSpace's (`SEARCH_PARAMS`, optionally prefixed by "quantizer_");
    anything else is a one-line LoupeError, raised before any index or model is loaded.
    """
    out: dict[str, int] = {}
    if text is None or not text.strip():
        return out
    names = ", ".join(SEARCH_PARAMS)
    for part in text.split(","):
        name, sep, value = (x.strip() for x in part.partition("="))
        base = name
        while base.startswith("quantizer_"):
            base = base[len("quantizer_") :]
        if not sep or base not in SEARCH_PARAMS:
            raise LoupeError(
                f"bad FAISS search parameter {part.strip()!r} in {text.strip()!r}: use NAME=NUMBER[,NAME=NUMBER...] with NAME one of {names}"
            )
        try:
            number = int(value)
        except ValueError:
            raise LoupeError(f"bad FAISS search parameter {part.strip()!r}: {name} takes a whole number") from None
        if number < (1 if base in _POSITIVE else 0):
            raise LoupeError(f"bad FAISS search parameter {part.strip()!r}: {name} must be at least {1 if base in _POSITIVE else 0}")
        out[name] = number
    return out


def join_search_params(raw: str | None, nprobe: int | None = None, ef_search: int | None = None) -> str | None:
    """One parameter string from `--search-params`, `--nprobe` and `--ef-search` (the last two win)."""
    parts = [raw.strip()] if raw and raw.strip() else []
    if nprobe is not None:
        parts.append(f"nprobe={nprobe}")
    if ef_search is not None:
        parts.append(f"efSearch={ef_search}")
    return ",".join(parts) or None


def _nested_ivf(index):
    """The IVF whose lists a search visits, wherever it sits (under IDMap, a transform, a refine); or None."""
    faiss = faiss_module()
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _filtered_params(index, sel):
    """SearchParameters for a search of `index` restricted to the ids `sel` accepts.

    The tree mirrors the index's layers and carries the values `configure` set on each, because
    a parameters object replaces them (SearchParametersIVF would probe 1 list); the selector sits
    at the innermost layer, the only one FAISS filters in. Below an IndexIDMap2 the stored ids
    are its own sequential ones, so our selector is translated through its id map.
    """
    faiss = faiss_module()
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap):
        return _filtered_params(index.index, faiss.IDSelectorTranslated(index.id_map, sel))
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.SearchParametersPreTransform(index_params=_filtered_params(index.index, sel))
    if isinstance(index, faiss.IndexRefine):
        return faiss.IndexRefineSearchParameters(k_factor=index.k_factor, base_index_params=_filtered_params(index.base_index, sel))
    if isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(nprobe=index.nprobe, max_codes=index.max_codes, sel=sel)
        quantizer = faiss.downcast_index(index.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            params.quantizer_params = faiss.SearchParametersHNSW(efSearch=quantizer.hnsw.efSearch)
        return params
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=index.hnsw.efSearch, sel=sel)
    return faiss.SearchParameters(sel=sel)


class VectorIndex:
    """A FAISS index whose ids are catalog vector ids, plus the catalog state it reflects.

    `generation` and `catalog` (the catalog's identity, see `Store`) say which state of which
    catalog the content holds: -1 and None when unknown.
    """

    probes_per_sqrt_list: float = PROBES_PER_SQRT_LIST  # `default_nprobe`'s share for this kind of index

    def __init__(self, index, factory: str, generation: int = -1, catalog: str | None = None) -> None:
        self.index = index
        self.factory = factory
        self.generation = generation
        self.catalog = catalog
        self.exact_vectors: VectorLoader | None = None  # set by the Store: float vectors by id
        faiss = faiss_module()
        self._ivf = index if isinstance(index, faiss.IndexIVF) else None  # stores our ids itself
        self._probed = _nested_ivf(index)  # the IVF a search probes, if any, wherever it sits
        self.exact = factory == DEFAULT_FACTORY
        self.mmapped = False  # lists mapped from the file, read-only (see `load`)
        self.search_params: dict[str, int] = {}
        self.configure()

    @property
    def nprobe(self) -> int | None:
        """Inverted lists a query visits (None: no IVF in this index)."""
        return int(self._probed.nprobe) if self._probed is not None else None

    def configure(self, params: str | Mapping[str, int] | None = None) -> None:
        """Set search parameters through faiss.ParameterSpace, whatever the index's shape.

        First loupe's defaults: `default_nprobe` lists for an IVF anywhere in the index (bare, under
        a PCA/OPQ transform, wrapped in IndexIDMap2 or a refine), EF_SEARCH for HNSW; then `params`
        (a faiss parameter string or a dict) over them. A parameter this index has no use for
        (nprobe on Flat) is skipped; `search_params` records what was set.
        """
        faiss = faiss_module()
        given = parse_search_params(params) if params is None or isinstance(params, str) else dict(params)
        values: dict[str, int] = {}
        if self._probed is not None:
            values["nprobe"] = default_nprobe(self._probed.nlist, self.probes_per_sqrt_list)
        values["efSearch"] = EF_SEARCH
        values.update(given)
        space = faiss.ParameterSpace()
        applied = {}
        for name, value in values.items():
            try:
                space.set_index_parameter(self.index, name, float(value))
            except RuntimeError:  # "could not set parameter": not a knob of this kind of index
                continue
            applied[name] = value
        self.search_params = applied

    def candidates(self, k: int) -> int:
        """How many candidates a search fetches for `k` results before exact re-scoring."""
        return k if self.exact else k * RERANK_FACTOR

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
        """Read an index written by `save`, with the label inside the file.

        The label is checked against the content (count, dimension, digest of the ids): a file
        whose label does not describe its content, or that has no label (written by a loupe
        that kept it in a side file), raises LoupeError. `mmap` maps an IVF index's lists instead
        of reading them (faster to open, no copy in memory: benchmarks/RESULTS.md); such an
        index is read-only, so it is for searching a file already current, and `Store` reads it
        fully before changing it.
        """
        faiss = faiss_module()
        for _ in range(3):
            before = os.stat(path)
            label = read_label(path)
            if label is None:
                raise LoupeError(f"{path} carries no loupe label (written by an older loupe, or damaged)")
            mapped = mmap and ivf_lists(label.factory) is not None and label.factory.startswith("IVF")
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mapped else 0)
            after = os.stat(path)
            if (before.st_ino, before.st_size, before.st_mtime_ns) == (after.st_ino, after.st_size, after.st_mtime_ns):
                break  # label and content came from one file: no writer replaced it in between
        else:
            raise LoupeError(f"{path} kept being replaced while it was read")
        out = cls(index, label.factory, label.generation, label.catalog)
        out.mmapped = mapped
        if (out.ntotal, out.dim) != (label.ntotal, label.dim) or ids_digest(out.ids()) != label.ids_digest:
            raise LoupeError(f"{path}: its label does not describe its content (damaged, or pieced together from two files)")
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
        """Per-search parameters: None (the values `configure` set apply), or with an id filter `sel`
        a tree that keeps them (`_filtered_params`)."""
        faiss = faiss_module()
        if self._probed is not None:
            # one query: let both cores scan lists; many queries: one query per core
            self._probed.parallel_mode = 1 if nq < faiss.omp_get_max_threads() else 0
        return _filtered_params(self.index, sel) if sel is not None else None

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
        fetch = min(self.ntotal, self.candidates(k))
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

    def save(self, path: Path, generation: int, catalog: str | None = None) -> None:
        """Write the index and its label as one file, renamed into place once.

        The FAISS bytes and then the label (`Label`: catalog identity, generation, count, digest
        of the ids, factory) go to a temporary file in the same folder, which is fsynced and
        renamed over the old one: a reader, or a crash, sees the old unit or the new one, never a
        label over other content. A side file left by an older loupe is removed afterwards.
        """
        faiss = faiss_module()
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: str) -> None:
            faiss.write_index(self.index, tmp)
            label = Label(
                generation=int(generation), ntotal=self.ntotal, ids_digest=ids_digest(self.ids()), factory=self.factory,
                dim=self.dim, catalog=catalog, faiss_bytes=os.path.getsize(tmp),
            )
            blob = json.dumps(asdict(label), sort_keys=True).encode()
            with open(tmp, "ab") as f:
                f.write(blob + _FOOTER.pack(len(blob), _MAGIC))

        atomic_write(path, write)
        self.generation, self.catalog = int(generation), catalog
        side_file(path).unlink(missing_ok=True)


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


@dataclass(frozen=True)
class Label:
    """What an index file holds, stored in the file itself after the FAISS bytes (see `save`).

    `catalog` is the identity of the catalog the vectors came from (a catalog rebuilt from scratch
    is another one, whatever its generation), `generation` the catalog state they reflect (the
    content may be newer, never older: the Store reads the generation before the ids),
    `ids_digest` ties the label to the ids actually stored, `faiss_bytes` to the file's length.
    """

    generation: int
    ntotal: int
    ids_digest: str
    factory: str
    dim: int
    catalog: str | None
    faiss_bytes: int
    format: int = FILE_FORMAT


def ids_digest(ids: np.ndarray) -> str:
    """An order-free digest of a set of ids (their count and the sum of a 64-bit mix of each)."""
    x = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)  # splitmix64
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        total = int(z.sum(dtype=np.uint64))
    return f"{len(x)}:{total:016x}"


def read_label(path: Path) -> Label | None:
    """The label at the end of an index file, read without loading the index.

    None when there is none: no file, a file written before labels moved into it (its label
    was a separate `side_file`, which is never trusted), a damaged or truncated one.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _FOOTER.size:
                return None
            f.seek(size - _FOOTER.size)
            length, magic = _FOOTER.unpack(f.read(_FOOTER.size))
            if magic != _MAGIC or length > min(_LABEL_MAX, size - _FOOTER.size):
                return None
            f.seek(size - _FOOTER.size - length)
            data = json.loads(f.read(length))
            label = Label(**{name: data[name] for name in Label.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if label.format != FILE_FORMAT or label.faiss_bytes + length + _FOOTER.size != size:
        return None
    return label


def side_file(path: Path) -> Path:
    """Where loupe kept an index file's label before it moved into the file (removed by writers)."""
    return path.with_suffix(path.suffix + ".gen")


def atomic_write(path: Path, writer) -> None:
    """Have `writer` fill a temporary file beside `path`, fsync it, then rename it over `path`."""
    import tempfile  # a writer's import (with shutil, lzma, bz2: ~8 ms a cold search does not pay)

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
