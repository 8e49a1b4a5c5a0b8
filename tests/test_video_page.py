"""The page plays a video from the moment a search found, in real Chromium (Playwright) against a
real `loupe serve`; everything found by ARIA roles and names, as a person sees it."""

from __future__ import annotations

import shutil

import pytest

from benchmarks.synthetic_video import photos as shuffled, write_video
from tests.conftest import FLICKR8K, LoupeRunner, browser_page, chromium, require_chromium, serving
from tests.test_web_page import page_url, send_image

require_chromium()

from playwright.sync_api import expect  # noqa: E402

SCENES = [2.0, 2.5, 2.0]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("videolib")
    folder, queries = root / "library", root / "queries"
    folder.mkdir()
    queries.mkdir()
    pool = shuffled(FLICKR8K / "images", seed=5)
    truth = write_video(
        str(folder / "lake.webm"), pool[:3], SCENES, size=(320, 180), fps=12, codec="libvpx-vp9",
        options={"deadline": "realtime", "cpu-used": "8"}, querydir=str(queries),
    )
    for src in pool[3:9]:
        shutil.copyfile(src, folder / src.rsplit("/", 1)[1])
    return folder, truth


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_encoder, library):
    from loupe.indexer.pipeline.indexing import index_folder
    from loupe.indexer.storage.store import Store

    folder, _ = library
    loupe = LoupeRunner(tmp_path_factory.mktemp("loupe-home"))
    report = index_folder(Store.open(home=loupe.home), tiny_encoder, folder, workers=1)
    assert report.moments >= len(SCENES) and not report.bad_files
    with serving(loupe) as state:
        yield page_url(state)


@pytest.fixture
def page(server):
    with chromium("--autoplay-policy=no-user-gesture-required") as browser, browser_page(browser, server) as pg:
        yield pg


def test_the_page_plays_the_video_from_the_moment_found(page, library):
    _, truth = library
    scene = truth.scenes[1]
    expect(page.get_by_role("searchbox", name="Search photos")).to_be_visible()
    send_image(page, "drop", __import__("pathlib").Path(scene.query))
    expect(page.locator("#results")).to_have_attribute("aria-busy", "false")
    tiles = page.get_by_role("list", name="Photos").get_by_role("img", name="lake.webm, video at")
    expect(tiles).to_have_count(1)  # the video's moments collapse into one tile
    tile = tiles.first
    name = tile.get_attribute("alt")
    m, s = name.rsplit(" ", 1)[1].split(":")
    shown = int(m) * 60 + int(s)
    assert int(scene.start_s) <= shown <= scene.end_s, name
    page.wait_for_function("(i) => i.complete", arg=tile.element_handle())
    assert tile.evaluate("i => i.complete && i.naturalWidth > 0"), "the tile shows the moment's frame"
    tile.click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    video = dialog.get_by_label("Video lake.webm, from")
    expect(video).to_be_visible()
    page.wait_for_function(
        "() => { const v = document.getElementById('viewer-video'); return v.readyState >= 2 && v.currentTime > 0; }", timeout=20_000
    )
    t = video.evaluate("v => v.currentTime")
    assert scene.start_s - 0.3 <= t <= scene.end_s + 0.5, f"playing at {t}s, the scene is {scene.start_s}-{scene.end_s}s"
    assert video.evaluate("v => v.duration") == pytest.approx(sum(SCENES), abs=0.5)
    others = dialog.get_by_role("region", name="Other moments of this video").get_by_role("button", name="Play from")
    assert others.count() >= 1  # the video's other moments (all rank in so small a library): one click plays from there
    label = others.first.get_attribute("aria-label")
    mm, ss = label.rsplit(" ", 1)[1].split(":")
    target = int(mm) * 60 + int(ss)
    others.first.click()
    page.wait_for_function(f"() => Math.abs(document.getElementById('viewer-video').currentTime - {target}) < 1.5", timeout=20_000)
    dialog.get_by_role("button", name="Close").click()
    expect(dialog).to_be_hidden()
    assert page.locator("#viewer-video").evaluate("v => v.paused"), "closing the viewer stops the video"
