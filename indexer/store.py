"""An index on disk: the catalog plus its FAISS files, kept in agreement.

The FAISS files are derived data. Whenever the catalog generation differs from the one a
FAISS file records (an interrupted run, a crash, another process), `vector_index` brings the
file back in line by difference: ids the catalog lacks are removed, missing ones are added
from the stored vectors. That one mechanism serves incremental updates and crash recovery.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.catalog import IMAGE, TEXT, Catalog, Meta
from indexer.errors import LoupeError
from indexer.locations import Location, resolve_location
from indexer.vectors import DEFAULT_FACTORY, VectorIndex


@dataclass
class SyncReport:
    added: int
    removed: int
    rebuilt: bool


class Store:
    """Open (or create) the index at a location."""

    def __init__(self, location: Location) -> None:
        self.location = location
        self.catalog = Catalog(location.url)
        self._indices: dict[str, VectorIndex] = {}

    @classmethod
    def open(cls, home: str | Path | None = None, db: str | None = None) -> "Store":
        return cls(resolve_location(home, db))

    def meta(self) -> Meta | None:
        return self.catalog.meta()

    def require_meta(self) -> Meta:
        meta = self.catalog.meta()
        if meta is None:
            raise LoupeError(f"no index at {self.describe()}: run `loupe index FOLDER` first")
        return meta

    def describe(self) -> str:
        if self.location.url.startswith("sqlite:///"):
            return self.location.url[len("sqlite:///") :]
        return self.location.url

    # ---- model binding ------------------------------------------------------------------
    def bind(self, encoder: "Encoder") -> Meta:
        """Bind a new index to `encoder`'s model, or check an existing one matches it."""
        meta = self.catalog.meta()
        spec = encoder.spec
        ckpt_stat = os.stat(spec.checkpoint) if spec.checkpoint else None
        if meta is None:
            return self.catalog.create_meta(
                model=spec.model,
                pretrained=spec.pretrained,
                checkpoint_path=spec.checkpoint,
                checkpoint_size=ckpt_stat.st_size if ckpt_stat else None,
                checkpoint_mtime_ns=ckpt_stat.st_mtime_ns if ckpt_stat else None,
                weights_id=encoder.weights_id,
                dim=encoder.dim,
            )
        self.check_compatible(meta, encoder)
        return meta

    def check_compatible(self, meta: Meta, encoder: "Encoder") -> None:
        """Refuse to mix vectors of different models in one index (they share no space)."""
        spec = encoder.spec
        asked = spec.describe()
        built = _meta_describe(meta)
        if spec.model != meta.model or encoder.dim != meta.dim:
            raise LoupeError(
                f"this index was built with {built}, not {asked}: use that model, or another --home/--db for a new index"
            )
        if spec.checkpoint:
            st = os.stat(spec.checkpoint)
            same_file = (
                spec.checkpoint == meta.checkpoint_path
                and st.st_size == meta.checkpoint_size
                and st.st_mtime_ns == meta.checkpoint_mtime_ns
            )
            weights = meta.weights_id if same_file else encoder.weights_id  # hash only when needed
        else:
            weights = encoder.weights_id
        if weights != meta.weights_id:
            raise LoupeError(
                f"this index was built with {built} ({meta.weights_id[:19]}), but {asked} has other weights "
                f"({weights[:19]}): use the same weights, or another --home/--db"
            )

    # ---- vector indices -------------------------------------------------------------------
    def vector_index(self, kind: str, factory: str | None = None) -> VectorIndex:
        """The FAISS index for `kind`, synced to the catalog if it lags behind."""
        if kind in self._indices:
            return self._indices[kind]
        meta = self.require_meta()
        index, _ = self.sync(kind, meta, factory)
        self._indices[kind] = index
        return index

    def sync(self, kind: str, meta: Meta | None = None, factory: str | None = None) -> tuple[VectorIndex, SyncReport]:
        """Make the FAISS file of `kind` hold exactly the catalog's vectors; save it if changed."""
        meta = meta or self.require_meta()
        path = self.location.vector_file(kind)
        generation = self.catalog.generation()
        index = None
        if path.exists():
            try:
                index = VectorIndex.load(path)
            except Exception:
                index = None  # unreadable file: rebuilt below from the catalog
        if index is not None and (index.dim != meta.dim or (factory and index.factory != factory)):
            index = None
        if index is not None and index.generation == generation and index.ntotal == self.catalog.count_vectors(kind):
            return index, SyncReport(0, 0, False)
        rebuilt = index is None
        if index is None:
            index = VectorIndex.create(meta.dim, factory or DEFAULT_FACTORY)
        want = self.catalog.vector_ids(kind)
        have = index.ids()
        missing = np.setdiff1d(want, have, assume_unique=True)
        extra = np.setdiff1d(have, want, assume_unique=True)
        index.remove(extra)
        if len(missing):
            index.add(missing, self.catalog.load_vectors(missing, meta.dim))
        index.save(path, generation)
        return index, SyncReport(int(len(missing)), int(len(extra)), rebuilt)

    def sync_all(self) -> dict[str, SyncReport]:
        meta = self.require_meta()
        out = {}
        for kind in (IMAGE, TEXT):
            index, report = self.sync(kind, meta)
            self._indices[kind] = index
            out[kind] = report
        return out

    def vector_files(self) -> list[Path]:
        return [self.location.vector_file(k) for k in (IMAGE, TEXT)]


def _meta_describe(meta: Meta) -> str:
    if meta.checkpoint_path:
        return f"{meta.model} (checkpoint {meta.checkpoint_path})"
    if meta.pretrained:
        return f"{meta.model}/{meta.pretrained}"
    return meta.model


def spec_from_meta(meta: Meta) -> "ModelSpec":
    """The model an index was built with, so search and add need no model options."""
    from indexer.encoder import ModelSpec

    if meta.checkpoint_path and not os.path.isfile(meta.checkpoint_path):
        raise LoupeError(
            f"this index was built with checkpoint {meta.checkpoint_path}, which no longer exists: pass --checkpoint FILE"
        )
    return ModelSpec(model=meta.model, pretrained=meta.pretrained, checkpoint=meta.checkpoint_path)


@dataclass
class CheckReport:
    problems: list[str]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_store(store: Store, sample: int = 200) -> CheckReport:
    """Verify that catalog and FAISS files agree, without changing anything.

    Checks per kind: the file exists and loads, it records the current catalog generation,
    it holds exactly the catalog's vector ids, and a sample of its vectors equals the stored ones.
    Also notes catalogued files that no longer exist on disk (a re-index will drop them).
    """
    from sqlalchemy import func, select

    from indexer.catalog import CaptionRow, ImageRow, Vector

    meta = store.require_meta()
    problems: list[str] = []
    notes: list[str] = []
    generation = store.catalog.generation()
    for kind in (IMAGE, TEXT):
        path = store.location.vector_file(kind)
        want = store.catalog.vector_ids(kind)
        if not path.exists():
            if len(want):
                problems.append(f"{kind} index file missing: {path}")
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
            stored = store.catalog.load_vectors(picked, meta.dim)
            try:
                got = np.stack([index.reconstruct(int(i)) for i in picked])
                bad = int(np.sum(np.abs(got - stored).max(axis=1) > 1e-3))
                if bad:
                    problems.append(f"{kind} index: {bad} of {len(picked)} sampled vectors differ from the catalog")
            except RuntimeError:
                notes.append(f"{kind} index ({index.factory}) cannot reconstruct vectors; contents not sampled")
    with store.catalog.session() as s:
        dangling = s.scalar(
            select(func.count()).select_from(ImageRow).join(Vector, ImageRow.vector_id == Vector.id, isouter=True)
            .where(ImageRow.status == "ok", (Vector.id.is_(None)) | (Vector.kind != IMAGE))
        )
        if dangling:
            problems.append(f"{dangling} indexed files point at no image vector")
        bad_caps = s.scalar(
            select(func.count()).select_from(CaptionRow).join(Vector, CaptionRow.vector_id == Vector.id, isouter=True)
            .where((Vector.id.is_(None)) | (Vector.kind != TEXT))
        )
        if bad_caps:
            problems.append(f"{bad_caps} captions point at no text vector")
    gone = sum(1 for row in store.catalog.iter_image_rows() if not os.path.exists(os.fsdecode(row.path_key)))
    if gone:
        notes.append(f"{gone} catalogued files no longer exist on disk (re-run `loupe index` on their folder)")
    return CheckReport(problems, notes)
