"""Filtered hits list only the paths that pass the filter.

Identical files share one vector, and a hit lists every file of its vector (the first as
`path`, the others as `duplicates`). With a filter, a copy outside `--in`, `--glob` or the date
range is not a result: it must not be shown as the hit's path, nor among its duplicates.
"""

from __future__ import annotations

import os
import shutil

import pytest

from loupe.indexer.pipeline.indexing import index_folder
from loupe.retrieval.engine.query import parse_query
from loupe.retrieval.engine.requests import parse_date
from loupe.retrieval.engine.search import Filters, Searcher


@pytest.fixture
def twins(tmp_path, store, tiny_encoder, flickr_images):
    """The same photo (same bytes, one vector) in folders x/ and b/; b's copies sort first."""
    root = tmp_path / "photos"
    photo = sorted(flickr_images.iterdir())[0]
    other = sorted(flickr_images.iterdir())[1]
    for folder, name in (("x", "z-in-x.jpg"), ("b", "a-in-b.jpg"), ("b", "b-also-in-b.jpg")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(photo, root / folder / name)
    shutil.copy2(other, root / "x" / "other.jpg")
    old = 946_684_800  # 2000-01-01: b's copies are old, x's are from today
    for name in ("a-in-b.jpg", "b-also-in-b.jpg"):
        os.utime(root / "b" / name, (old, old))
    report = index_folder(store, tiny_encoder, root)
    assert report.embedded == 2 and report.reused == 2
    return Searcher(store, tiny_encoder), root, str(photo)


def _paths(hit) -> list[str]:
    return [hit.fields["path"], *hit.fields["duplicates"]]


def test_folder_filter_lists_only_paths_inside_the_folder(twins):
    searcher, root, photo = twins
    hits = searcher.search(parse_query([photo]), k=5, filters=Filters(folder=str(root / "x")))
    assert [_paths(h) for h in hits][0] == [str(root / "x" / "z-in-x.jpg")]
    assert all(str(root / "b") not in p for h in hits for p in _paths(h))
    hits = searcher.search(parse_query([photo]), k=5, filters=Filters(folder=str(root / "b")))
    assert [_paths(h) for h in hits] == [[str(root / "b" / "a-in-b.jpg"), str(root / "b" / "b-also-in-b.jpg")]]
    # unfiltered, the hit still lists every copy
    hits = searcher.search(parse_query([photo]), k=1)
    assert sorted(_paths(hits[0])) == sorted(str(p) for p in root.rglob("*in-*.jpg"))


def test_glob_and_date_filters_list_only_matching_paths(twins):
    searcher, root, photo = twins
    terms = parse_query([photo])
    hits = searcher.search(terms, k=5, filters=Filters(globs=["z-*"]))
    assert [_paths(h) for h in hits] == [[str(root / "x" / "z-in-x.jpg")]]
    hits = searcher.search(terms, k=5, filters=Filters(globs=["*/b/b-*", "*/x/*"]))
    assert _paths(hits[0]) == [str(root / "b" / "b-also-in-b.jpg"), str(root / "x" / "z-in-x.jpg")]
    hits = searcher.search(terms, k=5, filters=Filters(before=parse_date("2001"), date_field="modified"))
    assert [_paths(h) for h in hits] == [[str(root / "b" / "a-in-b.jpg"), str(root / "b" / "b-also-in-b.jpg")]]
    hits = searcher.search(terms, k=5, filters=Filters(after=parse_date("2001"), folder=str(root)))
    assert _paths(hits[0]) == [str(root / "x" / "z-in-x.jpg")]
