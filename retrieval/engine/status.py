"""What an index holds, as plain data: shared by `loupe info` and the web API's status view."""

from __future__ import annotations

import os
from typing import Any

from loupe.indexer.storage.locations import redact_url

from loupe.indexer.storage.ondisk.state import ondisk_status
from loupe.indexer.storage.store import Store


def indexed_folders(store: Store) -> list[dict[str, Any]]:
    """Indexed folders, offline ones marked: as the last run found them, or gone since."""
    out = []
    for root in store.catalog.roots():
        offline = root.offline or (None if os.path.isdir(os.fsdecode(root.path_key)) else "missing")
        out.append({
            "path": root.path,
            "files": root.files,
            "missing": len(store.catalog.missing_ids(root.path_key)),
            "scanned_at": root.scanned_at.isoformat(timespec="seconds") if root.scanned_at else None,
            "offline": offline,
            "offline_since": root.offline_since.isoformat(timespec="seconds") if root.offline and root.offline_since else None,
        })
    return out


def skipped_files(store: Store, limit: int | None = None) -> list[dict[str, str | None]]:
    """Skipped files with their reasons, in path order (the first `limit` when given)."""
    out = []
    for row in store.catalog.iter_image_rows(status="skipped"):
        if limit is not None and len(out) >= limit:
            break
        out.append({"path": row.path, "reason": row.reason})
    return out


def index_status(store: Store, skipped_limit: int | None = None) -> dict[str, Any]:
    """Counts, model, index kind, sizes, folders and last update of the index (`loupe info --json`)."""
    meta = store.require_meta()
    stats = store.catalog.stats()
    files = {str(p): p.stat().st_size for p in store.vector_files() if p.exists()}
    out = {
        "catalog": redact_url(store.describe()),
        "model": meta.model,
        "pretrained": meta.pretrained,
        "checkpoint": meta.checkpoint_path,
        "weights": meta.weights_id,
        "dim": meta.dim,
        "index_factory": store.index_factory(),
        "created": meta.created_at.isoformat(timespec="seconds"),
        "updated": meta.updated_at.isoformat(timespec="seconds"),
        **stats,
        "vector_files": files,
        "ondisk": ondisk_status(store, meta),
        "roots": indexed_folders(store),
    }
    if skipped_limit is not None:
        out["skipped_files"] = skipped_files(store, skipped_limit)
    return out
