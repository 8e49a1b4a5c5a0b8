"""Whether a catalog's on-disk index is current, and what `loupe info` and `loupe check` say of it."""

from __future__ import annotations

from loupe.indexer.storage.catalog_names import IMAGE, TEXT, catalog_identity
from loupe.indexer.storage.catalog_sql import MetaView
from loupe.indexer.storage.ondisk.layout import CATALOG_SOURCE, CatalogAt, read_info
from loupe.indexer.storage.vectors import ids_digest


def catalog_ondisk_state(store: CatalogAt, kind: str, meta: MetaView, info: dict) -> tuple[bool, str, int]:
    """(current, why not, catalog generation) of the on-disk index described by `info`.

    Current: built for this catalog (identity and dimension), at its present generation, or
    holding exactly its present vector ids (a change that left this kind alone, such as new
    captions for the image index, does not make it stale; ids are never reused, so the same ids
    are the same vectors).
    """
    generation = store.catalog.generation()
    if info.get("source") != CATALOG_SOURCE or info.get("kind") != kind:
        return False, "was not built from this catalog's vectors", generation
    if info.get("catalog") != catalog_identity(meta) or info.get("dim") != meta.dim:
        return False, "belongs to another catalog", generation
    if info.get("generation") == generation:
        return True, "", generation
    n = store.catalog.count_vectors(kind)
    if n != info.get("rows") or ids_digest(store.catalog.vector_ids(kind)) != info.get("ids_digest"):
        return False, f"is behind the catalog (built over {info.get('rows')} vectors, the catalog now has {n})", generation
    return True, "", generation


def ondisk_status(store: CatalogAt, meta: MetaView) -> dict[str, dict]:
    """What `loupe info` says of the on-disk indices of this catalog: kind -> facts and state."""
    out = {}
    for kind in (IMAGE, TEXT):
        folder = store.location.ondisk_dir(kind)
        info = read_info(folder)
        if info is None:
            continue
        current, why, _ = catalog_ondisk_state(store, kind, meta, info)
        out[kind] = {
            "path": str(folder), "factory": info.get("factory"), "vectors": info.get("rows"), "built_at": info.get("built_at"),
            "bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
            "state": "current" if current else "stale", "why": why or None,
        }
    return out


