"""The rows an on-disk index is built from: the npy shards of a layout folder, or a catalog's vectors.

Both hand out (vectors, ids) block by block and a random training sample, never more than a
batch of float vectors at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from loupe.indexer.errors import LoupeError
from loupe.indexer.interop import shards as sh
from loupe.indexer.storage.catalog_sql import CatalogReads
from loupe.indexer.storage.ondisk.layout import ADD_BATCH
from loupe.indexer.storage.vectors import ids_digest


@dataclass
class ShardSet:
    """The npy files of one embedding kind, in order, with the global row number of each first row."""

    paths: list[Path]
    rows: list[int]
    dim: int
    dtype: str

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(sum(self.rows))

    @classmethod
    def scan(cls, root: str | os.PathLike, kind: str = sh.IMG) -> "ShardSet":
        """The `kind` embeddings of a layout folder; only the npy headers are read (no pyarrow needed)."""
        folder = sh.emb_dir(Path(root), kind)
        files = sh._numbered(folder, f"{kind}_emb", "npy")
        if not files:
            raise LoupeError(f"{root}: no {kind}_emb/{kind}_emb_N.npy shards")
        paths, rows, dims, dtypes = [], [], set(), set()
        for n in sorted(files):
            shape, dtype, _ = sh.npy_header(files[n])
            if len(shape) != 2 or dtype not in (np.float16, np.float32):
                raise LoupeError(f"{files[n]}: expected a 2-D float16/float32 array, found {dtype} {shape}")
            paths.append(files[n].resolve())
            rows.append(int(shape[0]))
            dims.add(int(shape[1]))
            dtypes.add(str(dtype))
        if len(dims) != 1:
            raise LoupeError(f"{root}: shards of different dimensions {sorted(dims)}")
        return cls(paths, rows, dims.pop(), dtypes.pop() if len(dtypes) == 1 else "mixed")

    def read_sample(self, size: int, seed: int = 0) -> np.ndarray:
        """`size` distinct random rows (float32), read row by row: no shard is mapped or loaded."""
        total = self.total
        size = min(size, total)
        picked = np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))
        out = np.empty((size, self.dim), dtype=np.float32)
        offsets = self.offsets
        done = 0
        for s, path in enumerate(self.paths):
            lo, hi = np.searchsorted(picked, [offsets[s], offsets[s + 1]])
            if lo == hi:
                continue
            shape, dtype, header = sh.npy_header(path)
            width = self.dim * dtype.itemsize
            fd = os.open(path, os.O_RDONLY)
            try:
                for j, row in enumerate(picked[lo:hi] - offsets[s]):
                    buf = os.pread(fd, width, header + int(row) * width)
                    out[done + j] = np.frombuffer(buf, dtype=dtype)
            finally:
                os.close(fd)
            done += hi - lo
        return out

    def mapped(self) -> list[np.ndarray]:
        """Every shard memory-mapped read-only (for re-ranking: only the rows touched are read)."""
        return [sh.open_embeddings(p) for p in self.paths]

    # the building interface (`_build`): one block per shard, ids are global row numbers
    block_name = "shard"

    def plan(self) -> dict:
        return {"shards": [str(p) for p in self.paths], "rows": self.rows}

    def block_rows(self) -> list[int]:
        return list(self.rows)

    def read_block(self, s: int, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(float32 vectors, ids) of shard `s`, `batch` rows at a time, read without mapping."""
        first = int(self.offsets[s])
        for start in range(0, self.rows[s], batch):
            vecs = sh.read_rows(self.paths[s], start, start + batch)
            yield vecs, np.arange(first + start, first + start + len(vecs), dtype=np.int64)


@dataclass
class CatalogRows:
    """The vectors of one kind in a loupe catalog, as `_build` reads them: ids are catalog vector
    ids (the same the catalog's FAISS files use), read in blocks of `ADD_BATCH` ids."""

    catalog: CatalogReads
    kind: str
    dim: int
    ids: np.ndarray
    block_name = "block"

    @property
    def total(self) -> int:
        return len(self.ids)

    def plan(self) -> dict:
        return {"kind": self.kind, "ids_digest": ids_digest(self.ids)}

    def block_rows(self) -> list[int]:
        return [len(self.ids[i : i + ADD_BATCH]) for i in range(0, len(self.ids), ADD_BATCH)]

    def read_block(self, b: int, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        part = self.ids[b * ADD_BATCH : (b + 1) * ADD_BATCH]
        for start in range(0, len(part), batch):
            ids = part[start : start + batch]
            yield self.catalog.load_vectors(ids, self.dim), ids

    def read_sample(self, size: int, seed: int = 0) -> np.ndarray:
        picked = self.ids
        if len(picked) > size:
            picked = np.sort(np.random.default_rng(seed).choice(self.ids, size=size, replace=False))
        return self.catalog.load_vectors(picked, self.dim)
