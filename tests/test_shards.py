"""Embedding shards in clip-retrieval's layout: export -> import round trips, foreign shards,
model binding, idempotence, and a third-party reader (embedding-reader) on loupe's output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from loupe.indexer.storage.catalog import IMAGE, OK, TEXT, CaptionRow, ImageRow, Vector  # noqa: E402
from loupe.indexer.errors import LoupeError  # noqa: E402
from loupe.indexer.pipeline.captions import index_captions  # noqa: E402
from loupe.indexer.pipeline.indexing import index_folder  # noqa: E402
from loupe.indexer.interop.shards import MANIFEST, list_shards  # noqa: E402
from loupe.indexer.storage.store import Store  # noqa: E402
from loupe.indexer.interop.transfer import export_catalog, import_shards  # noqa: E402


def image_rows(store: Store) -> dict[str, tuple]:
    """path -> (hash, size, mtime_ns, width, height, taken_at) and vector, of the visible photos."""
    out = {}
    with store.catalog.session() as s:
        q = s.query(ImageRow, Vector.data).join(Vector, Vector.id == ImageRow.vector_id).where(ImageRow.status == OK)
        for row, data in q:
            out[row.path] = (
                (row.content_hash, row.size, row.mtime_ns, row.width, row.height, row.taken_at),
                np.frombuffer(data, np.float32),
            )
    return out


def caption_rows(store: Store) -> dict[tuple, np.ndarray]:
    out = {}
    with store.catalog.session() as s:
        for row, data in s.query(CaptionRow, Vector.data).join(Vector, Vector.id == CaptionRow.vector_id):
            out[(row.source, row.position, row.text, row.image, row.content_hash)] = np.frombuffer(data, np.float32)
    return out


@pytest.fixture
def indexed(tmp_path, tiny_encoder, photo_dir) -> Store:
    """A real index: 12 photos plus one duplicate (two rows, one vector), and a caption corpus."""
    shutil.copy2(next(iter(sorted(photo_dir.iterdir()))), photo_dir / "copy of first.jpg")
    store = Store.open(home=tmp_path / "src")
    index_folder(store, tiny_encoder, photo_dir)
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog running on grass\na child in a red shirt\ntwo people on a beach\na dog running on grass\n")
    index_captions(store, tiny_encoder, captions)
    return store


def assert_same_catalog(a: Store, b: Store, atol: float) -> None:
    ra, rb = image_rows(a), image_rows(b)
    assert len(ra) == 13 and set(ra) == set(rb)
    for path, (fields, vec) in ra.items():
        assert rb[path][0] == fields
        np.testing.assert_allclose(rb[path][1], vec, atol=atol, rtol=0)
    ca, cb = caption_rows(a), caption_rows(b)
    assert len(ca) == 4 and set(ca) == set(cb)
    for key, vec in ca.items():
        np.testing.assert_allclose(cb[key], vec, atol=atol, rtol=0)
    assert a.catalog.count_vectors(IMAGE) == b.catalog.count_vectors(IMAGE) == 12  # the duplicate shares one
    assert a.catalog.count_vectors(TEXT) == b.catalog.count_vectors(TEXT) == 3


def test_export_import_round_trip_float32(indexed, tmp_path, tiny_encoder):
    out = tmp_path / "shards"
    rep = export_catalog(indexed, out, dtype="float32", shard_size=5)
    assert (rep.images, rep.image_shards, rep.captions, rep.caption_shards) == (13, 3, 4, 1)
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    assert sorted(p.name for p in (out / "metadata").iterdir()) == [f"metadata_{i}.parquet" for i in range(3)]
    first = np.load(out / "img_emb" / "img_emb_0.npy")
    assert first.dtype == np.float32 and first.shape == (5, tiny_encoder.dim)
    meta = pq.read_table(out / "metadata" / "metadata_0.parquet").to_pylist()
    assert {"image_path", "hash", "vector_id"} <= set(meta[0])
    rows = image_rows(indexed)
    for m, v in zip(meta, first):  # row i of the npy is row i of the parquet
        np.testing.assert_allclose(v, rows[m["image_path"]][1], atol=0, rtol=0)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["model"] == "loupe-tiny" and manifest["dim"] == tiny_encoder.dim
    assert manifest["checkpoint_sha256"] == tiny_encoder.weights_id[len("sha256:"):]

    copy = Store.open(home=tmp_path / "dst")
    rep = import_shards(copy, out)
    assert (rep.images_added, rep.captions_added, rep.skipped) == (13, 4, 0)
    assert_same_catalog(indexed, copy, atol=0)
    assert copy.meta().weights_id == indexed.meta().weights_id
    assert copy.meta().checkpoint_path == indexed.meta().checkpoint_path  # found here with the same sha256

    # the imported index answers like the original, through the FAISS file written by the import
    assert copy.location.vector_file(IMAGE).exists() and copy.location.vector_file(TEXT).exists()
    queries = tiny_encoder.encode_texts(["a dog running on grass", "a beach", "a red shirt"])
    for kind in (IMAGE, TEXT):
        sa, ia = indexed.vector_index(kind).search(queries, 3)
        sb, ib = Store.open(home=tmp_path / "dst", writer=False).vector_index(kind).search(queries, 3)
        np.testing.assert_allclose(sa, sb, atol=1e-6)
        ra = indexed.catalog.image_rows_for_vectors(ia.ravel()) if kind == IMAGE else indexed.catalog.caption_rows_for_vectors(ia.ravel())
        rb = copy.catalog.image_rows_for_vectors(ib.ravel()) if kind == IMAGE else copy.catalog.caption_rows_for_vectors(ib.ravel())
        names_a = [[(r.path if kind == IMAGE else r.text) for r in ra[int(i)]] for i in ia.ravel()]
        names_b = [[(r.path if kind == IMAGE else r.text) for r in rb[int(i)]] for i in ib.ravel()]
        assert names_a == names_b


def test_float16_round_trip_and_idempotent_reimport(indexed, tmp_path):
    out = tmp_path / "half"
    export_catalog(indexed, out, dtype="float16", shard_size=4)
    assert np.load(out / "img_emb" / "img_emb_0.npy").dtype == np.float16
    assert len(list((out / "img_emb").iterdir())) == 4  # 13 rows, 4 per shard
    copy = Store.open(home=tmp_path / "dst")
    import_shards(copy, out)
    assert_same_catalog(indexed, copy, atol=2e-3)  # fp16 rounding (~5e-4 relative), then re-normalised
    for _, vec in image_rows(copy).values():
        assert abs(np.linalg.norm(vec) - 1) < 1e-5
    generation = copy.catalog.generation()
    again = import_shards(copy, out)
    assert (again.images_added, again.images_updated, again.captions_added, again.vectors_added) == (0, 0, 0, 0)
    assert (again.images_unchanged, again.captions_unchanged) == (13, 4)
    assert copy.catalog.generation() == generation  # nothing written at all
    assert_same_catalog(indexed, copy, atol=2e-3)


def test_incremental_import_into_the_same_model(indexed, tmp_path, tiny_encoder, flickr_images):
    """Shards of the same model go into an index that already has other photos: only new rows land."""
    out = tmp_path / "shards"
    export_catalog(indexed, out)
    other = tmp_path / "other"
    other.mkdir()
    for src in sorted(flickr_images.iterdir())[20:23]:
        shutil.copy2(src, other / src.name)
    dst = Store.open(home=tmp_path / "dst")
    index_folder(dst, tiny_encoder, other)
    rep = import_shards(dst, out)
    assert (rep.images_added, rep.images_unchanged) == (13, 0)
    assert len(image_rows(dst)) == 16
    assert dst.vector_index(IMAGE).ntotal == 15


@pytest.mark.parametrize("layout", ["loupe export, files copied since", "clip-retrieval (path only)"])
def test_import_hashes_local_files_so_indexing_embeds_nothing(indexed, tmp_path, tiny_encoder, tiny_checkpoint, photo_dir, layout):
    """Imported photos that exist here get the row `loupe index` would write (size, time, content
    hash, pixels), so a following `loupe index` of their folder embeds and reads nothing."""
    out = tmp_path / "shards"
    export_catalog(indexed, out, shard_size=5)
    options = {}
    if layout.startswith("clip"):  # no hash, size, time or pixel size: only the path and the vector
        (out / MANIFEST).unlink()
        shutil.rmtree(out / "captions")
        for meta in (out / "metadata").iterdir():
            pq.write_table(pq.read_table(meta).select(["image_path"]), meta)
        options = {"checkpoint": tiny_checkpoint}
    else:  # as on another machine: same bytes, other modification times
        for f in photo_dir.iterdir():
            os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    dst = Store.open(home=tmp_path / "dst")
    rep = import_shards(dst, out, **options)
    assert (rep.images_added, rep.files_hashed) == (13, 13)
    want = {p: fields[:1] + fields[3:] for p, (fields, _) in image_rows(indexed).items()}  # hash, pixels, capture time
    got = image_rows(dst)
    assert {p: fields[:1] + fields[3:] for p, (fields, _) in got.items()} == want
    for p, (fields, _) in got.items():
        st = os.stat(p)
        assert fields[1:3] == (st.st_size, st.st_mtime_ns)
    again = import_shards(dst, out, **options)  # re-import: nothing read again, nothing changed
    assert (again.images_unchanged, again.images_updated, again.files_hashed) == (13, 0, 0)

    report = index_folder(dst, tiny_encoder, photo_dir)
    assert (report.embedded, report.reused, report.touched, report.unchanged) == (0, 0, 0, 13)
    assert dst.catalog.count_vectors(IMAGE) == 12  # the duplicate shares one vector


def write_clip_retrieval_output(folder: Path, paths: list[str], captions: list[str], img: np.ndarray, txt: np.ndarray, per: int) -> None:
    """What clip-retrieval's writer leaves (np.save of float16 arrays, a parquet per partition with
    image_path, caption and its extra metadata columns), written here with numpy and pyarrow only."""
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True)
    parts = range(0, len(paths), per)
    width = len(str(len(parts))) if len(parts) >= 10 else 1
    for n, start in enumerate(parts):
        tag = str(n).zfill(width)
        np.save(folder / "img_emb" / f"img_emb_{tag}.npy", img[start : start + per].astype(np.float16))
        np.save(folder / "text_emb" / f"text_emb_{tag}.npy", txt[start : start + per].astype(np.float16))
        table = pa.table({
            "image_path": paths[start : start + per],
            "caption": captions[start : start + per],
            "url": [f"https://example.com/{Path(p).name}" for p in paths[start : start + per]],
            "width": [float(640)] * len(paths[start : start + per]),  # pandas stores ints with gaps as floats
        })
        pq.write_table(table, folder / "metadata" / f"metadata_{tag}.parquet")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_clip_retrieval_shards_import_with_an_explicit_binding(tmp_path, tiny_checkpoint, tiny_encoder):
    rng = np.random.default_rng(0)
    dim = tiny_encoder.dim
    n = 23
    paths = [f"/photos/set/{i:04d}.jpg" for i in range(n)]
    captions = [f"caption number {i}" for i in range(n)]
    img, txt = unit(rng.standard_normal((n, dim))), unit(rng.standard_normal((n, dim)))
    img[7] = img[3]  # the same picture twice: one vector
    folder = tmp_path / "clip-retrieval-out"
    write_clip_retrieval_output(folder, paths, captions, img, txt, per=10)
    assert [s.rows for s in list_shards(folder)] == [10, 10, 3]

    store = Store.open(home=tmp_path / "home")
    with pytest.raises(LoupeError, match="no loupe_manifest.json naming the model"):
        import_shards(store, folder)
    assert store.meta() is None  # refused before anything was written
    rep = import_shards(store, folder, checkpoint=tiny_checkpoint)
    assert (rep.images_added, rep.captions_added, rep.vectors_added) == (23, 23, 22 + 23)
    assert store.meta().weights_id == tiny_encoder.weights_id and store.meta().dim == dim
    rows = image_rows(store)
    assert sorted(rows) == paths
    for i, p in enumerate(paths):
        want = unit(img[i : i + 1].astype(np.float16).astype(np.float32))[0]
        np.testing.assert_allclose(rows[p][1], want, atol=1e-6)
        assert rows[p][0][3] == 640  # width, from a float column
    caps = caption_rows(store)
    assert {k[2] for k in caps} == set(captions)
    assert {k[3] for k in caps} == set(paths)  # each caption remembers its image
    assert len({k[0] for k in caps}) == 3  # one corpus per shard
    # a text query finds the image whose vector it is closest to, through the synced FAISS file
    reader = Store.open(home=tmp_path / "home", writer=False)
    scores, ids = reader.vector_index(IMAGE).search(img[[5, 11, 20]], 1)
    found = reader.catalog.image_rows_for_vectors(ids.ravel())
    assert [found[int(i)][0].path for i in ids.ravel()] == [paths[5], paths[11], paths[20]]
    again = import_shards(store, folder, checkpoint=tiny_checkpoint)
    assert (again.images_added, again.captions_added, again.vectors_added) == (0, 0, 0)


def test_shards_of_another_model_are_refused(indexed, tmp_path):
    out = tmp_path / "shards"
    export_catalog(indexed, out)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["weights_id"] = "sha256:" + "0" * 64
    (out / MANIFEST).write_text(json.dumps(manifest))
    before = indexed.catalog.generation()
    with pytest.raises(LoupeError, match="holds vectors of loupe-tiny .*but this index was built with"):
        import_shards(indexed, out)
    manifest.update(model="ViT-B-32", weights_id="laion2b_s34b_b79k", pretrained="laion2b_s34b_b79k", dim=512)
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LoupeError, match="holds 128-dimensional vectors, but ViT-B-32/laion2b_s34b_b79k makes"):
        import_shards(Store.open(home=tmp_path / "new"), out)
    with pytest.raises(LoupeError, match="already holds embedding shards"):
        export_catalog(indexed, out)
    assert indexed.catalog.generation() == before


def test_embedding_reader_reads_the_export(indexed, tmp_path):
    er = pytest.importorskip("embedding_reader")
    out = tmp_path / "shards"
    export_catalog(indexed, out, dtype="float16", shard_size=5)
    reader = er.EmbeddingReader(
        str(out / "img_emb"), file_format="parquet_npy", metadata_folder=str(out / "metadata"),
        meta_columns=["image_path", "hash"],
    )
    assert (reader.count, reader.dimension) == (13, indexed.meta().dim)
    rows = image_rows(indexed)
    seen = 0
    for vecs, meta in reader(batch_size=4, show_progress=False):
        for vec, path, h in zip(vecs, meta["image_path"], meta["hash"]):
            assert rows[path][0][0] == h
            np.testing.assert_allclose(vec, rows[path][1], atol=2e-3)
            seen += 1
    assert seen == 13


def test_cli_export_import_and_one_line_errors(loupe, tmp_path, tiny_encoder, photo_dir):
    index_folder(Store.open(home=loupe.home), tiny_encoder, photo_dir)  # in process: no model load per command
    out = tmp_path / "exported"
    r = loupe("export", out, "--dtype", "float16", "--shard-size", "5")
    assert "12 photos in 3 shards" in r.stdout
    r = loupe("import", out, "--home", tmp_path / "other-home", "--json")
    assert json.loads(r.stdout)["images_added"] == 12
    (out / MANIFEST).unlink()
    r = loupe("import", out, "--home", tmp_path / "third", ok=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("loupe: error: ") and "--checkpoint FILE" in r.stderr
    # without pyarrow: one line naming the extra
    code = "import sys; sys.modules['pyarrow'] = None; sys.argv = ['loupe', 'export', sys.argv[1]]; from loupe.cli.main import run; run()"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "x")], env=loupe.env(), capture_output=True, text=True,
        cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "loupe: error: embedding shards need pyarrow: pip install 'loupe[shards]'"
