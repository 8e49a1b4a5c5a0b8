"""The catalog on a real PostgreSQL server (a throwaway cluster on a Unix socket, no TCP)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from loupe.indexer.storage.catalog import IMAGE, SCHEMA_VERSION
from loupe.indexer.pipeline.captions import index_captions
from loupe.indexer.pipeline.indexing import index_folder
from loupe.indexer.storage.check import check_store
from loupe.indexer.storage.store import Store
from loupe.retrieval.engine.query import parse_query
from loupe.retrieval.engine.search import Searcher


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pg_url():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries not installed (.ci/run installs them)")
    pytest.importorskip("psycopg", reason="pip install 'loupe[postgres]'")
    base = Path(tempfile.mkdtemp(prefix="loupe-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    as_root = os.geteuid() == 0  # PostgreSQL refuses to run as root: use its own account
    if as_root:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")

    def run(*cmd: str) -> None:
        full = ["runuser", "-u", "postgres", "--", *cmd] if as_root else list(cmd)
        subprocess.run(full, check=True, capture_output=True, timeout=120)

    port = _free_port()
    run(initdb, "-D", str(data), "-A", "trust", "-U", "loupe", "--no-sync")
    run(pg_ctl, "-D", str(data), "-w", "-l", str(base / "log"),
        "-o", f"-k {sock} -p {port} -c listen_addresses='' -c fsync=off", "start")
    try:
        yield f"postgresql+psycopg://loupe@/postgres?host={sock}&port={port}"
    finally:
        run(pg_ctl, "-D", str(data), "-w", "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)


def test_index_search_and_rescan_on_postgres(pg_url, tmp_path, tiny_encoder, photo_dir):
    store = Store.open(home=tmp_path / "home", db=pg_url)
    assert store.catalog.engine.dialect.name == "postgresql"
    weird = os.path.join(os.fsencode(photo_dir), b"\xff-odd.jpg")  # non-UTF-8 name as bytea key
    shutil.copy(sorted(photo_dir.iterdir())[0], os.fsdecode(weird))
    r = index_folder(store, tiny_encoder, photo_dir)
    assert (r.embedded, r.reused) == (12, 1)
    again = index_folder(store, tiny_encoder, photo_dir)
    assert (again.unchanged, again.embedded) == (13, 0)
    sorted(photo_dir.glob("*.jpg"))[5].unlink()
    r = index_folder(store, tiny_encoder, photo_dir, prune=True)
    assert (r.missing, r.removed) == (1, 1)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a dog\na boat\n")
    index_captions(store, tiny_encoder, corpus)
    assert check_store(store).ok
    # the vector files for a server catalog live under --home, named after the URL
    assert store.location.vector_file(IMAGE).parent == (tmp_path / "home").resolve()
    searcher = Searcher(Store.open(home=tmp_path / "home", db=pg_url), tiny_encoder)
    first = sorted(photo_dir.iterdir())[0]
    hit = searcher.search(parse_query([str(first)]), k=1)[0]
    assert hit.score == pytest.approx(1.0, abs=1e-4) and len(hit.fields["duplicates"]) == 1
    assert len(searcher.search(parse_query([str(first)]), target="text", k=5)) == 2


def test_version_1_catalog_is_migrated_on_postgres(pg_url, tmp_path, tiny_encoder, photo_dir):
    from sqlalchemy import inspect, text

    url = pg_url.replace("/postgres?", "/v1?")
    with Store.open(home=tmp_path / "home", db=pg_url).catalog.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("CREATE DATABASE v1"))
    store = Store.open(home=tmp_path / "home", db=url)
    index_folder(store, tiny_encoder, photo_dir)
    with store.catalog.engine.begin() as conn:  # the version 1 layout
        conn.execute(text("DROP TABLE roots"))
        conn.execute(text("DROP INDEX ix_images_status_vector"))
        conn.execute(text("UPDATE meta SET schema_version = 1"))
    store.catalog.engine.dispose()
    migrated = Store.open(home=tmp_path / "home", db=url)
    assert migrated.meta().schema_version == SCHEMA_VERSION and "roots" in inspect(migrated.catalog.engine).get_table_names()
    assert index_folder(migrated, tiny_encoder, photo_dir).embedded == 0
    assert check_store(migrated).ok


def test_cold_cli_search_on_postgres_goes_through_sqlalchemy(pg_url, tmp_path, tiny_encoder, photo_dir, loupe):
    """A cold `loupe search --db postgresql...` reads its catalog through SQLAlchemy (the stdlib
    sqlite3 reader is for SQLite files only) and answers as the in-process search does."""
    import json

    url = pg_url.replace("/postgres?", "/cold?")
    with Store.open(home=tmp_path / "home", db=pg_url).catalog.engine.connect() as conn:
        from sqlalchemy import text

        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("CREATE DATABASE cold"))
    store = Store.open(home=loupe.home, db=url)
    index_folder(store, tiny_encoder, photo_dir)
    proc = loupe("search", "a dog on the beach", "--db", url, "--json", "--timings", "-k", "4")
    timings = json.loads(proc.stderr.strip().splitlines()[-1])
    assert "sqlalchemy" in timings["heavy_imports"] and "typer" not in timings["heavy_imports"]
    assert timings["text_precision"] == tiny_encoder.text_precision == "fp32"  # the query's precision, on any CPU
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    want = Searcher(Store.open(home=loupe.home, db=url, writer=False), tiny_encoder).search(parse_query(["a dog on the beach"]), k=4)
    assert [h["path"] for h in got] == [h.fields["path"] for h in want]
    assert [h["score"] for h in got] == pytest.approx([h.score for h in want], abs=1e-4)


def test_export_and_reimport_on_postgres(pg_url, tmp_path, tiny_encoder, photo_dir):
    """The catalog reads behind export and import (one SQL for every database) on PostgreSQL: an export
    holds every visible photo, and importing it back into the same catalog changes nothing."""
    pytest.importorskip("pyarrow")
    from sqlalchemy import text

    from loupe.indexer.interop.transfer import export_catalog, import_shards

    url = pg_url.replace("/postgres?", "/shards?")
    with Store.open(home=tmp_path / "admin", db=pg_url).catalog.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("CREATE DATABASE shards"))
    store = Store.open(home=tmp_path / "home", db=url)
    index_folder(store, tiny_encoder, photo_dir)
    visible = len(list(store.catalog.iter_image_rows(status="ok")))
    report = export_catalog(store, tmp_path / "out")
    assert report.images == store.catalog.count_export_images() == visible > 0
    generation = store.catalog.generation()
    again = import_shards(store, tmp_path / "out")
    assert (again.images_unchanged, again.images_added, again.images_updated, again.vectors_added) == (visible, 0, 0, 0)
    assert store.catalog.generation() == generation and check_store(store).ok


def test_text_in_photos_on_postgres_uses_pg_trgm(pg_url, tmp_path, tiny_encoder):
    """OCR lines in `signal_text` with a pg_trgm GIN index: substrings, folding and typos as on SQLite."""
    from sqlalchemy import create_engine, text

    from benchmarks.ocr_set import have_fonts, make_fixtures, write_set
    from loupe.indexer.signals.textmatch import normalize
    from tests.test_ocr import names

    if not have_fonts():
        pytest.skip("fonts-dejavu not installed")
    with create_engine(pg_url).connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("CREATE DATABASE ocr"))
    url = pg_url.replace("/postgres?", "/ocr?")
    fixtures = make_fixtures(1, seed=9, kinds=("sign", "plate", "document"))
    write_set(tmp_path / "photos", fixtures)
    store = Store.open(home=tmp_path / "home", db=url)
    assert store.catalog.text_index == "pg_trgm"
    report = index_folder(store, tiny_encoder, tmp_path / "photos")
    assert report.signals["text"]["done"] == 4
    with store.catalog.engine.connect() as conn:
        plan = "\n".join(r[0] for r in conn.execute(text(
            "EXPLAIN SELECT id FROM signal_text WHERE norm LIKE '%re16%'")))  # the index is there and usable
        assert conn.execute(text("SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_signal_text_trgm'")).scalar() == 1
    assert "signal_text" in plan
    searcher = Searcher(store, tiny_encoder)
    assert names(searcher.search(parse_query(["re16"]), k=1)) == ["01_plate.jpg"]
    decoy = fixtures[2].decoy[0]  # e.g. "RE61 KXZ": the near-miss plate, found by its own text alone
    only = searcher.search(parse_query([f'text:"{decoy.lower()}"']), k=4)
    assert names(only)[0] == "02_decoy.jpg" and only[0].fields["text_match"]["match"] == "exact"
    assert all(h.fields["text_match"]["match"] == "typo" for h in only[1:])  # a plate one letter away, after it
    word = fixtures[-1].words[0]
    typo = word[:2] + ("x" if word[2] != "x" else "z") + word[3:]
    hit = searcher.search(parse_query([typo.upper()]), k=1)[0]
    assert names([hit]) == ["03_document.jpg"] and hit.fields["text_match"]["match"] == "typo"
    assert store.catalog.text_matches(normalize("a dog on the beach")) == {}
