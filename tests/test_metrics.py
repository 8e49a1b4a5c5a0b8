"""Recall@k and ranks against a brute-force reference that sorts, written independently."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from loupe.retrieval.eval.metrics import (
    chance_recall,
    ranks_from_embeddings,
    ranks_from_scores,
    summarize_ranks,
)


def reference(sim: np.ndarray, text_to_image: list, ks=(1, 5, 10)) -> dict:
    """Sort every query's items with ties broken *against* it (wrong items first), then read
    off the position of the first right item. Loops and Python sorting only."""
    n_texts, n_images = len(sim), len(sim[0])
    right = [set([t2i]) if isinstance(t2i, int) else set(t2i) for t2i in text_to_image]

    def first_right(scores: list[float], is_right: list[bool]) -> int:
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], is_right[j]))
        for position, j in enumerate(order, start=1):
            if is_right[j]:
                return position
        raise AssertionError("no right item")

    t2i_ranks = [
        first_right([float(sim[t][i]) for i in range(n_images)], [i in right[t] for i in range(n_images)])
        for t in range(n_texts)
    ]
    i2t_ranks = []
    for i in range(n_images):
        is_right = [i in right[t] for t in range(n_texts)]
        if any(is_right):
            i2t_ranks.append(first_right([float(sim[t][i]) for t in range(n_texts)], is_right))

    def summary(ranks):
        out = {f"R@{k}": 100.0 * sum(r <= k for r in ranks) / len(ranks) for k in ks}
        ordered = sorted(ranks)
        mid = len(ordered) // 2
        out["median_rank"] = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        out["mean_rank"] = sum(ranks) / len(ranks)
        return out

    return {"text_to_image": summary(t2i_ranks), "image_to_text": summary(i2t_ranks), "ranks": (t2i_ranks, i2t_ranks)}


def check_against_reference(sim, text_to_image, ks=(1, 5, 10), chunk=3):
    ref = reference(sim, text_to_image, ks)
    ranks = ranks_from_scores(np.asarray(sim, dtype=np.float32), text_to_image, chunk=chunk)
    assert ranks.text_to_image.tolist() == ref["ranks"][0]
    assert ranks.image_to_text.tolist() == ref["ranks"][1]
    got = ranks.summary(ks)
    for direction in ("text_to_image", "image_to_text"):
        assert got[direction] == pytest.approx(ref[direction]), direction
    return got


def test_hand_made_matrix_several_captions_per_image():
    # 3 images, 6 captions (2 each). Caption 1 finds its image second, caption 4 third.
    sim = [
        [0.9, 0.1, 0.2],
        [0.5, 0.6, 0.1],
        [0.1, 0.8, 0.3],
        [0.2, 0.7, 0.4],
        [0.3, 0.2, 0.1],
        [0.0, 0.1, 0.9],
    ]
    t2i = [0, 0, 1, 1, 2, 2]
    got = check_against_reference(sim, t2i, ks=(1, 2, 5))
    assert got["text_to_image"]["R@1"] == pytest.approx(100 * 4 / 6)
    assert got["text_to_image"]["R@2"] == pytest.approx(100 * 5 / 6)
    # image 0: best caption is 0 (0.9) -> rank 1; image 2: caption 5 (0.9) -> rank 1;
    # image 1: best right caption 2 (0.8) -> rank 1.
    assert got["image_to_text"]["R@1"] == 100.0
    assert got["text_to_image"]["mean_rank"] == pytest.approx((1 + 2 + 1 + 1 + 3 + 1) / 6)


def test_ties_never_flatter():
    # Every score equal: the true item is tied with all others, so it ranks last.
    sim = np.full((4, 4), 0.5)
    got = check_against_reference(sim, [0, 1, 2, 3], ks=(1, 3, 4))
    assert got["text_to_image"]["R@1"] == 0.0
    assert got["text_to_image"]["R@3"] == 0.0
    assert got["text_to_image"]["R@4"] == 100.0
    assert got["text_to_image"]["median_rank"] == 4
    # A partial tie: the right image ties one wrong image at the top -> rank 2.
    sim = [[0.7, 0.7, 0.1], [0.2, 0.9, 0.9], [0.3, 0.3, 0.3]]
    ranks = ranks_from_scores(np.array(sim), [0, 1, 2])
    assert ranks.text_to_image.tolist() == [2, 2, 3]


def test_ties_between_right_items_do_not_hurt():
    # Image 0 has two captions tied at the top: the first right caption is still rank 1.
    sim = [[0.8, 0.1], [0.8, 0.2], [0.8, 0.9]]
    ranks = ranks_from_scores(np.array(sim), [0, 0, 1])
    assert ranks.image_to_text.tolist()[0] == 2  # the wrong caption 2 ties at 0.8
    check_against_reference(sim, [0, 0, 1])
    sim = [[0.8, 0.1], [0.8, 0.2], [0.7, 0.9]]
    assert ranks_from_scores(np.array(sim), [0, 0, 1]).image_to_text.tolist() == [1, 1]


def test_k_larger_than_corpus_is_everything():
    sim = [[0.1, 0.9], [0.9, 0.1]]
    got = check_against_reference(sim, [0, 1], ks=(1, 10, 100))
    assert got["text_to_image"]["R@1"] == 0.0
    assert got["text_to_image"]["R@10"] == got["text_to_image"]["R@100"] == 100.0
    assert got["image_to_text"]["R@100"] == 100.0


def test_several_right_images_per_text_and_captionless_images():
    # Text 0 is right for images 0 and 2 (a shared caption); image 3 has no caption (a distractor).
    sim = [
        [0.2, 0.5, 0.4, 0.3],
        [0.1, 0.6, 0.45, 0.7],
        [0.9, 0.2, 0.3, 0.95],
    ]
    t2i = [[0, 2], 1, 0]
    got = check_against_reference(sim, t2i, ks=(1, 2, 3))
    ranks = ranks_from_scores(np.array(sim), t2i)
    assert ranks.text_to_image.tolist() == [2, 2, 2]
    assert ranks.images_with_text.tolist() == [0, 1, 2]
    assert ranks.image_to_text.tolist() == [1, 1, 2]  # caption 1 (0.45) beats image 2's caption (0.4)
    assert got["image_to_text"]["R@1"] == pytest.approx(100 * 2 / 3)


@pytest.mark.parametrize("seed", range(6))
def test_random_matrices_with_coarse_scores(seed):
    rng = np.random.default_rng(seed)
    n_images = int(rng.integers(1, 9))
    n_texts = int(rng.integers(n_images, 3 * n_images + 2))
    t2i = [int(i) for i in rng.permutation(np.resize(np.arange(n_images), n_texts))]
    if seed % 2:  # some texts with several right images
        t2i = [sorted({i, int(rng.integers(n_images))}) if rng.random() < 0.3 else i for i in t2i]
    sim = rng.integers(0, 4, size=(n_texts, n_images)) / 4.0  # few levels: many ties
    check_against_reference(sim.tolist(), t2i, ks=(1, 2, 5, 10), chunk=int(rng.integers(1, 5)))


def test_embeddings_path_matches_matrix_path_at_scale():
    # small integers: every inner product is exact in float32 whatever the BLAS kernel's blocking
    # or summation order, so ranks computed by blocks and from the full matrix must agree exactly
    # on any CPU (random normal floats differ in their last bits between block shapes on some)
    rng = np.random.default_rng(7)
    images = rng.integers(-8, 9, size=(300, 16)).astype(np.float32)
    texts = np.repeat(images, 5, axis=0) + rng.integers(-16, 17, size=(1500, 16)).astype(np.float32)
    t2i = np.repeat(np.arange(300), 5)
    by_blocks = ranks_from_embeddings(texts, images, t2i, chunk=64)
    full = ranks_from_scores(texts @ images.T, t2i, chunk=4096)
    assert np.array_equal(by_blocks.text_to_image, full.text_to_image)
    assert np.array_equal(by_blocks.image_to_text, full.image_to_text)
    summary = by_blocks.summary()
    assert 0 < summary["text_to_image"]["R@1"] < 100


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="NaN"):
        ranks_from_scores(np.array([[np.nan, 0.1], [0.1, 0.2]]), [0, 1])
    with pytest.raises(ValueError, match="outside"):
        ranks_from_scores(np.zeros((2, 2)), [0, 2])
    with pytest.raises(ValueError, match="no relevant image"):
        ranks_from_scores(np.zeros((2, 2)), [0, []])
    with pytest.raises(ValueError, match="entries"):
        ranks_from_scores(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError):
        summarize_ranks(np.zeros(0, np.int64))


def test_chance_recall_matches_enumeration():
    n, k = 7, 3
    for right in (1, 2, 4):
        subsets = list(itertools.combinations(range(n), k))
        hit = sum(any(j < right for j in s) for s in subsets) / len(subsets)
        assert chance_recall(n, [right], k) == pytest.approx(100 * hit)
    assert chance_recall(1000, [1] * 5000, 1) == pytest.approx(0.1)
    assert chance_recall(5, [1], 10) == 100.0
    # large corpora (huge binomials) stay exact: 1 - prod((n - r - j) / (n - j))
    expected = 1 - np.prod([(5000 - 5 - j) / (5000 - j) for j in range(10)])
    assert chance_recall(5000, [5] * 1000, 10) == pytest.approx(100 * expected)
