"""`--precision auto` embeds images in fp32 on CPUs. bf16 and int8 change `loupe eval` recall of
models trained here as much as unbiased noise of their size does, which broke the 0.3-point bound of
issue 11 (bf16 on loupe-tiny: 0.38) and is kept within it every time only by vectors within cosine
~0.999999 of fp32, closer than either gets (benchmarks/bench_precision_recall.py, RESULTS.md). They
stay available as explicit choices, within the 0.999 cosine bound, and an index that already holds
their vectors keeps taking new runs.

Real models (loupe's tiny ViT and loupe-tiny, the two tower kinds), real photos; every CPU.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from loupe.indexer.models import precision


@pytest.fixture(scope="module")
def vit_encoder(tmp_path_factory):
    """loupe's tiny ViT config (the tower kind int8 serves), seeded random weights."""
    from loupe.indexer.models.encoder import load_encoder
    from loupe.indexer.models.spec import make_spec
    from loupe.indexer.models.random_weights import save_random_model

    ckpt = save_random_model(tmp_path_factory.mktemp("vit") / "vit.pt", "loupe-tiny-vit")
    return load_encoder(make_spec(None, None, ckpt), "cpu")


@pytest.fixture(scope="module")
def pixels(vit_encoder, flickr_images):
    paths = sorted(flickr_images.iterdir())[:8]  # both towers take 64 px with the same preprocess
    return torch.stack([vit_encoder.preprocess(Image.open(p).convert("RGB")) for p in paths])


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_auto_is_fp32_on_cpus_and_faster_precisions_stay_opt_in(vit_encoder, tiny_encoder, pixels, kind):
    encoder = vit_encoder if kind == "vit" else tiny_encoder
    encoder.set_image_precision("fp32")
    reference = encoder.encode_images(pixels)
    assert encoder.set_image_precision("auto") == "fp32"  # on main: int8 (x86, ViT) or bf16 (bf16 units)
    vecs = encoder.encode_images(pixels)
    assert encoder.image_precision == "fp32" and encoder.image_cosine == 1.0 and encoder.precision_notice is None
    assert np.min(np.sum(vecs * reference, axis=1)) >= 0.99999
    fastest = precision.fastest(encoder.device, encoder.model.visual)
    if fastest != "fp32":  # the speed stays one option away, within the 0.999 bound
        assert encoder.set_image_precision(fastest) == fastest
        faster = encoder.encode_images(pixels)
        assert encoder.image_precision == fastest and precision.MIN_COSINE <= encoder.image_cosine < 0.999999
        assert np.min(np.sum(faster * reference, axis=1)) >= precision.MIN_COSINE
    encoder.set_image_precision("fp32")


def test_auto_runs_join_an_index_of_int8_vectors(store, vit_encoder, photo_dir, tmp_path):
    """An index whose int8 vectors an earlier `auto` made still takes the fp32 runs of today's `auto`
    (mixing is judged by the 0.999 bound)."""
    from loupe.indexer.pipeline.indexing import index_folder

    names = sorted(p.name for p in photo_dir.iterdir())
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, part in ((a, names[:4]), (b, names[4:8])):
        folder.mkdir()
        for n in part:
            shutil.copy2(photo_dir / n, folder / n)
    vit_encoder.set_image_precision("int8")
    assert index_folder(store, vit_encoder, a, batch_size=8).precision == "int8"
    vit_encoder.set_image_precision("auto")
    report = index_folder(store, vit_encoder, b, batch_size=8)
    assert report.embedded == 4
    assert report.precision == "fp32"
    recorded = store.image_precisions()
    assert set(recorded) == {"int8", "fp32"} and recorded["int8"] >= precision.MIN_COSINE
    vit_encoder.set_image_precision("fp32")


def test_text_tower_exports_after_the_image_tower_went_int8(vit_encoder, pixels, tmp_path):
    """`loupe index --precision int8` lowers the image tower in place; the text tower's ONNX export
    that follows must still work (it failed with 'transpose for tensor of unknown rank')."""
    from loupe.indexer.storage.locations import Location
    from loupe.indexer.models.text_tower import export_text_tower

    fp32_visual = vit_encoder.model.visual
    try:
        vit_encoder.model.visual = precision.lowered(fp32_visual, "int8")
        vit_encoder.model.encode_image(pixels[:2])
        location = Location(url="sqlite:///unused", vector_dir=tmp_path, prefix="")
        manifest = export_text_tower(vit_encoder, location, "weights-int8")
    finally:
        vit_encoder.model.visual = fp32_visual
    assert manifest["usable"], manifest
    assert manifest["min_cosine"] >= 0.9999
