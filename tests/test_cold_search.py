"""Cold searches without torch: the exported ONNX text tower, the torch-free tokenizer, the fallbacks,
and a no-change `loupe index` that checks its model binding without building the model."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from indexer.locations import Location

TRICKY = [
    "a dog running on the grass",
    "A DOG   running\ton the GRASS!!",
    "it's the dog's ball, isn't it? they'll see; we'd go",
    "café crème brûlée, Ünïcödé straße",
    "東京の夜景 and 🐶🌊 emoji",
    "&amp; tom &lt;3 jerry &#x27;quoted&#x27;",
    "mojibake: cafÃ© â€œquotedâ€\u009d",
    "“curly” quotes, the ﬁ ligature and ＦＵＬＬ width",
    "numbers 12345 and 3.14 and 10:30",
    "<start_of_text> written out, <end_of_text> too",
    "a\x00b\x1b[31mred\x1b[0m line\r\nbreak",
    " ".join(["word"] * 100),
    "",
    "   ",
]


def _timings(proc) -> dict:
    return json.loads(proc.stderr.strip().splitlines()[-1])


def _hits(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("context_length", [77, 16])
def test_tokenizer_gives_open_clips_ids(context_length):
    import open_clip

    from indexer.clip_tokenizer import ClipTokenizer

    reference = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    ours = ClipTokenizer(context_length)
    np.testing.assert_array_equal(ours(TRICKY), reference(TRICKY).numpy())


def test_plain_ascii_needs_no_ftfy():
    """The tokenizer skips ftfy for printable ASCII without '&': ftfy must leave such text alone."""
    import ftfy

    from indexer.clip_tokenizer import _PLAIN

    plain = [t for t in TRICKY + ["a <b>bold</b> claim; x=1 {y} [z] ~ ^ | \\ `"] if _PLAIN.fullmatch(t)]
    assert len(plain) >= 5
    for text in plain:
        assert ftfy.fix_text(text) == text


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory, tiny_encoder):
    from indexer.text_tower import export_text_tower

    folder = tmp_path_factory.mktemp("tower")
    location = Location(url="sqlite:///unused", vector_dir=folder, prefix="")
    manifest = export_text_tower(tiny_encoder, location, "weights-a")
    return location, manifest


def test_onnx_tower_matches_torch(tower_dir, tiny_encoder):
    from indexer.text_tower import cached_tower, open_tower

    location, manifest = tower_dir
    assert manifest["usable"], manifest
    assert cached_tower(location, "loupe-tiny", "weights-a") == manifest
    assert cached_tower(location, "loupe-tiny", "weights-b") is None  # other weights: not this tower
    tower = open_tower(location, manifest)
    sentences = [t for t in TRICKY if t.strip()]
    got = tower.encode(sentences, batch_size=5)  # several batches, of varying size
    expected = tiny_encoder.encode_texts(sentences)  # fp32 torch
    assert got.shape == expected.shape
    assert np.min(np.sum(got * expected, axis=1)) >= 0.9999


def test_a_model_that_does_not_export_is_recorded_and_left_to_torch(tmp_path, tiny_encoder):
    import dataclasses

    from indexer.text_tower import export_text_tower, tower_state

    location = Location(url="sqlite:///unused", vector_dir=tmp_path, prefix="")
    other = dataclasses.replace(tiny_encoder, tokenizer=lambda texts: tiny_encoder.tokenizer(texts))  # not CLIP's own
    manifest = export_text_tower(other, location, "weights-x")
    assert not manifest["usable"] and "tokenizer" in manifest["reason"]
    assert tower_state(location, "loupe-tiny", "weights-x") == "unusable"
    assert not list(tmp_path.glob("text-*.onnx*"))


def test_cold_search_needs_no_torch_and_ranks_as_torch(loupe, photo_dir, tiny_checkpoint, tiny_encoder):
    """Right after indexing (no tower yet) a search loads torch and caches the tower; the next
    searches run without torch or open_clip, rank as torch does, and repeat from the query cache."""
    from indexer.store import Store
    from retrieval.query import parse_query
    from retrieval.search import Searcher

    loupe("index", photo_dir, "--checkpoint", tiny_checkpoint)  # LOUPE_TEXT_TOWER=0 here: no tower yet
    on = loupe.env()
    on["LOUPE_TEXT_TOWER"] = "1"
    loupe.env = lambda: on
    first = loupe("search", "two children in the snow", "--json", "--timings", "-k", "5")
    t = _timings(first)
    assert (t["text_encoder"], t["text_precision"], t["text_tower"]) == ("torch", "fp32", "ready")  # then exported
    manifest = json.loads((loupe.home / "text-tower.json").read_text())
    assert manifest["usable"] and manifest["min_cosine"] >= 0.9999

    query = "a dog running on the grass"
    cold = loupe("search", query, "--json", "--timings", "-k", "5")
    t = _timings(cold)
    assert (t["text_encoder"], t["heavy_imports"], t["encoded"], t["onnx_sessions"]) == ("onnx", [], 1, 1)
    store = Store.open(loupe.home, writer=False)
    assert tiny_encoder.text_precision == "fp32"
    want = Searcher(store, tiny_encoder).search(parse_query([query]), k=5)  # torch fp32, in this process
    got = _hits(cold)
    assert [h["path"] for h in got] == [h.fields["path"] for h in want]
    assert [h["score"] for h in got] == pytest.approx([h.score for h in want], abs=1e-4)

    for again in (query, f"  {query.replace(' ', '   ')} "):  # repeated (whitespace aside): no encoding at all
        hit = loupe("search", again, "--json", "--timings", "-k", "5")
        t = _timings(hit)
        assert (t["cache_hits"], t["encoded"], t["onnx_sessions"], t["heavy_imports"]) == (1, 0, 0, [])
        assert _hits(hit) == got


def test_a_damaged_tower_falls_back_to_torch(tower_dir, tiny_encoder, tmp_path):
    import shutil

    from indexer.binding import OnnxEncoder
    from indexer.text_tower import open_tower

    location, manifest = tower_dir
    copy = Location(url="sqlite:///unused", vector_dir=tmp_path, prefix="")
    for name in (manifest["file"], manifest["file"] + ".data", manifest["bpe"]):
        shutil.copy(location.vector_dir / name, tmp_path / name)
    (tmp_path / manifest["file"]).write_bytes((tmp_path / manifest["file"]).read_bytes()[:1000])
    encoder = OnnxEncoder(tiny_encoder.spec, open_tower(copy, manifest), tiny_encoder.dim, "cpu")
    got = encoder.encode_texts(["a dog on a beach"])
    assert encoder.backend == "torch"
    assert float(got[0] @ tiny_encoder.encode_texts(["a dog on a beach"])[0]) >= 0.9999


def test_searcher_encodes_a_sentence_once_per_model(tmp_path, photo_dir, tiny_encoder, tiny_checkpoint):
    """The query cache sits behind `Searcher` (CLI and server alike), keyed by the index's weights."""
    from indexer.pipeline import index_folder
    from indexer.random_weights import save_random_model
    from indexer.encoder import load_encoder, make_spec
    from indexer.store import Store
    from retrieval.query import parse_query
    from retrieval.search import Searcher

    store = Store.open(home=tmp_path / "home")
    index_folder(store, tiny_encoder, photo_dir)
    terms = parse_query(['"2:a red car" + "a dog"'])
    first = Searcher(store, tiny_encoder)
    v1 = first.query_vector(terms)
    assert first.stats == {"cache_hits": 0, "encoded": 2}
    second = Searcher(Store.open(home=tmp_path / "home", writer=False), tiny_encoder)
    assert np.allclose(second.query_vector(terms), v1, atol=1e-6)
    assert second.stats == {"cache_hits": 2, "encoded": 0}

    for path in (tmp_path / "home").glob("*.faiss"):  # the index rebuilt with other weights, same home
        path.unlink()
    (tmp_path / "home" / "catalog.db").unlink()
    other = load_encoder(make_spec(None, None, save_random_model(tmp_path / "other.pt", seed=7)), "cpu")
    rebuilt = Store.open(home=tmp_path / "home")
    index_folder(rebuilt, other, photo_dir)
    third = Searcher(rebuilt, other)
    third.query_vector(terms)
    assert third.stats == {"cache_hits": 0, "encoded": 2}


def test_query_cache_is_keyed_by_weights_and_precision_and_bounded(tmp_path):
    from retrieval.query_cache import QueryCache

    path = tmp_path / "query-cache.sqlite"
    a = QueryCache(path, "sha256:aaa", 4, max_entries=3)
    v = np.arange(4, dtype=np.float32)
    a.put(["one", "two"], [v, v + 1], "fp32")
    assert np.array_equal(a.get(["one"], "fp32")[0], v)
    assert a.get(["one"], "bf16") == [None]  # another precision
    assert QueryCache(path, "sha256:bbb", 4).get(["one"], "fp32") == [None]  # another model's weights
    assert QueryCache(path, "sha256:aaa", 8).get(["one"], "fp32") == [None]  # wrong length: ignored
    a.get(["one"], "fp32")  # 'one' is now more recently used than 'two'
    a.put(["three", "four"], [v + 2, v + 3], "fp32")
    got = a.get(["one", "two", "three", "four"], "fp32")
    assert [g is not None for g in got] == [True, False, True, True]  # least recently used evicted
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM vectors").fetchone() == (3,)
    blocked = QueryCache(tmp_path / "no-such-folder" / "q.sqlite", "sha256:aaa", 4)  # unusable: silently skipped
    blocked.put(["one"], [v], "fp32")
    assert blocked.get(["one"], "fp32") == [None]


def test_no_change_index_with_model_options_does_not_load_the_model(loupe, photo_dir, tiny_checkpoint, tmp_path):
    import shutil

    from indexer.random_weights import save_random_model

    def report(*args):
        return json.loads(loupe("index", photo_dir, "--json", *args).stdout.strip().splitlines()[-1])

    assert report("--checkpoint", tiny_checkpoint)["model_loaded"]
    again = report("--checkpoint", tiny_checkpoint, "--model", "loupe-tiny")
    assert (again["model_loaded"], again["unchanged"], again["embedded"]) == (False, 12, 0)
    copy = shutil.copy(tiny_checkpoint, tmp_path / "copy.pt")  # same bytes elsewhere: hashed, accepted
    assert report("--checkpoint", copy)["model_loaded"] is False
    other = save_random_model(tmp_path / "other.pt", seed=3)
    refused = loupe("index", photo_dir, "--checkpoint", other, ok=False)
    assert refused.returncode == 1 and "other weights" in refused.stderr
