"""Image encoding precision: faster arithmetic only within cosine 0.999 of fp32, recorded per index.

Real models (a tiny ViT registered here, and `loupe-tiny`), real photos, real CLI runs. The bf16
and int8 paths run on every CPU (bf16 is emulated where the CPU lacks bf16 units: slow on large
models, fine on these tiny ones); only which precision `auto` picks depends on the host.
"""

from __future__ import annotations

import json
import platform
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from loupe.indexer.models import precision
from loupe.indexer.errors import LoupeError
from tests.conftest import LoupeRunner

TINY_VIT = "loupe-test-vit"
TINY_VIT_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def vit_encoder(tmp_path_factory):
    """A tiny vision transformer (the kind of tower int8 serves), seeded random weights."""
    import open_clip

    from loupe.indexer.models.encoder import load_encoder

    from loupe.indexer.models.spec import make_spec
    from loupe.indexer.models.random_weights import save_random_model

    folder = tmp_path_factory.mktemp("configs")
    (folder / f"{TINY_VIT}.json").write_text(json.dumps(TINY_VIT_CONFIG))
    open_clip.add_model_config(folder)
    ckpt = save_random_model(tmp_path_factory.mktemp("vit") / "vit.pt", TINY_VIT)
    return load_encoder(make_spec(None, None, ckpt), "cpu")


@pytest.fixture(scope="module")
def pixels(vit_encoder, flickr_images):
    paths = sorted(flickr_images.iterdir())[:12]
    return torch.stack([vit_encoder.preprocess(Image.open(p).convert("RGB")) for p in paths])


def host_has_bf16() -> bool:
    """Read from the host itself: /proc/cpuinfo flags where Linux lists them, else torch's own probes."""
    flags = set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    probes = [getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(p()) for p in probes if p is not None)


def test_auto_follows_the_host(vit_encoder, tiny_encoder):
    x86_avx2 = platform.machine().lower() in ("x86_64", "amd64") and (
        "avx2" in open("/proc/cpuinfo").read() if platform.system() == "Linux" else True
    )
    bf16 = host_has_bf16()
    assert precision.cpu_has_bf16() == bf16
    vit = precision.fastest(vit_encoder.device, vit_encoder.model.visual)
    resnet = precision.fastest(tiny_encoder.device, tiny_encoder.model.visual)
    assert vit == ("bf16" if bf16 else "int8" if x86_avx2 else "fp32")
    assert resnet == ("bf16" if bf16 else "fp32")  # int8 gains nothing on a convolutional tower
    for encoder in (vit_encoder, tiny_encoder):  # auto stays fp32 on CPUs: test_precision_auto.py
        assert precision.resolve("auto", encoder.device, encoder.model.visual) == "fp32"
    assert precision.resolve("fp32", vit_encoder.device, vit_encoder.model.visual) == "fp32"
    with pytest.raises(LoupeError, match="unknown precision 'fp8'"):
        precision.resolve("fp8", vit_encoder.device, vit_encoder.model.visual)
    with pytest.raises(LoupeError, match="CPUs only"):
        precision.resolve("int8", torch.device("cuda"), vit_encoder.model.visual)


@pytest.mark.parametrize("name", ["int8", "bf16"])
def test_faster_precisions_stay_within_the_bound(vit_encoder, pixels, name):
    vit_encoder.set_image_precision("fp32")
    reference = vit_encoder.encode_images(pixels)
    assert vit_encoder.set_image_precision(name) == name
    first = vit_encoder.encode_images(pixels)  # checked against fp32 on its first images
    assert vit_encoder.image_precision == name and vit_encoder.precision_notice is None
    assert precision.MIN_COSINE <= vit_encoder.image_cosine < 0.999999  # really another arithmetic
    again = vit_encoder.encode_images(pixels)  # no check this time, same precision
    for vecs in (first, again):
        assert vecs.dtype == np.float32 and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
        assert np.min(np.sum(vecs * reference, axis=1)) >= precision.MIN_COSINE
    assert vit_encoder.set_image_precision("fp32") == "fp32"  # fp32 stays selectable, the fp32 tower is back
    assert np.min(np.sum(vit_encoder.encode_images(pixels) * reference, axis=1)) >= 0.99999


def test_check_failure_falls_back_to_fp32(vit_encoder, pixels):
    vit_encoder.set_image_precision("fp32")
    reference = vit_encoder.encode_images(pixels)
    vit_encoder.set_image_precision("int8", min_cosine=1.5)  # a bound nothing can meet
    vecs = vit_encoder.encode_images(pixels)
    assert vit_encoder.image_precision == "fp32" and vit_encoder.image_cosine == 1.0
    assert "int8" in vit_encoder.precision_notice and "embedding in fp32" in vit_encoder.precision_notice
    assert "\n" not in vit_encoder.precision_notice and vit_encoder.fidelity_seconds > 0
    assert np.min(np.sum(vecs * reference, axis=1)) >= 0.99999
    assert np.min(np.sum(vit_encoder.encode_images(pixels) * reference, axis=1)) >= 0.99999


def test_a_tower_that_cannot_run_quantised_falls_back(tiny_checkpoint, pixels):
    from loupe.indexer.models.encoder import load_encoder
    from loupe.indexer.models.spec import make_spec

    enc = load_encoder(make_spec(None, None, tiny_checkpoint), "cpu")  # ModifiedResNet: its pool reads Linear weights
    reference = enc.encode_images(pixels)
    enc.set_image_precision("int8")
    vecs = enc.encode_images(pixels)
    assert enc.image_precision == "fp32" and "cannot be computed" in enc.precision_notice
    assert np.min(np.sum(vecs * reference, axis=1)) >= 0.99999


def test_mixing_rule():
    fp32 = {"fp32": 1.0}
    assert precision.admit(fp32, "bf16", 0.99994) == {"fp32": 1.0, "bf16": 0.99994}
    assert precision.admit({}, "int8", 0.9997771) == {"int8": 0.999777}  # recorded rounded down
    assert precision.admit({"int8": 0.9995}, "int8", 0.9991) == {"int8": 0.9991}  # one arithmetic: the lowest kept
    assert precision.admit({"int8": 0.9995}, "fp32", 1.0) == {"int8": 0.9995, "fp32": 1.0}
    with pytest.raises(LoupeError) as refused:  # each within the bound of fp32, not of each other
        precision.admit({"fp32": 1.0, "bf16": 0.9995}, "int8", 0.9993)
    message = str(refused.value)
    assert "\n" not in message and "--precision fp32" in message and "re-index" in message
    with pytest.raises(LoupeError, match="--min-cosine 0.995"):  # nothing here meets a stricter bound
        precision.admit({"int8": 0.9951}, "fp32", 1.0, bound=0.999)
    assert precision.combined_cosine(1.0, 0.9995) == pytest.approx(0.9995)
    assert precision.parse_record(None) == {} and precision.parse_record("garbage") == {}


def test_library_index_records_its_precision(store, vit_encoder, photo_dir):
    from loupe.indexer.pipeline.indexing import index_folder

    vit_encoder.set_image_precision("int8")
    report = index_folder(store, vit_encoder, photo_dir, batch_size=8)
    assert report.precision == "int8" and report.embedded == 12
    recorded = store.image_precisions()
    assert list(recorded) == ["int8"] and recorded["int8"] >= precision.MIN_COSINE
    vit_encoder.set_image_precision("fp32")


def _copy(photos, dst, names):
    dst.mkdir()
    for name in names:
        shutil.copy2(photos / name, dst / name)
    return dst


def test_cli_records_shows_refuses_and_falls_back(loupe, tiny_checkpoint, photo_dir, tmp_path):
    names = sorted(p.name for p in photo_dir.iterdir())
    a, b, c = (_copy(photo_dir, tmp_path / d, names[i * 4 : i * 4 + 4]) for i, d in enumerate("abc"))
    first = json.loads(loupe("index", a, "--checkpoint", tiny_checkpoint, "--precision", "bf16", "--json").stdout)
    assert first["precision"] == "bf16" and first["embedded"] == 4
    recorded = json.loads(loupe("info", "--json").stdout)["image_precision"]
    cosine = recorded["bf16"]
    assert list(recorded) == ["bf16"] and precision.MIN_COSINE <= cosine < 1.0
    assert f"precision    image vectors bf16 (cosine >= {cosine:.5f} to fp32)" in loupe("info").stdout

    strict = f"{(cosine + 1) / 2:.7f}"  # fp32 vectors are fine, but the bf16 ones already here are not this close
    refused = loupe("index", b, "--precision", "fp32", "--backend", "torch", "--min-cosine", strict, ok=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("loupe: error: this index holds bf16 image vectors") and "re-index" in refused.stderr
    assert json.loads(loupe("info", "--json").stdout)["images_indexed"] == 4  # nothing of b went in

    # torch fp32 (the reference; `auto` would run ONNX Runtime fp32: tests/test_backends.py), within the default bound
    second = json.loads(loupe("index", b, "--precision", "fp32", "--backend", "torch", "--json").stdout)
    assert second["precision"] == "fp32" and second["embedded"] == 4
    assert json.loads(loupe("info", "--json").stdout)["image_precision"] == {"bf16": cosine, "fp32": 1.0}

    fresh = LoupeRunner(tmp_path / "fresh")  # (here, fp32 at bound 1.0 would be refused beside the bf16 vectors)
    fell = fresh("index", c, "--checkpoint", tiny_checkpoint, "--precision", "bf16", "--min-cosine", "1.0", "--json")
    assert json.loads(fell.stdout)["precision"] == "fp32"
    notice = [line for line in fell.stderr.splitlines() if line.startswith("loupe: ")]
    assert len(notice) == 1 and "bf16 image vectors of loupe-tiny strayed from fp32" in notice[0]
    assert json.loads(fresh("info", "--json").stdout)["image_precision"] == {"fp32": 1.0}
    bad = loupe("index", c, "--precision", "fp8", ok=False)
    assert bad.returncode == 1 and "unknown precision 'fp8'" in bad.stderr


def test_unpacked_attention_is_the_same_arithmetic(vit_encoder, pixels):
    """int8 quantises the attention projections too; before quantising, that rewrite changes nothing."""
    import copy

    from loupe.indexer.models.quantize import LinearSelfAttention, unpack_attention

    vit_encoder.set_image_precision("fp32")
    tower = copy.deepcopy(vit_encoder.model.visual)
    assert unpack_attention(tower) == TINY_VIT_CONFIG["vision_cfg"]["layers"]
    assert all(isinstance(b.attn, LinearSelfAttention) for b in tower.transformer.resblocks)
    with torch.inference_mode():
        a = torch.nn.functional.normalize(vit_encoder.model.visual(pixels), dim=-1)
        b = torch.nn.functional.normalize(tower(pixels), dim=-1)
    assert float((a * b).sum(1).min()) >= 0.99999


# ---- the model spec carries the precisions; query text is fp32 unless asked, on every CPU -----------------

SCORE_TOLERANCE = {"fp32": 1e-5, "bf16": 5e-3}  # how far a cosine computed in that precision may be from fp32's


@pytest.mark.parametrize("has_bf16", [False, True])
def test_query_text_auto_is_fp32_whatever_the_cpu(monkeypatch, tiny_checkpoint, has_bf16):
    """A CPU with bf16 units (simulated here) no longer changes what `auto` runs: the search paths agree."""
    from loupe.indexer.models.factory import index_encoder
    from loupe.indexer.models.spec import make_spec

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has_bf16)
    assert precision.resolve_text("auto", torch.device("cpu")) == "fp32"
    assert precision.resolve_text("bf16", torch.device("cpu")) == "bf16"
    assert precision.resolve_text("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(LoupeError, match="unknown text precision"):
        precision.resolve_text("fp8", torch.device("cpu"))
    encoder = index_encoder(make_spec(None, None, tiny_checkpoint), "cpu")
    assert (encoder.text_precision, encoder.spec.text_precision, encoder.spec.image_precision) == ("fp32", "fp32", "fp32")
    assert encoder.spec.text_backend == "torch" and encoder.spec.dim == encoder.dim


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_the_spec_precision_is_what_runs(tiny_checkpoint, tiny_encoder, name):
    """Either text precision, forced by the spec, runs on any CPU (bf16 is emulated without bf16
    units) and stays within that precision's tolerance of fp32."""
    from loupe.indexer.models.factory import index_encoder

    encoder = index_encoder(tiny_encoder.spec.replace(text_precision=name), "cpu")
    assert encoder.text_precision == encoder.spec.text_precision == name
    texts = ["a dog runs on the grass", "two children play on a sandy beach"]
    got, want = encoder.encode_texts(texts), tiny_encoder.encode_texts(texts)
    assert np.abs(got - want).max() <= SCORE_TOLERANCE[name]
    assert name == "fp32" or np.abs(got - want).max() > SCORE_TOLERANCE["fp32"]  # really bf16


def test_cli_search_scores_follow_the_text_precision(loupe, tiny_checkpoint, tiny_encoder, photo_dir):
    """The same query scores as the in-process fp32 search within the tolerance of the precision the
    CLI reports having run: fp32 by default, bf16 when asked, on any CPU."""
    from loupe.indexer.storage.store import Store
    from loupe.retrieval.engine.query import parse_query
    from loupe.retrieval.engine.search import Searcher

    loupe("index", photo_dir, "--checkpoint", tiny_checkpoint)
    query = "a dog on the beach"
    want = Searcher(Store.open(home=loupe.home, writer=False), tiny_encoder).search(parse_query([query]), k=4)
    for asked, runs in (("auto", "fp32"), ("bf16", "bf16")):
        proc = loupe("search", query, "--json", "--timings", "-k", "4", "--text-precision", asked)
        timings = json.loads(proc.stderr.strip().splitlines()[-1])
        assert timings["text_precision"] == runs
        got = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [h["score"] for h in got] == pytest.approx([h.score for h in want], abs=SCORE_TOLERANCE[runs])


def test_a_ray_actor_runs_the_spec_precision(tiny_encoder):
    """The embedding actor builds its encoder from the driver's spec: the precision it names, not
    one of its own choosing (on CUDA it used to turn fp16 on by itself)."""
    from loupe.indexer.pipeline.ray_runner import Embedder

    for name in ("fp32", "bf16"):
        actor = Embedder(tiny_encoder.spec.replace(image_precision=name), "cpu")
        assert actor.encoder.spec.image_precision == name
        assert actor.encoder._pending == (None if name == "fp32" else (name, precision.MIN_COSINE))
