"""Removals: `loupe remove` forgets files, folders or caption corpora (the files on disk stay)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from loupe.indexer.errors import LoupeError
from loupe.indexer.storage.catalog import path_key_of
from loupe.indexer.storage.locking import holds_writer_lock
from loupe.indexer.storage.store import Store


@dataclass
class RemoveReport:
    images: int = 0
    captions: int = 0


@holds_writer_lock
def remove_items(store: Store, paths: list[str | os.PathLike]) -> RemoveReport:
    """Forget files, whole folders, or caption corpus files, missing ones included (the files on
    disk are untouched)."""
    store.require_meta()
    catalog = store.catalog
    report = RemoveReport()
    row_ids: list[int] = []
    for p in paths:
        key = path_key_of(p)
        catalog.forget_roots(key)
        ids = [s.id for s in catalog.image_states(key).values()]  # a folder's files
        exact = catalog.image_id(key)  # or the file itself
        ids += [exact] if exact is not None else []
        removed_captions = catalog.delete_captions(os.path.abspath(p)) if not ids else 0
        if not ids and not removed_captions:
            raise LoupeError(f"nothing indexed at {os.path.abspath(p)}")
        row_ids.extend(ids)
        report.captions += removed_captions
    if row_ids:
        report.images = catalog.delete_images(row_ids)
    store.sync_all()
    return report
