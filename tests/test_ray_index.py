"""The indexing stages alone, file lists, and the Ray runner on one local cluster for the module.

The Ray runs are real `loupe index --ray=ADDRESS` processes (drivers) on a cluster this module
starts once with 2 CPUs, compared with the in-process runner's catalog.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from loupe.indexer.storage.catalog import IMAGE, path_key_of
from loupe.indexer.pipeline.runner import IndexReport
from loupe.indexer.pipeline.indexing import index_files, index_folder
from loupe.indexer.pipeline.stages import Committer, Reader, StageTimes, embed_batch, plan_files, plan_folder, read_file_list
from loupe.indexer.storage.check import check_store
from loupe.indexer.storage.store import Store
from tests.conftest import REPO
from tests.test_indexing import catalog_snapshot


def assert_same_catalog(a: dict, b: dict, cosine: float = 0.9999) -> None:
    """Same files, hashes, statuses and reasons; vectors within `cosine` (another process, another
    batch composition: last bits differ)."""
    assert {name: row[:3] for name, row in a.items()} == {name: row[:3] for name, row in b.items()}
    for name, row in a.items():
        va, vb = row[3], b[name][3]
        assert (va is None) == (vb is None), name
        if va is not None:
            assert float(va @ vb) >= cosine, (name, float(va @ vb))


def _copy_photos(src, dst, n: int):
    dst.mkdir()
    for p in sorted(src.iterdir())[:n]:
        shutil.copy2(p, dst / p.name)
    return dst


# ---- the stages alone (no Ray) -------------------------------------------------------------


def test_plan_read_embed_commit_units(store, tiny_encoder, photo_dir):
    (photo_dir / "notes.txt").write_text("not a photo")
    (photo_dir / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    store.bind(tiny_encoder)
    plan = plan_folder(store.catalog, str(photo_dir))
    assert (plan.files, len(plan.todo), plan.unchanged, plan.ignored) == (13, 13, 0, 1)

    times = StageTimes()
    known = store.catalog.hash_to_vector(IMAGE)
    reader = Reader(known, tiny_encoder.image_size, tiny_encoder.preprocess, times)
    loaded, bad = [], []
    for unit in plan.todo:
        try:
            loaded.append(reader(unit))
        except Exception as exc:  # noqa: BLE001
            bad.append((unit, exc))
    assert [u.path for u, _ in bad] == [str(photo_dir / "broken.jpg")]
    assert {x.action for x in loaded} == {"embed"} and len(loaded) == 12
    assert tuple(loaded[0].tensor.shape) == (3, tiny_encoder.image_size, tiny_encoder.image_size)

    vecs = embed_batch(tiny_encoder, [x.tensor for x in loaded], times)
    assert vecs.shape == (12, tiny_encoder.dim)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-4)

    report = IndexReport(root=str(photo_dir))
    commit = Committer(store.catalog, known, report, times)
    commit.failed(bad[0][0], "corrupt")
    # the first file twice (a retried unit): one vector, the copy counted as reused
    items = [(x.unit, x.content_hash, x.info) for x in loaded] + [(loaded[0].unit, loaded[0].content_hash, loaded[0].info)]
    assert commit.embedded(items, np.concatenate([vecs, vecs[:1]])) == 12
    assert (report.embedded, report.skipped, report.reused) == (12, 1, 1)
    assert store.catalog.count_vectors(IMAGE) == 12
    assert len(list(store.catalog.iter_image_rows())) == 13

    again = plan_folder(store.catalog, str(photo_dir))
    assert (len(again.todo), again.unchanged, again.unchanged_skipped) == (0, 13, 1)
    # a unit read again now that its content is known: reuse, nothing decoded
    reread = Reader(store.catalog.hash_to_vector(IMAGE), tiny_encoder.image_size, tiny_encoder.preprocess)(plan.todo[0])
    assert reread.action == "reuse" and reread.tensor is None
    stages = times.as_dict()
    assert set(stages) == {"read", "decode", "embed", "commit"}  # decode counts attempts, the broken file too
    assert stages["decode"]["items"] == 13 and stages["embed"]["items"] == 12 and stages["embed"]["seconds"] > 0


def test_index_report_has_stage_timings(store, tiny_encoder, photo_dir):
    report = index_folder(store, tiny_encoder, photo_dir, batch_size=5)
    assert report.embedded == 12
    assert {"plan", "read", "decode", "embed", "commit", "sync"} <= set(report.stages)
    assert report.stages["embed"]["items"] == 12 and report.stages["plan"]["items"] == 12
    assert report.stages["commit"]["items"] == 12
    assert report.encode_seconds == pytest.approx(report.stages["embed"]["seconds"], abs=1e-3)


def test_file_list_text_and_parquet(store, tiny_encoder, photo_dir, tmp_path):
    names = sorted(p.name for p in photo_dir.iterdir())
    listing = tmp_path / "list.txt"
    listing.write_text("# a comment\n" + "\n".join(f"photos/{n}" for n in names[:5]) + "\nphotos/gone.jpg\n\n")
    assert read_file_list(listing)[0] == str(photo_dir / names[0])  # relative to the list's folder
    report = index_files(store, tiny_encoder, listing)
    assert (report.files, report.embedded, report.walk_errors) == (5, 5, 1)
    assert report.bad_files == [(str(photo_dir / "gone.jpg"), "file not found")]
    rows = {os.path.basename(r.path) for r in store.catalog.iter_image_rows()}
    assert rows == set(names[:5])

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": [str(photo_dir / n) for n in names[3:8]], "caption": ["x"] * 5}), table)
    second = index_files(store, tiny_encoder, table)
    assert (second.files, second.unchanged, second.embedded) == (5, 2, 3)
    assert len(list(store.catalog.iter_image_rows())) == 8
    assert check_store(store).ok
    # the same photos indexed as a folder: nothing new to embed
    folder = index_folder(store, tiny_encoder, photo_dir)
    assert (folder.unchanged, folder.embedded) == (8, 4)

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"file": ["a.jpg"]}), bad)
    from loupe.indexer.errors import LoupeError

    with pytest.raises(LoupeError, match="path"):
        plan_files(store.catalog, read_file_list(bad))


def test_cli_files_json_reports_stages(loupe, tiny_checkpoint, photo_dir, tmp_path):
    listing = tmp_path / "few.txt"
    listing.write_text("\n".join(str(p) for p in sorted(photo_dir.iterdir())[:4]))
    # --no-ocr: the text pass reads the photos once more, after the embedding stages counted here
    out = loupe("index", "--files", listing, "--checkpoint", tiny_checkpoint, "--no-ocr", "--json").stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert (report["files"], report["embedded"], report["runner"]) == (4, 4, "in-process")
    for stage in ("plan", "read", "decode", "embed", "commit"):
        assert report["stages"][stage]["seconds"] >= 0 and report["stages"][stage]["items"] == 4, stage


def test_without_ray_one_line_error(tmp_path, photo_dir, tiny_checkpoint):
    code = "import sys; sys.modules['ray'] = None; from loupe.cli.main import run; sys.argv[0] = 'loupe'; run()"
    env = dict(os.environ, HF_HUB_OFFLINE="1", LOUPE_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", code, "index", str(photo_dir), "--ray", "--checkpoint", str(tiny_checkpoint)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["loupe: error: --ray needs Ray, which is not installed: pip install 'loupe[ray]'"]
    assert not (tmp_path / "home" / "catalog.db").exists()  # failed before any work


# ---- the Ray runner on one local cluster ---------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    import logging

    ray = pytest.importorskip("ray")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # ray.init replaces them
    set_handler = signal.signal  # and Ray's deferred-SIGINT context swaps this function while it is open

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 << 20,
        logging_level=logging.ERROR,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}},
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        signal.signal = set_handler
        for sig, handler in handlers.items():  # later tests (and pytest's Ctrl-C) get the usual handlers
            signal.signal(sig, handler)


def _reference(tmp_path, tiny_encoder, folder) -> dict:
    plain = Store.open(home=tmp_path / "plain")
    index_folder(plain, tiny_encoder, folder, batch_size=16)
    return catalog_snapshot(plain)


def test_ray_index_same_catalog_and_rerun_embeds_nothing(cluster, loupe, tiny_checkpoint, tiny_encoder, flickr_images, tmp_path):
    photos = _copy_photos(flickr_images, tmp_path / "p60", 60)
    shutil.copy2(photos / sorted(os.listdir(photos))[0], photos / "copy.jpg")  # a duplicate: one vector
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = loupe("index", photos, f"--ray={cluster}", "--checkpoint", tiny_checkpoint, "--batch-size", "8", "--json").stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert (report["runner"], report["files"], report["embedded"], report["reused"], report["skipped"]) == ("ray", 62, 60, 1, 1)
    for stage in ("plan", "read", "decode", "embed", "commit", "cluster"):
        assert stage in report["stages"], stage
    assert report["stages"]["embed"]["items"] == 61 and report["stages"]["embed"]["seconds"] > 0

    on_ray = Store.open(home=loupe.home)
    assert check_store(on_ray).ok
    assert on_ray.catalog.count_vectors(IMAGE) == 60
    assert_same_catalog(catalog_snapshot(on_ray), _reference(tmp_path, tiny_encoder, photos))

    again = json.loads(loupe("index", photos, f"--ray={cluster}", "--json").stdout.strip().splitlines()[-1])
    assert (again["unchanged"], again["embedded"], again["reused"], again["touched"]) == (62, 0, 0, 0)


def _embed_actor_pid(timeout: float = 240) -> tuple[str, int]:
    """The pid of a live embedding actor of another driver's job, from the cluster's actor table."""
    from ray._private.state import actors

    deadline = time.time() + timeout
    while time.time() < deadline:
        for actor_id, a in actors().items():
            if "Embedder" in a.get("ActorClassName", "") and a.get("State") == "ALIVE" and a.get("Pid"):
                return actor_id, int(a["Pid"])
        time.sleep(0.2)
    raise AssertionError("no embedding actor came up")


def test_killed_embedding_actor_loses_and_doubles_nothing(cluster, loupe, tiny_checkpoint, tiny_encoder, flickr_images, tmp_path):
    photos = _copy_photos(flickr_images, tmp_path / "p200", 200)
    proc = loupe.popen("index", photos, f"--ray={cluster}", "--checkpoint", tiny_checkpoint, "--batch-size", "2", "--json")
    try:
        actor_id, pid = _embed_actor_pid()
        home = Store.open(home=loupe.home)  # the driver created it before starting the actors
        deadline = time.time() + 240
        while time.time() < deadline and home.catalog.count_vectors(IMAGE) == 0 and proc.poll() is None:
            time.sleep(0.05)  # kill once some batches are committed: mid-run
        committed = home.catalog.count_vectors(IMAGE)
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert 0 < committed < 200, committed  # the worker died in the middle of the job
    from ray._private.state import actors

    assert actors()[actor_id]["NumRestarts"] >= 1 or actors()[actor_id]["State"] == "DEAD"
    report = json.loads(out.strip().splitlines()[-1])
    assert (report["files"], report["embedded"], report["skipped"]) == (200, 200, 0)
    on_ray = Store.open(home=loupe.home)
    assert on_ray.catalog.count_vectors(IMAGE) == 200 == len(list(on_ray.catalog.iter_image_rows()))
    assert_same_catalog(catalog_snapshot(on_ray), _reference(tmp_path, tiny_encoder, photos))
    assert check_store(on_ray).ok


def test_interrupted_ray_run_continues_to_the_same_catalog(cluster, tiny_encoder, flickr_images, tmp_path):
    """A driver stopped mid-run (as by Ctrl-C: `max_batches` raises KeyboardInterrupt in the
    commit loop) keeps what it committed; the next run embeds only the rest."""
    from loupe.indexer.pipeline.ray_runner import index_on_ray

    photos = _copy_photos(flickr_images, tmp_path / "p40", 40)
    store = Store.open(home=tmp_path / "ray-home")
    first = index_on_ray(store, tiny_encoder, str(photos), batch_size=4, max_batches=3)
    assert first.interrupted and 0 < first.embedded < 40
    assert check_store(store).ok
    second = index_on_ray(store, tiny_encoder, str(photos), batch_size=8)
    assert not second.interrupted
    assert (second.unchanged, second.embedded) == (first.embedded, 40 - first.embedded)
    assert_same_catalog(catalog_snapshot(store), _reference(tmp_path, tiny_encoder, photos))


def test_ray_records_precision_and_runs_signals_like_the_local_runner(cluster, tiny_encoder, flickr_images, tmp_path):
    """Both executors go through one loop: the precision of Ray-written vectors is admitted and
    recorded as the local runner's is, and the signals run in the Ray decode pass (and, decode
    only, on photos indexed before a signal existed)."""
    from loupe.indexer.pipeline.ray_runner import index_on_ray
    from loupe.indexer.signals.phash import PerceptualHash

    photos = _copy_photos(flickr_images, tmp_path / "p12", 12)
    local = Store.open(home=tmp_path / "local")
    index_folder(local, tiny_encoder, photos, signals=[PerceptualHash()])
    on_ray = Store.open(home=tmp_path / "ray")
    report = index_on_ray(on_ray, tiny_encoder, str(photos), batch_size=4, signals=(PerceptualHash(),))
    assert (report.runner, report.embedded, report.precision) == ("ray", 12, "fp32")
    assert on_ray.image_precisions() == local.image_precisions() == {"fp32": 1.0}
    assert report.signals == {"phash": {"done": 12, "failed": 0}}
    assert on_ray.catalog.signal_values("phash", 1).keys() == local.catalog.signal_values("phash", 1).keys()

    later = Store.open(home=tmp_path / "later")
    index_on_ray(later, tiny_encoder, str(photos), batch_size=4, signals=())
    backfill = index_on_ray(later, tiny_encoder, str(photos), batch_size=4, signals=(PerceptualHash(),))
    assert (backfill.embedded, backfill.signals) == (0, {"phash": {"done": 12, "failed": 0}})
