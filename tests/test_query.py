"""The query grammar: what is text, what is an image, what is a weight, what is an operator.

Every case here is about a query that used to be read in a way its user did not mean, without
a word: a clock time taken for a weight, a word taken for a file that happens to sit in the
current folder, a dash inside a sentence taken for a subtraction.
"""

from __future__ import annotations

import os

import pytest
from PIL import Image

from loupe.indexer.errors import LoupeError
from loupe.retrieval.engine.query import Term, parse_query


def _image(path) -> str:
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path, "PNG")
    return str(path)


# ---- weights ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "words, text",
    [
        (["10:30 sunset"], "10:30 sunset"),
        (["10:30", "sunset"], "10:30 sunset"),
        (["4:3 photo of a lake"], "4:3 photo of a lake"),
        (["2:30pm", "at", "the", "beach"], "2:30pm at the beach"),
        (["2:.5 litres"], "2:.5 litres"),
        (["2: beach"], "2: beach"),
        (["note: 3 dogs"], "note: 3 dogs"),
        (["sunny", "2:beach"], "sunny 2:beach"),  # a weight only starts a term
    ],
)
def test_a_number_after_the_colon_is_not_a_weight(words, text):
    assert parse_query(words) == [Term(1.0, "text", text)]


def test_weights():
    assert parse_query(["2:beach"]) == [Term(2.0, "text", "beach")]
    assert parse_query(["2:a sunny beach"]) == [Term(2.0, "text", "a sunny beach")]
    assert parse_query(["0.5:a", "sunny", "beach", "-", "people"]) == [
        Term(0.5, "text", "a sunny beach"), Term(-1.0, "text", "people")
    ]
    assert parse_query(['"2:beach" - ".5:people"']) == [Term(2.0, "text", "beach"), Term(-0.5, "text", "people")]
    # a weight in front of quotes: the quoted text is then literal, numbers and all
    assert parse_query(['2:"10:30 sunset" + 1:"3:2 ratio"']) == [
        Term(2.0, "text", "10:30 sunset"), Term(1.0, "text", "3:2 ratio")
    ]
    assert parse_query(["beach - -1:people"]) == [Term(1.0, "text", "beach"), Term(1.0, "text", "people")]


# ---- images -------------------------------------------------------------------------------


def test_a_word_naming_a_file_in_the_current_folder_stays_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _image(tmp_path / "beach")
    (tmp_path / "sunset").write_text("not a picture")
    assert parse_query(["beach"]) == [Term(1.0, "text", "beach")]
    assert parse_query(["beach", "sunset"]) == [Term(1.0, "text", "beach sunset")]
    assert parse_query(['"2:dogs" + beach']) == [Term(2.0, "text", "dogs"), Term(1.0, "text", "beach")]


def test_path_like_terms_are_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    dog = _image(tmp_path / "dog.jpg")
    cat = _image(tmp_path / "sub" / "Cat.PNG")
    noext = _image(tmp_path / "sub" / "scan")
    assert parse_query(["./dog.jpg"]) == [Term(1.0, "image", dog)]
    assert parse_query(["dog.jpg"]) == [Term(1.0, "image", dog)]
    assert parse_query(["sub/Cat.PNG"]) == [Term(1.0, "image", cat)]
    assert parse_query(["./sub/scan"]) == [Term(1.0, "image", noext)]
    assert parse_query(["sub/../dog.jpg"]) == [Term(1.0, "image", dog)]
    assert parse_query([noext]) == [Term(1.0, "image", noext)]  # absolute
    os.chdir(tmp_path / "sub")
    assert parse_query(["../dog.jpg"]) == [Term(1.0, "image", dog)]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_query(["~/dog.jpg"]) == [Term(1.0, "image", dog)]


def test_image_expressions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dog = _image(tmp_path / "dog.jpg")
    spaced = _image(tmp_path / "my dog.jpg")
    expected = [Term(2.0, "text", "beach"), Term(1.0, "image", dog), Term(-1.0, "text", "people")]
    assert parse_query(['"2:beach" + ./dog.jpg - "people"']) == expected
    assert parse_query(["2:beach", "+", "./dog.jpg", "-", "people"]) == expected
    assert parse_query(["a dog", "-", "dog.jpg"]) == [Term(1.0, "text", "a dog"), Term(-1.0, "image", dog)]
    assert parse_query(["0.5:./dog.jpg", "+", "snow"]) == [Term(0.5, "image", dog), Term(1.0, "text", "snow")]
    # a path with a space, as one shell word
    assert parse_query(["./my dog.jpg"]) == [Term(1.0, "image", spaced)]
    assert parse_query(["snow", "+", "my dog.jpg"]) == [Term(1.0, "text", "snow"), Term(1.0, "image", spaced)]


def test_forced_image_and_forced_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    beach = _image(tmp_path / "beach")
    dog = _image(tmp_path / "dog.jpg")
    spaced = _image(tmp_path / "my beach")
    assert parse_query(["img:beach"]) == [Term(1.0, "image", beach)]
    assert parse_query(["img:my beach"]) == [Term(1.0, "image", spaced)]
    assert parse_query(['img:"my beach" - 2:img:beach']) == [Term(1.0, "image", spaced), Term(-2.0, "image", beach)]
    # quotes force text, even for a path that exists
    assert parse_query(['"dog.jpg"']) == [Term(1.0, "text", "dog.jpg")]
    assert parse_query([f'"{dog}"']) == [Term(1.0, "text", dog)]
    assert parse_query(['"./dog.jpg" + ./dog.jpg']) == [Term(1.0, "text", "./dog.jpg"), Term(1.0, "image", dog)]


@pytest.mark.parametrize(
    "words, message",
    [
        (["./missing.jpg"], "no such image file: ./missing.jpg"),
        (["holiday.JPEG"], "no such image file: holiday.JPEG"),
        (["~/surely/not/here"], "no such image file"),
        (["img:beach"], "no such image file: beach"),
        (["a", "dog", "+", "/nope/x.png"], "no such image file: /nope/x.png"),
        (["a photo of beach.jpg"], "quote it"),
        (["./"], "not a file"),
    ],
)
def test_a_missing_image_is_an_error_not_text(tmp_path, monkeypatch, words, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoupeError, match=message) as err:
        parse_query(words)
    assert "\n" not in str(err.value)


# ---- operators ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "words, text",
    [
        (["t - shirt"], "t - shirt"),
        (["t", "-", "shirt"], "t - shirt"),
        (['"t - shirt"'], "t - shirt"),
        (["mother-in-law"], "mother-in-law"),
        (['"mother-in-law"'], "mother-in-law"),
        (["a dog - not a cat"], "a dog - not a cat"),
        (["a", "dog", "-", "not", "a", "cat"], "a dog - not a cat"),
        (["salt + pepper"], "salt + pepper"),
        (['"a dog - not a cat" on grass'], "a dog - not a cat on grass"),  # quotes only protect
        (['a "t - shirt" on a line'], "a t - shirt on a line"),
    ],
)
def test_plus_and_minus_inside_a_sentence_are_text(words, text):
    assert parse_query(words) == [Term(1.0, "text", text)]


def test_operators_join_marked_terms():
    assert parse_query(['"a dog" - "a cat"']) == [Term(1.0, "text", "a dog"), Term(-1.0, "text", "a cat")]
    assert parse_query(['a dog - "a cat"']) == [Term(1.0, "text", "a dog"), Term(-1.0, "text", "a cat")]
    assert parse_query(["a", "dog", "-", '"t - shirt"']) == [Term(1.0, "text", "a dog"), Term(-1.0, "text", "t - shirt")]
    assert parse_query(["a dog - 0.5:a cat"]) == [Term(1.0, "text", "a dog"), Term(-0.5, "text", "a cat")]
    assert parse_query(['"mother-in-law" - "in-law"']) == [
        Term(1.0, "text", "mother-in-law"), Term(-1.0, "text", "in-law")
    ]


@pytest.mark.parametrize(
    "words, message",
    [
        ([], "empty query"),
        ([""], "empty query"),
        (['"unbalanced'], "unbalanced"),
        (["dog", "+"], "operator"),
        (["- people"], "operator"),
        (["dog", "+", "-", "cat"], "operator"),
        (['""'], "empty"),
        (['-1:"a" - "b"'], "no positive term"),
        (['"a" + ./x.jpg ./y.jpg'], "image term must stand alone"),
        (["img:", "+", '"x"'], "empty"),
    ],
)
def test_errors(tmp_path, monkeypatch, words, message):
    monkeypatch.chdir(tmp_path)
    for name in ("x.jpg", "y.jpg"):
        _image(tmp_path / name)
    with pytest.raises(LoupeError, match=message):
        parse_query(words)


def test_cli_documents_the_grammar_and_fails_in_one_line(loupe):
    help_text = " ".join(loupe("search", "--help", timeout=60).stdout.split())  # any terminal width
    for needle in ("img:PATH", "10:30 sunset", "a dog - not a cat", "image extension"):
        assert needle in help_text
    proc = loupe("search", "./surely-not-here.jpg", ok=False, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "loupe: error: no such image file: ./surely-not-here.jpg (to search for it as text, quote it: "
        "'\"./surely-not-here.jpg\"')"
    ]
