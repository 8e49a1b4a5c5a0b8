"""Text in photos on the page, in real Chromium against a real `loupe serve`: a word drawn in a photo
finds it first, the preview marks the matched words on the photo, and lists the photo's text."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from benchmarks.ocr_set import have_fonts, make_fixtures
from tests.conftest import LoupeRunner
from tests.test_ocr import write_set

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]

playwright_sync = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)
if not have_fonts():
    pytest.skip("fonts-dejavu not installed (.ci/run installs it)", allow_module_level=True)
from playwright.sync_api import expect  # noqa: E402


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    root = tmp_path_factory.mktemp("drawn")
    fixtures = make_fixtures(1, seed=11, kinds=("sign", "plate", "document", "notext"))
    return write_set(root / "photos", fixtures), root / "photos"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_encoder, drawn):
    from loupe.indexer.pipeline.indexing import index_folder
    from loupe.indexer.storage.locations import resolve_location
    from loupe.indexer.storage.store import Store
    from loupe.retrieval.web.client import read_state, state_file

    loupe = LoupeRunner(tmp_path_factory.mktemp("loupe-home"))
    report = index_folder(Store.open(home=loupe.home), tiny_encoder, drawn[1])
    assert report.signals["text"]["done"] == len(drawn[0])
    proc = loupe.popen("serve", "--port", "0")
    path = state_file(resolve_location(loupe.home))
    try:
        deadline = time.monotonic() + 180
        while (state := read_state(path)) is None or state.pid != proc.pid:
            if proc.poll() is not None:
                raise AssertionError(f"loupe serve exited ({proc.returncode}):\n{proc.stderr.read()}")
            if time.monotonic() > deadline:
                raise AssertionError("loupe serve did not start in time")
            time.sleep(0.2)
        yield state.url + f"/#token={state.token}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except Exception:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture
def page(server):
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pg = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        pg.set_default_timeout(20_000)
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.goto(server)
        yield pg
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def search(page, text: str) -> list[str]:
    box = page.get_by_role("searchbox", name="Search photos")
    box.fill(text)
    box.press("Enter")
    expect(page.locator("#results")).to_have_attribute("aria-busy", "false")
    return page.get_by_role("list", name="Photos").get_by_role("img").evaluate_all("imgs => imgs.map(i => i.alt)")


def test_a_drawn_word_comes_first_and_the_preview_marks_it_on_the_photo(page, drawn):
    photos, _ = drawn
    name, sign = next((n, f) for n, f in photos.items() if f.kind == "sign")
    word = sign.words[0]
    shown = search(page, word.lower())
    assert shown and shown[0] == name, page.locator("body").inner_text()
    page.get_by_role("list", name="Photos").get_by_role("img").first.click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_role("heading", name=name)).to_be_visible()
    marks = dialog.get_by_role("list", name="Matched words on the photo").get_by_role("listitem")
    expect(marks).to_have_count(1)
    label = marks.first.get_attribute("aria-label")
    assert word.lower() in label.lower()
    img = dialog.get_by_role("img", name=name)
    expect(img).to_have_js_property("complete", True)
    page.wait_for_timeout(200)
    mark, pic = marks.first.bounding_box(), img.bounding_box()
    assert mark["width"] > 10 and mark["height"] > 5
    assert pic["x"] - 1 <= mark["x"] and mark["x"] + mark["width"] <= pic["x"] + pic["width"] + 1
    assert pic["y"] - 1 <= mark["y"] and mark["y"] + mark["height"] <= pic["y"] + pic["height"] + 1
    text = dialog.get_by_role("region", name="Text in this photo")
    expect(text).to_be_visible()
    expect(text.get_by_role("listitem")).not_to_have_count(0)
    expect(text.locator("mark")).to_contain_text(label)

    # a photo found by CLIP alone: no marks; a document's lines are listed, none marked
    page.keyboard.press("Escape")
    doc_name, doc = next((n, f) for n, f in photos.items() if f.kind == "document")
    shown = search(page, f'text:"{doc.words[0]}"')
    assert shown == [doc_name]
    page.get_by_role("list", name="Photos").get_by_role("img").first.click()
    text = page.get_by_role("dialog").get_by_role("region", name="Text in this photo")
    expect(text.get_by_role("listitem")).to_have_count(len(doc.words) // 2, timeout=10_000)
    expect(text.locator("mark")).to_have_count(1)
