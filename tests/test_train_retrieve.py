"""The whole path, proven with a model trained here (no weights can be downloaded):
generate captioned shapes -> `loupe train` a tiny CLIP from scratch -> `loupe eval` on held-out
pictures and on unseen colour-shape pairs -> `loupe index` + `loupe search` both ways.

Bars come from measured runs (see the closing note of issue 4) with wide margins; chance levels
are computed by `loupe eval` itself and checked to sit far below the bars.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.synthetic_shapes import generate

STEPS = 300  # 150 is seed-sensitive, 300 stable (shared notes); ~0.3-0.6 s/step on 2 cores


def captions_by_path(part) -> dict[str, str]:
    entries = json.loads((part / "captions.json").read_text())
    return {str(part / "images" / e["image"]): e["captions"][0] for e in entries}


def most_common(captions: dict[str, str], n: int) -> list[str]:
    return [text for text, _ in Counter(sorted(captions.values())).most_common(n)]


@pytest.mark.slow
def test_train_then_retrieve_held_out_pictures(tmp_path, loupe):
    parts = generate(tmp_path / "shapes", n_train=4000, n_test=500, n_unseen=200, seed=0)
    model = tmp_path / "shapes-tiny.pt"
    out = loupe(
        "train", "--model", "loupe-tiny", "--images", parts["train"] / "images",
        "--annotations", parts["train"] / "captions.json", "--steps", STEPS, "--batch-size", "128",
        "--seed", "0", "--device", "cpu", "--out", model,
        "--val-images", parts["unseen"] / "images", "--val-annotations", parts["unseen"] / "captions.json",
        timeout=900,
    ).stdout
    assert f"step {STEPS}/{STEPS}" in out and "val (same-caption)" in out and model.is_file()

    scores = {}
    for name in ("test", "unseen"):
        report = tmp_path / f"{name}.json"
        loupe("eval", "--checkpoint", model, "--images", parts[name] / "images",
              "--annotations", parts[name] / "captions.json", "--json", report)
        scores[name] = json.loads(report.read_text())["scores"]

    # Held-out pictures of seen combinations. Captions repeat across pictures, so the fair
    # measure counts any picture with the query's caption ("same caption" view).
    same = scores["test"]["same_caption"]
    assert same["text_to_image"]["R@5"] >= 80 and same["chance"]["text_to_image"]["R@5"] < 5
    assert same["image_to_text"]["R@10"] >= 80 and same["chance"]["image_to_text"]["R@10"] < 5
    assert same["text_to_image"]["R@1"] >= 40 and same["image_to_text"]["R@1"] >= 40
    exact = scores["test"]["exact"]  # the one exact picture among look-alikes: still far above chance
    assert exact["text_to_image"]["R@10"] >= 60 and exact["chance"]["text_to_image"]["R@10"] == pytest.approx(2.0)

    # Colour-shape pairs never seen in training: composition, not memory.
    unseen = scores["unseen"]["same_caption"]
    assert unseen["text_to_image"]["R@5"] >= 50 and unseen["chance"]["text_to_image"]["R@5"] < 10
    assert unseen["image_to_text"]["R@10"] >= 60 and unseen["chance"]["image_to_text"]["R@10"] < 20

    # Through the search engine: one index over both held-out parts, queried with their sentences.
    loupe("index", parts["test"] / "images", parts["unseen"] / "images", "--checkpoint", model)
    truth = {**captions_by_path(parts["test"]), **captions_by_path(parts["unseen"])}
    queries = most_common(captions_by_path(parts["test"]), 2) + most_common(captions_by_path(parts["unseen"]), 2)
    top1 = 0
    for sentence in queries:
        hits = [json.loads(line) for line in loupe("search", sentence, "-k", "10", "--json").stdout.splitlines()]
        found = [truth[h["path"]] == sentence for h in hits]
        assert len(hits) == 10 and any(found), (sentence, [truth[h["path"]] for h in hits])
        top1 += found[0]
    assert top1 >= len(queries) // 2

    corpus = tmp_path / "sentences.txt"  # the distinct captions of both parts
    corpus.write_text("\n".join(sorted(set(truth.values()))) + "\n")
    loupe("index-text", corpus)
    for picture in (sorted(captions_by_path(parts["test"]))[0], sorted(captions_by_path(parts["unseen"]))[0]):
        hits = [json.loads(line) for line in loupe("search", picture, "--captions", "-k", "10", "--json").stdout.splitlines()]
        assert truth[picture] in [h["text"] for h in hits], (picture, truth[picture], hits[:3])
