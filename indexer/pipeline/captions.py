"""Caption corpora: `loupe index-text` makes the sentences of a file searchable (text vectors)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from loupe.indexer.errors import LoupeError
from loupe.indexer.pipeline.sources import read_captions
from loupe.indexer.pipeline.stages import content_hash
from loupe.indexer.storage.catalog import TEXT
from loupe.indexer.storage.critical import critical_section
from loupe.indexer.storage.locking import holds_writer_lock
from loupe.indexer.storage.store import Store


@dataclass
class TextReport:
    source: str  # the caption file, absolute
    captions: int = 0  # read from it
    embedded: int = 0  # texts encoded now (each distinct text once)
    reused: int = 0  # captions whose text the index had a vector for already
    seconds: float = 0.0


@holds_writer_lock
def index_captions(
    store: Store,
    encoder: "Encoder",
    path: str | os.PathLike,
    column: str | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> TextReport:
    """Make the caption corpus `path` searchable (replacing what an earlier run took from it)."""
    t0 = time.perf_counter()
    captions = read_captions(path, column)
    if not captions:
        raise LoupeError(f"no captions found in {path}")
    store.bind(encoder)
    source = os.path.abspath(path)
    report = TextReport(source=source, captions=len(captions))
    known = store.catalog.hash_to_vector(TEXT)
    hashes = [content_hash(c.text.encode("utf-8")) for c in captions]
    todo: dict[str, str] = {}
    for c, h in zip(captions, hashes):
        if h not in known and h not in todo:
            todo[h] = c.text
    report.reused = len(captions) - len(todo)
    items = list(todo.items())
    new_vectors: list[tuple[str, np.ndarray]] = []
    bar = None
    if progress and items:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="captions", unit="text", dynamic_ncols=True)
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            vecs = encoder.encode_texts([t for _, t in chunk], batch_size=batch_size)
            new_vectors.extend((h, v) for (h, _), v in zip(chunk, vecs))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    report.embedded = len(new_vectors)
    rows = [(c.position, c.text, c.image, h) for c, h in zip(captions, hashes)]
    with critical_section():
        store.catalog.replace_captions(source, rows, new_vectors, known)
    store.sync_all()
    report.seconds = time.perf_counter() - t0
    return report
