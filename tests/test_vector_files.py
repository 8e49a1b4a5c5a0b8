"""FAISS files on disk: one atomic unit (index + label), trusted only for the catalog state it names.

A file's label says which catalog (its identity) and which generation its content holds. Only
writers (`loupe index`, `index-text`, `remove`, `check --repair`) write files; a reader that
finds a file behind the catalog brings its in-memory copy in line and leaves the file alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sqlalchemy import delete, update

from loupe.indexer.storage.synthetic import ClipLike, bind_meta, insert_images
from loupe.indexer.storage import vectors
from loupe.indexer.storage.catalog import IMAGE, ImageRow, Meta, Vector
from loupe.indexer.errors import LoupeError
from loupe.indexer.storage.check import check_store
from loupe.indexer.storage.store import Store
from loupe.indexer.storage.vectors import VectorIndex
from tests.conftest import REPO

DIM = 64
WORLD = ClipLike(dim=DIM, topics=10, subtopics=5, seed=7)


def remove_vectors(store: Store, ids) -> None:
    """Drop catalog rows as `loupe remove` would (file rows, vectors, one generation bump)."""
    with store.catalog.session() as s, s.begin():
        s.execute(delete(ImageRow).where(ImageRow.vector_id.in_([int(i) for i in ids])))
        s.execute(delete(Vector).where(Vector.id.in_([int(i) for i in ids])))
        s.execute(update(Meta).where(Meta.id == 1).values(generation=Meta.generation + 1))


def files_of(store: Store) -> dict[str, tuple[bytes, int]]:
    """Every vector file (and side file) beside the catalog: name -> (bytes, mtime_ns)."""
    folder = store.location.vector_dir
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.iterdir())
        if p.name.startswith(("images.faiss", "texts.faiss", ".images.faiss", ".texts.faiss"))
    }


def assert_holds_catalog(store: Store, index: VectorIndex) -> None:
    """The index holds exactly the catalog's image vectors, and finds each by itself."""
    want = store.catalog.vector_ids(IMAGE)
    assert sorted(index.ids().tolist()) == sorted(want.tolist())
    probe = want[-3:]
    scores, found = index.search(store.catalog.load_vectors(probe, DIM), 1)
    assert found[:, 0].tolist() == probe.tolist()
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def writer(home) -> Store:
    store = Store.open(home=home)
    bind_meta(store, DIM)
    return store


def test_label_claiming_a_state_its_content_does_not_hold_is_not_accepted(writer, home):
    ids = insert_images(writer, WORLD.images(300))
    writer.sync_all()
    path = writer.location.vector_file(IMAGE)
    state_a = files_of(writer)
    # one vector goes, another comes: same count, new generation
    remove_vectors(writer, ids[:1])
    insert_images(writer, WORLD.images(1, seed=9), root="/later")
    writer.sync_all()
    state_b = files_of(writer)
    # forge what a reader's save racing a writer's save could leave: A's content under B's label
    if "images.faiss.gen" in state_b:  # a label in a side file, renamed separately
        path.write_bytes(state_a["images.faiss"][0])
        (path.parent / "images.faiss.gen").write_bytes(state_b["images.faiss.gen"][0])
    else:  # the label inside the file, after the FAISS bytes
        cut = vectors.read_label(path).faiss_bytes  # B's FAISS bytes end here; A's are as long (Flat, same count)
        path.write_bytes(state_a["images.faiss"][0][:cut] + state_b["images.faiss"][0][cut:])
        assert vectors.read_label(path).generation == writer.catalog.generation()  # the label claims B
    reader = Store.open(home=home)
    assert_holds_catalog(reader, reader.vector_index(IMAGE))
    assert not check_store(reader).ok
    writer.sync_all(load=True)  # `loupe check --repair`: reads the file, finds it bad, replaces it
    assert check_store(Store.open(home=home)).ok


def test_old_file_with_a_side_file_is_stale_and_rewritten_by_the_next_writer(writer, home):
    """A file written before labels moved inside it: never trusted, even when its side file says current."""
    ids = insert_images(writer, WORLD.images(200))
    path = writer.location.vector_file(IMAGE)
    old = VectorIndex.create(DIM)
    old.add(ids[1:], writer.catalog.load_vectors(ids[1:], DIM))  # lacks one vector...
    old.add(ids[:1], WORLD.images(1, seed=99))  # ...and holds another under its id
    path.parent.mkdir(parents=True, exist_ok=True)
    vectors.faiss_module().write_index(old.index, str(path))
    gen = path.parent / "images.faiss.gen"
    gen.write_text(f"{writer.catalog.generation()}\nFlat\n200\n")  # claims: current
    before = files_of(writer)
    reader = Store.open(home=home, writer=False)
    assert_holds_catalog(reader, reader.vector_index(IMAGE))
    assert files_of(reader) == before  # the reader wrote nothing
    report = check_store(reader)
    assert not report.ok and any("old format" in p for p in report.problems)
    with pytest.raises(LoupeError, match="opened for reading"):
        reader.sync_all()
    assert files_of(reader) == before
    writer.sync_all()
    assert not gen.exists() and vectors.read_label(path).generation == writer.catalog.generation()
    assert check_store(Store.open(home=home)).ok


def test_save_is_a_single_rename(writer, monkeypatch):
    ids = insert_images(writer, WORLD.images(100))
    index = VectorIndex.create(DIM)
    index.add(ids, writer.catalog.load_vectors(ids, DIM))
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(vectors.os, "replace", lambda a, b: (renames.append(b), real_replace(a, b)))
    path = writer.location.vector_file(IMAGE)
    path.parent.mkdir(parents=True, exist_ok=True)
    index.save(path, 5)
    assert renames == [path]
    assert sorted(p.name for p in path.parent.iterdir() if "faiss" in p.name) == ["images.faiss"]


KILL_INSIDE_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from loupe.indexer.storage import vectors
    from loupe.indexer.storage.vectors import VectorIndex

    path, when = vectors.Path(sys.argv[1]), sys.argv[2]
    rng = np.random.default_rng(0)
    index = VectorIndex.create(16)
    index.add(np.arange(100), rng.standard_normal((100, 16)))
    index.save(path, 100)
    index.add(np.arange(100, 250), rng.standard_normal((150, 16)))  # generation g holds g vectors
    real_replace = os.replace
    def dying_replace(src, dst):
        if when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
        os.kill(os.getpid(), signal.SIGKILL)  # right after the first rename of this save
    os.replace = dying_replace
    index.save(path, 250)
    """
)


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_inside_save_leaves_a_file_whose_label_matches_its_content(tmp_path, when):
    path = tmp_path / "images.faiss"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_INSIDE_SAVE, str(path), when], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -9, proc.stderr
    index = VectorIndex.load(path)
    assert index.generation == index.ntotal == (100 if when == "before" else 250)


def test_cold_search_on_a_stale_file_writes_nothing_and_is_right(writer, home):
    writer.set_index_factory("IVF8,Flat", DIM)
    insert_images(writer, WORLD.images(1_000))
    writer.sync_all()
    insert_images(writer, WORLD.images(20, seed=5), root="/late")  # catalog only: the file lags behind
    before = files_of(writer)
    reader = Store.open(home=home)
    index = reader.vector_index(IMAGE)
    assert index.factory == "IVF8,Flat"
    assert_holds_catalog(reader, index)
    assert not check_store(reader).ok  # still stale on disk: checking does not repair either
    assert files_of(reader) == before
    writer.sync_all()
    assert check_store(Store.open(home=home)).ok


def test_catalog_rebuilt_from_scratch_with_the_same_generation_is_detected(writer, home):
    insert_images(writer, WORLD.images(150))
    writer.sync_all()
    generation = writer.catalog.generation()
    writer.catalog.engine.dispose()
    for p in home.iterdir():
        if p.name.startswith("catalog.db"):
            p.unlink()
    rebuilt = Store.open(home=home)
    bind_meta(rebuilt, DIM)
    insert_images(rebuilt, WORLD.images(150, seed=42))  # same ids, other vectors
    with rebuilt.catalog.session() as s, s.begin():
        s.execute(update(Meta).where(Meta.id == 1).values(generation=generation))
    assert rebuilt.catalog.generation() == generation
    reader = Store.open(home=home)
    assert_holds_catalog(reader, reader.vector_index(IMAGE))
    assert not check_store(reader).ok
    rebuilt.sync_all()
    assert check_store(Store.open(home=home)).ok


def test_loupe_search_and_check_on_a_stale_index_write_nothing(loupe, tiny_encoder, photo_dir):
    from PIL import Image

    from loupe.indexer.pipeline.indexing import index_folder

    store = Store.open(home=loupe.home)
    index_folder(store, tiny_encoder, photo_dir)
    path = store.location.vector_file(IMAGE)
    old = path.read_bytes()
    new_photo = photo_dir / "blue.png"
    Image.new("RGB", (80, 80), (0, 90, 200)).save(new_photo)
    index_folder(store, tiny_encoder, photo_dir)
    path.write_bytes(old)  # the file lags the catalog, as after a crash before the FAISS save
    before = files_of(store)
    hit = json.loads(loupe("search", new_photo, "-k", "1", "--json").stdout.splitlines()[0])
    assert hit["path"] == str(new_photo) and abs(hit["score"] - 1.0) < 1e-4  # found though not in the file
    assert "lacks 1" in loupe("check", ok=False).stdout
    assert files_of(store) == before
    repaired = loupe("check", "--repair").stdout
    assert "repaired image index: +1" in repaired and "ok: catalog and vector index agree" in repaired
