"""Videos: one vector per moment, with its time, searchable among photos (issue 22).

The videos are made here with PyAV (benchmarks/synthetic_video.py): scenes cut from distinct real
photos with slow zooms, small and short, in the formats phones and cameras write. Indexed with
the tiny random-weight model through the functions behind `loupe index`, searched through the
one query engine, served by the web app in process (Range requests).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks.synthetic_video import corrupt, photos, repeat_video, truncate, write_video
from tests.conftest import FLICKR8K

SMALL = (256, 144)
FPS = 12
SCENES = [1.4, 1.8, 1.5]

FORMATS = {  # name -> write_video options
    "h264.mp4": {},
    "h264.mov": {},
    "vp9.webm": {"codec": "libvpx-vp9", "options": {"deadline": "realtime", "cpu-used": "8"}},
    "hevc10.mkv": {"codec": "libx265", "pix_fmt": "yuv420p10le", "hdr": True,
                   "options": {"preset": "ultrafast", "x265-params": "log-level=error"}},
    "portrait.mp4": {"size": (144, 256), "rotation": 90},
    "black_intro.mp4": {"black_intro_s": 1.5},
}


class VideoSet:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / "library"
        self.queries = root / "queries"
        self.folder.mkdir()
        self.queries.mkdir()
        pool = iter(photos(FLICKR8K / "images", seed=3))
        self.truth = {}
        for n, (name, kw) in enumerate(FORMATS.items()):
            kw = {"size": SMALL, "fps": FPS, **kw}
            self.truth[name] = write_video(
                str(self.folder / name), [next(pool) for _ in SCENES], SCENES, seed=n, querydir=str(self.queries), **kw
            )
        self.photo = self.folder / "photo.jpg"
        shutil.copyfile(next(pool), self.photo)
        self.bad = self.root / "bad"
        self.bad.mkdir()
        truncate(self.folder / "h264.mp4", self.bad / "truncated.mp4", 0.5)
        truncate(self.folder / "hevc10.mkv", self.bad / "truncated.mkv", 0.5)
        corrupt(self.folder / "h264.mp4", self.bad / "corrupt.mp4")
        (self.bad / "text.mp4").write_text("this is not a video\n" * 50)
        (self.bad / "empty.mov").write_bytes(b"")

    def scenes(self):
        for name, truth in self.truth.items():
            for scene in truth.scenes:
                yield name, scene


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> VideoSet:
    return VideoSet(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_encoder, videos):
    from loupe.indexer.pipeline.indexing import index_folder
    from loupe.indexer.storage.store import Store

    home = tmp_path_factory.mktemp("home")
    store = Store.open(home=home)
    report = index_folder(store, tiny_encoder, videos.folder, workers=2)
    return store, report, home


def _searcher(home, encoder):
    from loupe.indexer.storage.store import Store
    from loupe.retrieval.engine.search import Searcher

    return Searcher(Store.open(home=home, writer=False, map_files=False), encoder)


def _search(home, encoder, query: Path, k: int = 5, collapse: bool = True):
    from loupe.retrieval.engine.query import parse_query
    from loupe.retrieval.engine.requests import Filters, SearchRequest

    searcher = _searcher(home, encoder)
    ranking = searcher.rank(SearchRequest(tuple(parse_query([str(query)])), "image", 0, k, None, Filters(), collapse=collapse))
    searcher.extend(ranking, k)
    return ranking.entries


# ---- indexing ---------------------------------------------------------------------------------


def test_every_format_is_indexed_with_its_moments(indexed, videos):
    store, report, _ = indexed
    assert report.bad_files == []
    assert report.embedded == len(FORMATS) + 1  # every video, and the photo
    catalog = store.catalog
    rows = {os.path.basename(r.path): r for r in catalog.iter_image_rows(status="ok")}
    assert set(rows) == set(FORMATS) | {"photo.jpg"}
    for name, truth in videos.truth.items():
        moments = catalog.moments_of(rows[name].content_hash)
        assert len(moments) >= len(SCENES), name  # a moment per scene at least
        starts = [m[1] for m in moments]
        assert starts == sorted(starts)
        for _, start, t, end, _ in moments:
            assert start <= t <= end <= truth.scenes[-1].end_s + 0.5
    # the portrait video is catalogued upright, as a phone shows it
    assert rows["portrait.mp4"].width < rows["portrait.mp4"].height
    # the black intro gives no moment: the first one lies in the first real scene
    intro = catalog.moments_of(rows["black_intro.mp4"].content_hash)
    assert intro[0][2] >= 1.5
    stats = catalog.stats()
    assert stats["videos"] == len(FORMATS)
    assert stats["moments"] >= len(FORMATS) * len(SCENES)
    assert 0 < stats["video_hours"] * 3600 <= len(FORMATS) * (sum(SCENES) + 1.6)


def test_a_mid_scene_frame_finds_its_video_at_that_scene(indexed, videos, tiny_encoder):
    _, _, home = indexed
    hits = total = 0
    for name, scene in videos.scenes():
        total += 1
        score, rows = _search(home, tiny_encoder, Path(scene.query), k=3)[0]
        best = rows[0]
        if best.moment is not None and os.path.basename(best.path) == name and scene.start_s - 0.2 <= best.moment[1] <= scene.end_s + 0.2:
            hits += 1
    assert hits / total >= 0.8, f"{hits} of {total} scenes found at rank 1 with a time inside the scene"


def test_moments_of_one_video_collapse_to_its_best(indexed, videos, tiny_encoder):
    from loupe.retrieval.engine.search import _image_fields, kind_of_hit

    _, _, home = indexed
    query = Path(videos.truth["h264.mp4"].scenes[1].query)
    collapsed = _search(home, tiny_encoder, query, k=40)
    paths = [rows[0].path for _, rows in collapsed]
    assert len(paths) == len(set(paths))  # one entry per video
    top = collapsed[0][1]
    fields = _image_fields(top)
    assert kind_of_hit(top) == "video"
    assert {"time", "start", "end", "moments"} <= set(fields)
    assert fields["moments"], "the video's other moments are reachable from its best one"
    assert all(m["score"] <= collapsed[0][0] + 1e-6 for m in fields["moments"])
    apart = _search(home, tiny_encoder, query, k=40, collapse=False)
    assert sum(rows[0].path == top[0].path for _, rows in apart) == 1 + len(fields["moments"])


def test_rescan_touches_nothing_move_reuses_change_reembeds(tmp_path, tiny_encoder, videos):
    from loupe.indexer.pipeline.indexing import index_folder
    from loupe.indexer.storage.store import Store

    folder = tmp_path / "v"
    folder.mkdir()
    shutil.copyfile(videos.folder / "h264.mp4", folder / "a.mp4")
    store = Store.open(home=tmp_path / "home")
    first = index_folder(store, tiny_encoder, folder, workers=1)
    assert (first.embedded, first.moments) == (1, first.moments) and first.moments >= len(SCENES)
    again = index_folder(store, tiny_encoder, folder, workers=1)
    assert (again.unchanged, again.embedded) == (1, 0)
    os.rename(folder / "a.mp4", folder / "moved.mp4")
    moved = index_folder(store, tiny_encoder, folder, workers=1)
    assert (moved.embedded, moved.reused, moved.removed) == (0, 1, 1)
    old_hash = next(store.catalog.iter_image_rows(status="ok")).content_hash
    shutil.copyfile(videos.folder / "h264.mov", folder / "moved.mp4")  # other content at the same path
    changed = index_folder(store, tiny_encoder, folder, workers=1)
    assert changed.embedded == 1
    assert store.catalog.moments_of(old_hash) == []  # the old content's moments are gone with it
    (row,) = store.catalog.iter_image_rows(status="ok")
    assert len(store.catalog.moments_of(row.content_hash)) == changed.moments
    assert len(store.vector_index("image").ids()) == changed.moments  # the search index: the moments only


def test_no_video_skips_videos_and_keeps_those_indexed(tmp_path, tiny_encoder, videos):
    from loupe.indexer.pipeline.indexing import index_folder
    from loupe.indexer.storage.store import Store

    folder = tmp_path / "v"
    folder.mkdir()
    shutil.copyfile(videos.folder / "h264.mp4", folder / "a.mp4")
    shutil.copyfile(videos.photo, folder / "p.jpg")
    store = Store.open(home=tmp_path / "home")
    report = index_folder(store, tiny_encoder, folder, workers=1, video=False)
    assert (report.files, report.embedded, report.moments) == (1, 1, 0)
    index_folder(store, tiny_encoder, folder, workers=1)
    report = index_folder(store, tiny_encoder, folder, workers=1, video=False)
    assert (report.files, report.missing) == (1, 0)
    assert store.catalog.stats()["videos"] == 1


def test_bad_videos_are_skipped_with_their_reason(tmp_path, tiny_encoder, videos):
    from loupe.indexer.pipeline.indexing import index_folder
    from loupe.indexer.storage.store import Store

    folder = tmp_path / "mixed"
    shutil.copytree(videos.bad, folder)
    shutil.copyfile(videos.photo, folder / "photo.jpg")
    store = Store.open(home=tmp_path / "home")
    report = index_folder(store, tiny_encoder, folder, workers=2)
    reasons = {os.path.basename(p): r for p, r in report.bad_files}
    assert set(reasons) == {"truncated.mp4", "truncated.mkv", "corrupt.mp4", "text.mp4", "empty.mov"}
    assert "empty" in reasons["empty.mov"]
    assert "cannot open" in reasons["text.mp4"]
    assert "truncated" in reasons["truncated.mkv"] or "corrupt" in reasons["truncated.mkv"]
    assert all("\n" not in r for r in reasons.values())
    ok = {os.path.basename(r.path) for r in store.catalog.iter_image_rows(status="ok")}
    assert ok == {"photo.jpg"}  # never a lost photo; no bad video indexed
    again = index_folder(store, tiny_encoder, folder, workers=2)
    assert again.unchanged == again.files and again.bad_files == []  # a skip is remembered, not retried


def test_a_time_limit_ends_a_video_that_takes_too_long(videos):
    from loupe.indexer.pipeline.moments import stream_moments
    from loupe.indexer.pipeline.video import VideoTimeout

    with pytest.raises(VideoTimeout, match="time limit"):
        list(stream_moments(str(videos.folder / "hevc10.mkv"), 224, None, time_limit_s=1e-4))


def test_an_interrupt_in_the_middle_of_a_long_video_keeps_nothing_of_it_and_a_rerun_finishes(tmp_path, tiny_encoder, videos):
    """Ctrl-C while a long video's moments are being embedded: the video is not indexed (none of
    its moments is committed), the photo beside it is; the next run indexes the video whole,
    exactly as an uninterrupted run does."""
    from loupe.indexer.pipeline.indexing import index_folder
    from loupe.indexer.storage.store import Store

    folder = tmp_path / "long"
    folder.mkdir()
    chunk = tmp_path / "chunk.mp4"
    write_video(str(chunk), [str(p) for p in photos(FLICKR8K / "images", seed=9)[:3]], [4.0, 4.0, 4.0], size=(160, 90), fps=8)
    repeat_video(str(chunk), str(folder / "long.mp4"), 60, 12.0)  # 60 s: 15 scenes
    shutil.copyfile(videos.photo, folder / "photo.jpg")

    class Interrupting:
        """The tiny model, whose preprocessing is hit by Ctrl-C at the 6th video frame it sees."""

        def __init__(self, encoder) -> None:
            self.encoder, self.seen = encoder, 0

        def __getattr__(self, name):
            return getattr(self.encoder, name)

        def preprocess(self, image):
            if image.size == (224, 126) or image.size[0] / image.size[1] > 1.7:  # a video frame (16:9)
                self.seen += 1
                if self.seen == 6:
                    raise KeyboardInterrupt
            return self.encoder.preprocess(image)

    store = Store.open(home=tmp_path / "home")
    store.bind(tiny_encoder)
    cut = index_folder(store, Interrupting(tiny_encoder), folder, workers=1)
    assert cut.interrupted
    assert store.catalog.stats()["videos"] == 0 and store.catalog.stats()["moments"] == 0
    assert store.catalog.image_id(os.fsencode(str(folder / "long.mp4"))) is None
    resumed = index_folder(store, tiny_encoder, folder, workers=1)
    assert not resumed.interrupted and resumed.moments >= 15
    clean = Store.open(home=tmp_path / "clean")
    whole = index_folder(clean, tiny_encoder, folder, workers=1)
    (row,) = [r for r in store.catalog.iter_image_rows(status="ok") if r.path.endswith(".mp4")]
    mine = store.catalog.moments_of(row.content_hash)
    theirs = clean.catalog.moments_of(row.content_hash)
    assert [m[:4] for m in mine] == [m[:4] for m in theirs] and len(mine) == whole.moments
    a = store.catalog.load_vectors([m[4] for m in mine], tiny_encoder.dim)
    b = clean.catalog.load_vectors([m[4] for m in theirs], tiny_encoder.dim)
    assert np.allclose(a, b, atol=1e-5)


def test_export_writes_moment_vectors_with_their_times(indexed, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    from loupe.indexer.interop.transfer import export_catalog

    store, _, _ = indexed
    report = export_catalog(store, tmp_path / "out")
    assert report.moments == store.catalog.stats()["moments"]
    meta = pq.read_table(tmp_path / "out" / "moments" / "metadata" / "metadata_0.parquet").to_pydict()
    vecs = np.load(tmp_path / "out" / "moments" / "img_emb" / "img_emb_0.npy")
    assert len(vecs) == report.moments == len(meta["time"])
    assert all(s <= t <= e for s, t, e in zip(meta["start"], meta["time"], meta["end"]))
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-3)


# ---- the web app: videos served by Range, moment thumbnails -------------------------------------

TOKEN = "v" * 43
PORT = 8766
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def client(indexed, tiny_encoder, tmp_path_factory):
    from starlette.testclient import TestClient

    from loupe.retrieval.engine.service import SearchService
    from loupe.retrieval.web.app import create_app

    _, _, home = indexed
    app = create_app(SearchService(_searcher(home, tiny_encoder)), token=TOKEN, port=PORT, thumbs_dir=tmp_path_factory.mktemp("thumbs"))
    with TestClient(app, base_url=f"http://127.0.0.1:{PORT}", raise_server_exceptions=False, headers=AUTH) as c:
        yield c


def _page_results(client, videos, name="h264.mp4", scene=1) -> list[dict]:
    up = client.post("/api/uploads", content=Path(videos.truth[name].scenes[scene].query).read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert up.status_code == 200, up.text
    r = client.post("/api/search", json={"q": f"upload:{up.json()['id']}", "limit": 20})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_page_results_carry_the_moment_and_more_like_this_works_on_it(client, videos):
    results = _page_results(client, videos)
    top = results[0]
    scene = videos.truth["h264.mp4"].scenes[1]
    assert top["kind"] == "video" and top["name"] == "h264.mp4"
    assert scene.start_s - 0.2 <= top["time"] <= scene.end_s + 0.2 and top["start"] <= top["time"] <= top["end"]
    assert top["preview"].startswith(f"/api/video/{top['id']}?") and top["preview"].endswith(f"#t={top['time']:.3f}")
    assert top["ref"].startswith("moment:")
    assert [r["id"] for r in results].count(top["id"]) == 1  # collapsed
    similar = client.post("/api/search", json={"q": top["ref"], "limit": 5}).json()["results"]
    assert similar[0]["ref"] == top["ref"] and similar[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert client.post("/api/search", json={"q": "moment:999999", "limit": 5}).status_code == 404
    thumb = client.get(top["thumb"].split("?")[0], params={"t": top["time"]})
    assert thumb.status_code == 200 and thumb.headers["content-type"].startswith("image/")
    assert client.get(top["thumb"].split("?")[0], params={"t": "nan"}).status_code == 400


def test_range_requests_on_a_catalogued_video(client, videos):
    top = _page_results(client, videos)[0]
    data = (videos.folder / "h264.mp4").read_bytes()
    url = f"/api/video/{top['id']}"
    r = client.get(url, headers={"Range": "bytes=0-99"})
    assert r.status_code == 206 and r.content == data[:100]
    assert r.headers["content-range"] == f"bytes 0-99/{len(data)}" and r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-type"] == "video/mp4"
    r = client.get(url, headers={"Range": "bytes=100-"})
    assert r.status_code == 206 and r.content == data[100:]
    r = client.get(url, headers={"Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == data[-10:]
    r = client.get(url)
    assert r.status_code == 200 and r.content == data
    for bad in ("bytes=0-1,5-9", f"bytes={len(data)}-", "bytes=9-3", "items=0-9", "bytes=x-y", "bytes=-0", "bytes=-"):
        r = client.get(url, headers={"Range": bad})
        assert r.status_code == 416, bad
        assert r.headers["content-range"] == f"bytes */{len(data)}"
    signed = client.get(top["preview"].split("#")[0], headers={"Authorization": "", "Range": "bytes=0-9"})
    assert signed.status_code == 206 and signed.content == data[:10]  # the page's <video> cannot send the token


def test_only_catalogued_videos_are_served(client, videos, tmp_path):
    top = _page_results(client, videos)[0]
    from starlette.testclient import TestClient

    photo = next(r for r in client.post("/api/search", json={"q": "", "limit": 50}).json()["results"] if r["kind"] == "image")
    assert client.get(f"/api/video/{photo['id']}").status_code == 404  # a photo is not a video
    escapes = [
        "/api/video/999999", "/api/video/-1", "/api/video/../../etc/passwd", "/api/video/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        f"/api/video/{top['id']}/../../../etc/passwd", "/api/video/..%2f..%2fetc%2fpasswd", "/api/video//etc/passwd",
        f"/api/video/{top['id']}%00", "/api/video/1e3", f"/api/video/{top['id']}?path=/etc/passwd&file=../../x",
    ]
    for url in escapes:
        r = client.get(url, headers={"Range": "bytes=0-99"})
        assert r.status_code in (400, 404) or (url.startswith(f"/api/video/{top['id']}?") and r.content == (videos.folder / "h264.mp4").read_bytes()[:100]), url
        assert b"root:" not in r.content
    anonymous = TestClient(client.app, base_url=str(client.base_url), raise_server_exceptions=False)
    assert anonymous.get(f"/api/video/{top['id']}", headers={"Range": "bytes=0-9"}).status_code == 401
    forged = top["preview"].split("#")[0].replace("sig=", "sig=0")
    assert anonymous.get(forged[: forged.index("sig=") + 36]).status_code == 401



def test_a_kill_in_the_middle_of_a_long_video_then_a_rerun_ends_as_an_uninterrupted_run(tmp_path, tiny_checkpoint, tiny_encoder, videos):
    """The real command, killed (SIGKILL) while it decodes a 10-minute video: the catalog is
    intact, the video not indexed; the re-run indexes it whole, as a run never killed does."""
    import signal
    import time

    from loupe.indexer.storage.store import Store
    from tests.conftest import LoupeRunner

    folder = tmp_path / "long"
    folder.mkdir()
    chunk = tmp_path / "chunk.mp4"
    write_video(str(chunk), [str(p) for p in photos(FLICKR8K / "images", seed=11)[:3]], [4.0, 4.0, 4.0], size=(128, 72), fps=6)
    video = folder / "long.mp4"
    repeat_video(str(chunk), str(video), 600, 12.0)
    shutil.copyfile(videos.photo, folder / "photo.jpg")
    loupe = LoupeRunner(tmp_path / "home")
    proc = loupe.popen("index", folder, "--checkpoint", tiny_checkpoint, "--workers", "1")
    deadline, held_since = time.monotonic() + 240, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:  # the decoder holds the video open: kill it there
            try:
                held = any(os.readlink(f"/proc/{proc.pid}/fd/{fd}") == str(video) for fd in os.listdir(f"/proc/{proc.pid}/fd"))
            except OSError:
                held = False
            held_since = (held_since or time.monotonic()) if held else None
            if held_since is not None and time.monotonic() - held_since > 0.2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed in the middle of the video"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    store = Store.open(home=loupe.home)
    assert store.catalog.image_id(os.fsencode(str(video))) is None  # nothing of the video in progress
    assert store.catalog.stats()["moments"] == 0
    from loupe.indexer.pipeline.indexing import index_folder

    rerun = index_folder(store, tiny_encoder, folder, workers=1)  # the same model the killed run bound
    assert rerun.moments > 0 and not rerun.bad_files
    clean = Store.open(home=tmp_path / "clean")
    index_folder(clean, tiny_encoder, folder, workers=1)
    ours, theirs = store.catalog, clean.catalog
    h = ours.image_rows_at([os.fsencode(str(video))])[os.fsencode(str(video))].content_hash
    assert [m[:4] for m in ours.moments_of(h)] == [m[:4] for m in theirs.moments_of(h)]
    assert len(ours.moments_of(h)) >= 300 / 12 * 3 * 0.9  # a moment per scene (4 s scenes)
    assert ours.stats()["videos"] == 1 and ours.dangling_references() == (0, 0)


def test_a_video_is_never_read_whole_as_a_picture(client, videos):
    top = _page_results(client, videos)[0]
    r = client.get(f"/api/photo/{top['id']}")
    assert r.status_code == 404 and f"/api/video/{top['id']}" in r.json()["error"]
    info = client.get(f"/api/photos/{top['id']}").json()
    assert info["available"] is True and info["kind"] == "video" and info["video"].startswith(f"/api/video/{top['id']}?")
