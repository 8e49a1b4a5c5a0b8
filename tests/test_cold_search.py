"""Cold searches without torch: the exported ONNX text tower, the torch-free tokenizer, the fallbacks,
and a no-change `loupe index` that checks its model binding without building the model."""

from __future__ import annotations

import json
import os
import sqlite3

import numpy as np
import pytest

from loupe.indexer.storage.locations import Location

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

    from loupe.indexer.models.clip_tokenizer import ClipTokenizer

    reference = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    ours = ClipTokenizer(context_length)
    np.testing.assert_array_equal(ours(TRICKY), reference(TRICKY).numpy())


def test_tokenizer_table_gives_open_clips_ids(tmp_path, monkeypatch):
    """The lookup table beside a merges file gives the dicts' ids, is made once, rebuilt when the
    merges file changes, leaves a long corpus to the dicts, and is skipped where it cannot be written."""
    import open_clip

    from loupe.indexer.models.clip_tokenizer import BpeTable, ClipTokenizer, default_bpe_path, read_merges

    merges = tmp_path / "tower.bpe"
    merges.write_text("\n".join(read_merges(default_bpe_path())), encoding="utf-8")
    reference = open_clip.tokenizer.SimpleTokenizer()(TRICKY).numpy()
    table = tmp_path / "tower.bpe.sqlite"
    ours = ClipTokenizer(77, str(merges))
    assert ours.table is not None and table.exists()
    np.testing.assert_array_equal(ours(TRICKY), reference)
    made = table.stat().st_mtime_ns
    assert ClipTokenizer(77, str(merges)).table is not None and table.stat().st_mtime_ns == made  # not made again

    monkeypatch.setattr(BpeTable, "MAX_LOOKUPS", 40)  # a corpus: on to the dicts midway, same ids
    switching = ClipTokenizer(77, str(merges))
    np.testing.assert_array_equal(switching(TRICKY), reference)
    assert switching.table is None
    monkeypatch.undo()

    os.utime(merges, ns=(made + 10**9, made + 10**9))  # another merges file under the name: a new table
    assert ClipTokenizer(77, str(merges)).table is not None and table.stat().st_mtime_ns != made

    table.unlink()
    tmp_path.chmod(0o500)
    try:
        readonly = ClipTokenizer(77, str(merges))
        assert readonly.table is None or os.geteuid() == 0  # root writes anyway
        np.testing.assert_array_equal(readonly(TRICKY), reference)
    finally:
        tmp_path.chmod(0o700)


def test_the_tower_encodes_the_sentences_given_ahead(tower_dir):
    """Sentences handed over with the loading tower are encoded in its thread: the same rows as
    encoding them afterwards; other sentences are encoded as asked."""
    from loupe.indexer.models.text_tower import OnnxTextTower

    location, manifest = tower_dir
    args = (location.vector_dir / manifest["file"], location.vector_dir / manifest["bpe"], manifest["context_length"])
    kw = {"dynamic": bool(manifest.get("dynamic_length"))}
    plain = OnnxTextTower(*args, **kw)
    texts = ["a dog on the beach", "two children in the snow"]
    want = plain.encode(texts)
    ahead = OnnxTextTower(*args, background=True, ahead=texts, **kw)
    ahead.ready()
    assert ahead._ahead is not None
    np.testing.assert_allclose(ahead.encode(texts), want, atol=1e-6)
    assert ahead._ahead is None
    np.testing.assert_allclose(ahead.encode(texts[::-1]), want[::-1], atol=1e-6)  # asked again, or otherwise
    other = OnnxTextTower(*args, background=True, ahead=["something else"], **kw)
    np.testing.assert_allclose(other.encode(texts), want, atol=1e-6)


def test_plain_ascii_needs_no_ftfy():
    """The tokenizer skips ftfy for printable ASCII without '&': ftfy must leave such text alone."""
    import ftfy

    from loupe.indexer.models.clip_tokenizer import _PLAIN

    plain = [t for t in TRICKY + ["a <b>bold</b> claim; x=1 {y} [z] ~ ^ | \\ `"] if _PLAIN.fullmatch(t)]
    assert len(plain) >= 5
    for text in plain:
        assert ftfy.fix_text(text) == text


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory, tiny_encoder):
    from loupe.indexer.models.text_tower import export_text_tower

    folder = tmp_path_factory.mktemp("tower")
    location = Location(url="sqlite:///unused", vector_dir=folder, prefix="")
    manifest = export_text_tower(tiny_encoder, location, "weights-a")
    return location, manifest


def test_onnx_tower_matches_torch(tower_dir, tiny_encoder):
    from loupe.indexer.models.text_tower import cached_tower, open_tower

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

    from loupe.indexer.models.text_tower import export_text_tower, tower_state

    location = Location(url="sqlite:///unused", vector_dir=tmp_path, prefix="")
    other = dataclasses.replace(tiny_encoder, tokenizer=lambda texts: tiny_encoder.tokenizer(texts))  # not CLIP's own
    manifest = export_text_tower(other, location, "weights-x")
    assert not manifest["usable"] and "tokenizer" in manifest["reason"]
    assert tower_state(location, "loupe-tiny", "weights-x") == "unusable"
    assert not list(tmp_path.glob("text-*.onnx*"))


def test_cold_search_needs_no_torch_and_ranks_as_torch(loupe, photo_dir, tiny_checkpoint, tiny_encoder):
    """Right after indexing (no tower yet) a search loads torch and caches the tower; the next
    searches run without torch or open_clip, rank as torch does, and repeat from the query cache."""
    from loupe.indexer.storage.store import Store
    from loupe.retrieval.engine.query import parse_query
    from loupe.retrieval.engine.search import Searcher

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

    from loupe.indexer.models.onnx_encoder import OnnxEncoder
    from loupe.indexer.models.text_tower import open_tower

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
    from loupe.indexer.pipeline.indexing import index_folder
    from loupe.indexer.models.random_weights import save_random_model
    from loupe.indexer.models.encoder import load_encoder
    from loupe.indexer.models.spec import make_spec
    from loupe.indexer.storage.store import Store
    from loupe.retrieval.engine.query import parse_query
    from loupe.retrieval.engine.search import Searcher
    from loupe.retrieval.engine.vectors import query_vector

    store = Store.open(home=tmp_path / "home")
    index_folder(store, tiny_encoder, photo_dir)
    terms = parse_query(['"2:a red car" + "a dog"'])
    first = Searcher(store, tiny_encoder)
    v1 = query_vector(first, terms)
    assert first.stats == {"cache_hits": 0, "encoded": 2}
    second = Searcher(Store.open(home=tmp_path / "home", writer=False), tiny_encoder)
    assert np.allclose(query_vector(second, terms), v1, atol=1e-6)
    assert second.stats == {"cache_hits": 2, "encoded": 0}

    for path in (tmp_path / "home").glob("*.faiss"):  # the index rebuilt with other weights, same home
        path.unlink()
    (tmp_path / "home" / "catalog.db").unlink()
    other = load_encoder(make_spec(None, None, save_random_model(tmp_path / "other.pt", seed=7)), "cpu")
    rebuilt = Store.open(home=tmp_path / "home")
    index_folder(rebuilt, other, photo_dir)
    third = Searcher(rebuilt, other)
    query_vector(third, terms)
    assert third.stats == {"cache_hits": 0, "encoded": 2}


def test_query_cache_is_keyed_by_weights_and_precision_and_bounded(tmp_path):
    from loupe.indexer.models.query_cache import QueryCache

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

    from loupe.indexer.models.random_weights import save_random_model

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


# ---- the light search path: no typer, SQLAlchemy or FAISS where they are not needed ---------------


def _typer_search_command():
    import typer.main

    from loupe.cli.app import app
    from loupe.cli.main import _register

    _register()
    return typer.main.get_command(app).commands["search"]


def test_search_options_are_typers():
    """The option table of the typer-free entry names every option of typer's command, the same way."""
    from loupe.cli.search_entry import DEFAULTS, ENVVARS, OPTIONS

    command = _typer_search_command()
    options = {p.name: p for p in command.params if p.name != "query"}
    assert set(DEFAULTS) == set(options)
    for param, option in options.items():
        assert {n for n, (p, _) in OPTIONS.items() if p == param} == set(option.opts) | set(option.secondary_opts), param
        assert option.default == DEFAULTS[param], param
        assert (option.envvar or None) == (ENVVARS[param][0] if param in ENVVARS else None), param
        kind = OPTIONS[option.opts[0]][1]
        assert (kind == "flag") == bool(option.is_flag) and (kind == "strs") == bool(option.multiple), param
        assert (option.min == 1) == (kind == "int"), param


ARGS = [
    ["a", "dog"],
    ["a dog", "-k", "3", "--json"],
    ["--top=5", "a", "--glob", "*.jpg", "dog", "--glob=x*", "--in", "photos", "--captions"],
    ["--min-score", "0.25", "--after", "2021-06", "--before", "2022", "--date-field", "taken", "beach"],
    ["--min-score=-0.5", "-m", "ViT-B-32", "--pretrained", "laion", "-c", "w.pt", "--device", "cpu", "q"],
    ["--text-precision", "fp32", "--nprobe", "8", "--ef-search", "64", "--search-params", "nprobe=2", "q", "--timings"],
    ["--home", "/tmp/h", "--db", "sqlite:////tmp/x.db", "-k", "1", "-k", "2", "q"],
    ["a", "-", "b", "--", "--json", "-k"],
    ['"2:a dog" + ./dog.jpg - "people"'],
    ["--min-score", ".5", "q"],
]
REFUSED = [  # left to typer: help, unknown or malformed options, values it may read or refuse its own way
    [], ["--help"], ["q", "--help"], ["-k", "0", "q"], ["-k", "x", "q"], ["-k5", "q"], ["q", "-k"], ["--json=1", "q"],
    ["--no-such", "q"], ["-5", "q"], ["--min-score", "1e-3", "q"], ["--min-score", "nan", "q"], ["--in", "", "q"],
    ["-k", "+3", "q"], ["--ray=host", "q"],
]


@pytest.mark.parametrize("env", [{}, {"LOUPE_HOME": "/tmp/env-home", "LOUPE_DB": "sqlite:////tmp/env.db"}])
def test_plain_arguments_are_read_as_typer_reads_them(monkeypatch, env):
    from loupe.cli.search_entry import parse_search_args

    for var in ("LOUPE_HOME", "LOUPE_DB"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    command = _typer_search_command()
    for args in ARGS:
        ours = parse_search_args(args)
        theirs = command.make_context("search", list(args)).params
        assert ours is not None, args
        assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in theirs.items()} == ours, args
    for args in REFUSED:
        assert parse_search_args(args) is None, args


def test_cli_errors_stay_typers(loupe):
    """Usage errors go to typer (exit 2, its message, no traceback); library errors are one line."""
    bad = loupe("search", "-k", "0", "dog", ok=False)
    assert bad.returncode == 2 and "Invalid value for '-k'" in bad.stderr and "Traceback" not in bad.stderr
    unknown = loupe("search", "--no-such", "dog", ok=False)
    assert unknown.returncode == 2 and "No such option" in unknown.stderr and "Traceback" not in unknown.stderr
    assert "Usage: loupe search" in loupe("search", "--help").stdout
    missing = loupe("search", "dog", ok=False)
    assert missing.returncode == 1 and missing.stderr.startswith("loupe: error: no index at")


@pytest.fixture(scope="module")
def cold_home(tmp_path_factory, tiny_checkpoint, flickr_images):
    """A real index of 12 photos with its text tower, built through the CLI."""
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO

    home = tmp_path_factory.mktemp("cold") / "home"
    photos = home.parent / "photos"
    photos.mkdir()
    for src in sorted(flickr_images.iterdir())[:12]:
        shutil.copy2(src, photos / src.name)
    shutil.copy2(sorted(flickr_images.iterdir())[0], photos / "dup.jpg")
    env = dict(os.environ, HF_HUB_OFFLINE="1", LOUPE_HOME=str(home), PYTHONPATH=str(REPO), LOUPE_TEXT_TOWER="1",
               LOUPE_NO_SERVER="1")
    subprocess.run([sys.executable, "-m", "loupe", "index", str(photos), "--checkpoint", str(tiny_checkpoint)],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    assert json.loads((home / "text-tower.json").read_text())["usable"]
    return home, photos, env


def _cli(env, *args, ok=True):
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "loupe", *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert (proc.returncode == 0) == ok, proc.stderr
    return proc


def test_cold_search_imports_only_what_it_needs(cold_home):
    """A plain search of a small SQLite index imports neither typer, SQLAlchemy, FAISS nor torch;
    search parameters for FAISS bring FAISS in (and rank the same); a catalog to migrate, SQLAlchemy."""
    home, photos, env = cold_home
    plain = _cli(env, "search", "a dog in the snow", "--json", "--timings", "-k", "5")
    t = _timings(plain)
    assert (t["text_encoder"], t["heavy_imports"], t["onnx_sessions"]) == ("onnx", [], 1)
    with_faiss = _cli(env, "search", "a dog in the snow", "--json", "--timings", "-k", "5", "--nprobe", "4")
    assert _timings(with_faiss)["heavy_imports"] == ["faiss"]
    a, b = _hits(plain), _hits(with_faiss)
    assert [h["path"] for h in a] == [h["path"] for h in b]
    assert [h["score"] for h in a] == pytest.approx([h["score"] for h in b], abs=1e-5)


def test_light_path_gives_the_full_paths_results(cold_home, tiny_encoder):
    """The sqlite3 reader with numpy ranking against SQLAlchemy with FAISS, on the same real index:
    same files, same order, same fields, scores within float rounding, for filters and captions too."""
    from loupe.indexer.storage.catalog_reader import CatalogReader
    from loupe.indexer.storage.exact import ExactIndex
    from loupe.indexer.storage.store import Store
    from loupe.retrieval.engine.query import parse_query
    from loupe.retrieval.engine.search import Filters, Searcher, _open_store

    home, photos, _ = cold_home
    full = Searcher(Store.open(home=home, writer=False), tiny_encoder)
    light_store = _open_store(home, None, False, None)
    light = Searcher(light_store, tiny_encoder)
    assert isinstance(light_store.catalog, CatalogReader)
    img = str(sorted(photos.iterdir())[3])
    cases = [
        (["a dog running on the grass"], {}),
        (["people"], {"k": 50}),  # more than the index holds
        ([f'"a child" + {img}'], {"k": 4, "min_score": -1.0}),
        (["a dog"], {"filters": Filters.parse(photos, ["*.jpg"], "2000", None)}),
        (["a dog"], {"filters": Filters.parse(None, ["dup*"], None, None)}),
    ]
    for query, kw in cases:
        want = full.search(parse_query(query), **kw)
        got = light.search(parse_query(query), **kw)
        assert [(h.rank, h.vector_id, h.fields) for h in got] == [(h.rank, h.vector_id, h.fields) for h in want], query
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5)
    ids = full.store.catalog.vector_ids("image")
    assert np.array_equal(light_store.catalog.vector_ids("image"), ids)
    assert np.array_equal(light_store.catalog.load_vectors(ids, full.meta.dim), full.store.catalog.load_vectors(ids, full.meta.dim))
    assert isinstance(light_store.vector_index("image"), ExactIndex)
    assert "faiss" not in type(light_store.vector_index("image")).__module__


def test_numpy_ranks_as_faiss_flat():
    """Same scores and order as FAISS's flat index, filtered or not; among equal scores (identical
    vectors), whose order FAISS leaves to its code path and CPU, the same scores of tied ids."""
    from loupe.indexer.storage.exact import ExactIndex
    from loupe.indexer.storage.vectors import VectorIndex

    rng = np.random.default_rng(0)
    for n, dups in ((300, False), (40, True)):
        base = rng.standard_normal((6 if dups else n, 16)).astype(np.float32)
        vectors = base[rng.integers(0, 6, size=n)] if dups else base  # identical vectors: ties everywhere
        ids = np.sort(rng.choice(10 * n, size=n, replace=False)).astype(np.int64)
        flat = VectorIndex.create(16, "Flat")
        flat.add(ids, vectors)  # in id order, as loupe builds its flat indices
        exact = ExactIndex(ids[::-1].copy(), vectors[::-1].copy())  # given in any order
        for q in rng.standard_normal((3, 16)).astype(np.float32).tolist() + vectors[:3].tolist():
            q = np.asarray(q, dtype=np.float32)
            for k in (1, 2, 5, 9, 40, n + 20):
                for allowed in (None, ids[::3], ids[:1]):
                    s1, i1 = flat.search(q[None], k, allowed)
                    s2, i2 = exact.search(q[None], k, allowed)
                    assert np.array_equal(i1 >= 0, i2 >= 0)
                    assert np.allclose(s1, s2, atol=1e-5)
                    if not dups:
                        assert np.array_equal(i1, i2), (n, k, allowed)
                        continue
                    got = i2[i2 >= 0]
                    assert len(set(got.tolist())) == len(got) and np.all(np.isin(got, ids if allowed is None else allowed))
                    score_of = dict(zip(ids.tolist(), (vectors @ q).tolist()))
                    assert np.allclose([score_of[i] for i in got], s2[i2 >= 0], atol=1e-5)
                    assert np.all(np.diff(s2[i2 >= 0]) <= 1e-6)  # best first


def test_catalogs_the_reader_leaves_to_sqlalchemy(tmp_path, cold_home):
    """PostgreSQL and other URLs, missing files, other schema versions: `open_reader` says no, and the
    search goes through SQLAlchemy, which migrates an older catalog and refuses a newer one."""
    import shutil

    from loupe.indexer.storage.catalog import SCHEMA_VERSION
    from loupe.indexer.storage.catalog_reader import open_reader

    home, _, env = cold_home
    assert open_reader("postgresql+psycopg://loupe@/postgres?host=/tmp") is None
    assert open_reader(f"sqlite:///{tmp_path / 'none.db'}") is None and not (tmp_path / "none.db").exists()
    assert open_reader(f"sqlite:///{home / 'catalog.db'}?mode=ro") is None
    assert open_reader(f"sqlite:///{home / 'catalog.db'}") is not None
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    with sqlite3.connect(copy / "catalog.db") as db:
        db.execute("UPDATE meta SET schema_version = ?", (SCHEMA_VERSION + 1,))
    assert open_reader(f"sqlite:///{copy / 'catalog.db'}") is None
    newer = _cli(dict(env, LOUPE_HOME=str(copy)), "search", "a dog", ok=False)
    assert newer.returncode == 1 and "newer than this loupe knows" in newer.stderr


def test_an_error_while_the_tower_loads_exits_cleanly(cold_home, tmp_path):
    """The text tower starts loading first thing; a search that fails meanwhile still exits with its
    one-line error (a process leaving while ONNX Runtime builds a session used to abort)."""
    from loupe.indexer.models.random_weights import save_random_model

    home, _, env = cold_home
    other = save_random_model(tmp_path / "other.pt", seed=5)
    for _ in range(3):
        proc = _cli(env, "search", f"a sentence never asked {_}", "--checkpoint", other, ok=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "other weights" in proc.stderr, proc.stderr


def test_query_cache_is_read_once_per_search(tmp_path, monkeypatch):
    """One cache object per index and model in a process: the steps of a cold search that ask
    (prestart, the encoder's choice, the query's vectors) read the file once between them."""
    from loupe.indexer.models.query_cache import open_cache

    location = Location(url="sqlite:///unused", vector_dir=tmp_path, prefix="")
    cache = open_cache(location, "sha256:once", 4)
    assert open_cache(location, "sha256:once", 4) is cache and open_cache(location, "sha256:other", 4) is not cache
    reads = []
    read = cache._read
    monkeypatch.setattr(cache, "_read", lambda keys: reads.append(keys) or read(keys))
    for texts, ahead in ((["a dog", "a cat"], True), (["a dog"], True), (["a  cat", "a dog"], False)):
        assert cache.get(texts, "fp32", ahead=ahead) == [None] * len(texts)
    assert len(reads) == 1
    assert cache.get(["a dog"], "fp32") == [None] and len(reads) == 2  # a miss is asked again (another process may have cached it)
    v = np.arange(4, dtype=np.float32)
    cache.put(["a dog"], [v], "fp32")
    assert np.array_equal(cache.get(["a dog"], "fp32")[0], v) and len(reads) == 3  # read back once, marked used


def test_a_search_whose_reader_went_away_exits_quietly_and_keeps_its_cache(cold_home):
    """A plain search leaves by `os._exit` once its output is out, so what it must keep is written
    before: the sentence it encoded is in the query cache. Output to a reader that went away
    (`| head -1`) ends the command quietly, with exit code 1 as click gives it the commands typer runs."""
    import subprocess
    import sys

    from tests.conftest import REPO

    home, _, env = cold_home
    for query, json_out in (("a red kite over the sea", []), ("a kite", ["--json"])):
        proc = subprocess.Popen([sys.executable, "-m", "loupe", "search", query, "-k", "50", *json_out], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdout.close()  # gone before the first line
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 1 and err == "", err
        again = _timings(_cli(env, "search", query, "--timings", "-k", "50"))
        assert (again["cache_hits"], again["encoded"]) == (1, 0)
    gone = subprocess.Popen([sys.executable, "-m", "loupe", "info"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # through typer
    gone.stdout.close()
    err = gone.stderr.read()
    assert gone.wait(timeout=120) == 1 and err == "", err


def test_a_server_encodes_text_on_the_tower_as_the_cli_does(cold_home, monkeypatch, tiny_encoder):
    """`loupe serve`'s searcher (long-lived) runs text on the exported tower too, in a session set up
    for many runs: the same fp32 vectors as the one-off CLI path, so both rank alike; its torch
    encoder for images loads beside it."""
    from loupe.indexer.models.onnx_encoder import OnnxEncoder
    from loupe.retrieval.engine.query import parse_query
    from loupe.retrieval.engine.search import open_searcher

    home, photos, _ = cold_home
    monkeypatch.setenv("LOUPE_TEXT_TOWER", "1")
    served = open_searcher(home, device="cpu", long_lived=True)
    one_off = open_searcher(home, device="cpu")
    assert isinstance(served.encoder, OnnxEncoder) and served.encoder.tower.long_lived
    assert isinstance(one_off.encoder, OnnxEncoder) and not one_off.encoder.tower.long_lived
    sentences = ["a black dog jumping over a log", "people on a city street at night"]
    a, b = served.encoder.encode_texts(sentences), one_off.encoder.encode_texts(sentences)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.min(np.sum(a * tiny_encoder.encode_texts(sentences), axis=1)) >= 0.9999  # torch fp32
    for q in sentences:
        want, got = one_off.search(parse_query([q]), k=5), served.search(parse_query([q]), k=5)
        assert [h.fields["path"] for h in got] == [h.fields["path"] for h in want]
    img = str(sorted(photos.iterdir())[2])
    assert served.encoder.torch_encoder() is served.encoder.torch_encoder()  # loaded once, beside the tower
    assert served.search(parse_query([img]), k=3)[0].fields["path"] == img
