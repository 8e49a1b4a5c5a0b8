"""The visible photos a ranking filters and shows, in two views with the same methods.

`CatalogPhotos` asks the catalog on each query (a one-off `loupe search` reads only what it
needs); `Snapshot` holds every visible photo of one catalog generation in memory (`loupe serve`:
filters, date browsing and result fields need no SQL per request). Both answer
`allowed_vectors(filters)` (vector ids with at least one file that passes) and
`rows_for_vectors(ids)` (the visible files of each vector, in path order).
"""

from __future__ import annotations

import dataclasses
import os
from datetime import datetime
from typing import Any, NamedTuple, Sequence

import numpy as np

from loupe.retrieval.engine.requests import Filters, RequestError


class CatalogPhotos:
    """The catalog's visible photos, read per query."""

    def __init__(self, catalog) -> None:
        self.catalog = catalog

    def check_folder(self, filters: Filters) -> None:
        if filters.folder and not os.path.isdir(filters.folder):
            raise RequestError(400, f"--in: not a folder: {filters.folder}")

    def allowed_vectors(self, filters: Filters) -> np.ndarray:
        inside = dataclasses.replace(filters, folder=None)  # the folder is the query's key range already
        rows = [row for row in self.catalog.iter_image_rows(filters.folder_key, status="ok") if inside.passes(row)]
        ids = {row.vector_id for row in rows}
        videos = {row.content_hash for row in rows if row.content_hash}
        if videos:  # a passing video's moments
            ids.update(vid for vid, _, _, _, _, h in self._moments() if h in videos)
        return np.fromiter(ids, dtype=np.int64, count=len(ids))

    def rows_for_vectors(self, ids: Sequence[int]) -> dict[int, list]:
        return self.catalog.image_rows_for_vectors(ids)

    def _moments(self) -> list[tuple]:
        from loupe.indexer.storage.catalog_sql import VISIBLE_MOMENTS_HASH

        return [tuple(r) for r in self.catalog._rows(VISIBLE_MOMENTS_HASH, {"ok": "ok"})]


class Photo(NamedTuple):
    """A visible (status ok) catalog image row, as the page shows it (a tuple: 100k load fast)."""

    id: int
    vector_id: int
    path: str
    size: int
    width: int | None
    height: int | None
    taken_at: datetime | None
    mtime_ns: int
    content_hash: str
    moment: tuple[float, float, float] | None = None  # (start, time, end) seconds: this row stands for a video's moment

    @property
    def modified(self) -> datetime:
        return datetime.fromtimestamp(self.mtime_ns / 1e9)

    def date(self, date_field: str = "auto") -> tuple[datetime | None, str]:
        """The date filters and sorting use, and where it came from ('taken' or 'modified')."""
        if date_field == "taken" or (date_field == "auto" and self.taken_at is not None):
            return self.taken_at, "taken"
        return self.modified, "modified"

    def fields(self, score: float | None = None, duplicates: int = 0, date_field: str = "auto") -> dict[str, Any]:
        """The JSON of an image result on the page (also the base of GET /api/photos/{id})."""
        when, source = self.date("auto" if date_field == "taken" else date_field)
        return {
            "id": self.id,
            "name": os.path.basename(self.path),
            "path": self.path,
            "folder": os.path.dirname(self.path),
            "score": None if score is None else round(float(score), 6),
            "width": self.width,
            "height": self.height,
            "size": self.size,
            "date": when.isoformat(timespec="seconds") if when else None,
            "date_source": source,
            "duplicates": duplicates,
            "thumb": f"/api/thumb/{self.id}?h={(self.content_hash or '')[:16]}",
            "preview": f"/api/photo/{self.id}",
            "kind": "image",
            **(self.video_fields() if self.moment is not None or _is_video(self.path) else {}),
        }

    def video_fields(self) -> dict[str, Any]:
        """A video's: the moment's time (the tile is its frame there, the preview plays from there)."""
        start, t, end = self.moment or (0.0, 0.0, None)
        out = {
            "kind": "video",
            "time": round(t, 3),
            "start": round(start, 3),
            "end": None if end is None else round(end, 3),
            "thumb": f"/api/thumb/{self.id}?h={(self.content_hash or '')[:16]}&t={t:.3f}",
            "video": f"/api/video/{self.id}",
            "preview": f"/api/video/{self.id}#t={t:.3f}",
            "ref": f"moment:{self.vector_id}" if self.moment is not None else f"photo:{self.id}",
        }
        return out


def _is_video(path: str) -> bool:
    from loupe.indexer.pipeline.media import is_video

    return is_video(path)


class Snapshot:
    """The visible photos of one catalog generation, indexed by row id, vector id and folder."""

    def __init__(self, photos: list[Photo], generation: int, moments: Sequence[tuple] = ()) -> None:
        self.generation = generation
        self.photos = photos  # path order
        self.by_id = {p.id: p for p in photos}
        self.by_vector: dict[int, list[Photo]] = {}
        for p in photos:
            self.by_vector.setdefault(p.vector_id, []).append(p)
        position = {p.id: n for n, p in enumerate(photos)}
        moment_vids, moment_pos = [], []
        for vid, photo_id, start, t, end in moments:  # a video's moments: its row at that time, by moment vector
            if photo_id in self.by_id:
                self.by_vector.setdefault(vid, []).append(self.by_id[photo_id]._replace(vector_id=vid, moment=(start, t, end)))
                moment_vids.append(vid)
                moment_pos.append(position[photo_id])
        self.moment_vids = np.asarray(moment_vids, np.int64)
        self.moment_set = set(moment_vids)
        self.moment_pos = np.asarray(moment_pos, np.int64)
        self.folder_counts: dict[str, int] = {}
        counts = self.folder_counts
        for p in photos:
            folder = p.path.rpartition("/")[0] or "/"
            counts[folder] = counts.get(folder, 0) + 1
        self.known_folders: set[str] = set()
        for folder in self.folder_counts:
            while folder not in self.known_folders and folder not in ("", "/"):
                self.known_folders.add(folder)
                folder = os.path.dirname(folder)
        n = len(photos)  # columns for filtering and date order without a Python loop per photo
        self.vector_ids = np.fromiter((p.vector_id for p in photos), np.int64, n)
        self.modified_ts = np.fromiter((p.mtime_ns for p in photos), np.float64, n) / 1e9
        self.taken_ts = np.fromiter((p.taken_at.timestamp() if p.taken_at else np.nan for p in photos), np.float64, n)

    @classmethod
    def load(cls, catalog, generation: int) -> "Snapshot":
        """Read the visible photos (`visible_photos`: plain tuples, no ORM objects) and videos' moments."""
        return cls([Photo(*row) for row in catalog.visible_photos()], generation, catalog.visible_moments())

    def check_folder(self, filters: Filters) -> None:
        if filters.folder and filters.folder not in self.known_folders:
            raise RequestError(400, f"not an indexed folder: {filters.folder}")

    def dates(self, date_field: str) -> np.ndarray:
        """Seconds (local time, as naive datetimes compare) per photo; NaN where unknown."""
        if date_field == "taken":
            return self.taken_ts
        if date_field == "modified":
            return self.modified_ts
        return np.where(np.isnan(self.taken_ts), self.modified_ts, self.taken_ts)

    def mask(self, filters: Filters) -> np.ndarray:
        """Which photos pass `filters`."""
        photos = self.photos
        keep = np.ones(len(photos), dtype=bool)
        if filters.folder:
            prefix = filters.folder_prefix()
            keep &= np.fromiter((p.path.startswith(prefix) for p in photos), bool, len(photos))
        if filters.globs:
            keep &= np.fromiter((filters.passes(p) for p in photos), bool, len(photos))
        if filters.after or filters.before:
            ts = self.dates(filters.date_field)
            with np.errstate(invalid="ignore"):
                if filters.after:
                    keep &= ts >= filters.after.timestamp()
                if filters.before:
                    keep &= ts < filters.before.timestamp()
            keep &= ~np.isnan(ts)
        return keep

    def allowed_vectors(self, filters: Filters) -> np.ndarray:
        mask = self.mask(filters)
        return np.unique(np.concatenate([self.vector_ids[mask], self.moment_vids[mask[self.moment_pos]]]))

    def rows_for_vectors(self, ids: Sequence[int]) -> dict[int, list[Photo]]:
        return {int(i): self.by_vector[int(i)] for i in ids if int(i) in self.by_vector}
