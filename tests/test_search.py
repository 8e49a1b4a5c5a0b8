"""Search semantics against brute force: query parsing, mixed queries, filters, duplicates."""

from __future__ import annotations

import io
import os
import shutil
from datetime import datetime

import numpy as np
import pytest
from PIL import Image

from loupe.indexer.storage.catalog import IMAGE
from loupe.indexer.errors import LoupeError
from loupe.indexer.pipeline.captions import index_captions
from loupe.indexer.pipeline.indexing import index_folder
from loupe.retrieval.engine.query import Term, parse_query
from loupe.retrieval.engine.requests import parse_date
from loupe.retrieval.engine.search import Filters, Searcher
from loupe.retrieval.engine.vectors import image_file_vector, query_vector


# ---- query language ---------------------------------------------------------------------


def test_parse_single_sentence_and_words(tmp_path):
    assert parse_query(["a dog on a beach"]) == [Term(1.0, "text", "a dog on a beach")]
    assert parse_query(["a", "dog", "on", "a", "beach"]) == [Term(1.0, "text", "a dog on a beach")]
    assert parse_query(["a well-known dog"]) == [Term(1.0, "text", "a well-known dog")]
    assert parse_query(["note: 3 dogs"]) == [Term(1.0, "text", "note: 3 dogs")]


def test_parse_mixed_expression(tmp_path):
    img = tmp_path / "dog photo.jpg"
    Image.new("RGB", (8, 8)).save(img)
    one_word = f'"2:beach" + {img.parent}/dog\\ photo.jpg - "people"'.replace("\\ ", " ")
    expected = [Term(2.0, "text", "beach"), Term(1.0, "image", str(img)), Term(-1.0, "text", "people")]
    # as separate shell words (the file name keeps its space)
    assert parse_query(["2:beach", "+", str(img), "-", "people"]) == expected
    assert parse_query(['"2:beach" + "a sunny day" - "0.5:people"']) == [
        Term(2.0, "text", "beach"), Term(1.0, "text", "a sunny day"), Term(-0.5, "text", "people")
    ]
    # quoted text that happens to name a file stays text
    assert parse_query([f'"{img}"'])[0].kind == "text"
    assert one_word  # documented form with a path containing no spaces:
    plain = tmp_path / "dog.jpg"
    Image.new("RGB", (8, 8)).save(plain)
    assert parse_query([f'"2:beach" + {plain} - "people"'])[1] == Term(1.0, "image", str(plain))


@pytest.mark.parametrize("bad", [[], ['"unbalanced'], ["dog", "+"], ["- people"], ["dog", "+", "-", "cat"]])
def test_parse_errors(bad):
    with pytest.raises(LoupeError):
        parse_query(bad)


def test_parse_date_bounds():
    assert parse_date("2021") == datetime(2021, 1, 1)
    assert parse_date("2021", end=True) == datetime(2022, 1, 1)
    assert parse_date("2021-12", end=True) == datetime(2022, 1, 1)
    assert parse_date("2021-06-30", end=True) == datetime(2021, 7, 1)
    with pytest.raises(LoupeError):
        parse_date("last week")


# ---- ranking ------------------------------------------------------------------------------


def _jpeg_with_exif(path, color, taken: str | None) -> None:
    img = Image.new("RGB", (96, 72), color)
    exif = Image.Exif()
    if taken:
        exif.get_ifd(0x8769)[0x9003] = taken
    img.save(path, "JPEG", exif=exif.tobytes())


@pytest.fixture
def indexed(store, tiny_encoder, photo_dir):
    """12 real photos, 3 with capture dates in a subfolder, one duplicated."""
    sub = photo_dir / "trip"
    sub.mkdir()
    _jpeg_with_exif(sub / "2019.jpg", (250, 10, 10), "2019:07:01 10:00:00")
    _jpeg_with_exif(sub / "2021.jpg", (10, 250, 10), "2021:03:05 12:30:00")
    _jpeg_with_exif(sub / "2023.jpg", (10, 10, 250), "2023:11:11 08:00:00")
    first = sorted(p for p in photo_dir.iterdir() if p.is_file())[0]
    shutil.copy(first, photo_dir / "zz-duplicate.jpg")
    report = index_folder(store, tiny_encoder, photo_dir)
    assert report.embedded == 15 and report.reused == 1
    return Searcher(store, tiny_encoder)


def brute_force(searcher: Searcher, query: np.ndarray, allowed=None) -> list[tuple[int, float]]:
    ids = searcher.store.catalog.vector_ids(IMAGE)
    if allowed is not None:
        ids = np.array(sorted(set(ids) & set(int(a) for a in allowed)), dtype=np.int64)
    vecs = searcher.store.catalog.load_vectors(ids, searcher.meta.dim)
    scores = vecs @ query
    order = np.argsort(-scores, kind="stable")
    return [(int(ids[i]), float(scores[i])) for i in order]


def assert_same_ranking(hits, expected: list[tuple[int, float]], atol: float = 1e-5) -> None:
    """`hits` are the top of the brute-force ranking `expected`, up to float rounding.

    FAISS and numpy sum in other orders, so two items whose scores differ by less than the
    rounding may swap: each hit must score (by brute force) what it reports, and the scores
    must run down the expected ones rank by rank.
    """
    truth = dict(expected)
    assert len({h.vector_id for h in hits}) == len(hits)
    assert np.allclose([h.score for h in hits], [s for _, s in expected[: len(hits)]], atol=atol)
    assert np.allclose([truth[h.vector_id] for h in hits], [h.score for h in hits], atol=atol)


def test_text_query_matches_brute_force(indexed):
    terms = parse_query(["a dog running through the grass"])
    hits = indexed.search(terms, k=5)
    assert len(hits) == 5
    assert_same_ranking(hits, brute_force(indexed, query_vector(indexed, terms)))
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]


def test_image_query_finds_itself_and_collapses_duplicates(indexed, photo_dir):
    first = sorted(p for p in photo_dir.iterdir() if p.is_file())[0]
    hits = indexed.search(parse_query([str(first)]), k=3)
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    paths = {hits[0].fields["path"], *hits[0].fields["duplicates"]}
    assert paths == {str(first), str(photo_dir / "zz-duplicate.jpg")}
    assert all(str(photo_dir / "zz-duplicate.jpg") != h.fields["path"] for h in hits[1:])


def test_unindexed_query_image_is_embedded(indexed, tmp_path):
    q = tmp_path / "query.png"
    Image.new("RGB", (50, 50), (250, 10, 10)).save(q)
    hits = indexed.search(parse_query([str(q)]), k=1)
    assert len(hits) == 1
    assert_same_ranking(hits, brute_force(indexed, query_vector(indexed, parse_query([str(q)]))))


def test_mixed_query_is_weighted_sum(indexed, photo_dir):
    img = sorted(p for p in photo_dir.iterdir() if p.is_file())[1]
    terms = parse_query([f'"2:a beach" + {img} - "people"'])
    enc = indexed.encoder
    t = enc.encode_texts(["a beach", "people"])
    vec = 2 * t[0] + image_file_vector(indexed, str(img)) - t[1]
    vec /= np.linalg.norm(vec)
    assert np.allclose(query_vector(indexed, terms), vec, atol=1e-5)
    hits = indexed.search(terms, k=4)
    assert len(hits) == 4
    assert_same_ranking(hits, brute_force(indexed, vec))  # `vec` is summed here, not by the searcher


def test_filters_apply_before_the_top_k_cut(indexed, photo_dir):
    terms = parse_query(["a photo"])
    q = query_vector(indexed, terms)
    rows = {r.path: r for r in indexed.store.catalog.iter_image_rows()}

    def expect(paths):
        allowed = {rows[p].vector_id for p in paths}
        return [i for i, _ in brute_force(indexed, q, allowed)][:2]

    trip = photo_dir / "trip"
    got = indexed.search(terms, k=2, filters=Filters(folder=str(trip)))
    assert [h.vector_id for h in got] == expect([str(trip / f) for f in ("2019.jpg", "2021.jpg", "2023.jpg")])

    got = indexed.search(terms, k=5, filters=Filters(after=parse_date("2020"), before=parse_date("2022", end=True)))
    # capture dates decide for the trip photos; the others have no EXIF date, so their
    # modification time (today) decides, which is outside 2020-2022
    assert [h.fields["path"] for h in got] == [str(trip / "2021.jpg")]
    assert got[0].fields["taken_at"] == "2021-03-05T12:30:00"

    got = indexed.search(terms, k=10, filters=Filters(date_field="taken", before=parse_date("2022")))
    assert sorted(h.fields["path"] for h in got) == [str(trip / "2019.jpg"), str(trip / "2021.jpg")]

    got = indexed.search(terms, k=3, filters=Filters(globs=["*/trip/202*"]))
    assert {h.fields["path"] for h in got} == {str(trip / "2021.jpg"), str(trip / "2023.jpg")}

    assert indexed.search(terms, k=3, filters=Filters(globs=["*.gif"])) == []
    scores = [h.score for h in indexed.search(terms, k=15)]
    cut = scores[3]
    assert [h.score for h in indexed.search(terms, k=15, min_score=cut)] == scores[:4]


def test_image_to_text_against_caption_corpus(indexed, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a red square", "image": "r.jpg"}\n{"text": "a tree"}\n{"caption": "blue sky"}\n')
    index_captions(indexed.store, indexed.encoder, corpus)
    img = tmp_path / "q.png"
    Image.new("RGB", (40, 40), (200, 0, 0)).save(img)
    terms = parse_query([str(img)])
    hits = indexed.search(terms, target="text", k=3)
    texts = ["a red square", "a tree", "blue sky"]
    scores = indexed.encoder.encode_texts(texts) @ query_vector(indexed, terms)
    assert [h.fields["text"] for h in hits] == [texts[i] for i in np.argsort(-scores)]
    assert next(h for h in hits if h.fields["text"] == "a red square").fields["image"] == "r.jpg"


def test_wrong_model_for_search_is_an_error(indexed, tmp_path):
    from loupe.indexer.models.encoder import load_encoder
    from loupe.indexer.models.spec import make_spec
    from tests.conftest import save_random_model

    other = load_encoder(make_spec(None, None, save_random_model(tmp_path / "o.pt", seed=3)), "cpu")
    with pytest.raises(LoupeError, match="other weights"):
        Searcher(indexed.store, other)
