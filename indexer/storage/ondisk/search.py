"""Searching a built on-disk index: by global row over shards (`OnDiskIndex`), or as a catalog's
index in place of its FAISS file (`OnDiskVectorIndex`, opened by `open_catalog_ondisk`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from loupe.indexer.errors import LoupeError
from loupe.indexer.interop import shards as sh
from loupe.indexer.storage.catalog_sql import MetaView
from loupe.indexer.storage.ondisk.layout import (
    DEFAULT_RERANK, INDEX_FILE, INFO_FILE, LISTS_FILE, ONDISK_PROBES_PER_SQRT_LIST, CatalogAt, default_nprobe,
    faiss_module, read_info,
)
from loupe.indexer.storage.ondisk.sources import ShardSet
from loupe.indexer.storage.ondisk.state import catalog_ondisk_state
from loupe.indexer.storage.vectors import RERANK_FACTOR, VectorIndex


class OnDiskIndex:
    """A built on-disk index, opened for searching: lists memory-mapped, floats memory-mapped."""

    def __init__(self, out: str | os.PathLike, nprobe: int | None = None, rerank: int = DEFAULT_RERANK) -> None:
        faiss = faiss_module()
        self.out = Path(out)
        info_file = self.out / INFO_FILE
        if not info_file.exists():
            raise LoupeError(f"{self.out}: no on-disk index here (build one with `loupe build-index`)")
        self.info = json.loads(info_file.read_text())
        # OnDiskInvertedLists always map their file (read-only here). IO_FLAG_MMAP, which maps the
        # in-memory kind of lists, must not be added: with on-disk lists faiss crashes on the first
        # search (benchmarks/RESULTS.md).
        flags = faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_ONDISK_SAME_DIR
        self.index = faiss.read_index(str(self.out / INDEX_FILE), flags)
        self.ivf = faiss.extract_index_ivf(self.index)
        self.ivf.nprobe = nprobe or default_nprobe(self.ivf.nlist)
        self.rerank = rerank
        self.paths = [Path(s["path"]) for s in self.info["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum([s["rows"] for s in self.info["shards"]])]).astype(np.int64)
        self._mapped: list[np.ndarray] | None = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def nprobe(self) -> int:
        return int(self.ivf.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.ivf.nprobe = int(value)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Float32 vectors of global `rows`, from the memory-mapped shards."""
        if self._mapped is None:
            self._mapped = [sh.open_embeddings(p) for p in self.paths]
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), int(self.info["dim"])), dtype=np.float32)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            local = rows[sel] - self.offsets[s]
            order = np.argsort(local)  # ascending offsets: sequential-ish reads
            got = self._mapped[s][local[order]]
            out[np.flatnonzero(sel)[order]] = got
        return out

    def search(self, queries: np.ndarray, k: int = 10, rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, global row ids) per query: `rerank` candidates by code, re-scored exactly."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        fetch = max(k, rerank or self.rerank)
        _, cand = self.index.search(queries, fetch)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for i, row in enumerate(cand):
            row = row[row >= 0]
            if not len(row):
                continue
            exact = self.vectors(row) @ queries[i]
            top = np.argsort(-exact, kind="stable")[:k]
            scores[i, : len(top)], ids[i, : len(top)] = exact[top], row[top]
        return scores, ids


def exact_search(shards: ShardSet, queries: np.ndarray, k: int = 10, batch: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k over every row of the shards, read batch by batch (the ground truth)."""
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    offsets = shards.offsets
    for s, path in enumerate(shards.paths):
        for start in range(0, shards.rows[s], batch):
            vecs = sh.read_rows(path, start, start + batch)
            sims = queries @ vecs.T
            kk = min(k, sims.shape[1])
            part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
            cand_s = np.concatenate([best_s, np.take_along_axis(sims, part, axis=1)], axis=1)
            cand_i = np.concatenate([best_i, part + offsets[s] + start], axis=1)
            order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
            best_s, best_i = np.take_along_axis(cand_s, order, axis=1), np.take_along_axis(cand_i, order, axis=1)
    return best_s, best_i


def open_catalog_ondisk(store: CatalogAt, kind: str, meta: MetaView) -> tuple["OnDiskVectorIndex | None", str | None]:
    """The catalog's on-disk index of `kind` if there is one and it is current, else None, with a
    one-line notice when one exists but cannot be used (stale, another catalog's, unreadable)."""
    folder = store.location.ondisk_dir(kind)
    if not (folder / INFO_FILE).exists():
        return None, None
    info = read_info(folder)
    rebuild = "`loupe build-index" + (" --texts`" if kind == "text" else "`")
    if info is None:
        return None, f"the on-disk {kind} index {folder} is unreadable: searching the regular index instead; {rebuild} rebuilds it"
    current, why, generation = catalog_ondisk_state(store, kind, meta, info)
    if not current:
        return None, f"the on-disk {kind} index {folder} {why}: searching the regular index instead; {rebuild} rebuilds it"
    try:
        return OnDiskVectorIndex.open(folder, info, generation), None
    except (LoupeError, RuntimeError, OSError) as exc:
        return None, f"the on-disk {kind} index {folder} is unreadable ({str(exc).splitlines()[0]}): searching the regular index instead"


def _file_ids(folder: Path) -> tuple:
    return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in (os.stat(folder / n) for n in (INFO_FILE, INDEX_FILE, LISTS_FILE)))


class OnDiskVectorIndex(VectorIndex):
    """A catalog's on-disk index, searched like its FAISS file: ids are catalog vector ids, and
    candidates are re-scored exactly against the catalog's float vectors (`Store._attach`).

    Read-only (its lists are memory-mapped). It fetches `DEFAULT_RERANK` candidates at least,
    since its PQ codes rank less faithfully than SQ8, and visits this module's share of its
    lists (`default_nprobe`), fewer than an in-memory IVF would, which is what keeps it fast.
    """

    rerank_depth = DEFAULT_RERANK
    probes_per_sqrt_list = ONDISK_PROBES_PER_SQRT_LIST

    @classmethod
    def open(cls, folder: Path, info: dict, generation: int) -> "OnDiskVectorIndex":
        """Open the index files whose label is `info`; `generation` is the catalog's, checked current."""
        faiss = faiss_module()
        for _ in range(3):  # label and lists from one build: no swap happened while they were opened
            before = _file_ids(folder)
            flags = faiss.IO_FLAG_READ_ONLY
            if info.get("lists_path") != str(folder.resolve() / LISTS_FILE):  # the folder moved since
                flags |= faiss.IO_FLAG_ONDISK_SAME_DIR  # (faiss says so on stdout, once per opening)
            index = faiss.read_index(str(folder / INDEX_FILE), flags)
            if _file_ids(folder) == before and read_info(folder) == info:
                break
        else:
            raise LoupeError(f"{folder} kept being replaced while it was read")
        if (int(index.ntotal), int(index.d)) != (info["rows"], info["dim"]):
            raise LoupeError(f"{folder}: its label does not describe its content")
        out = cls(index, info["factory"], generation, info["catalog"])
        out.mmapped = True  # never written: `Store` searches it or falls back to the FAISS file
        out.folder = folder
        return out

    def candidates(self, k: int) -> int:
        return max(k * RERANK_FACTOR, self.rerank_depth)

