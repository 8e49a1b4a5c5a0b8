"""Faithful pixels: eval and training see exactly the reference pixels (PIL -> RGB -> open_clip's
preprocess, as CLIP_benchmark); indexing's faster decoding stays within cosine 0.999 of them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from loupe.indexer.pipeline.batching import embed_images
from loupe.indexer.models.encoder import load_encoder
from loupe.indexer.models.spec import make_spec
from loupe.indexer.pipeline.imageio import DRAFT_FACTOR, decode_image
from loupe.retrieval.eval.annotations import load_annotations
from loupe.retrieval.eval.evaluate import bind_images
from loupe.retrieval.eval.training import decode_all
from tests.conftest import FLICKR8K

MIN_COSINE = 0.999  # the bound DRAFT_FACTOR was chosen for


def reference_pixels(path, preprocess) -> torch.Tensor:
    with Image.open(path) as img:
        return preprocess(img.convert("RGB"))


@pytest.fixture(scope="module")
def few_pairs(tmp_path_factory):
    """captions.json for 6 real photos of 500 px (the size JPEG draft mode touches) and a PNG with
    transparency plus an EXIF-rotated JPEG, where loupe's photo decoding differs on purpose."""
    entries = json.loads((FLICKR8K / "captions.json").read_text())
    big = [e for e in entries if max(Image.open(FLICKR8K / "images" / e["image"]).size) >= 500][:6]
    folder = tmp_path_factory.mktemp("few")
    for e in big:
        (folder / e["image"]).write_bytes((FLICKR8K / "images" / e["image"]).read_bytes())
    with Image.open(FLICKR8K / "images" / big[0]["image"]) as img:
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
        rgba.save(folder / "alpha.png")
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(folder / "rotated.jpg", quality=90, exif=exif.tobytes())
    extra = [{"image": "alpha.png", "captions": ["a picture"]}, {"image": "rotated.jpg", "captions": ["a turned picture"]}]
    path = folder / "captions.json"
    path.write_text(json.dumps(big + extra))
    return folder, path


def test_eval_and_training_pixels_are_the_reference_pixels(tiny_encoder, few_pairs):
    folder, captions = few_pairs
    bound = bind_images(load_annotations(captions), folder, allow_missing=False)
    pre, size = tiny_encoder.preprocess, tiny_encoder.image_size
    reference = torch.stack([reference_pixels(p, pre) for p in bound.paths])
    evaluated = torch.stack([decode_image(p, size, pre, reference=True)[0] for p in bound.paths])
    trained = decode_all(bound, tiny_encoder, workers=2)
    torch.testing.assert_close(evaluated, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(trained, reference, atol=1e-6, rtol=0)
    # what `loupe eval` embeds (its batched reader in reference mode) is the reference's vectors
    vectors = embed_images([str(p) for p in bound.paths], tiny_encoder, batch_size=3, workers=2, reference=True)
    assert np.sum(vectors.vectors * tiny_encoder.encode_images(reference), axis=1).min() >= 0.99999

    # indexing's pixels differ from them where users need it: upright photos, transparency on white
    photos = [decode_image(p, size, pre)[0] for p in bound.paths]
    assert (photos[-1] - reference[-1]).abs().max() > 0.5  # rotated.jpg is turned upright
    assert (photos[-2] - reference[-2]).abs().max() > 0.5  # alpha.png composited on white


def _cosines(encoder, paths, **decode) -> np.ndarray:
    ref = torch.stack([reference_pixels(p, encoder.preprocess) for p in paths])
    ours = torch.stack([decode_image(p, encoder.image_size, encoder.preprocess, **decode)[0] for p in paths])
    return np.sum(encoder.encode_images(ours) * encoder.encode_images(ref), axis=1)


@pytest.fixture(scope="module")
def photo_12mp(tmp_path_factory):
    """A 4000x3000 JPEG (quality 90) upscaled from a real photo: a phone camera's size."""
    name = sorted(p for p in (FLICKR8K / "images").iterdir() if max(Image.open(p).size) >= 500)[1]
    path = tmp_path_factory.mktemp("large") / "large.jpg"
    with Image.open(name) as img:
        img.convert("RGB").resize((4000, 3000), Image.BICUBIC).save(path, quality=90)
    return path


def test_photo_decoding_stays_within_cosine_0999_of_the_reference(flickr_trained, few_pairs, photo_12mp):
    encoder = load_encoder(make_spec(None, None, flickr_trained), "cpu")  # a trained small model: the sensitive case
    folder, _ = few_pairs
    real = sorted(folder.glob("[0-9]*.jpg"))
    cosines = _cosines(encoder, [*real, photo_12mp])
    assert cosines.min() >= MIN_COSINE, cosines
    # the bound is what makes it hold: drafting straight to the input side (loupe before) strays
    assert _cosines(encoder, [*real, photo_12mp], draft_factor=1).min() < MIN_COSINE

    # and the 12 MP photo is still draft-decoded far below its full size (the speed): 1/8 here
    decoded, info = decode_image(photo_12mp, encoder.image_size)
    assert (info.width, info.height) == (4000, 3000)
    assert DRAFT_FACTOR * encoder.image_size <= min(decoded.size) <= 3000 / 8


def test_draft_bound_with_a_full_size_model_input(photo_12mp):
    """At ViT-B-32's 224 px input a 12 MP JPEG decodes at 1/2 scale (2000x1500), not 1/8 (500x375)."""
    decoded, _ = decode_image(photo_12mp, 224)
    assert decoded.size == (2000, 1500)
    before, _ = decode_image(photo_12mp, 224, draft_factor=1)
    assert before.size == (500, 375)
    assert decode_image(photo_12mp, 224, reference=True)[0].size == (4000, 3000)  # reference never drafts


def test_eval_says_when_it_reads_photos_unrotated(tiny_encoder, few_pairs):
    from loupe.retrieval.eval.evaluate import evaluate

    folder, captions = few_pairs
    report = evaluate(folder, captions, tiny_encoder, batch_size=4)
    assert report.data["exif_rotated"] == 1 and report.data["pixels"].startswith("reference")
    assert any(w.startswith("1 images carry an EXIF orientation (rotated.jpg)") for w in report.warnings)
    assert "loupe index` shows them upright" in report.format()
