"""Annotation formats: Karpathy split files, LAVIS/CLIP_benchmark lists, loupe captions.json."""

from __future__ import annotations

import json

import pytest

from loupe.indexer.errors import LoupeError
from loupe.retrieval.eval.annotations import load_annotations, resolve_image_paths
from tests.conftest import SHARED_DATA


def write(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_karpathy_takes_the_test_split_with_raw_sentences(tmp_path):
    data = {
        "images": [
            {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "train only"}]},
            {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "A dog. "}, {"raw": "a brown dog", "tokens": []}]},
            {"filename": "c.jpg", "filepath": "val2014", "split": "test", "sentences": [{"raw": "a cat"}]},
            {"filename": "d.jpg", "split": "val", "sentences": [{"raw": "val only"}]},
        ],
        "dataset": "flickr30k",
    }
    ann = load_annotations(write(tmp_path / "dataset_flickr30k.json", data))
    assert ann.format == "karpathy"
    assert ann.images == ["b.jpg", "val2014/c.jpg"]
    assert ann.captions == ["A dog.", "a brown dog", "a cat"]
    assert ann.caption_image == [0, 0, 1]
    val = load_annotations(tmp_path / "dataset_flickr30k.json", split="val")
    assert val.images == ["d.jpg"] and val.captions == ["val only"]
    with pytest.raises(LoupeError, match="no images in split 'restval'.*splits present: test, train, val"):
        load_annotations(tmp_path / "dataset_flickr30k.json", split="restval")


def test_lavis_lists_merge_entries_per_image(tmp_path):
    data = [
        {"image": "flickr30k-images/1.jpg", "caption": ["one a", "one b"]},
        {"image": "flickr30k-images/2.jpg", "caption": "two a", "image_id": "2"},
        {"image": "flickr30k-images/1.jpg", "caption": "one c", "image_id": "1"},
    ]
    ann = load_annotations(write(tmp_path / "test.json", data))
    assert ann.format == "lavis"
    assert ann.images == ["flickr30k-images/1.jpg", "flickr30k-images/2.jpg"]
    assert list(zip(ann.captions, ann.caption_image)) == [("one a", 0), ("one b", 0), ("two a", 1), ("one c", 0)]


def test_loupe_captions_json_drops_empty_captions_and_captionless_images(tmp_path):
    data = [
        {"image": "x.jpg", "captions": ["  x one ", "", "x two"]},
        {"image": "y.jpg", "captions": ["", "   "]},
        {"image": "z.jpg", "captions": ["z"]},
    ]
    ann = load_annotations(write(tmp_path / "captions.json", data))
    assert (ann.format, ann.images, ann.captions, ann.caption_image) == (
        "loupe", ["x.jpg", "z.jpg"], ["x one", "x two", "z"], [0, 0, 1]
    )
    assert ann.dropped_images == 1
    sub = ann.subset([1])
    assert (sub.images, sub.captions, sub.caption_image) == (["z.jpg"], ["z"], [0])


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"annotations": [], "images": [{"id": 1}]}', "unknown annotations format"),
        ('[{"file": "a.jpg", "text": "x"}]', "unknown annotations format"),
        ("[]", "unknown annotations format"),
        ('[{"image": "a.jpg", "captions": ', "invalid JSON"),
        ('[{"image": "", "captions": ["x"]}]', "malformed loupe annotations"),
        ('[{"image": "a.jpg", "captions": [""]}]', "no captioned images"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "ann.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LoupeError, match=message):
        load_annotations(path)
    with pytest.raises(LoupeError, match="not found"):
        load_annotations(tmp_path / "absent.json")


def test_real_flickr30k_karpathy_test_split():
    ann = load_annotations(SHARED_DATA / "flickr30k_karpathy_test" / "captions.json")
    assert (len(ann.images), len(ann.captions), ann.format) == (1000, 5000, "loupe")
    assert ann.images[0] == "1007129816.jpg" and ann.images[-1] == "97234558.jpg"
    assert len(set(ann.images)) == 1000
    assert all(ann.caption_image.count(i) == 5 for i in (0, 500, 999))


def test_resolve_image_paths_falls_back_to_base_names(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jpg").write_bytes(b"x")
    found = resolve_image_paths(tmp_path, ["a.jpg", "flickr30k-images/a.jpg", "sub/b.jpg", "b.jpg", "nope.jpg"])
    assert found == [tmp_path / "a.jpg", tmp_path / "a.jpg", tmp_path / "sub" / "b.jpg", None, None]
