"""The saved near-duplicate grouping, read: which photos are copies of one picture.

`loupe.retrieval.engine.duplicates` finds the groups and saves their state beside the index
(`{prefix}duplicates.npz`); a search only needs to know, per content, which copy stands for its
"same" group (`same_copies`), and reads that here without the grouping's imports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def state_path(location) -> Path:
    """Where the grouping state of the index at `location` is saved."""
    return Path(location.vector_dir) / f"{location.prefix}duplicates.npz"


class Parents:
    """Union-find over a growable int64 array (path halving; the smaller root wins)."""

    def __init__(self, parents: np.ndarray | None = None) -> None:
        self.p = np.zeros(0, np.int64) if parents is None else parents.astype(np.int64)

    def grow(self, n: int) -> None:
        if n > len(self.p):
            self.p = np.concatenate([self.p, np.arange(len(self.p), n, dtype=np.int64)])

    def find(self, x: int) -> int:
        p = self.p
        while p[x] != x:
            p[x] = p[p[x]]
            x = int(p[x])
        return int(x)

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.p[max(a, b)] = min(a, b)

    def roots(self) -> np.ndarray:
        """Every item's root, vectorised (pointer jumping)."""
        r = self.p.copy()
        while True:
            nxt = r[r]
            if np.array_equal(nxt, r):
                return r
            r = nxt


_COPIES_CACHE: dict[str, tuple[int, dict[str, str]]] = {}


def same_copies(location) -> dict[str, str]:
    """content hash -> a representative content hash, for every content of a "same" group in the
    saved grouping of the index at `location` ({} when none was saved). Search collapses the
    results sharing a representative into one (like identical files). Read without FAISS; cached
    per state file version."""
    path = state_path(location)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return {}
    hit = _COPIES_CACHE.get(str(path))
    if hit is not None and hit[0] == mtime:
        return hit[1]
    try:
        with np.load(path, allow_pickle=False) as z:
            keys, roots = z["keys"], Parents(z["same"]).roots()
    except (OSError, KeyError, ValueError):
        return {}
    counts = np.bincount(roots, minlength=len(roots))
    grouped = np.flatnonzero(counts[roots] > 1)
    out = {str(keys[i]): str(keys[roots[i]]) for i in grouped.tolist()}
    _COPIES_CACHE[str(path)] = (mtime, out)
    return out
