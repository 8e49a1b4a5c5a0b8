"""Query vectors: the one place a query becomes a vector.

A query is a weighted sum of terms: sentences (through `Searcher.text_vectors`, the on-disk query
cache), image files, stored photos (their indexed vector, no re-embedding) and uploaded images
(kept in memory by the page). Each term's vector is L2-normalised; the sum is normalised again.
An image whose bytes are already indexed reuses its stored vector.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from loupe.indexer.storage.catalog_names import IMAGE
from loupe.retrieval.engine.query import Term
from loupe.retrieval.engine.requests import RequestError


class ImageVector(NamedTuple):
    vector: np.ndarray
    width: int | None  # None when the stored vector was reused without decoding
    height: int | None


def image_bytes_vector(searcher, data: bytes, what: str, decode: bool = False) -> ImageVector:
    """The vector of an image given as bytes: its stored vector when the same bytes are indexed,
    else embedded by the searcher's encoder. `decode` decodes it even then (for its size, and to
    refuse what is not an image); `what` names it in errors ("the upload", a path)."""
    from loupe.indexer.pipeline.imageio import BadImage, decode_image
    from loupe.indexer.pipeline.stages import content_hash

    stored = searcher.store.catalog.vector_for_hash(IMAGE, content_hash(data), searcher.meta.dim)
    if stored is not None and not decode:
        return ImageVector(np.asarray(stored, dtype=np.float32), None, None)
    encoder = searcher.encoder
    try:
        tensor, info = decode_image(data, encoder.image_size, encoder.preprocess)
    except BadImage as exc:
        raise RequestError(400, f"cannot use {what} as a query image: {exc}") from None
    if stored is None:
        import torch

        stored = encoder.encode_images(torch.stack([tensor]))[0]
    return ImageVector(np.asarray(stored, dtype=np.float32), info.width, info.height)


def image_file_vector(searcher, path: str) -> np.ndarray:
    """The vector of a query image file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise RequestError(400, f"cannot read query image {path}: {exc.strerror}") from None
    return image_bytes_vector(searcher, data, path).vector


def stored_vector(searcher, vector_id: int) -> np.ndarray:
    """The indexed vector `vector_id` (no re-embedding)."""
    return np.asarray(searcher.store.catalog.load_vectors([vector_id], searcher.meta.dim)[0], dtype=np.float32)


def query_vector(searcher, terms: Sequence[Term], image: Callable[[str], np.ndarray] | None = None) -> np.ndarray:
    """Weighted sum of the L2-normalised term vectors, normalised again.

    Text terms go through `searcher.text_vectors` in one batch; an image term's value goes to
    `image` (default: a file path; the page passes its resolver of `photo:ID` and `upload:ID`).
    """
    image = image or (lambda path: image_file_vector(searcher, path))
    total = np.zeros(searcher.meta.dim, dtype=np.float32)
    texts = [t for t in terms if t.kind == "text"]
    if texts:
        for term, vec in zip(texts, searcher.text_vectors([t.value for t in texts])):
            total += term.weight * vec
    for term in terms:
        if term.kind != "text":
            total += term.weight * image(term.value)
    norm = float(np.linalg.norm(total))
    if norm < 1e-8:
        raise RequestError(400, "the query terms cancel out: nothing left to search for")
    return total / norm
