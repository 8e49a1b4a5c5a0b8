"""`loupe index` without torch (issue 19): with the towers cached, a fresh index of the same photos
is embedded by the ONNX image tower alone, with open_clip's eval transform in numpy+PIL, and gives
the torch path's vectors; first use, another ONNX Runtime or another backend take the torch path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

HEAVY = ("torch", "open_clip", "torchvision")


def _index(cache: Path, home: Path, photos: Path, *args: str) -> set[str]:
    """Run the real `loupe index` with its own tower cache; the heavy packages it imported (`-X importtime`)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), LOUPE_CACHE_DIR=str(cache), LOUPE_TEXT_TOWER="1")
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "loupe", "index", str(photos), "--home", str(home), "--no-ocr", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return {name for name in imported if name in HEAVY}


def _vectors(home: Path) -> dict[str, np.ndarray]:
    from loupe.indexer.storage.store import Store

    store = Store.open(home=home, writer=False)
    ids = store.catalog.hash_to_vector("image")
    rows = store.catalog.load_vectors(list(ids.values()), store.meta().dim)
    return dict(zip(ids, rows))


def _info(home: Path) -> tuple[dict, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    run = lambda *a: subprocess.run([sys.executable, "-m", "loupe", "info", "--home", str(home), *a], cwd=REPO, env=env,
                                    capture_output=True, text=True, timeout=300, check=True).stdout
    backend = [line for line in run().splitlines() if line.strip().startswith("backend")]
    return json.loads(run("--json"))["image_precision"], "\n".join(backend)


@pytest.fixture
def photos(tmp_path, flickr_images) -> Path:
    """8 real photos, one of them turned portrait and one grey with an alpha channel (PNG)."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    paths = sorted(flickr_images.iterdir())[:8]
    for src in paths[:6]:
        (folder / src.name).write_bytes(src.read_bytes())
    Image.open(paths[6]).rotate(90, expand=True).save(folder / "portrait.jpg")
    Image.open(paths[7]).convert("LA").save(folder / "grey-alpha.png")
    return folder


def test_second_fresh_index_needs_no_torch_and_gives_the_same_vectors(tmp_path, photos, tiny_checkpoint):
    cache = tmp_path / "cache"
    first = _index(cache, tmp_path / "one", photos, "--checkpoint", str(tiny_checkpoint))
    assert {"torch", "open_clip"} <= first  # first use: the model is built, both towers exported
    manifest = json.loads(next(cache.glob("image-*.json")).read_text())
    assert manifest["preprocess"]["resize_mode"] == "shortest" and manifest["checkpoint_model"] == "loupe-tiny"

    second = _index(cache, tmp_path / "two", photos, "--checkpoint", str(tiny_checkpoint))
    assert second == set()  # model name, transform, check, towers: all from the cache
    want, got = _vectors(tmp_path / "one"), _vectors(tmp_path / "two")
    assert set(got) == set(want) and len(got) == 8
    for h in want:
        np.testing.assert_allclose(got[h], want[h], atol=1e-5)
    (record_one, backend_one), (record_two, backend_two) = _info(tmp_path / "one"), _info(tmp_path / "two")
    assert list(record_one) == list(record_two) == ["onnx-fp32"] and record_two["onnx-fp32"] >= 0.9999
    assert backend_one == backend_two and "ONNX Runtime (fp32)" in backend_two
    assert json.loads((tmp_path / "two" / "text-tower.json").read_text())["usable"]  # installed without torch

    again = _index(cache, tmp_path / "two", photos)  # nothing new: nothing loaded at all
    assert again == set()


def test_fallbacks_take_the_torch_path(tmp_path, photos, tiny_checkpoint):
    """A tower checked by another ONNX Runtime version, or another backend asked for: torch, as before;
    and the torch-free encoder refuses such a manifest itself."""
    from loupe.indexer.models.onnx_images import cached_image_encoder
    from loupe.indexer.models.spec import make_spec

    cache = tmp_path / "cache"
    _index(cache, tmp_path / "one", photos, "--checkpoint", str(tiny_checkpoint))
    spec = make_spec(None, None, tiny_checkpoint)
    assert cached_image_encoder(spec, folder=cache) is not None
    assert _index(cache, tmp_path / "torch", photos, "--checkpoint", str(tiny_checkpoint), "--backend", "torch") >= {"torch"}

    path = next(cache.glob("image-*.json"))
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "onnxruntime": "0.0.1"}))
    assert cached_image_encoder(spec, folder=cache) is None
    assert {"torch", "open_clip"} <= _index(cache, tmp_path / "two", photos, "--checkpoint", str(tiny_checkpoint))
    record, backend = _info(tmp_path / "two")
    assert list(record) == ["onnx-fp32"] and "ONNX Runtime (fp32)" in backend  # the tower ran, checked per run

    path.write_text(json.dumps({**manifest, "preprocess": None}))  # a transform not reproduced
    assert cached_image_encoder(spec, folder=cache) is None


def test_preprocess_is_open_clips(tmp_path, flickr_images):
    """The numpy+PIL transform against open_clip's own, on real photos of odd sizes and modes."""
    import open_clip
    from PIL import Image

    from loupe.indexer.models.preprocess import Preprocess, transform_record

    originals = [Image.open(p) for p in sorted(flickr_images.iterdir())[:3]]
    pictures = []
    for img in originals:
        pictures += [img, img.rotate(90, expand=True), img.resize((37, 23)), img.resize((9, 300)),
                     img.convert("L"), img.convert("RGBA"), img.convert("P")]
    for size in (64, 224, 336):
        reference = open_clip.image_transform(size, is_train=False)
        mine = Preprocess.from_record(transform_record(reference))
        assert mine is not None and mine.size == size
        for picture in pictures:
            want = reference(picture).numpy()
            got = mine(picture)
            assert got.dtype == np.float32 and got.shape == want.shape == (3, size, size)
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    for other in (dict(resize_mode="squash"), dict(resize_mode="longest"), dict(interpolation="bilinear")):
        assert transform_record(open_clip.image_transform(224, is_train=False, **other)) is None


def test_model_name_of_a_checkpoint_from_the_cache(tmp_path, tiny_checkpoint):
    """The model a checkpoint records comes from a cached tower's manifest when one names its hash."""
    from loupe.indexer.models.image_tower import FORMAT, checkpoint_model
    from loupe.indexer.models.spec import file_sha256

    weights_id = f"sha256:{file_sha256(tiny_checkpoint)}"
    assert checkpoint_model(weights_id, tmp_path) == (False, None)
    (tmp_path / "image-0.json").write_text(json.dumps({"format": FORMAT, "weights_id": weights_id, "checkpoint_model": None}))
    assert checkpoint_model(weights_id, tmp_path) == (True, None)  # a foreign file: it records no name
