"""`loupe eval` plumbing on real photos with a real (random-weights) model: fast, no training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loupe.indexer.errors import LoupeError
from loupe.indexer.pipeline.imageio import decode_image
from loupe.retrieval.eval.annotations import load_annotations
from loupe.retrieval.eval.evaluate import evaluate, format_report, published_row
from loupe.retrieval.eval.metrics import ranks_from_scores
from tests.conftest import FLICKR8K, SHARED_DATA

N_IMAGES = 16


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """captions.json for the first 16 flickr8k_800 photos (5 real captions each)."""
    entries = json.loads((FLICKR8K / "captions.json").read_text())[:N_IMAGES]
    path = tmp_path_factory.mktemp("ann") / "captions.json"
    path.write_text(json.dumps(entries))
    return path


def test_eval_cli_on_real_photos_matches_an_independent_computation(loupe, tiny_checkpoint, tiny_encoder, flickr_images, small_set, tmp_path):
    out = tmp_path / "report.json"
    proc = loupe("eval", "--images", flickr_images, "--annotations", small_set, "--checkpoint", tiny_checkpoint,
                 "--batch-size", "5", "--json", out)
    assert "text -> image" in proc.stdout and "image -> text" in proc.stdout and "WARNING" not in proc.stdout
    report = json.loads(out.read_text())
    assert report["counts"] == {"images_listed": 16, "images": 16, "captions": 80, "missing": 0, "unreadable": 0, "subset": False}
    assert report["model"]["name"] == "loupe-tiny" and report["model"]["weights"].startswith("sha256:")
    assert report["data"]["format"] == "loupe" and report["published"] is None
    assert report["timings"]["embed_images_s"] > 0
    exact = report["scores"]["exact"]
    assert exact["chance"]["text_to_image"]["R@1"] == pytest.approx(100 / 16)
    assert exact["chance"]["image_to_text"]["R@10"] == pytest.approx(100 * (1 - np.prod([(75 - j) / (80 - j) for j in range(10)])))

    # The same figures from embeddings computed one image at a time, outside evaluate().
    ann = load_annotations(small_set)
    images = np.concatenate([
        tiny_encoder.encode_images(decode_image(flickr_images / name, tiny_encoder.image_size, tiny_encoder.preprocess)[0][None])
        for name in ann.images
    ])
    texts = tiny_encoder.encode_texts(ann.captions)
    expected = ranks_from_scores(texts @ images.T, ann.caption_image).summary()
    for direction, n_queries in (("text_to_image", 80), ("image_to_text", 16)):
        for key, value in expected[direction].items():
            # batched vs single-image float rounding may swap one near-tie, nothing more
            tolerance = 100 / n_queries if key.startswith("R@") else 1.0
            assert exact[direction][key] == pytest.approx(value, abs=tolerance), (direction, key)


def test_missing_images_are_an_error_unless_allowed(loupe, tiny_checkpoint, flickr_images, small_set, tmp_path):
    entries = json.loads(small_set.read_text())
    entries += [{"image": f"gone-{i}.jpg", "captions": [f"caption {i}"]} for i in range(7)]
    ann = tmp_path / "with-missing.json"
    ann.write_text(json.dumps(entries))
    args = ["eval", "--images", flickr_images, "--annotations", ann, "--checkpoint", tiny_checkpoint]
    proc = loupe(*args, ok=False)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert err.startswith("loupe: error: 7 of 23 images listed in") and len(err.splitlines()) == 1
    assert "gone-0.jpg, gone-1.jpg, gone-2.jpg, gone-3.jpg, gone-4.jpg, ... (2 more)" in err
    assert "--allow-missing" in err

    out = tmp_path / "subset.json"
    proc = loupe(*args, "--allow-missing", "--json", out)
    assert proc.stdout.startswith("!!! WARNING: SUBSET ONLY: 7 of 23 images are missing")
    assert proc.stdout.rstrip().splitlines()[-2].startswith("!!! WARNING: SUBSET ONLY")  # then "wrote ..."
    report = json.loads(out.read_text())
    assert report["counts"]["subset"] and report["counts"]["missing"] == 7
    assert (report["counts"]["images"], report["counts"]["captions"]) == (16, 80)
    assert report["warnings"][0].startswith("SUBSET ONLY")


def test_unreadable_images_and_empty_folders(tiny_encoder, flickr_images, small_set, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    entries = json.loads(small_set.read_text())[:4]
    for e in entries:
        (folder / e["image"]).write_bytes((flickr_images / e["image"]).read_bytes())
    (folder / entries[0]["image"]).write_bytes(b"\xff\xd8\xff\xe0 truncated")
    ann = tmp_path / "four.json"
    ann.write_text(json.dumps(entries))
    with pytest.raises(LoupeError, match=f"1 images could not be read: {entries[0]['image']}"):
        evaluate(folder, ann, tiny_encoder)
    report = evaluate(folder, ann, tiny_encoder, allow_missing=True)
    assert (report.counts["images"], report.counts["unreadable"], report.counts["captions"]) == (3, 1, 15)
    assert "SUBSET ONLY: 1 of 4" in format_report(report)
    with pytest.raises(LoupeError, match="images folder not found"):
        evaluate(tmp_path / "nowhere", ann, tiny_encoder)
    with pytest.raises(LoupeError, match="4 of 4 images .* missing"):
        evaluate(tmp_path, ann, tiny_encoder, allow_missing=True)  # nothing left to score


def test_ann_index_beside_exact(tiny_encoder, flickr_images, small_set):
    flat = evaluate(flickr_images, small_set, tiny_encoder, index_factory="Flat")
    for direction, n_queries in (("text_to_image", 80), ("image_to_text", 16)):
        for k in (1, 5, 10):
            exact = flat.scores["exact"][direction][f"R@{k}"]
            assert flat.scores["ann"][direction][f"R@{k}"] == pytest.approx(exact, abs=100 / n_queries)
    hnsw = evaluate(flickr_images, small_set, tiny_encoder, index_factory="HNSW32")
    assert hnsw.scores["ann"]["factory"] == "HNSW32"
    assert "ANN index HNSW32" in hnsw.format() and "vs exact" in hnsw.format()
    with pytest.raises(LoupeError, match="bad FAISS factory"):
        evaluate(flickr_images, small_set, tiny_encoder, index_factory="Nope99")
    with pytest.raises(LoupeError, match="cannot be built over 16 vectors"):
        evaluate(flickr_images, small_set, tiny_encoder, index_factory="IVF256,Flat")


def test_published_figures_only_for_that_model_on_that_split(tiny_encoder, flickr_images, small_set):
    names = load_annotations(SHARED_DATA / "flickr30k_karpathy_test" / "captions.json").images
    row = published_row("ViT-B-32", "laion2b_s34b_b79k", names)
    assert row["text_to_image"] == {"R@1": 66.78, "R@5": 88.38, "R@10": 93.10}
    assert row["image_to_text"] == {"R@1": 84.10, "R@5": 96.20, "R@10": 98.30}
    assert published_row("ViT-B-32", "laion2b_s34b_b79k", [f"flickr30k-images/{n}" for n in reversed(names)]) == row
    assert published_row("ViT-B-32", "laion2b_s34b_b79k", names[:-1]) is None  # another split
    assert published_row("ViT-B-32", "no-such-tag", names) is None
    assert published_row("ViT-B-32", None, names) is None

    report = evaluate(flickr_images, small_set, tiny_encoder)
    report.published = row
    text = report.format()
    assert "measured - published" in text and "66.78" in text
    gap = report.scores["exact"]["text_to_image"]["R@1"] - 66.78
    assert f"{gap:+.2f}" in text


def test_flickr30k_benchmark_script_defaults_and_missing_images(tmp_path):
    import subprocess
    import sys

    from benchmarks.flickr30k_eval import DEFAULT_ANNOTATIONS, REPO, build_command

    cmd = build_command(["--images", "/data/f30k"])
    assert cmd == ["eval", "--images", "/data/f30k", "--annotations", str(DEFAULT_ANNOTATIONS), "--json",
                   "flickr30k-ViT-B-32-laion2b_s34b_b79k.json", "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k"]
    assert build_command(["--images", "x", "--checkpoint", "m.pt", "--", "--index-factory", "HNSW32"])[-4:] == [
        "--checkpoint", "m.pt", "--index-factory", "HNSW32"]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "flickr30k_eval.py"), "--images", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("loupe: error: 1000 of 1000 images listed in") and "flickr30k_karpathy_test" in proc.stderr


def test_same_caption_view_counts_any_image_with_that_caption():
    from loupe.retrieval.eval.evaluate import score_embeddings

    images = np.eye(3, dtype=np.float32)
    a = np.array([1, 1, 0], np.float32) / np.sqrt(2)
    texts = np.stack([a, a, images[2]])
    scores = score_embeddings(images, texts, [0, 1, 2], ["A  dog", "a dog", "a cat"])
    assert scores["exact"]["text_to_image"]["R@1"] == pytest.approx(100 / 3)  # the tie counts against
    same = scores["same_caption"]
    assert (same["distinct_captions"], same["captions_on_several_images"]) == (2, 1)
    assert same["text_to_image"]["R@1"] == 100.0 and same["image_to_text"]["R@1"] == 100.0
    assert same["chance"]["text_to_image"]["R@1"] == pytest.approx(100 * (2 / 3 + 1 / 3) / 2)
    assert "same_caption" not in score_embeddings(images, texts, [0, 1, 2], ["x", "y", "z"])
