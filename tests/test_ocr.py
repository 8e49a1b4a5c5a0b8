"""Text in photos: read by OCR in a second, resumable pass, stored with boxes in a trigram index,
found from the one search box (text matches first, `text:"..."` alone), folded for case, accents
and full-width forms, with typos; photos drawn by the test (benchmarks/ocr_set.py)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from benchmarks.ocr_set import have_cjk_font, have_fonts, make_fixtures, write_set
from loupe.indexer.pipeline.indexing import index_folder
from loupe.indexer.signals.ocr import NAME, RecognisedText
from loupe.indexer.signals.phash import PerceptualHash
from loupe.indexer.signals.registry import registered
from loupe.indexer.signals.textmatch import max_typos, normalize, substring_distance
from loupe.indexer.storage.store import Store
from loupe.retrieval.engine.query import Term, parse_query
from loupe.retrieval.engine.search import Searcher

pytestmark = pytest.mark.skipif(not have_fonts(), reason="fonts-dejavu not installed (.ci/run installs it)")
NO_OCR = (PerceptualHash(),)


@pytest.fixture(scope="module")
def text_index(tmp_path_factory, tiny_encoder):
    """22 drawn photos (2 of each kind, plates with their decoys) indexed with a random-weight model."""
    root = tmp_path_factory.mktemp("ocr")
    photos = write_set(root / "photos", make_fixtures(2, seed=3))
    store = Store.open(home=root / "home")
    report = index_folder(store, tiny_encoder, root / "photos", batch_size=8)
    return store, photos, report, root


def names(hits) -> list[str]:
    return [Path(h.fields["path"]).name for h in hits]


def test_folding_and_the_typo_rule():
    assert normalize("ＲＥ１６  Bréval\tÇA") == "re16 breval ca"
    assert normalize("花雨月") == "花雨月"
    assert [max_typos(q) for q in ("re16", "tulax", "tulaxado", "tulaxadoro")] == [0, 1, 1, 2]
    assert substring_distance("tulaxdo", "xx tulaxado yy") == 1 and substring_distance("re16", "re61 abc") == 1 > max_typos("re16")


def test_ocr_runs_after_the_embeddings_and_stores_lines_with_boxes(text_index):
    store, photos, report, _ = text_index
    assert report.embedded == len(photos) and report.signals[NAME]["done"] == len(photos) and report.deferred == {NAME: 0}
    cov = store.catalog.signal_coverage({NAME: RecognisedText.version})[NAME]
    assert (cov["done"], cov["failed"]) == (len(photos), 0)
    sign = next(n for n, f in photos.items() if f.kind == "sign")
    by_name = {Path(p.decode()).name: s.content_hash for p, s in store.catalog.image_states().items()}
    text = store.catalog.text_of(by_name[sign])
    assert text and all(0.5 <= line["conf"] <= 1 and len(line["box"]) == 4 for line in text)
    assert all(0 <= x <= 1 and 0 <= y <= 1 for line in text for x, y in line["box"])
    notext = [n for n, f in photos.items() if f.kind == "notext"]
    assert all(store.catalog.text_of(by_name[n]) == [] for n in notext)
    assert store.catalog.photos_with_text() >= len(photos) - len(notext) - 2


def test_a_made_up_word_finds_its_photo_first_with_a_random_model(text_index, tiny_encoder):
    store, photos, _, _ = text_index
    searcher = Searcher(store, tiny_encoder)
    words = [(n, w) for n, f in photos.items() for w in f.words if f.kind not in ("plate",)]
    if not have_cjk_font():
        words = [(n, w) for n, w in words if photos[n].kind != "chinese"]
    first = {w: names(searcher.search(parse_query([w]), k=3))[:1] for _, w in words}
    found = [w for n, w in words if first[w] == [n]]
    assert len(found) >= 0.9 * len(words), sorted(set(w for _, w in words) - set(found))
    signs = [(n, w) for n, w in words if photos[n].kind == "sign"]
    assert all(first[w] == [n] for n, w in signs)


def test_folded_queries_typos_and_matched_text_in_json(text_index, tiny_encoder):
    store, photos, _, _ = text_index
    searcher = Searcher(store, tiny_encoder)
    doc_name, doc = next((n, f) for n, f in photos.items() if f.kind == "document")
    word = doc.words[0]
    for query in (word.upper(), word.capitalize(), "".join(chr(ord(c) - 0x20 + 0xFF00) for c in word.upper())):
        hit = searcher.search(parse_query([query]), k=1)[0]
        assert Path(hit.fields["path"]).name == doc_name
        matched = hit.to_json()["text_match"]
        assert matched["match"] == "exact" and any(word in normalize(line["text"]) for line in matched["lines"])
    typo = word[:2] + ("x" if word[2] != "x" else "z") + word[3:]  # one substitution, a word of >= 5 letters
    hit = searcher.search(parse_query([typo]), k=1)[0]
    assert Path(hit.fields["path"]).name == doc_name and hit.fields["text_match"] == {**hit.fields["text_match"], "match": "typo", "edits": 1}
    accented = next((w for f in photos.values() for w in f.words if "é" in w), None)
    if accented is not None:
        plain = accented.replace("é", "e")
        owner = next(n for n, f in photos.items() if accented in f.words)
        assert names(searcher.search(parse_query([plain]), k=1)) == [owner]


def test_re16_ranks_every_plate_above_every_decoy(text_index, tiny_encoder):
    store, photos, _, _ = text_index
    searcher = Searcher(store, tiny_encoder)
    ranked = names(searcher.search(parse_query(["RE16"]), k=len(photos)))
    plates = [n for n, f in photos.items() if f.kind == "plate"]
    decoys = [n for n, f in photos.items() if f.kind == "decoy"]
    assert set(ranked[: len(plates)]) == set(plates)
    assert max(ranked.index(p) for p in plates) < min(ranked.index(d) for d in decoys)
    only = searcher.search([Term(1.0, "ocr", "re16")], k=len(photos))  # text:"RE16": the plates alone
    assert set(names(only)) == set(plates) and all(h.fields["text_match"]["match"] == "exact" for h in only)
    assert parse_query(['text:"RE16"']) == [Term(1.0, "ocr", "RE16")] == parse_query(["text:RE16"])


def test_a_query_with_no_text_match_ranks_exactly_as_without_ocr(text_index, tiny_encoder, tmp_path):
    store, photos, _, root = text_index
    plain = Store.open(home=tmp_path / "no-ocr")
    index_folder(plain, tiny_encoder, root / "photos", batch_size=8, signals=NO_OCR)
    query = parse_query(["a dog running on the grass"])
    with_ocr, without = Searcher(store, tiny_encoder), Searcher(plain, tiny_encoder)
    assert store.catalog.text_matches(normalize("a dog running on the grass")) == {}
    a = with_ocr.search(query, k=len(photos))
    b = without.search(query, k=len(photos))
    assert [(names([h])[0], round(h.score, 6)) for h in a] == [(names([h])[0], round(h.score, 6)) for h in b]
    assert all("text_match" not in h.fields for h in a)


def test_existing_index_gains_text_without_reembedding_and_ctrl_c_loses_nothing(tmp_path, tiny_encoder, monkeypatch):
    write_set(tmp_path / "photos", make_fixtures(1, seed=5, kinds=("sign", "document", "exif", "notext")))
    store = Store.open(home=tmp_path / "home")
    first = index_folder(store, tiny_encoder, tmp_path / "photos", signals=NO_OCR)  # as `loupe index --no-ocr`
    assert first.embedded == 4 and NAME not in first.signals and store.catalog.photos_with_text() == 0

    def no_model():
        raise AssertionError("gaining text must not load the model")

    real = store.catalog.write_signals
    calls = []

    def interrupted(results):  # Ctrl-C lands on the second commit of the OCR pass
        calls.append(len(results))
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(results)

    monkeypatch.setattr(store.catalog, "write_signals", interrupted)
    cut = index_folder(store, no_model, tmp_path / "photos", batch_size=1)
    assert cut.interrupted and cut.embedded == 0 and sum(cut.deferred.values()) >= 1
    done = store.catalog.signal_coverage({NAME: 1})[NAME]["done"]
    assert 1 <= done < 4
    monkeypatch.setattr(store.catalog, "write_signals", real)
    rest = index_folder(store, no_model, tmp_path / "photos")
    assert rest.embedded == 0 and rest.signals[NAME]["done"] == 4 - done and rest.deferred == {NAME: 0}
    assert store.catalog.signal_coverage({NAME: 1})[NAME]["done"] == 4 and store.catalog.photos_with_text() >= 2
    assert store.catalog.image_states() and all(s.status == "ok" for s in store.catalog.image_states().values())


class FailingOcr(RecognisedText):
    """OCR that cannot read one photo (a signal failure, as a corrupt stretch of a file would cause)."""

    def extract(self, image, source):
        if source.path.endswith("_document.jpg"):
            raise RuntimeError("cannot read this one")
        return super().extract(image, source)


def test_a_photo_whose_ocr_failed_keeps_its_vector_and_is_reported(tmp_path, tiny_encoder):
    write_set(tmp_path / "photos", make_fixtures(1, seed=6, kinds=("sign", "document")))
    store = Store.open(home=tmp_path / "home")
    report = index_folder(store, tiny_encoder, tmp_path / "photos", signals=(FailingOcr(),))
    assert report.embedded == 2 and report.signals[NAME] == {"done": 1, "failed": 1}
    assert [(Path(p).name, n) for p, n, _ in report.signal_errors] == [("01_document.jpg", NAME)]
    assert all(s.status == "ok" for s in store.catalog.image_states().values())  # searchable by CLIP all the same
    assert store.catalog.signal_coverage({NAME: 1})[NAME] == {"version": 1, "photos": 2, "done": 1, "failed": 1}


def test_an_older_catalog_gains_the_text_table(tmp_path, tiny_encoder):
    from loupe.indexer.storage.catalog import SCHEMA_VERSION

    write_set(tmp_path / "photos", make_fixtures(1, seed=7, kinds=("sign",)))
    store = Store.open(home=tmp_path / "home")
    index_folder(store, tiny_encoder, tmp_path / "photos", signals=NO_OCR)
    path = store.catalog.url[len("sqlite:///"):]
    store.catalog.engine.dispose()
    db = sqlite3.connect(path)
    for name in ("signal_text_fts", "signal_text"):
        db.execute(f"DROP TABLE {name}")
    db.execute("UPDATE meta SET schema_version = 4")  # the version before the text table
    db.commit()
    db.close()
    migrated = Store.open(home=tmp_path / "home")
    assert migrated.meta().schema_version == SCHEMA_VERSION == 5 and migrated.catalog.text_index == "fts5"
    report = index_folder(migrated, tiny_encoder, tmp_path / "photos")
    word = make_fixtures(1, seed=7, kinds=("sign",))[0].words[0]
    assert report.embedded == 0 and report.signals[NAME]["done"] == 1
    assert len(migrated.catalog.text_matches(normalize(word))) == 1


def test_cli_no_ocr_info_search_json_text_only_and_export(tmp_path, loupe, tiny_checkpoint):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    fixtures = make_fixtures(1, seed=8, kinds=("sign", "plate", "notext"))
    write_set(tmp_path / "photos", fixtures)
    loupe("index", tmp_path / "photos", "--checkpoint", tiny_checkpoint, "--no-ocr")
    info = loupe("info").stdout
    assert "text         0 photos with text, 0 of 4 read; 4 not read yet" in info
    out = loupe("index", tmp_path / "photos", "--json").stdout
    report = json.loads(out.splitlines()[-1])
    assert report["embedded"] == 0 and report["signals"][NAME]["done"] == 4 and not report["model_loaded"]
    word = fixtures[0].words[0]
    rows = [json.loads(line) for line in loupe("search", word.upper(), "--json", "-k", "4").stdout.splitlines()]
    assert rows[0]["path"].endswith("00_sign.jpg") and rows[0]["text_match"]["match"] == "exact"
    assert all("text_match" not in r for r in rows[1:])
    only = [json.loads(line) for line in loupe("search", 'text:"RE16"', "--json").stdout.splitlines()]
    assert [Path(r["path"]).name for r in only] == ["01_plate.jpg"] and "RE16" in only[0]["text_match"]["lines"][0]["text"]
    loupe("export", tmp_path / "shards")
    table = pq.read_table(next((tmp_path / "shards" / "metadata").glob("*.parquet")))
    texts = dict(zip((Path(p).name for p in table.column("image_path").to_pylist()), table.column("text").to_pylist()))
    assert normalize(word) in normalize(texts["00_sign.jpg"]) and "RE16" in texts["01_plate.jpg"]
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts.values())


class MissingOcr(RecognisedText):
    def unavailable(self):
        return "reading text in photos needs the rapidocr-onnxruntime package"


def test_without_the_ocr_package_the_pass_is_skipped_and_runs_once_installed(tmp_path, tiny_encoder):
    write_set(tmp_path / "photos", make_fixtures(1, seed=6, kinds=("sign",)))
    store = Store.open(home=tmp_path / "home")
    report = index_folder(store, tiny_encoder, tmp_path / "photos", signals=(MissingOcr(),))
    assert report.embedded == 1 and report.unavailable == {NAME: "reading text in photos needs the rapidocr-onnxruntime package"}
    assert NAME not in report.signals and store.catalog.signal_coverage({NAME: 1})[NAME]["failed"] == 0  # nothing recorded
    again = index_folder(store, tiny_encoder, tmp_path / "photos", signals=(RecognisedText(),))
    assert again.embedded == 0 and again.signals[NAME]["done"] == 1 and RecognisedText().unavailable() is None
