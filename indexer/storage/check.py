"""`loupe check`: whether the catalog and its vector files agree, read without changing anything."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from loupe.indexer.storage.catalog_names import IMAGE, MISSING, TEXT, catalog_identity
from loupe.indexer.storage.ondisk.state import ondisk_status
from loupe.indexer.storage.store import Store
from loupe.indexer.storage.vectors import VectorIndex, read_label, side_file


@dataclass
class CheckReport:
    problems: list[str]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_store(store: Store, sample: int = 200) -> CheckReport:
    """Verify that catalog and FAISS files agree, without changing anything.

    Checks per kind: the file exists, its label names this catalog and matches its content, it
    records the current catalog generation, it holds exactly the catalog's vector ids, and a
    sample of its vectors equals the stored ones. Every file row with a vector, missing ones
    included (their vector must outlive them), points at an image vector. Also notes missing
    files, and files no longer on disk (a re-index marks them).
    """
    meta = store.require_meta()
    problems: list[str] = []
    notes: list[str] = []
    generation = store.catalog.generation()
    identity = catalog_identity(meta)
    for kind in (IMAGE, TEXT):
        path = store.location.vector_file(kind)
        want = store.catalog.vector_ids(kind)
        if not path.exists():
            if len(want):
                problems.append(f"{kind} index file missing: {path}")
            continue
        label = read_label(path)
        if label is None:
            if side_file(path).exists():
                problems.append(f"{kind} index file has the old format (its label in a separate side file, not trusted): {path}")
            else:
                problems.append(f"{kind} index file carries no loupe label (damaged?): {path}")
            continue
        if label.catalog != identity:
            problems.append(f"{kind} index file belongs to another catalog (created {label.catalog}, this one {identity}): {path}")
            continue
        try:
            index = VectorIndex.load(path)
        except Exception as exc:
            problems.append(f"{kind} index file unreadable ({exc}): {path}")
            continue
        if index.dim != meta.dim:
            problems.append(f"{kind} index has dimension {index.dim}, catalog says {meta.dim}")
            continue
        if index.generation != generation:
            problems.append(f"{kind} index reflects catalog generation {index.generation}, catalog is at {generation}")
        have = index.ids()
        missing = np.setdiff1d(want, have)
        extra = np.setdiff1d(have, want)
        if len(missing):
            problems.append(f"{kind} index lacks {len(missing)} catalog vectors (e.g. id {missing[0]})")
        if len(extra):
            problems.append(f"{kind} index holds {len(extra)} ids unknown to the catalog (e.g. id {extra[0]})")
        common = np.intersect1d(want, have)
        if len(common):
            rng = np.random.default_rng(0)
            picked = rng.choice(common, size=min(sample, len(common)), replace=False)
            stored, found = store.catalog.fetch_vectors(picked, meta.dim)  # a writer may delete some meanwhile
            picked, stored = picked[found], stored[found]
            try:
                got = np.stack([index.reconstruct(int(i)) for i in picked]) if len(picked) else stored
                if index.exact:
                    bad = int(np.sum(np.abs(got - stored).max(axis=1) > 1e-3))
                else:  # quantised storage (SQ8, PQ...) holds an approximation of each vector
                    cos = np.sum(got * stored, axis=1) / np.maximum(np.linalg.norm(got, axis=1), 1e-12)
                    bad = int(np.sum(cos < 0.95))
                if bad:
                    problems.append(f"{kind} index: {bad} of {len(picked)} sampled vectors differ from the catalog")
            except RuntimeError:
                notes.append(f"{kind} index ({index.factory}) cannot reconstruct vectors; contents not sampled")
    dangling, bad_caps = store.catalog.dangling_references()
    if dangling:
        problems.append(f"{dangling} indexed files point at no image vector")
    if bad_caps:
        problems.append(f"{bad_caps} captions point at no text vector")
    missing = 0
    gone = 0
    for row in store.catalog.iter_image_rows():
        if row.status == MISSING:
            missing += 1
        elif not os.path.exists(os.fsdecode(row.path_key)):
            gone += 1
    for kind, od in ondisk_status(store, meta).items():
        if od["state"] != "current":
            notes.append(f"the on-disk {kind} index {od['path']} {od['why']}: searches use the FAISS file until `loupe build-index` rebuilds it")
    if missing:
        notes.append(f"{missing} files are missing (kept with their vectors, hidden from results; "
                     "`loupe index DIR --prune` or `loupe remove PATH` forgets them)")
    if gone:
        notes.append(f"{gone} catalogued files no longer exist on disk (re-run `loupe index` on their folder)")
    return CheckReport(problems, notes)
