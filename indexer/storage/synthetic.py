"""CLIP-like synthetic vectors with a modality gap, for ANN tuning at sizes no photo folder reaches.

Real CLIP embeddings have two properties that decide how an ANN index behaves for text
queries: (1) each modality lives in its own narrow cone (images share one mean direction,
sentences another: the "modality gap"), and (2) content is clustered hierarchically
(topics, sub-topics, near-duplicates). This generator reproduces both:

    image = normalize(a * g_img + b * content + e * noise)
    text  = normalize(a_t * g_txt + b_t * content' + e_t * noise')

where `content` is a unit vector drawn around one of `topics * subtopics` sub-topic centres
(themselves drawn around topic centres), and `content'` of a text query is drawn around a
random sub-topic independently of any image, so a query never sits on an indexed point.
The defaults give about the cosine statistics of ViT-B-32 on photos and captions: image-image
~0.45 on average, text-image ~0.15 on average and ~0.35-0.45 for the best match. `stats()`
prints them, so every benchmark states the structure it measured on.
"""

from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class ClipLike:
    """A fixed random 'world' (gap directions, topic tree) from which both modalities are drawn."""

    def __init__(
        self, dim: int = 512, topics: int = 100, subtopics: int = 50, spread: float = 1.2, seed: int = 0
    ) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        g_img = _unit(rng.standard_normal(dim))
        other = _unit(rng.standard_normal(dim))
        other = _unit(other - (other @ g_img) * g_img)
        self.g_img = g_img
        self.g_txt = _unit(0.32 * g_img + np.sqrt(1 - 0.32**2) * other)  # gap directions at cos 0.32
        top = _unit(rng.standard_normal((topics, dim)))
        parent = np.repeat(np.arange(topics), subtopics)
        self.centres = _unit(top[parent] + _unit(rng.standard_normal((topics * subtopics, dim))))
        self.spread = spread  # content noise around a sub-topic centre: larger = less clustered
        self.seed = seed

    def _content(self, rng: np.random.Generator, n: int) -> np.ndarray:
        pick = rng.integers(0, len(self.centres), n)
        return _unit(self.centres[pick] + self.spread * _unit(rng.standard_normal((n, self.dim))))

    def images(self, n: int, seed: int = 1, chunk: int = 200_000) -> np.ndarray:
        """`n` image-like unit vectors (float32), generated in chunks to bound memory."""
        rng = np.random.default_rng((self.seed, seed))
        out = np.empty((n, self.dim), dtype=np.float32)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            c = self._content(rng, m)
            noise = _unit(rng.standard_normal((m, self.dim)))
            out[start : start + m] = _unit(0.67 * self.g_img + 0.63 * c + 0.39 * noise)
        return out

    def texts(self, n: int, seed: int = 2) -> np.ndarray:
        """`n` sentence-like unit vectors: the other side of the modality gap."""
        rng = np.random.default_rng((self.seed, seed))
        c = self._content(rng, n)
        noise = _unit(rng.standard_normal((n, self.dim)))
        return _unit(0.71 * self.g_txt + 0.59 * c + 0.39 * noise)


def stats(images: np.ndarray, texts: np.ndarray, sample: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean image-image and text-image cosine, and the mean best text->image cosine."""
    rng = np.random.default_rng(seed)
    a = images[rng.choice(len(images), min(sample, len(images)), replace=False)]
    t = texts[: min(200, len(texts))]
    ii = a @ a.T
    ti = t @ images[: min(len(images), 200_000)].T
    return {
        "image_image_mean_cos": round(float((ii.sum() - np.trace(ii)) / (len(a) * (len(a) - 1))), 3),
        "text_image_mean_cos": round(float(ti.mean()), 3),
        "text_image_best_cos": round(float(ti.max(axis=1).mean()), 3),
    }


def insert_images(store, vectors: np.ndarray, root: str = "/synthetic", chunk: int = 20_000) -> np.ndarray:
    """Put `vectors` into the catalog as indexed images under `root` (bulk SQL, one generation bump).

    Stands in for `loupe index` at sizes where embedding real photos would take hours; the rows
    are what indexing writes (a file row pointing at a vector row), so sync, search and the
    catalog look-ups behind results all run exactly as for real photos. Returns the vector ids.
    """
    from sqlalchemy import func, insert, select, update

    from loupe.indexer.storage.catalog import IMAGE, ImageRow, Meta, Vector, to_blob, utcnow

    cat = store.catalog
    with cat.session() as s, s.begin():
        first = (s.scalar(select(func.max(Vector.id))) or 0) + 1
        now = utcnow()
        for start in range(0, len(vectors), chunk):
            part = vectors[start : start + chunk]
            ids = range(first + start, first + start + len(part))
            s.execute(
                insert(Vector),
                [{"id": i, "kind": IMAGE, "content_hash": f"syn{i:012d}", "data": to_blob(v)} for i, v in zip(ids, part)],
            )
            s.execute(
                insert(ImageRow),
                [
                    {
                        "path_key": f"{root}/{i:09d}.jpg".encode(), "path": f"{root}/{i:09d}.jpg", "size": 1000,
                        "mtime_ns": 0, "content_hash": f"syn{i:012d}", "vector_id": i, "status": "ok", "indexed_at": now,
                    }
                    for i in ids
                ],
            )
        s.execute(update(Meta).where(Meta.id == 1).values(generation=Meta.generation + 1))
    return np.arange(first, first + len(vectors), dtype=np.int64)


def bind_meta(store, dim: int, model: str = "synthetic") -> None:
    """Give a fresh catalog its model row, as the first `loupe index` would."""
    if store.meta() is None:
        store.catalog.create_meta(model=model, pretrained=None, weights_id="synthetic", dim=dim)
