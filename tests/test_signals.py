"""Per-photo signals: run in the decode pass, stored by (content hash, name, version), backfilled
without embedding, failures recorded like skips; the perceptual hash as the first signal."""

from __future__ import annotations

import io
import sqlite3

import pytest
from PIL import Image

from loupe.indexer.pipeline.indexing import index_folder
from loupe.indexer.signals.base import versions
from loupe.indexer.signals.phash import PerceptualHash, perceptual_hashes
from loupe.indexer.signals.registry import by_name, registered
from loupe.indexer.storage.catalog import IMAGE, SCHEMA_VERSION
from loupe.indexer.storage.check import check_store
from loupe.indexer.storage.store import Store


class PerceptualHashV2(PerceptualHash):
    version = 2


class Boom(PerceptualHash):
    """Fails on one photo (by name), like a signal meeting a picture it cannot handle."""

    name = "boom"

    def __init__(self, victim: str) -> None:
        self.victim = victim

    def extract(self, image, source):
        if source.path.endswith(self.victim):
            raise ValueError("cannot read this one")
        return super().extract(image, source)


def no_model():
    raise AssertionError("the model was loaded: a signal-only run must never embed")


@pytest.fixture
def count_encodes(tiny_encoder, monkeypatch):
    calls = []
    real = tiny_encoder.encode_images
    monkeypatch.setattr(tiny_encoder, "encode_images", lambda pixels: calls.append(len(pixels)) or real(pixels))
    return calls


def test_phash_is_the_registered_signal():
    assert [s.name for s in registered()][:1] == ["phash"] and by_name("phash").version >= 1 and by_name("text").deferred


def test_adding_a_signal_hashes_every_photo_without_embedding(store, tiny_encoder, photo_dir, count_encodes):
    first = index_folder(store, tiny_encoder, photo_dir, batch_size=5, signals=())
    assert first.embedded == 12 and first.signals == {} and sum(count_encodes) == 12
    count_encodes.clear()

    added = index_folder(store, no_model, photo_dir, signals=[PerceptualHash()])
    assert (added.embedded, added.unchanged, added.signals) == (0, 12, {"phash": {"done": 12, "failed": 0}})
    assert count_encodes == []
    assert store.catalog.signal_coverage({"phash": 1}) == {"phash": {"version": 1, "photos": 12, "done": 12, "failed": 0}}
    values = store.catalog.signal_values("phash", 1)
    assert len(values) == 12 and all(len(v) == 16 for v in values.values())
    assert set(values) == set(store.catalog.hash_to_vector(IMAGE))

    again = index_folder(store, no_model, photo_dir, signals=[PerceptualHash()])
    assert again.signals == {} and again.embedded == 0  # nothing left to do
    assert check_store(store).ok


def test_new_photos_get_signals_in_the_embedding_pass(store, tiny_encoder, photo_dir, count_encodes, tmp_path):
    report = index_folder(store, tiny_encoder, photo_dir, batch_size=5, signals=[PerceptualHash()])
    assert report.embedded == 12 and report.signals == {"phash": {"done": 12, "failed": 0}}
    assert sum(count_encodes) == 12 and report.stages["signals"]["items"] == 12
    hashed = store.catalog.signal_values("phash", 1)
    # the embedding pass (draft-decoded for the model) and a decode for the signal alone agree closely
    other = Store.open(home=tmp_path / "other")
    index_folder(other, tiny_encoder, photo_dir, signals=())
    index_folder(other, no_model, photo_dir, signals=[PerceptualHash()])
    alone = other.catalog.signal_values("phash", 1)
    sig = PerceptualHash()
    assert set(alone) == set(hashed)
    assert max(sig.distance(sig.decode(alone[h]), sig.decode(hashed[h])) for h in hashed) <= 4


def test_bumped_version_reruns_only_that_signal(store, tiny_encoder, photo_dir, count_encodes):
    index_folder(store, tiny_encoder, photo_dir, signals=[PerceptualHash()])
    count_encodes.clear()
    bumped = index_folder(store, no_model, photo_dir, signals=[PerceptualHashV2(), Boom("nothing")])
    assert bumped.embedded == 0 and count_encodes == []
    assert bumped.signals == {"phash": {"done": 12, "failed": 0}, "boom": {"done": 12, "failed": 0}}
    assert len(store.catalog.signal_values("phash", 2)) == 12
    assert store.catalog.signal_values("phash", 1) == {}  # the old version's values are replaced
    assert index_folder(store, no_model, photo_dir, signals=[PerceptualHashV2()]).signals == {}


def test_failing_signal_keeps_the_vector_and_is_reported(store, tiny_encoder, photo_dir):
    victim = sorted(p.name for p in photo_dir.iterdir())[3]
    report = index_folder(store, tiny_encoder, photo_dir, signals=[Boom(victim), PerceptualHash()])
    assert (report.embedded, report.skipped) == (12, 0)
    assert report.signals == {"boom": {"done": 11, "failed": 1}, "phash": {"done": 12, "failed": 0}}
    assert [(p.rsplit("/", 1)[-1], n, r) for p, n, r in report.signal_errors] == [(victim, "boom", "ValueError: cannot read this one")]
    assert store.catalog.count_vectors(IMAGE) == 12
    assert store.catalog.signal_coverage({"boom": 1})["boom"] == {"version": 1, "photos": 12, "done": 11, "failed": 1}
    # recorded like a skip: not retried until the signal's version changes
    assert index_folder(store, no_model, photo_dir, signals=[Boom(victim), PerceptualHash()]).signals == {}


def _reencoded(path, scale: float, quality: int) -> Image.Image:
    img = Image.open(path).convert("RGB")
    img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_near_identical_reencodes_are_close_and_different_photos_far(flickr_images):
    sig = PerceptualHash()
    paths = sorted(flickr_images.iterdir())[:12]
    originals = [perceptual_hashes(Image.open(p).convert("RGB")) for p in paths]
    for p, h in zip(paths, originals):
        for scale, quality in ((1.0, 40), (0.5, 75), (0.25, 90)):
            assert sig.distance(h, perceptual_hashes(_reencoded(p, scale, quality))) <= 6, (p.name, scale, quality)
    far = [sig.distance(a, b) for i, a in enumerate(originals) for b in originals[i + 1 :]]
    assert min(far) >= 14 and sum(far) / len(far) >= 24
    stored = {str(i): sig.encode(h) for i, h in enumerate(originals)}
    query = perceptual_hashes(_reencoded(paths[5], 0.5, 60))
    assert [h for h, _ in sig.within(query, stored, 10)] == ["5"]
    assert sig.decode(sig.encode(originals[0])) == originals[0]


def test_an_older_catalog_gains_the_signals_table(store, tiny_encoder, photo_dir, tmp_path):
    index_folder(store, tiny_encoder, photo_dir, signals=())
    path = store.catalog.url[len("sqlite:///") :]
    store.catalog.engine.dispose()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE signals")
    db.execute("UPDATE meta SET schema_version = 2")
    db.commit()
    db.close()
    migrated = Store.open(home=tmp_path / "home")  # the `store` fixture's home
    assert migrated.meta().schema_version == SCHEMA_VERSION >= 3
    report = index_folder(migrated, no_model, photo_dir, signals=[PerceptualHash()])
    assert report.signals == {"phash": {"done": 12, "failed": 0}}


def test_info_shows_signal_coverage(loupe, tiny_checkpoint, photo_dir):
    loupe("index", photo_dir, "--checkpoint", tiny_checkpoint)
    out = loupe("info").stdout
    assert "signal       phash v1: 12 of 12 photos" in out
