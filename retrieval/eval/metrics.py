"""Recall@k and ranks for cross-modal retrieval, as CLIP_benchmark defines them.

text->image: for each caption, 1 if one of its images is among the top k images; averaged
over captions. image->text: for each image, 1 if any of its captions is among the top k
captions; averaged over images (images without captions are distractors only).

Ranks are 1-based and pessimistic about ties: the rank of a query is 1 + the number of
*wrong* items scoring >= its best right item, i.e. an item tied with the true one counts as
ranked ahead of it. Sorting-based code (torch.topk in CLIP_benchmark) breaks ties arbitrarily,
which can flatter a degenerate model (all scores equal would give R@1 = 100 for query 0);
this definition cannot. Scores must be finite: NaN compares false and would flatter too.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Callable, Iterable, Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)
# Rows per block: the boolean temporaries of one block stay near chunk * n_items bytes.
DEFAULT_CHUNK = 1024

Relevant = Sequence[int | Iterable[int]]


@dataclass(frozen=True)
class Pairs:
    """The relevance relation as sorted (text, image) index pairs: who is right for whom."""

    text: np.ndarray
    image: np.ndarray
    n_texts: int
    n_images: int

    @classmethod
    def from_text_to_image(cls, text_to_image: Relevant, n_images: int) -> "Pairs":
        """`text_to_image[t]` is the image index of caption t, or several (any of them is right)."""
        texts: list[int] = []
        images: list[int] = []
        for t, target in enumerate(text_to_image):
            targets = [int(target)] if np.ndim(target) == 0 else sorted({int(i) for i in target})
            if not targets:
                raise ValueError(f"text {t} has no relevant image")
            for i in targets:
                if not 0 <= i < n_images:
                    raise ValueError(f"text {t} points at image {i}, outside 0..{n_images - 1}")
                texts.append(t)
                images.append(i)
        return cls(np.asarray(texts, np.int64), np.asarray(images, np.int64), len(text_to_image), n_images)

    def by_image(self) -> "Pairs":
        """The same relation seen from the image side (pairs sorted by image)."""
        order = np.lexsort((self.text, self.image))
        return Pairs(self.image[order], self.text[order], self.n_images, self.n_texts)


@dataclass
class Ranks:
    """1-based rank of the first right item for every query, both directions."""

    text_to_image: np.ndarray  # one per caption
    image_to_text: np.ndarray  # one per image that has at least one caption
    images_with_text: np.ndarray  # the image indices image_to_text refers to

    def summary(self, ks: Sequence[int] = DEFAULT_KS) -> dict[str, dict[str, float]]:
        """R@k in percent plus median and mean rank, per direction."""
        return {
            "text_to_image": summarize_ranks(self.text_to_image, ks),
            "image_to_text": summarize_ranks(self.image_to_text, ks),
        }


def summarize_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """R@k (percent of queries whose first right item has rank <= k), median and mean rank."""
    if len(ranks) == 0:
        raise ValueError("no queries to score")
    out = {f"R@{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = float(np.mean(ranks))
    return out


def _query_ranks(
    block: Callable[[int, int], np.ndarray], pairs: Pairs, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ranks for the queries of `pairs` (its first side); `block(a, b)` gives score rows a..b.

    Returns (query indices that have a right item, their ranks).
    """
    n_queries, n_items = pairs.n_texts, pairs.n_images
    bounds = np.searchsorted(pairs.text, np.arange(0, n_queries + chunk, chunk).clip(max=n_queries))
    queries: list[np.ndarray] = []
    ranks: list[np.ndarray] = []
    for c, start in enumerate(range(0, n_queries, chunk)):
        stop = min(start + chunk, n_queries)
        scores = np.asarray(block(start, stop))
        if scores.shape != (stop - start, n_items):
            raise ValueError(f"score block has shape {scores.shape}, expected {(stop - start, n_items)}")
        if not np.isfinite(scores).all():
            raise ValueError("similarity scores contain NaN or inf")
        lo, hi = bounds[c], bounds[c + 1]
        right = np.zeros(scores.shape, dtype=bool)
        right[pairs.text[lo:hi] - start, pairs.image[lo:hi]] = True
        has_right = right.any(axis=1)
        best = np.where(right, scores, -np.inf).max(axis=1)
        wrong_ahead = ((scores >= best[:, None]) & ~right).sum(axis=1)
        queries.append(np.flatnonzero(has_right) + start)
        ranks.append(1 + wrong_ahead[has_right])
    if not queries:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(queries), np.concatenate(ranks).astype(np.int64)


def ranks_from_scores(
    sim: np.ndarray, text_to_image: Relevant, chunk: int = DEFAULT_CHUNK
) -> Ranks:
    """Ranks from a similarity matrix `sim` of shape (texts, images) (may be a np.memmap)."""
    n_texts, n_images = sim.shape
    if len(text_to_image) != n_texts:
        raise ValueError(f"{len(text_to_image)} text->image entries for {n_texts} score rows")
    pairs = Pairs.from_text_to_image(text_to_image, n_images)
    return _ranks(lambda a, b: sim[a:b], lambda a, b: sim[:, a:b].T, pairs, chunk)


def ranks_from_embeddings(
    texts: np.ndarray, images: np.ndarray, text_to_image: Relevant, chunk: int = DEFAULT_CHUNK
) -> Ranks:
    """Ranks by inner product of embedding rows, one block at a time (no full matrix in memory)."""
    if texts.shape[1] != images.shape[1]:
        raise ValueError(f"text dim {texts.shape[1]} != image dim {images.shape[1]}")
    if len(text_to_image) != len(texts):
        raise ValueError(f"{len(text_to_image)} text->image entries for {len(texts)} texts")
    pairs = Pairs.from_text_to_image(text_to_image, len(images))
    return _ranks(lambda a, b: texts[a:b] @ images.T, lambda a, b: images[a:b] @ texts.T, pairs, chunk)


def _ranks(t_rows: Callable, i_rows: Callable, pairs: Pairs, chunk: int) -> Ranks:
    texts, t2i = _query_ranks(t_rows, pairs, chunk)
    if len(texts) != pairs.n_texts:  # from_text_to_image guarantees it; keep the invariant loud
        raise ValueError("every text needs a relevant image")
    images, i2t = _query_ranks(i_rows, pairs.by_image(), chunk)
    return Ranks(text_to_image=t2i, image_to_text=i2t, images_with_text=images)


def chance_recall(n_items: int, n_right: Sequence[int] | np.ndarray, k: int) -> float:
    """Expected R@k in percent for a random ranking: mean of 1 - C(n-r, k) / C(n, k) over queries."""
    if k >= n_items:
        return 100.0
    values, counts = np.unique(np.asarray(n_right, dtype=np.int64), return_counts=True)
    total = comb(n_items, k)
    miss = sum(int(c) * comb(n_items - int(r), k) for r, c in zip(values, counts))  # exact integers
    return float(100.0 * (1.0 - miss / (total * int(counts.sum()))))
