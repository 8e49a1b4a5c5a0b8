"""Image tower backends (issue 19): each one forced whatever the CPU, against torch fp32; the choice
recorded in the index and shown by `loupe info`; the fallback when ONNX Runtime is missing; towers
exported once per model; the text tower's dynamic sequence length."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from loupe.indexer.models.random_weights import save_random_model


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("vit") / "loupe-tiny-vit.pt", "loupe-tiny-vit")


@pytest.fixture(scope="module")
def pixels(flickr_images, tiny_encoder):
    """8 real photos through the model's own preprocessing (both tiny configs take 64 px)."""
    import torch
    from PIL import Image

    paths = sorted(flickr_images.iterdir())[:8]
    return torch.stack([tiny_encoder.preprocess(Image.open(p).convert("RGB")) for p in paths])


def _spec(checkpoint, **changes):
    from loupe.indexer.models.spec import make_spec

    return make_spec(None, None, checkpoint).replace(**changes)


@pytest.mark.parametrize("which", ["tiny", "vit"])
def test_each_backend_against_torch_fp32(which, tiny_checkpoint, vit_checkpoint, pixels):
    """Forced whatever the CPU: ONNX fp32 within 0.9999 (every CPU: same fp32 graph), torch fp32
    identical, torch bf16 within 0.99 (emulated where the CPU has no bf16 units: same arithmetic)."""
    from loupe.indexer.models.encoder import load_encoder
    from loupe.indexer.models.factory import index_encoder

    checkpoint = tiny_checkpoint if which == "tiny" else vit_checkpoint
    reference = load_encoder(_spec(checkpoint), "cpu").encode_images(pixels)

    onnx = index_encoder(_spec(checkpoint, image_backend="onnx"), "cpu")
    got = onnx.encode_images(pixels)
    assert onnx.precision_notice is None
    assert (onnx.spec.image_backend, onnx.image_backend, onnx.image_precision) == ("onnx", "onnx", "onnx-fp32")
    assert np.min(np.sum(got * reference, axis=1)) >= 0.9999
    assert 0.9999 <= onnx.image_cosine <= 1.0 + 1e-6

    torch32 = index_encoder(_spec(checkpoint, image_backend="torch"), "cpu")
    assert (torch32.spec.image_backend, torch32.image_precision) == ("torch", "fp32")
    np.testing.assert_allclose(torch32.encode_images(pixels), reference, atol=1e-6)

    bf16 = index_encoder(_spec(checkpoint, image_precision="bf16"), "cpu", min_cosine=0.0)
    vecs = bf16.encode_images(pixels)
    assert bf16.spec.image_backend == "torch" and bf16.image_precision == "bf16"
    assert np.min(np.sum(vecs * reference, axis=1)) >= 0.99


def test_auto_chooses_per_device():
    import torch

    from loupe.indexer.errors import LoupeError
    from loupe.indexer.models.factory import image_backend
    from loupe.indexer.models.spec import ModelSpec

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert image_backend(ModelSpec(), cpu) == ("onnx", None)  # bf16 units or not, a run of unknown size (`bulk_spec`)
    assert image_backend(ModelSpec(), cuda) == ("torch", None)
    assert image_backend(ModelSpec(image_precision="int8"), cpu) == ("torch", None)
    assert image_backend(ModelSpec(image_backend="onnx"), cuda)[0] == "torch"  # said in the note
    with pytest.raises(LoupeError, match="fp32 only"):
        image_backend(ModelSpec(image_backend="onnx", image_precision="bf16"), cpu)
    with pytest.raises(LoupeError, match="unknown image backend"):
        ModelSpec(image_backend="tensorrt")


def test_tower_is_exported_once_per_model(tmp_path, tiny_checkpoint, pixels):
    from loupe.indexer.models.factory import index_encoder
    from loupe.indexer.models.image_tower import cache_dir

    first = index_encoder(_spec(tiny_checkpoint, image_backend="onnx"), "cpu")
    first.encode_images(pixels)
    files = sorted(cache_dir().glob("image-*.onnx"))
    stamps = [f.stat().st_mtime_ns for f in files]
    assert files
    second = index_encoder(_spec(tiny_checkpoint, image_backend="onnx"), "cpu")
    second.encode_images(pixels)
    assert sorted(cache_dir().glob("image-*.onnx")) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps  # reused, not exported again


def test_index_records_the_backend_and_info_shows_it(loupe, photo_dir, tiny_checkpoint, tmp_path):
    ck = str(tiny_checkpoint)
    out = loupe("index", photo_dir, "--checkpoint", ck, "--json")
    assert json.loads(out.stdout.splitlines()[-1])["embedded"] == 12
    record = json.loads(loupe("info", "--json").stdout)["image_precision"]
    assert list(record) == ["onnx-fp32"] and record["onnx-fp32"] >= 0.9999
    text = loupe("info").stdout
    assert "backend      images: ONNX Runtime (fp32)" in text
    # torch fp32 vectors join the same index (cosines add up within the bound: the mixing rule)
    more = tmp_path / "more"
    more.mkdir()
    for src in sorted(photo_dir.iterdir())[:3]:
        (more / f"copy-{src.name}").write_bytes(src.read_bytes() + b"\0")  # other bytes, same photo
    loupe("index", more, "--backend", "torch")
    record = json.loads(loupe("info", "--json").stdout)["image_precision"]
    assert set(record) == {"onnx-fp32", "fp32"}
    assert "ONNX Runtime (fp32), torch (fp32)" in loupe("info").stdout


def test_bad_backend_options_are_one_line_errors(loupe, photo_dir, tiny_checkpoint):
    bad = loupe("index", photo_dir, "--checkpoint", tiny_checkpoint, "--backend", "tpu", ok=False)
    assert bad.returncode != 0 and "unknown backend 'tpu'" in bad.stderr and "Traceback" not in bad.stderr
    bad = loupe("index", photo_dir, "--checkpoint", tiny_checkpoint, "--backend", "onnx", "--precision", "int8", ok=False)
    assert bad.returncode != 0 and "fp32 only" in bad.stderr and "Traceback" not in bad.stderr


def test_without_onnxruntime_torch_embeds_said_once(loupe, photo_dir, tiny_checkpoint, tmp_path):
    """ONNX Runtime absent (an import that fails, as on a platform without wheels): torch fp32, one note."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "onnxruntime.py").write_text("raise ImportError('no onnxruntime on this platform')\n")
    env = loupe.env()
    loupe.env = lambda: {**env, "PYTHONPATH": f"{blocker}{os.pathsep}{env['PYTHONPATH']}"}
    out = loupe("index", photo_dir, "--checkpoint", tiny_checkpoint)
    assert out.stderr.count("onnxruntime is not installed") == 1, out.stderr
    assert "12 embedded" in out.stdout and "fp32" in out.stdout
    assert json.loads(loupe("info", "--json").stdout)["image_precision"] == {"fp32": 1.0}


def test_text_tower_runs_each_query_at_its_own_length(tmp_path, tiny_encoder):
    from loupe.indexer.models import text_tower
    from loupe.indexer.storage.locations import Location

    location = Location(url="sqlite:///unused", vector_dir=tmp_path, prefix="x-")
    # a tower of the older format (fixed 77 positions) is not used: it is exported again
    text_tower.manifest_path(location).write_text(json.dumps({"format": 1, "model": "loupe-tiny", "weights_id": "w",
                                                              "usable": True, "file": "old.onnx", "bpe": "old.bpe"}))
    (tmp_path / "old.onnx").write_bytes(b"old")
    assert text_tower.tower_state(location, "loupe-tiny", "w") == "absent"
    manifest = text_tower.export_text_tower(tiny_encoder, location, "w")
    assert manifest["usable"] and manifest["dynamic_length"] and not (tmp_path / "old.onnx").exists()
    tower = text_tower.open_tower(location, manifest, background=False)
    seen = []
    run = tower.encode.__func__

    class Spy:
        def __init__(self, session):
            self.session = session

        def run(self, names, feeds):
            seen.append(feeds["tokens"].shape)
            return self.session.run(names, feeds)

    tower.ready()
    tower._session = Spy(tower._session)
    sentences = ["a dog", "a red car parked near an old stone bridge"]
    got = run(tower, sentences[:1]), run(tower, sentences)
    assert seen[0] == (1, 4) and seen[1][1] < tiny_encoder.tokenizer.context_length  # start, 2 words, end
    expected = tiny_encoder.encode_texts(sentences)
    assert np.min(np.sum(got[1] * expected, axis=1)) >= 0.9999
    assert float(np.dot(got[0][0], expected[0])) >= 0.9999
    # a second index of the same weights links the cached export: nothing exported again
    other = Location(url="sqlite:///unused", vector_dir=tmp_path / "other", prefix="")
    again = text_tower.export_text_tower(tiny_encoder, other, "w")
    assert again["usable"] and again["export_seconds"] < manifest["export_seconds"] + 1
    assert (tmp_path / "other" / again["file"]).exists()
    assert sys.modules.get("onnxruntime") is not None


@pytest.mark.parametrize("flags", [{"amx_bf16", "avx512f"}, {"avx512_bf16"}, {"avx2"}])
def test_a_large_auto_run_on_a_cpu_with_bf16_units_takes_bf16(monkeypatch, tiny_checkpoint, flags):
    """`bulk_spec`: auto/auto from BF16_MIN_IMAGES images on, on a CPU with bf16 units only; explicit
    choices, small runs, unknown sizes and GPUs keep the spec as it was."""
    from loupe.indexer.models import precision
    from loupe.indexer.models.factory import bulk_spec

    monkeypatch.setattr(precision, "cpu_flags", lambda: set(flags))
    spec = _spec(tiny_checkpoint)
    n = precision.BF16_MIN_IMAGES
    bf16_units = bool(flags & {"amx_bf16", "avx512_bf16"})
    got = bulk_spec(spec, "cpu", n)
    assert (got.image_backend, got.image_precision) == (("torch", "bf16") if bf16_units else ("auto", "auto"))
    for unchanged in (bulk_spec(spec, "cpu", n - 1), bulk_spec(spec, "cpu", None), bulk_spec(spec, "cuda", n),
                      bulk_spec(spec.replace(image_precision="fp32"), "cpu", n),
                      bulk_spec(spec.replace(image_backend="onnx"), "cpu", n)):
        assert (unchanged.image_backend, unchanged.image_precision) in (("auto", "auto"), ("auto", "fp32"), ("onnx", "auto"))


def test_the_run_loads_its_encoder_for_the_files_it_embeds(monkeypatch, tmp_path, vit_checkpoint, photo_dir):
    """The runner tells the loader how many files it will embed; a large enough run on a CPU with
    bf16 units records bf16 vectors (checked against fp32 on its first images), a small one ONNX fp32."""
    from loupe.indexer.models import precision
    from loupe.indexer.models.factory import index_encoder
    from loupe.indexer.pipeline.indexing import index_folder
    from loupe.indexer.storage.store import Store

    monkeypatch.setenv("LOUPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16"})
    files = len([p for p in photo_dir.iterdir() if p.suffix == ".jpg"])
    for threshold, runs in ((files, "bf16"), (files + 1, "onnx-fp32")):
        monkeypatch.setattr(precision, "BF16_MIN_IMAGES", threshold)
        asked = []

        def load(images=None):
            asked.append(images)
            return index_encoder(_spec(vit_checkpoint), "cpu", images=images)

        store = Store.open(home=tmp_path / f"home-{threshold}")
        report = index_folder(store, load, photo_dir, workers=1)
        assert asked == [files] and report.embedded == files
        assert report.precision == runs
        assert set(store.image_precisions()) == {runs}
