"""Text in photos on the page, in real Chromium against a real `loupe serve`: a word drawn in a photo
finds it first, the preview marks the matched words on the photo, and lists the photo's text."""

from __future__ import annotations

import pytest

from benchmarks.ocr_set import have_fonts, make_fixtures, write_set
from tests.conftest import LoupeRunner, browser_page, chromium, require_chromium, serving
from tests.test_web_page import page_url

require_chromium()
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
    from loupe.indexer.storage.store import Store

    loupe = LoupeRunner(tmp_path_factory.mktemp("loupe-home"))
    report = index_folder(Store.open(home=loupe.home), tiny_encoder, drawn[1])
    assert report.signals["text"]["done"] == len(drawn[0])
    with serving(loupe) as state:
        yield page_url(state)


@pytest.fixture
def page(server):
    with chromium() as browser, browser_page(browser, server) as pg:
        yield pg


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
