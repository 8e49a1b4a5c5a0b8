"""FAISS vector indices: ID-mapped to catalog vector ids, saved atomically.

One factory string names a whole index, as in FAISS itself ("Flat" is exact inner product;
the ids are always those of the catalog's `vectors` table).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from indexer.errors import LoupeError

DEFAULT_FACTORY = "Flat"


def faiss_module():
    """Import faiss, or say exactly what to install."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise LoupeError(
            "faiss is not installed: pip install 'loupe[cpu]' (faiss-cpu), or 'loupe[gpu]' (faiss-gpu) on a CUDA machine"
        ) from None
    return faiss


class VectorIndex:
    """A FAISS index whose ids are catalog vector ids, plus the catalog generation it reflects."""

    def __init__(self, index, factory: str, generation: int = -1) -> None:
        self.index = index
        self.factory = factory
        self.generation = generation

    @classmethod
    def create(cls, dim: int, factory: str = DEFAULT_FACTORY) -> "VectorIndex":
        faiss = faiss_module()
        try:
            inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise LoupeError(f"bad FAISS factory string {factory!r}: {str(exc).splitlines()[0]}") from None
        return cls(faiss.IndexIDMap2(inner), factory)

    @classmethod
    def load(cls, path: Path) -> "VectorIndex":
        """Read an index written by `save` (mmap'ed where FAISS can, so start-up stays cheap)."""
        faiss = faiss_module()
        index = faiss.read_index(str(path))
        meta = path.with_suffix(path.suffix + ".gen")
        generation, factory = -1, DEFAULT_FACTORY
        try:
            gen_text, factory = meta.read_text().split("\n", 1)
            generation = int(gen_text)
            factory = factory.strip() or DEFAULT_FACTORY
        except (OSError, ValueError):
            pass
        return cls(index, factory, generation)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        faiss = faiss_module()
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            faiss = faiss_module()
            self.index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64)))

    def reconstruct(self, vector_id: int) -> np.ndarray:
        return self.index.reconstruct(int(vector_id))

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row; `allowed` restricts the search to those ids first."""
        faiss = faiss_module()
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(int(k), self.ntotal))
        if self.ntotal == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if allowed is None:
            scores, ids = self.index.search(queries, k)
        else:
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64)))
            scores, ids = self.index.search(queries, k, params=params)
        return scores, ids

    def save(self, path: Path, generation: int) -> None:
        """Write to a temporary file in the same folder, fsync, then rename over the old one.

        A reader (or a crash) sees the old index or the new one, never half of one. The
        generation goes in a small side file written the same way, after the index.
        """
        faiss = faiss_module()
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda tmp: faiss.write_index(self.index, tmp))
        meta = path.with_suffix(path.suffix + ".gen")
        _atomic_write(meta, lambda tmp: Path(tmp).write_text(f"{generation}\n{self.factory}\n"))
        self.generation = generation


def _atomic_write(path: Path, writer) -> None:
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
