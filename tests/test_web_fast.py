"""What keeps a new query's first page fast (benchmarks/bench_page.py): the web search shares the
CLI's ranking costs (FAISS depth, on-disk query cache), encodes on one torch thread, and carries
the first row's cached thumbnails inline. In process (Starlette's TestClient), over the real index
of tests/test_webapp.py: real photos, the tiny real model, real FAISS."""

from __future__ import annotations

import base64

import numpy as np

from tests.test_webapp import TOKEN, app, client, search  # noqa: F401  (the same app and client fixtures)


def test_first_page_ranks_as_deep_as_the_cli(client, app, monkeypatch):
    """A new query asks FAISS for the page it shows (the CLI's -k), not more; page 2 goes deeper."""
    searcher = app.state.web.service.searcher
    index = searcher.store.vector_index("image")
    asked = []
    original = type(index).search

    def recording(self, queries, k, allowed=None):
        asked.append(k)
        return original(self, queries, k, allowed)

    monkeypatch.setattr(type(index), "search", recording)
    first = search(client, q="two dogs play in the snow", limit=5)
    assert asked == [5] and len(first["results"]) == 5 and first["has_more"] is True
    second = search(client, q="two dogs play in the snow", limit=5, offset=5)
    assert len(asked) == 2 and asked[1] > 5 and len(second["results"]) == 5
    whole = search(client, q="two dogs play in the snow", limit=10, collapse=True, min_score=-1.0)["results"]
    assert [r["id"] for r in first["results"] + second["results"]] == [r["id"] for r in whole]


def test_sentences_share_the_cli_query_cache(client, app, web_index):
    """A sentence the page searched is not encoded again by `loupe search` (and the other way round)."""
    from loupe.indexer.storage.store import Store
    from loupe.retrieval.engine.query import parse_query
    from loupe.retrieval.engine.search import Searcher

    web = app.state.web.web
    before = web.encodings
    search(client, q="a child in a pink dress", limit=3)
    assert web.encodings == before + 1
    cli = Searcher(Store.open(home=web_index.home, writer=False), web_index.encoder)
    hits = cli.search(parse_query(["a child in a pink dress"]), k=3)
    assert cli.stats == {"cache_hits": 1, "encoded": 0}
    cli.search(parse_query(["a man climbs a rock"]), k=3)  # encoded by the CLI ...
    assert cli.stats["encoded"] == 1
    page = search(client, q="a man climbs a rock", limit=3)["results"]
    assert web.encodings == before + 1  # ... and not again by the server
    assert [r["path"] for r in page] == [h.fields["path"] for h in cli.search(parse_query(["a man climbs a rock"]), k=3)]
    assert hits


def test_query_sentences_are_encoded_on_one_thread(client, app, monkeypatch):
    """Queries run torch on one thread in the server (robust when the browser wants a core); restored after."""
    import torch

    encoder = app.state.web.service.searcher.encoder
    seen = []
    original = encoder.encode_texts

    def watching(texts, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(texts, *args, **kwargs)

    monkeypatch.setattr(encoder, "encode_texts", watching)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # as on a machine with two cores or more (this one may have one)
    try:
        search(client, q="a surfer rides a big wave", limit=2)
        r = client.post("/search", json={"terms": [{"weight": 1, "kind": "text", "value": "a red bicycle"}], "k": 2},
                        headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_first_row_thumbnails_come_inline_when_cached(client, app):
    """`inline: N`: the first N results carry their cached thumbnail as a data: URL, the same bytes
    GET /api/thumb serves; a thumbnail not made yet is not made by the search."""
    from loupe.retrieval.web.media import THUMB_TYPE

    web = app.state.web
    query = "a black dog and a white dog"
    plain = search(client, q=query, limit=6)["results"]
    assert all("thumb_data" not in r for r in plain)  # not asked
    made = web.thumbs_made
    fresh = search(client, q=query, limit=6, inline=4)["results"]
    uncached = [r for r in fresh[:4] if not web.thumbs.path(web.web.photo(r["id"]).content_hash).exists()]
    assert all("thumb_data" not in r for r in uncached) and web.thumbs_made == made  # nothing decoded
    served = {r["id"]: client.get(r["thumb"]).content for r in fresh[:3]}  # makes and caches three
    answer = search(client, q=query, limit=6, inline=4)["results"]
    assert [r["id"] for r in answer] == [r["id"] for r in plain]
    for r in answer[:3]:
        prefix = f"data:{THUMB_TYPE};base64,"
        assert r["thumb_data"].startswith(prefix)
        assert base64.b64decode(r["thumb_data"][len(prefix):]) == served[r["id"]]
    assert all("thumb_data" not in r for r in answer[4:])  # only the first `inline`
    for bad in (-1, 25, True, "4", 2.5):
        r = client.post("/api/search", json={"q": query, "inline": bad})
        assert r.status_code == 400 and "inline" in r.json()["error"]
    captions = search(client, q=query, target="captions", limit=3, inline=3)["results"]
    assert captions and all("thumb_data" not in r for r in captions)


def test_query_cache_writes_cost_no_fsync(tmp_path):
    """The query cache is a write-ahead log synced at checkpoints: a new sentence's put is not an fsync."""
    import sqlite3

    from loupe.indexer.models.query_cache import QueryCache

    cache = QueryCache(tmp_path / "query-cache.sqlite", "sha256:aaa", 4)
    cache.put(["one"], [np.arange(4, dtype=np.float32)], "fp32")
    assert np.array_equal(cache.get(["one"], "fp32")[0], np.arange(4, dtype=np.float32))
    db = cache._conn()
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    cache.close()
    with sqlite3.connect(tmp_path / "query-cache.sqlite") as other:  # another process reads what was put
        assert other.execute("SELECT COUNT(*) FROM vectors").fetchone() == (1,)
