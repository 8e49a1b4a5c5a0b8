"""What an on-disk index folder holds and how its index is chosen: file names, the label
(ondisk.json), the FAISS factory and the lists a query visits."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

from loupe.indexer.storage.catalog_sql import CatalogReads, MetaView
from loupe.indexer.storage.locations import Location
from loupe.indexer.storage.vectors import default_nprobe as _default_nprobe

INDEX_FILE = "index.faiss"
LISTS_FILE = "lists.ivfdata"
INFO_FILE = "ondisk.json"
TRAINED_FILE = "trained.faiss"
BLOCKS_DIR = "blocks"
TRAIN_PER_LIST = 40  # FAISS wants >= 39 points per centroid; more costs training time for little gain
MAX_TRAIN = 300_000
DEFAULT_RERANK = 300  # candidates re-scored exactly per query (fewer lose recall with PQ codes: RESULTS.md)
ADD_BATCH = 100_000
CATALOG_SOURCE = "catalog"  # the label's "source" of an index built from a catalog's vectors
SMALL = TRAIN_PER_LIST * 256  # below this many vectors PQ's 256 codes per sub-space cannot be trained well


class CatalogAt(Protocol):
    """Where a catalog's on-disk indices live and what they are built from: a `Store`."""

    catalog: CatalogReads
    location: Location

    def require_meta(self) -> MetaView: ...


def faiss_module():
    from loupe.indexer.storage.vectors import faiss_module as load

    return load()


def auto_factory(n: int, dim: int) -> str:
    """IVF with about sqrt(n) lists (a power of two, 256..65536) and PQ codes of dim/4 bytes.

    PQ codes of dim/4 bytes keep a 10M x 512 index small enough to merge and map, and with exact
    re-ranking reach the recall of SQ8 (benchmarks/RESULTS.md, on-disk indices).

    "np": no polysemous training, which FAISS's factory turns on for IVF-PQ: a simulated annealing
    over the codes that only Hamming-filtered search uses (not this one), and most of a build's time.
    """
    nlist = 2 ** int(round(math.log2(max(256.0, min(65536.0, math.sqrt(max(n, 1)))))))
    m = max(1, dim // 4)
    while dim % m:
        m -= 1
    return f"IVF{nlist},PQ{m}np"


ONDISK_PROBES_PER_SQRT_LIST = 4  # recall and latency per setting: benchmarks/RESULTS.md, on-disk indices


def default_nprobe(nlist: int) -> int:
    """Lists a query visits by default: 4 * sqrt(lists), half the in-memory share (`vectors.default_nprobe`)
    since the candidates re-ranked exactly recover what PQ codes misorder (benchmarks/RESULTS.md)."""
    return _default_nprobe(nlist, ONDISK_PROBES_PER_SQRT_LIST)


def catalog_factory(n: int, dim: int) -> str:
    """`auto_factory` for a collection large enough to train it; below `SMALL`, fewer lists (at
    least `TRAIN_PER_LIST` vectors each) and SQ8 codes, so any collection gets a usable index."""
    if n >= SMALL:
        return auto_factory(n, dim)
    return f"IVF{2 ** int(math.log2(max(1, n // TRAIN_PER_LIST)))},SQ8"


def read_info(folder: Path) -> dict | None:
    """The label of the on-disk index in `folder`; None when there is none or it is unreadable."""
    try:
        return json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
