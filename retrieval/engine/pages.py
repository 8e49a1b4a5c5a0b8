"""The page's searches: rankings kept in a small LRU and read page by page; uploads; one photo.

The page asks for a query page by page (offset/limit), so a ranking (`Searcher.rank`) is kept
with its query vector and extended on demand: page 2 costs no encoding and no new index search
unless it reaches past what was ranked. Photos are addressed by catalog row id only (the web
never names a file on the server), through a `Snapshot` of the visible photos re-read once per
catalog generation. An empty query browses the collection by date; a query sorted by date
orders its best `DATE_POOL` results (all above min_score, when given).

Everything here runs on the thread that loaded the model (`loupe.retrieval.engine.service`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from loupe.indexer.storage.catalog_names import IMAGE, TEXT
from loupe.retrieval.engine.photos import Photo, Snapshot
from loupe.retrieval.engine.requests import RequestError, SearchRequest
from loupe.retrieval.engine.search import Ranking
from loupe.retrieval.engine.vectors import image_bytes_vector, stored_vector

DATE_POOL = 1000
RANKINGS_KEPT = 32
UPLOADS_KEPT = 64


@dataclass
class Upload:
    """An uploaded query image, kept in memory only (its vector, never its bytes)."""

    id: str
    vector: np.ndarray
    width: int
    height: int


class Pages:
    """The page's searches over one `Searcher` (model, indices, catalog)."""

    def __init__(self, searcher) -> None:
        self.searcher = searcher
        self._snapshot: Snapshot | None = None
        self._rankings: OrderedDict[tuple, Ranking] = OrderedDict()
        self.uploads: OrderedDict[str, Upload] = OrderedDict()
        self.encodings = 0  # text encodings run (tests check that page 2 runs none)

    # ---- catalog ------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The visible photos, re-read when the catalog generation changed (the caller refreshed)."""
        generation = self.searcher.meta.generation
        if self._snapshot is None or self._snapshot.generation != generation:
            self._snapshot = Snapshot.load(self.searcher.store.catalog, generation)
            self._rankings.clear()
        return self._snapshot

    def photo(self, photo_id: int) -> Photo:
        photo = self.snapshot().by_id.get(photo_id)
        if photo is None:
            raise RequestError(404, f"no photo {photo_id} in the catalog")
        return photo

    def folders(self) -> list[dict[str, Any]]:
        """Folders that hold visible photos (directly), with their counts, in path order."""
        return [{"path": f, "count": n} for f, n in sorted(self.snapshot().folder_counts.items())]

    # ---- images by reference -------------------------------------------------------------------
    def image_ref_vector(self, ref: str) -> np.ndarray:
        """The vector of `photo:ID` (stored) or `upload:ID` (kept in memory)."""
        kind, _, ident = ref.partition(":")
        if kind == "photo":
            return stored_vector(self.searcher, self.photo(int(ident)).vector_id)
        if kind == "moment":  # a video's moment ("more like this" on a moment): a visible video's only
            vid = int(ident) if ident.isdigit() else -1
            if vid not in self.snapshot().moment_set:
                raise RequestError(404, f"no moment {ident} in the catalog")
            return stored_vector(self.searcher, vid)
        upload = self.uploads.get(ident)
        if upload is None:
            raise RequestError(404, f"no upload {ident} (uploads are kept in memory for a while only: upload it again)")
        self.uploads.move_to_end(ident)
        return upload.vector

    def add_upload(self, data: bytes) -> Upload:
        """Decode (the indexer's bomb-safe decoder) and embed an uploaded image; kept in memory only."""
        from loupe.indexer.pipeline.stages import content_hash

        ident = content_hash(data)
        known = self.uploads.get(ident)
        if known is not None:
            self.uploads.move_to_end(ident)
            return known
        image = image_bytes_vector(self.searcher, data, "the upload", decode=True)
        upload = Upload(ident, image.vector, image.width, image.height)
        self.uploads[ident] = upload
        while len(self.uploads) > UPLOADS_KEPT:
            self.uploads.popitem(last=False)
        return upload

    # ---- search -----------------------------------------------------------------------------
    def search(self, query: SearchRequest) -> dict[str, Any]:
        """One page of results: {"results", "offset", "limit", "has_more"}."""
        snap = self.snapshot()
        key = query.ranking_key()
        ranking = self._rankings.get(key)
        if ranking is None:
            ranking = self._new_ranking(query, snap)
            self._rankings[key] = ranking
            while len(self._rankings) > RANKINGS_KEPT:
                self._rankings.popitem(last=False)
        else:
            self._rankings.move_to_end(key)
        need = query.offset + query.limit
        if len(ranking.entries) < need and not ranking.exhausted:
            self.searcher.extend(ranking, need)
        page = ranking.entries[query.offset : need]
        if query.target == IMAGE:
            df = query.filters.date_field
            results = [_with_text(_image_result(photos, score, df), ranking, photos[0]) for score, photos in page]
        else:
            results = [_caption(rows[0], score) for score, rows in page]
        return {
            "results": results, "offset": query.offset, "limit": query.limit,
            "has_more": len(ranking.entries) > need or not ranking.exhausted,
        }

    def _new_ranking(self, query: SearchRequest, snap: Snapshot) -> Ranking:
        if not query.terms:
            return self._browse(query, snap)
        encoded = self.searcher.stats["encoded"]
        try:
            ranking = self.searcher.rank(query, snap, self.image_ref_vector)
        finally:
            self.encodings += self.searcher.stats["encoded"] - encoded
        if query.sort != "relevance":  # the best DATE_POOL (or all above min_score), ordered by date
            self.searcher.extend(ranking, DATE_POOL if query.min_score is None else None)
            ranking.entries = self._by_date(ranking.entries, query)
            ranking.exhausted = True
        return ranking

    def _by_date(self, entries: list, query: SearchRequest) -> list:
        newest = query.sort == "newest"
        df = query.filters.date_field

        def when(entry) -> float:
            d, _ = entry[1][0].date(df)
            return d.timestamp() if d else (-np.inf if newest else np.inf)

        return sorted(entries, key=when, reverse=newest)

    def _browse(self, query: SearchRequest, snap: Snapshot) -> Ranking:
        """The whole collection (filtered) by date, newest first unless sort=oldest: no model call."""
        filters = query.filters if query.filters.active() else None
        if filters is not None:
            snap.check_folder(filters)
        rows = np.nonzero(snap.mask(filters))[0] if filters is not None else np.arange(len(snap.photos))
        if query.collapse:  # one entry per content: its first file (path order) among those shown
            _, first = np.unique(snap.vector_ids[rows], return_index=True)
            rows = rows[np.sort(first)]
        ts = snap.dates(query.filters.date_field)[rows]
        newest = query.sort != "oldest"
        key = np.where(np.isnan(ts), -np.inf if newest else np.inf, ts)  # unknown dates last
        order = np.argsort(-key if newest else key, kind="stable")
        photos = snap.photos
        if query.collapse:
            entries = []
            for i in rows[order]:
                group = snap.by_vector[photos[i].vector_id]
                if filters is not None and len(group) > 1:
                    group = [p for p in group if filters.passes(p)]
                entries.append((None, group if group[0] is photos[i] else [photos[i], *(p for p in group if p is not photos[i])]))
        else:
            entries = [(None, [photos[i]]) for i in rows[order]]
        return Ranking(query, snap, None, entries=entries, exhausted=True)

    # ---- one photo --------------------------------------------------------------------------
    def captions_for(self, photo_id: int, limit: int) -> dict[str, Any]:
        """Image -> text: the captions nearest to a photo's stored vector."""
        photo = self.photo(photo_id)
        index = self.searcher.store.vector_index(TEXT)
        if index.ntotal == 0:
            raise RequestError(404, "no caption corpus is indexed (run `loupe index-text FILE`)")
        vector = stored_vector(self.searcher, photo.vector_id)
        scores, ids = index.search(vector[None, :], min(limit, index.ntotal), None)
        pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        rows = self.searcher.store.catalog.caption_rows_for_vectors([i for _, i in pairs])
        return {"photo": photo_id, "results": [_caption(rows[i][0], s) for s, i in pairs if i in rows]}


def _image_result(photos: list, score: float | None, date_field: str) -> dict[str, Any]:
    """A result on the page; a video moment's lists the video's other moments that ranked."""
    out = photos[0].fields(score, len(photos) - 1, date_field)
    if photos[0].moment is not None:
        out["moments"] = [
            {"time": round(m[1], 3), "start": round(m[0], 3), "end": round(m[2], 3), "score": round(float(sc), 6)}
            for sc, m in getattr(photos, "others", [])
        ]
    return out


def _with_text(fields: dict[str, Any], ranking: Ranking, photo: Photo) -> dict[str, Any]:
    """A result's fields, with the text it matched (its lines and boxes) when it matched by text."""
    matched = ranking.text_match(photo.vector_id)
    if matched is not None:
        fields["text_match"] = matched
    return fields


def _caption(row, score: float) -> dict[str, Any]:
    return {"id": row.id, "text": row.text, "score": round(float(score), 6), "source": row.source, "image": row.image}
