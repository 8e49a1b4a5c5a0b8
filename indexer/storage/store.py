"""An index on disk: the catalog plus its FAISS files, kept in agreement.

The FAISS files are derived data. Each carries a label (`vectors.Label`) naming the catalog
and the generation it reflects. Whenever a file is behind the catalog (an interrupted run, a
crash, another process) or belongs to another catalog, the index is brought back in line by
difference: ids the catalog lacks are removed, missing ones are added from the stored vectors.
That one mechanism serves incremental updates and crash recovery.

Only writers write files (`sync`, `sync_all`: `loupe index`, `index-text`, `remove`,
`check --repair`). A reader (`vector_index`, `refresh`: searches, `loupe serve`, `loupe check`)
brings its in-memory copy in line and leaves the file alone, so a reader never races a writer's
save; a Store opened with `writer=False` refuses to write at all.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loupe.indexer.storage.catalog_names import IMAGE, TEXT, catalog_identity
from loupe.indexer.storage.critical import critical_section
from loupe.indexer.errors import LoupeError
from loupe.indexer.storage.locations import Location, resolve_location
from loupe.indexer.storage.vectors import (
    AUTO, VectorIndex, choose_factory, ivf_lists, min_train_size, parse_search_params, read_label, side_file,
)

if TYPE_CHECKING:  # SQLAlchemy is imported only when a Catalog is opened (a cold search reads with sqlite3)
    from loupe.indexer.storage.catalog import Catalog, Meta


FACTORY_SETTING = "index_factory"
ADD_CHUNK = 100_000


@dataclass
class SyncReport:
    added: int
    removed: int
    rebuilt: bool


class Store:
    """Open (or create) the index at a location."""

    def __init__(
        self, location: Location, map_files: bool = True, writer: bool = True, search_params: str | None = None,
        catalog: "Catalog | None" = None,
    ) -> None:
        """`writer=False` opens it for reading only: `sync`/`sync_all` refuse, nothing is written.
        `search_params` (a FAISS parameter string, e.g. "nprobe=64") is set on every index handed out.
        `map_files`: memory-map a current IVF file instead of reading it (`VectorIndex.load`).
        Mapping suits a process that searches once (it opens faster); a long-lived searcher should
        read the file, since a query over mapped lists is slower (benchmarks/RESULTS.md).

        `catalog`: an open catalog of `location` to use (a cold search's `loupe.indexer.storage.catalog_reader`,
        for reading only). `numpy_flat_max` > 0 lets `vector_index` score a flat collection of at
        most that many vectors with numpy (`loupe.indexer.storage.exact`) instead of opening FAISS.
        """
        self.search_params = parse_search_params(search_params)  # a bad string fails before any work
        self.location = location
        if catalog is None:
            from loupe.indexer.storage.catalog import Catalog

            catalog = Catalog(location.url)
        self.catalog = catalog
        self.numpy_flat_max = 0
        self.map_files = map_files
        self.writer = writer
        self._indices: dict[str, VectorIndex] = {}
        self.notices: list[str] = []  # one-line notes for the user (an on-disk index not used, and why)

    @classmethod
    def open(
        cls, home: str | Path | None = None, db: str | None = None, map_files: bool = True, writer: bool = True,
        search_params: str | None = None,
    ) -> "Store":
        return cls(resolve_location(home, db), map_files, writer, search_params)

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
        from loupe.indexer.models.spec import binding_record

        meta = self.catalog.meta()
        if meta is None:
            return self.catalog.create_meta(**binding_record(encoder.spec, encoder.weights_id, encoder.dim))
        self.check_compatible(meta, encoder)
        return meta

    def check_compatible(self, meta: Meta, encoder: "Encoder") -> None:
        """Refuse to mix vectors of different models in one index (they share no space):
        `loupe.indexer.models.spec.check_bound` on the encoder's spec."""
        from loupe.indexer.models.spec import check_bound

        check_bound(meta, encoder.spec, encoder.dim, lambda: encoder.weights_id)

    def image_precisions(self) -> dict[str, float]:
        """The precisions that made this index's image vectors, each with its lowest cosine to fp32."""
        from loupe.indexer.models import precision

        return precision.parse_record(self.catalog.setting(precision.SETTING))

    def admit_precision(self, encoder: "Encoder") -> None:
        """Record the precision of the image vectors `encoder` makes, or refuse them (one-line error)
        when they could stray from the vectors already here by more than the fidelity bound."""
        from loupe.indexer.models import precision

        record = self.image_precisions()
        new = precision.admit(record, encoder.image_precision, encoder.image_cosine, encoder.image_bound)
        if new != record:
            self.catalog.set_setting(precision.SETTING, precision.format_record(new))

    # ---- vector indices -------------------------------------------------------------------
    def index_factory(self) -> str:
        """The FAISS factory setting: a factory string, or 'auto' (chosen by collection size)."""
        return self.catalog.setting(FACTORY_SETTING) or AUTO

    def set_index_factory(self, factory: str, dim: int) -> bool:
        """Remember `factory` ('auto' to go back to automatic) for every later sync; True if it changed.

        Checked by building an empty index first, so a bad string fails before any work.
        """
        factory = factory.strip()
        if factory.lower() == AUTO:
            return self.catalog.set_setting(FACTORY_SETTING, None)
        VectorIndex.create(dim, factory)
        return self.catalog.set_setting(FACTORY_SETTING, factory)

    def vector_index(self, kind: str, factory: str | None = None) -> VectorIndex:
        """The FAISS index for `kind`, in line with the catalog; reads the file, never writes it.

        A file behind the catalog is brought in line in memory (the next writer saves it).
        """
        if kind in self._indices:
            return self._indices[kind]
        meta = self.require_meta()
        index = self._ondisk(kind, meta) if factory is None else None
        if index is None and self.numpy_flat_max and not self.search_params:
            from loupe.indexer.storage.exact import exact_index

            index = exact_index(self, kind, meta, factory, self.numpy_flat_max)
        if index is None:
            index, _, _ = self._in_line(kind, meta, factory)
        self._indices[kind] = index
        return index

    def _ondisk(self, kind: str, meta: Meta) -> VectorIndex | None:
        """The on-disk index of `kind` (`loupe build-index`) when one is current; a stale or foreign
        one is left aside with a one-line notice on stderr (the FAISS file answers instead)."""
        if not self.location.ondisk_dir(kind).is_dir():
            return None  # none built: a cold search does not even import loupe.indexer.storage.ondisk
        from loupe.indexer.storage.ondisk.search import open_catalog_ondisk

        index, notice = open_catalog_ondisk(self, kind, meta)
        if notice and notice not in self.notices:
            self.notices.append(notice)
            print(f"loupe: {notice}", file=sys.stderr, flush=True)
        if index is not None:
            self._attach(index, meta)
        return index

    def sync(
        self, kind: str, meta: Meta | None = None, factory: str | None = None, load: bool = True
    ) -> tuple[VectorIndex | None, SyncReport]:
        """Writers only: make the FAISS file of `kind` hold exactly the catalog's vectors; save it if changed.

        The index kind follows `factory`, else the stored setting, else the collection size
        (see `choose_factory`); a file of another kind is rebuilt. With `load=False` a file
        whose label says it is current is not even read (returns None for the index).
        """
        if not self.writer:
            raise LoupeError(
                "this index was opened for reading: only `loupe index`, `index-text`, `remove` and `check --repair` write vector files"
            )
        meta = meta or self.require_meta()
        path = self.location.vector_file(kind)
        index, report, changed = self._in_line(kind, meta, factory, load)
        if changed:
            with critical_section():  # a Ctrl-C (even a second one) never cuts a save in half
                index.save(path, index.generation, index.catalog)
        else:
            side_file(path).unlink(missing_ok=True)  # a label file an older loupe kept beside it
        return index, report

    def _in_line(
        self, kind: str, meta: Meta, factory: str | None = None, load: bool = True
    ) -> tuple[VectorIndex | None, SyncReport, bool]:
        """The index of `kind` holding exactly the catalog's vectors, and whether the file differs from it.

        The file is used only if its label names this catalog; a file without one (an older
        loupe's, whose label sat in a side file) or of another catalog is not trusted and the
        index is built from the catalog instead. Nothing is written here.
        """
        path = self.location.vector_file(kind)
        generation = self.catalog.generation()  # before the ids: a label may lag its content, never lead it
        n = self.catalog.count_vectors(kind)
        identity = catalog_identity(meta)
        label = read_label(path)
        ours = label is not None and label.catalog == identity and label.dim == meta.dim
        wanted = choose_factory(n, factory or self.index_factory(), label.factory if ours else None)
        current = ours and (label.generation, label.ntotal, label.factory) == (generation, n, wanted)
        if current and not load:
            return None, SyncReport(0, 0, False), False
        index = None
        if ours and label.factory == wanted:
            try:
                index = VectorIndex.load(path, mmap=current and self.map_files)  # only searched: may map it
            except Exception:
                index = None  # unreadable, or its label does not match its content: rebuilt below
        if index is not None and (index.catalog, index.dim) != (identity, meta.dim):
            index = None  # replaced meanwhile by a file of another catalog
        if index is not None and index.generation == generation and index.ntotal == n:
            self._attach(index, meta)
            return index, SyncReport(0, 0, False), False
        index, report = self._update(kind, index, meta, wanted)
        index.generation, index.catalog = generation, identity
        return index, report, True

    def _update(self, kind: str, index: VectorIndex | None, meta: Meta, factory: str) -> tuple[VectorIndex, SyncReport]:
        """Apply the catalog's id difference to `index` (building a new `factory` index if None).

        An index that cannot remove ids in place (HNSW, refine...) is rebuilt when ids went away.
        """
        if index is not None and index.mmapped:
            try:
                fresh = VectorIndex.load(self.location.vector_file(kind))  # writable copy of the file
            except Exception:
                fresh = None
            same = fresh is not None and (fresh.factory, fresh.dim, fresh.catalog) == (factory, meta.dim, index.catalog)
            index = fresh if same else None
        want = self.catalog.vector_ids(kind)
        have = index.ids() if index is not None else np.zeros(0, np.int64)
        extra = np.setdiff1d(have, want, assume_unique=True)
        if index is not None and len(extra) and not index.can_remove:
            index, have, extra = None, np.zeros(0, np.int64), extra[:0]
        rebuilt = index is None
        if index is None:
            index = VectorIndex.create(meta.dim, factory)
            if not index.is_trained:
                sample, found = self.catalog.fetch_vectors(_training_sample(want, factory), meta.dim)
                index.train(sample[found])
        missing = np.setdiff1d(want, have, assume_unique=True)
        index.remove(extra)
        added = 0
        for start in range(0, len(missing), ADD_CHUNK):  # bounded memory on a large rebuild
            part = missing[start : start + ADD_CHUNK]
            vecs, found = self.catalog.fetch_vectors(part, meta.dim)  # ids deleted since listed: left out
            index.add(part[found], vecs[found])
            added += int(found.sum())
        self._attach(index, meta)
        return index, SyncReport(added, int(len(extra)), rebuilt)

    def _attach(self, index: VectorIndex, meta: Meta) -> None:
        """Set the search parameters asked for, and let an approximate index re-score its
        candidates against the catalog's float vectors."""
        index.configure(self.search_params)
        if not index.exact:
            index.exact_vectors = lambda ids: self.catalog.fetch_vectors(ids, meta.dim)

    def loaded_indices(self) -> dict[str, VectorIndex]:
        return dict(self._indices)

    def refresh(self) -> bool:
        """For a long-lived reader: bring the loaded indices in line with a catalog that changed.

        Cheap when nothing changed (one query for the generation). Otherwise the difference is
        applied in memory, without rewriting files (the writer saves them); a file rebuilt with
        another factory by the writer is read instead. Returns True when something was reloaded.
        """
        generation = self.catalog.generation()
        stale = {k: i for k, i in self._indices.items() if i.generation != generation}
        if not stale:
            return False
        meta = self.require_meta()
        identity = catalog_identity(meta)
        from loupe.indexer.storage.ondisk.search import OnDiskVectorIndex

        for kind, index in stale.items():
            if isinstance(index, OnDiskVectorIndex):  # still current (this kind unchanged), or the FAISS file
                del self._indices[kind]
                self.vector_index(kind)
                continue
            path = self.location.vector_file(kind)
            label = read_label(path)
            wanted = choose_factory(self.catalog.count_vectors(kind), self.index_factory(), index.factory)
            fresh = None
            if (
                label is not None and (label.catalog, label.generation, label.factory) == (identity, generation, wanted)
                and wanted != index.factory
            ):
                try:
                    fresh = VectorIndex.load(path)
                    self._attach(fresh, meta)
                except Exception:
                    fresh = None
            if fresh is None:
                same = wanted == index.factory and index.catalog == identity
                fresh, _ = self._update(kind, index if same else None, meta, wanted)
                fresh.generation, fresh.catalog = generation, identity
            self._indices[kind] = fresh
        return True

    def sync_all(self, load: bool = False) -> dict[str, SyncReport]:
        """Writers only: bring both FAISS files in line with the catalog (files already current are not
        read), and the catalog's query-planner statistics with its size (`Catalog.refresh_statistics`)."""
        meta = self.require_meta()
        self.catalog.refresh_statistics()
        out = {}
        for kind in (IMAGE, TEXT):
            self._indices.pop(kind, None)
            index, report = self.sync(kind, meta, load=load)
            if index is not None:
                self._indices[kind] = index
            out[kind] = report
        return out

    def vector_files(self) -> list[Path]:
        return [self.location.vector_file(k) for k in (IMAGE, TEXT)]


def _training_sample(ids: np.ndarray, factory: str, seed: int = 0) -> np.ndarray:
    """Ids of the vectors to train `factory` on: 64 per IVF list (FAISS uses at most 256), sorted."""
    nlist = ivf_lists(factory)
    size = 64 * nlist if nlist else max(min_train_size(factory), 50_000)
    if len(ids) <= size:
        return ids
    return np.sort(np.random.default_rng(seed).choice(ids, size=size, replace=False))


