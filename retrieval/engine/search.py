"""Ranking: one query vector searched in the FAISS index, with filters, paging and collapse.

Filters (folder, path glob, date range) select the allowed vector ids first and the index
search is restricted to them, so `-k 10 --after 2020` returns the best 10 from 2020 on, not
whatever of the global top 10 survives. Identical files share one vector, so duplicates
collapse into one result that lists the other paths (or, without collapse, one result each).
A `Ranking` asks the index for exactly what is needed (`loupe search -k 60`'s k for a first
page of 60) and is extended on demand, 4x deeper at a time: the CLI, its server endpoint and
the page (`loupe.retrieval.engine.pages`) all rank here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from loupe.indexer.storage.catalog_names import IMAGE, TEXT
from loupe.indexer.errors import LoupeError
from loupe.indexer.storage.store import Store
from loupe.retrieval.engine.photos import CatalogPhotos
from loupe.retrieval.engine.query import Term
from loupe.retrieval.engine.requests import Filters, RequestError, SearchRequest
from loupe.retrieval.engine.vectors import query_vector

if TYPE_CHECKING:
    from loupe.indexer.storage.catalog import ImageRow

UNBOUNDED_START = 256  # index k of a first search for "everything above min_score"
MAX_TEXT_HITS = 2000  # photos a text match promotes (exact ones first): bounds a query's cost
MAX_MATCHED_LINES = 8


@dataclass
class Hit:
    rank: int
    score: float
    kind: str
    vector_id: int
    fields: dict

    def to_json(self) -> dict:
        return {"rank": self.rank, "score": round(float(self.score), 6), "kind": self.kind, **self.fields}


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
        **_moment_fields(rows),
    }


def _moment_fields(rows) -> dict:
    """A video moment's: its representative time and scene bounds (seconds), and the video's other
    moments that ranked (collapsed into this, its best one), best first."""
    moment = getattr(rows[0], "moment", None)
    if moment is None:
        return {}
    start, t, end = moment
    others = [
        {"time": round(m[1], 3), "start": round(m[0], 3), "end": round(m[2], 3), "score": round(float(sc), 6)}
        for sc, m in getattr(rows, "others", [])
    ]
    return {"time": round(t, 3), "start": round(start, 3), "end": round(end, 3), "moments": others}


class VideoEntry(list):
    """The files of a video moment's entry, with the same video's lower-ranked moments that were
    collapsed into it: `others` [(score, (start, time, end))]."""

    def __init__(self, files) -> None:
        super().__init__(files)
        self.others: list[tuple[float, tuple]] = []


def kind_of_hit(rows) -> str:
    return "video" if getattr(rows[0], "moment", None) is not None else IMAGE


@dataclass
class Ranking:
    """One query's results so far, best first: (score, files) entries, extended on demand.

    An entry's files are the visible files of one vector that pass the filters (collapsed), or
    one file (not collapsed); for captions, the caption rows of one vector.
    """

    request: SearchRequest
    photos: object  # `CatalogPhotos` or `Snapshot`
    vector: np.ndarray | None
    allowed: np.ndarray | None = None
    entries: list[tuple[float | None, list]] = field(default_factory=list)
    exhausted: bool = False
    depth: int = 0  # index k used so far
    text_hits: dict = field(default_factory=dict)  # vector id -> TextMatch: photos whose text matched
    text_entries: list[tuple[float | None, list]] = field(default_factory=list)  # their entries, first in the list

    def text_match(self, vector_id: int) -> dict | None:
        """The JSON of the text a result matched (None: matched by CLIP alone)."""
        m = self.text_hits.get(vector_id)
        if m is None:
            return None
        return {"match": "exact" if m.tier == 0 else "typo", "edits": m.edits, "lines": m.lines[:MAX_MATCHED_LINES]}


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

    def text_vectors(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Embed sentences, reusing the on-disk query cache: a repeated sentence is not encoded again."""
        from loupe.indexer.models.query_cache import uncached

        precision = self.encoder.text_precision
        cached = self.query_cache.get(texts, precision)
        todo = uncached(texts, cached)
        fresh = dict(zip(todo, self.encoder.encode_texts(todo))) if todo else {}
        if todo:
            self.query_cache.put(todo, [fresh[t] for t in todo], precision)
        self.stats["encoded"] += len(todo)
        self.stats["cache_hits"] += sum(v is not None for v in cached)
        return [fresh[t] if v is None else v for t, v in zip(texts, cached)]

    # ---- ranking ---------------------------------------------------------------------------
    def rank(self, request: SearchRequest, photos=None, image: Callable[[str], np.ndarray] | None = None) -> Ranking:
        """A new ranking for `request` (its terms), nothing ranked yet: `extend` it.

        `photos` is the view of the visible files (default: the catalog, per query); `image`
        resolves image terms (default: file paths, `loupe.retrieval.engine.vectors`).
        """
        photos = photos if photos is not None else CatalogPhotos(self.store.catalog)
        target, filters = request.target, request.filters
        if target == IMAGE and filters.active():
            photos.check_folder(filters)
        text_only = any(t.kind == "ocr" for t in request.terms)
        if text_only:
            if target != IMAGE or len(request.terms) != 1:
                raise RequestError(400, 'text:"..." searches the text in photos, alone')
            ranking = Ranking(request, photos, None, exhausted=True)
            self._text_ranking(ranking, request.terms[0].value)
            ranking.entries = list(ranking.text_entries)
            return ranking
        index = self.store.vector_index(target)
        if index.ntotal == 0:
            what = "images" if target == IMAGE else "captions (run `loupe index-text FILE`)"
            raise RequestError(400, f"the index holds no {what}")
        vector = query_vector(self, request.terms, image)
        allowed = photos.allowed_vectors(filters) if (target == IMAGE and filters.active()) else None
        ranking = Ranking(request, photos, vector, allowed, exhausted=allowed is not None and len(allowed) == 0)
        sentence = [t for t in request.terms if t.kind == "text"]
        if target == IMAGE and len(request.terms) == 1 and len(sentence) == 1 and sentence[0].weight > 0:
            self._text_ranking(ranking, sentence[0].value)  # one sentence: photos whose text holds it come first
        return ranking

    def _text_ranking(self, ranking: Ranking, query: str) -> None:
        """Photos whose text holds `query` (`Catalog.text_matches`): exact matches first, then with
        typos (fewer edits first), each group in the query vector's (CLIP) order, else by confidence."""
        from loupe.indexer.signals.textmatch import normalize

        hits = self.store.catalog.text_matches(normalize(query))
        if not hits:
            return
        if ranking.allowed is not None:
            allowed = set(ranking.allowed.tolist())
            hits = {v: m for v, m in hits.items() if v in allowed}
        best = sorted(hits.items(), key=lambda vm: (vm[1].tier, vm[1].edits, -max(x["conf"] for x in vm[1].lines), vm[0]))
        hits = dict(best[:MAX_TEXT_HITS])
        ids = list(hits)
        scores = {v: max(x["conf"] for x in hits[v].lines) for v in ids}  # text alone: by confidence
        if ranking.vector is not None and ids:
            vecs = np.asarray(self.store.catalog.load_vectors(ids, self.meta.dim), dtype=np.float32)
            scores = dict(zip(ids, (vecs @ ranking.vector).tolist()))
        rows = ranking.photos.rows_for_vectors(ids)
        request = ranking.request
        filters = request.filters if request.filters.active() else None
        order = sorted(ids, key=lambda v: (hits[v].tier, hits[v].edits, -scores[v], v))
        entries: list[tuple[float | None, list]] = []
        for v in order:  # noqa: B007
            files = rows.get(v, [])
            if filters is not None:
                files = [f for f in files if filters.passes(f)]
            if not files:
                continue
            if request.collapse:
                entries.append((scores[v], files))
            else:
                entries.extend((scores[v], [f]) for f in files)
        ranking.text_hits = {v: hits[v] for v in order}
        ranking.text_entries = entries

    def extend(self, ranking: Ranking, need: int | None) -> None:
        """Rank until `need` entries exist (None: all above min_score) or nothing is left."""
        if ranking.exhausted:
            return
        index = self.store.vector_index(ranking.request.target)
        total = index.ntotal if ranking.allowed is None else len(ranking.allowed)
        if total == 0:
            ranking.exhausted = True
            return
        # first exactly what is needed; then 4x deeper, with room for collapsed duplicates
        k = (need if need is not None else UNBOUNDED_START) if ranking.depth == 0 else max(ranking.depth * 4, (need or 0) * 2)
        while True:
            k = min(k, total)
            scores, ids = index.search(ranking.vector[None, :], k, ranking.allowed)
            ranking.depth = k
            ranking.entries, below = self._entries(scores[0], ids[0], ranking)
            if ranking.text_entries:  # text matches first, then the CLIP ranking without them
                hits = ranking.text_hits
                ranking.entries = ranking.text_entries + [e for e in ranking.entries if e[1][0].vector_id not in hits]
            found = int((ids[0] >= 0).sum())
            ranking.exhausted = below or found < k or k >= total
            if ranking.exhausted or (need is not None and len(ranking.entries) >= need):
                return
            k *= 4

    def _entries(self, scores: np.ndarray, ids: np.ndarray, ranking: Ranking) -> tuple[list, bool]:
        """Entries for ranked vector ids; True when min_score cut the list."""
        request = ranking.request
        pairs = []
        below = False
        for s, i in zip(scores, ids):
            if i < 0:
                break
            if request.min_score is not None and s < request.min_score:
                below = True
                break
            pairs.append((float(s), int(i)))
        if request.target == TEXT:
            rows = self.store.catalog.caption_rows_for_vectors([i for _, i in pairs])
            return [(s, rows[i]) for s, i in pairs if i in rows], below
        rows = ranking.photos.rows_for_vectors([i for _, i in pairs])
        filters = request.filters if request.filters.active() else None
        entries: list[tuple[float | None, list]] = []
        videos: dict[str, VideoEntry] = {}  # path -> the entry of its best moment (collapse)
        for s, i in pairs:
            files = rows.get(i, [])
            if filters is not None:
                files = [f for f in files if filters.passes(f)]
            if not files:
                continue
            if request.collapse and getattr(files[0], "moment", None) is not None:
                best = videos.get(files[0].path)
                if best is not None:  # a lower moment of a video already listed: reachable from its best
                    best.others.append((s, files[0].moment))
                    continue
                files = videos[files[0].path] = VideoEntry(files)
            if request.collapse:
                entries.append((s, files))
            else:
                entries.extend((s, [f]) for f in files)
        if request.collapse and entries:
            entries = _collapse_same_photo(entries, self.store.location)
        return entries, below

    def search(
        self,
        terms: Sequence[Term],
        target: str = IMAGE,
        k: int = 10,
        filters: Filters | None = None,
        min_score: float | None = None,
    ) -> list[Hit]:
        """The best `k` results for the query terms in the `target` collection ('image' or 'text')."""
        if k < 1:
            raise LoupeError("-k must be at least 1")
        ranking = self.rank(SearchRequest(tuple(terms), target, 0, k, min_score, filters or Filters()))
        self.extend(ranking, k)
        hits: list[Hit] = []
        for score, rows in ranking.entries[:k]:
            vid = rows[0].vector_id
            if target == IMAGE:
                fields = _image_fields(rows)
                matched = ranking.text_match(vid)
                if matched is not None:
                    fields["text_match"] = matched
                hits.append(Hit(len(hits) + 1, score, kind_of_hit(rows), vid, fields))
            else:
                first = rows[0]
                fields = {
                    "text": first.text,
                    "image": first.image,
                    "source": first.source,
                    "position": first.position,
                    "duplicates": len(rows) - 1,
                }
                hits.append(Hit(len(hits) + 1, score, TEXT, vid, fields))
        return hits


def _collapse_same_photo(entries: list, location) -> list:
    """Copies of one photo (a "same" group of `loupe duplicates`: resized, re-encoded, cropped...)
    shown once, at the best rank of any of them, the others listed as its duplicates."""
    from loupe.retrieval.engine.copies import same_copies

    copies = same_copies(location)
    if not copies:
        return entries
    first: dict[str, list] = {}
    out = []
    for score, files in entries:
        h = getattr(files[0], "content_hash", None)
        key = copies.get(h) if h else None
        if key is None:
            out.append((score, files))
        elif key in first:
            first[key].extend(files)
        else:
            first[key] = list(files)
            out.append((score, first[key]))
    return out


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
