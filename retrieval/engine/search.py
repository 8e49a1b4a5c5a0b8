"""Ranking: turn a query into one vector, search the FAISS index, apply filters before the cut.

Filters (folder, path glob, date range) select the allowed vector ids first and the index
search is restricted to them, so `-k 10 --after 2020` returns the best 10 from 2020 on, not
whatever of the global top 10 survives. Identical files share one vector, so duplicates
collapse into one result that lists the other paths.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from loupe.indexer.storage.catalog_names import IMAGE, TEXT, path_key_of, prefix_bounds
from loupe.indexer.errors import LoupeError
from loupe.indexer.storage.store import Store
from loupe.retrieval.engine.query import Term

if TYPE_CHECKING:
    from loupe.indexer.storage.catalog import ImageRow

DATE_FIELDS = ("auto", "taken", "modified")


def parse_date(text: str, end: bool = False) -> datetime:
    """'2021', '2021-06', '2021-06-30' or an ISO time; `end` rounds a partial date up (exclusive)."""
    text = text.strip()
    try:
        if len(text) == 4 and text.isdigit():
            year = int(text)
            return datetime(year + 1 if end else year, 1, 1)
        if len(text) == 7 and text[4] == "-":
            year, month = int(text[:4]), int(text[5:])
            if end:
                year, month = (year + 1, 1) if month == 12 else (year, month + 1)
            return datetime(year, month, 1)
        value = datetime.fromisoformat(text)
        if end and len(text) == 10:
            from datetime import timedelta

            value += timedelta(days=1)
        return value.replace(tzinfo=None)
    except ValueError:
        raise LoupeError(f"cannot read date '{text}': use YYYY, YYYY-MM, YYYY-MM-DD or an ISO time") from None


@dataclass
class Filters:
    """Restrictions applied before the top-k cut (image results only)."""

    folder: str | None = None
    globs: list[str] = field(default_factory=list)
    after: datetime | None = None
    before: datetime | None = None
    date_field: str = "auto"  # capture time when known, else modification time

    def active(self) -> bool:
        return bool(self.folder or self.globs or self.after or self.before)

    @classmethod
    def parse(
        cls, folder: str | os.PathLike | None, globs: Sequence[str] | None, after: str | None, before: str | None,
        date_field: str = "auto",
    ) -> "Filters":
        """Filters from command-line style values (dates as YYYY[-MM[-DD]]); shared by CLI and server."""
        return cls(
            folder=str(folder) if folder else None,
            globs=list(globs or []),
            after=parse_date(after) if after else None,
            before=parse_date(before, end=True) if before else None,
            date_field=date_field,
        )


@dataclass
class Hit:
    rank: int
    score: float
    kind: str
    vector_id: int
    fields: dict

    def to_json(self) -> dict:
        return {"rank": self.rank, "score": round(float(self.score), 6), "kind": self.kind, **self.fields}


def _row_date(row: ImageRow, date_field: str) -> datetime:
    if date_field == "taken" or (date_field == "auto" and row.taken_at is not None):
        return row.taken_at
    return datetime.fromtimestamp(row.mtime_ns / 1e9)


def _row_passes(row: ImageRow, filters: Filters, folder_key: bytes | None) -> bool:
    """Whether one file passes `filters`; `folder_key` is the folder's `path_key_of`, if any."""
    if folder_key is not None and not row.path_key.startswith(prefix_bounds(folder_key)[0]):
        return False
    if filters.globs and not any(
        fnmatch.fnmatch(row.path, g) or fnmatch.fnmatch(os.path.basename(row.path), g) for g in filters.globs
    ):
        return False
    if filters.after or filters.before:
        when = _row_date(row, filters.date_field)
        if when is None or (filters.after and when < filters.after) or (filters.before and when >= filters.before):
            return False
    return True


def _image_fields(rows: list[ImageRow]) -> dict:
    first = rows[0]
    return {
        "path": first.path,
        "size": first.size,
        "width": first.width,
        "height": first.height,
        "taken_at": first.taken_at.isoformat() if first.taken_at else None,
        "modified": datetime.fromtimestamp(first.mtime_ns / 1e9).isoformat(timespec="seconds"),
        "hash": first.content_hash,
        "duplicates": [r.path for r in rows[1:]],
    }


class Searcher:
    """A loaded index plus the encoder bound to it; answers any number of queries."""

    def __init__(self, store: Store, encoder: "Encoder", query_cache: "QueryCache | None" = None) -> None:
        from loupe.indexer.models.query_cache import open_cache

        self.store = store
        self.encoder = encoder
        self.meta = store.require_meta()
        store.check_compatible(self.meta, encoder)
        self.query_cache = query_cache or open_cache(store.location, self.meta.weights_id, self.meta.dim)
        self.stats = {"cache_hits": 0, "encoded": 0}  # text terms answered by the query cache / by the model

    # ---- query vectors -----------------------------------------------------------------
    def image_vector(self, path: str) -> np.ndarray:
        """Embed a query image; an already indexed file (same bytes) reuses its stored vector."""
        from loupe.indexer.pipeline.imageio import BadImage, decode_image
        from loupe.indexer.pipeline.jobs import content_hash

        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise LoupeError(f"cannot read query image {path}: {exc.strerror}") from None
        stored = self.store.catalog.vector_for_hash(IMAGE, content_hash(data), self.meta.dim)
        if stored is not None:
            return stored
        import torch

        try:
            tensor, _ = decode_image(data, self.encoder.image_size, self.encoder.preprocess)
        except BadImage as exc:
            raise LoupeError(f"cannot use {path} as a query image: {exc}") from None
        return self.encoder.encode_images(torch.stack([tensor]))[0]

    def query_vector(self, terms: Sequence[Term]) -> np.ndarray:
        """Weighted sum of the L2-normalised term embeddings, normalised again."""
        total = np.zeros(self.meta.dim, dtype=np.float32)
        texts = [t for t in terms if t.kind == "text"]
        if texts:
            for term, vec in zip(texts, self.text_vectors([t.value for t in texts])):
                total += term.weight * vec
        for term in terms:
            if term.kind == "image":
                total += term.weight * self.image_vector(term.value)
        norm = float(np.linalg.norm(total))
        if norm < 1e-8:
            raise LoupeError("the query terms cancel out: nothing left to search for")
        return total / norm

    def text_vectors(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Embed sentences, reusing the on-disk query cache: a repeated sentence is not encoded again."""
        precision = self.encoder.text_precision
        cached = self.query_cache.get(texts, precision)
        todo = sorted({t for t, v in zip(texts, cached) if v is None})
        fresh = dict(zip(todo, self.encoder.encode_texts(todo))) if todo else {}
        if todo:
            self.query_cache.put(todo, [fresh[t] for t in todo], precision)
        self.stats["encoded"] += len(todo)
        self.stats["cache_hits"] += sum(v is not None for v in cached)
        return [fresh[t] if v is None else v for t, v in zip(texts, cached)]

    # ---- filters -------------------------------------------------------------------------
    def allowed_image_vectors(self, filters: Filters) -> np.ndarray | None:
        """Vector ids of files that pass `filters`, or None when nothing is filtered."""
        if not filters.active():
            return None
        if filters.date_field not in DATE_FIELDS:
            raise LoupeError(f"--date-field must be one of {', '.join(DATE_FIELDS)}")
        folder = path_key_of(filters.folder) if filters.folder else None
        if folder is not None and not os.path.isdir(filters.folder):
            raise LoupeError(f"--in: not a folder: {filters.folder}")
        ids: set[int] = set()
        for row in self.store.catalog.iter_image_rows(folder, status="ok"):
            if _row_passes(row, filters, None):  # the folder is the query's key range already
                ids.add(row.vector_id)
        return np.fromiter(ids, dtype=np.int64, count=len(ids))

    # ---- search ----------------------------------------------------------------------------
    def search(
        self,
        terms: Sequence[Term],
        target: str = IMAGE,
        k: int = 10,
        filters: Filters | None = None,
        min_score: float | None = None,
    ) -> list[Hit]:
        """Rank the `target` collection ('image' or 'text') for the query terms."""
        if k < 1:
            raise LoupeError("-k must be at least 1")
        index = self.store.vector_index(target)
        if index.ntotal == 0:
            what = "images" if target == IMAGE else "captions (run `loupe index-text FILE`)"
            raise LoupeError(f"the index holds no {what}")
        query = self.query_vector(terms)
        allowed = self.allowed_image_vectors(filters) if (filters and target == IMAGE) else None
        if allowed is not None and len(allowed) == 0:
            return []
        scores, ids = index.search(query[None, :], k, allowed)
        pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        if min_score is not None:
            pairs = [(s, i) for s, i in pairs if s >= min_score]
        return self._hits(pairs, target, filters if allowed is not None else None)

    def _hits(self, pairs: list[tuple[float, int]], target: str, filters: Filters | None = None) -> list[Hit]:
        """Hits with their files; under `filters`, only the files that pass them (path and duplicates)."""
        ids = [i for _, i in pairs]
        hits: list[Hit] = []
        if target == IMAGE:
            rows = self.store.catalog.image_rows_for_vectors(ids)
            if filters is not None:
                folder = path_key_of(filters.folder) if filters.folder else None
                rows = {v: kept for v, rs in rows.items() if (kept := [r for r in rs if _row_passes(r, filters, folder)])}
            for score, vid in pairs:
                if vid in rows:
                    hits.append(Hit(len(hits) + 1, score, IMAGE, vid, _image_fields(rows[vid])))
        else:
            rows = self.store.catalog.caption_rows_for_vectors(ids)
            for score, vid in pairs:
                if vid in rows:
                    first = rows[vid][0]
                    fields = {
                        "text": first.text,
                        "image": first.image,
                        "source": first.source,
                        "position": first.position,
                        "duplicates": len(rows[vid]) - 1,
                    }
                    hits.append(Hit(len(hits) + 1, score, TEXT, vid, fields))
        return hits


def open_searcher(
    home: str | Path | None = None,
    db: str | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    preload: Sequence[str] = (),
    text_precision: str = "auto",
    long_lived: bool = False,
    search_params: str | None = None,
    texts: Sequence[str] | None = None,
) -> Searcher:
    """Open the index and load its model (the one it was built with, unless told otherwise).

    The vector indices named in `preload` ('image', 'text') are read in a second thread while
    the model loads (both mostly run outside the GIL), so a cold search pays for the larger
    of the two, not their sum. `text_precision` is the query encoder's (`Encoder.set_text_precision`);
    `long_lived` (a server) reads index files into memory rather than mapping them; a one-off
    search reads a SQLite catalog through `loupe.indexer.storage.catalog_reader` (no SQLAlchemy) and scores a
    small flat collection with numpy (`loupe.indexer.storage.exact`, no FAISS), when it can.
    `search_params` (a FAISS parameter string, e.g. "nprobe=64,efSearch=128") tunes approximate
    indices over loupe's defaults. The store is opened for reading: a search never writes index files.

    The encoder comes from `loupe.indexer.models.factory.query_encoder`: a one-off CPU search whose
    index has its text tower cached loads no torch at all. `texts`, the query's sentences when
    known, let a query answered entirely from the query cache (or by images) skip loading the tower.
    """
    from loupe.indexer.models.factory import query_encoder
    from loupe.indexer.models.precision import TEXT_CHOICES
    from loupe.indexer.models.spec import resolve_spec, spec_of_meta

    if text_precision not in TEXT_CHOICES:
        raise LoupeError(f"--text-precision must be one of {', '.join(TEXT_CHOICES)}, not '{text_precision}'")
    store = _open_store(home, db, long_lived, search_params)
    meta = store.require_meta()
    spec = resolve_spec(model, pretrained, checkpoint, spec_of_meta(meta)).replace(text_precision=text_precision)

    def read_vector_indices() -> None:
        for kind in preload:
            store.vector_index(kind)

    encoder = query_encoder(
        store.location, meta, spec, device, one_off=not long_lived, texts=texts, meanwhile=read_vector_indices
    )
    return Searcher(store, encoder)


def _open_store(home, db, long_lived: bool, search_params: str | None) -> Store:
    """The index, opened for reading: with the light catalog reader and numpy scoring for a one-off search."""
    from loupe.indexer.storage.locations import resolve_location

    location = resolve_location(home, db)
    reader = None
    if not long_lived:
        from loupe.indexer.storage.catalog_reader import open_reader

        reader = open_reader(location.url)
    store = Store(location, map_files=not long_lived, writer=False, search_params=search_params, catalog=reader)
    if not long_lived:
        from loupe.indexer.storage.exact import NUMPY_FLAT_MAX

        store.numpy_flat_max = NUMPY_FLAT_MAX
    return store
