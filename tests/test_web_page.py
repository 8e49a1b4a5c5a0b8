"""The web page in a real browser: Playwright driving Debian's Chromium against a real `loupe serve`.

One server for the module, on 240 real flickr8k photos copied into two folders (so the folder
filter has something to narrow) with modification times one day apart (so the date filter does),
indexed with the tiny random-weight model, plus the flickr8k caption corpus. Every check goes
through what a person sees: accessible roles and names (searchbox, list of img named by file,
dialog), the URL, the keyboard.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from tests.conftest import FLICKR8K, LoupeRunner, browser_page, chromium, require_chromium, serving

PER_FOLDER = 120
PAGE = 60  # the page's page size (retrieval/web/static/js/main.js)
DAY0 = datetime(2020, 1, 1, 12, 0, 0)

require_chromium()
from playwright.sync_api import expect  # noqa: E402


# ---- fixtures -------------------------------------------------------------------------------

class Library:
    """The photos the server indexed: name -> (folder, modification day)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folders = [root / "trips", root / "garden"]
        self.day: dict[str, datetime] = {}
        self.folder: dict[str, Path] = {}
        sources = sorted((FLICKR8K / "images").iterdir())[: 2 * PER_FOLDER]
        for f in self.folders:
            f.mkdir(parents=True)
        for i, src in enumerate(sources):
            folder = self.folders[i % 2]
            dst = folder / src.name
            shutil.copyfile(src, dst)
            when = DAY0 + timedelta(days=i)
            os.utime(dst, (when.timestamp(), when.timestamp()))
            self.day[src.name] = when
            self.folder[src.name] = folder
        # the caption corpus: the flickr8k captions of these photos (5 each)
        corpus = [item for item in json.loads((FLICKR8K / "captions.json").read_text()) if item["image"] in self.day]
        self.captions = root / "captions.json"
        self.captions.write_text(json.dumps(corpus))
        self.caption_count = sum(len(item["captions"]) for item in corpus)

    def path(self, name: str) -> Path:
        return self.folder[name] / name


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Library:
    return Library(tmp_path_factory.mktemp("library"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_encoder, library):
    """A real `loupe serve` on the library; yields the page URL.

    The index is built in this process by the functions behind `loupe index` and `loupe
    index-text` (the model is loaded here already); the server runs as a user runs it."""
    from loupe.indexer.pipeline.captions import index_captions
    from loupe.indexer.pipeline.indexing import index_folder
    from loupe.indexer.storage.store import Store

    loupe = LoupeRunner(tmp_path_factory.mktemp("loupe-home"))
    store = Store.open(home=loupe.home)
    from loupe.indexer.signals.registry import registered

    no_ocr = [s for s in registered() if s.name != "text"]  # 240 photos: OCR's page test is tests/test_web_ocr.py
    for folder in library.folders:
        index_folder(store, tiny_encoder, folder, batch_size=32, workers=1, signals=no_ocr)
    index_captions(store, tiny_encoder, library.captions)
    with serving(loupe) as state:
        yield page_url(state)


def page_url(state) -> str:
    """The URL a person opens: what `loupe serve` prints (the token in the fragment)."""
    return state.url + f"/#token={state.token}"


@pytest.fixture(scope="module")
def browser(server):  # closed before the server stops, so no open connection delays its exit
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser, server):
    with browser_page(browser, server) as pg:
        yield pg


# ---- helpers --------------------------------------------------------------------------------

def photos(page):
    return page.get_by_role("list", name="Photos").get_by_role("img")


def names(page) -> list[str]:
    return photos(page).evaluate_all("imgs => imgs.map(i => i.alt)")


def search(page, text: str) -> list[str]:
    box = page.get_by_role("searchbox", name="Search photos")
    box.fill(text)
    box.press("Enter")
    return settle(page)


def settle(page) -> list[str]:
    """Wait for the current search to finish; the names shown."""
    expect(page.locator("#results")).to_have_attribute("aria-busy", "false")
    return names(page)


def api_search(page, **body) -> dict:
    """The same search through the API the page uses (same origin, the token the page keeps)."""
    return page.evaluate(
        """async (body) => {
            const auth = 'Bearer ' + localStorage.getItem('loupe-token');
            const r = await fetch('/api/search', {method: 'POST', headers: {'Content-Type': 'application/json', 'Authorization': auth}, body: JSON.stringify(body)});
            return await r.json();
        }""",
        body,
    )


def send_image(page, event: str, path: Path) -> None:
    """Drop an image file on the page, or paste one, as the browser delivers it."""
    page.evaluate(
        """([event, name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: 'image/jpeg'}));
            const e = event === 'drop'
                ? new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})
                : new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true});
            document.body.dispatchEvent(e);
        }""",
        [event, path.name, base64.b64encode(path.read_bytes()).decode()],
    )


def url_params(page) -> dict:
    return parse_qs(urlparse(page.url).query)


# ---- tests ----------------------------------------------------------------------------------

def test_sentence_search_shows_thumbnails_best_first_and_scrolling_loads_more(page, library, tmp_path):
    shown = search(page, "a dog running on the grass")
    assert len(shown) == PAGE
    assert set(shown) <= set(library.day)
    expected = api_search(page, q="a dog running on the grass", limit=2 * PAGE)["results"]
    assert shown == [r["name"] for r in expected[:PAGE]]  # best first, the API's order
    first = photos(page).first
    expect(first).to_have_js_property("complete", True)
    assert first.evaluate("i => i.naturalWidth") > 0  # a real thumbnail arrived
    box = first.bounding_box()
    assert box["width"] > 40 and box["height"] > 40
    page.screenshot(path=str(tmp_path / "results-grid.png"))
    assert (tmp_path / "results-grid.png").stat().st_size > 10_000
    assert first.evaluate("i => i.src").split("?")[0].endswith(f"/api/thumb/{expected[0]['id']}")  # made on the fly

    search(page, "a dog running on the grass")  # again: the first row's thumbnails, cached now, come inline
    first = photos(page).first
    assert first.evaluate("i => i.src").startswith("data:image/")
    expect(first).to_have_js_property("complete", True)
    assert first.evaluate("i => i.naturalWidth") > 0

    page.mouse.wheel(0, 100_000)
    expect(photos(page)).to_have_count(2 * PAGE)
    more = settle(page)
    assert more[:PAGE] == shown and more == [r["name"] for r in expected]
    for _ in range(2 * PER_FOLDER // PAGE):  # keep scrolling: never a hard cap, every photo once
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_timeout(300)
        everything = settle(page)
    assert len(set(everything)) == len(everything) == 2 * PER_FOLDER
    expect(page.get_by_text("That’s all")).to_be_visible()


def test_open_a_photo_then_more_like_this(page, library):
    shown = search(page, "people in a city street")
    name = shown[2]
    photos(page).nth(2).click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    assert dialog.get_attribute("aria-modal") == "true"
    expect(dialog.get_by_role("heading", name=name)).to_be_visible()
    expect(dialog).to_contain_text(str(library.path(name)))
    expect(dialog).to_contain_text(f"{library.day[name].year}")
    expect(dialog.get_by_role("img", name=name)).to_be_visible()
    expect(dialog.get_by_role("button", name="Open")).to_have_attribute("target", "_blank")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    dialog.get_by_role("button", name="Copy path").click()
    expect(dialog.get_by_role("status")).to_have_text("Path copied.")
    assert page.evaluate("navigator.clipboard.readText()") == str(library.path(name))

    dialog.get_by_role("button", name="Captions for this").click()
    expect(dialog.get_by_role("region", name="Captions for this photo").get_by_role("listitem")).to_have_count(8)

    dialog.get_by_role("button", name="More like this").click()
    expect(dialog).to_be_hidden()
    similar = settle(page)
    assert similar[0] == name
    assert url_params(page)["img"][0].startswith("photo:")
    expect(page.get_by_role("searchbox", name="Search photos")).to_have_value("")


def test_image_upload_is_a_query_and_combines_with_words(page, library):
    name = sorted(library.day)[7]
    page.get_by_label("Search with an image").set_input_files(str(library.path(name)))
    expect(page.get_by_role("button", name="Remove your image")).to_be_visible()
    hits = settle(page)
    assert hits[0] == name
    term = url_params(page)["img"][0]
    assert term.startswith("upload:")

    combined = search(page, "a red car")  # words join the image: upload:ID + a red car
    assert url_params(page)["q"] == ["a red car"] and url_params(page)["img"] == [term]
    expected = api_search(page, q=f"{term} + a red car", limit=PAGE)["results"]
    assert combined == [r["name"] for r in expected]

    page.get_by_role("button", name="Remove your image").click()
    assert "img" not in url_params(page)

    for event, other in (("drop", sorted(library.day)[11]), ("paste", sorted(library.day)[12])):
        page.get_by_role("searchbox", name="Search photos").fill("")
        send_image(page, event, library.path(other))
        expect(page.get_by_role("button", name="Remove your image")).to_be_visible()
        assert settle(page)[0] == other, event
        page.get_by_role("button", name="Remove your image").click()

    page.get_by_label("Search with an image").set_input_files(
        files=[{"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": b"\xff\xd8\xff\xe0 not really a jpeg"}])
    expect(page.get_by_role("alert")).to_contain_text("broken.jpg")


def test_date_and_folder_filters_narrow_and_a_bad_date_says_so(page, library):
    everything = search(page, "a child playing")
    march = datetime(2020, 3, 1)
    assert any(library.day[n] < march for n in everything)
    page.get_by_label("After").fill("2020-03-01")
    after = settle(page)
    assert after and after != everything
    assert all(library.day[n] >= datetime(2020, 3, 1) for n in after)
    assert url_params(page)["after"] == ["2020-03-01"]

    garden = str(library.folders[1])
    page.get_by_label("Folder").select_option(value=garden)
    both = settle(page)
    assert both and all(library.folder[n] == library.folders[1] and library.day[n] >= datetime(2020, 3, 1) for n in both)
    assert url_params(page)["folder"] == [garden]

    page.get_by_label("Before").fill("2020-02-01")  # before < after: nothing can match, said plainly
    expect(page.get_by_role("alert")).to_contain_text("earlier than")
    expect(page.get_by_label("Before")).to_have_attribute("aria-invalid", "true")
    assert names(page) == []

    page.goto(page.url.split("?")[0] + "?q=dog&after=2021-02-30")
    expect(page.get_by_role("alert")).to_contain_text("not a date")
    assert names(page) == []


def test_reload_and_back_forward_reproduce_results(page):
    first = search(page, "a man riding a bike")
    page.get_by_label("Sort").select_option("oldest")
    oldest = settle(page)
    second = search(page, "two dogs in the snow")
    assert first != second
    page.reload()
    assert settle(page) == second
    page.go_back()
    expect(page.get_by_role("searchbox", name="Search photos")).to_have_value("a man riding a bike")
    assert settle(page) == oldest
    page.go_back()
    expect(page.get_by_label("Sort")).to_have_value("relevance")  # the popstate handler ran
    assert settle(page) == first
    page.go_forward()
    page.go_forward()
    expect(page.get_by_role("searchbox", name="Search photos")).to_have_value("two dogs in the snow")
    assert settle(page) == second
    # a shared link in a fresh tab shows the same thing
    other = page.context.new_page()
    other.goto(page.url)
    assert settle(other) == second
    other.close()


def test_keyboard(page):
    page.locator("body").press("/")
    box = page.get_by_role("searchbox", name="Search photos")
    expect(box).to_be_focused()
    shown = search(page, "a black dog")
    box.press("ArrowDown")
    focused = lambda: page.evaluate("document.activeElement.querySelector('img')?.alt")  # noqa: E731
    assert focused() == shown[0]
    page.keyboard.press("ArrowRight")
    assert focused() == shown[1]
    tops = photos(page).evaluate_all("imgs => imgs.map(i => i.getBoundingClientRect().top)")
    page.keyboard.press("ArrowDown")
    below = focused()
    assert tops[shown.index(below)] > tops[1]
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_role("heading", name=below)).to_be_visible()
    page.keyboard.press("ArrowRight")
    nxt = shown[shown.index(below) + 1]
    expect(dialog.get_by_role("heading", name=nxt)).to_be_visible()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    # focus goes back to the photo the dialog showed (on the dialog's close event: waited for, not raced)
    expect(page.locator("a.tile-link", has=page.get_by_role("img", name=nxt, exact=True))).to_be_focused()
    assert focused() == nxt


def test_status_view_and_caption_mode(page, library):
    page.get_by_role("link", name="Index status").click()
    view = page.get_by_role("main", name="Index status")
    expect(view).to_be_visible()
    expect(view).to_contain_text(f"{2 * PER_FOLDER}")
    expect(view).to_contain_text(f"{library.caption_count:,}")  # captions
    expect(view).to_contain_text("loupe-tiny")
    for folder in library.folders:
        expect(view).to_contain_text(str(folder))
    assert url_params(page)["view"] == ["status"]
    page.go_back()
    expect(page.get_by_role("list", name="Photos")).to_be_visible()

    page.get_by_role("form", name="Filters").get_by_text("Captions", exact=True).click()
    expect(page.get_by_role("radio", name="Captions")).to_be_checked()
    search(page, "a dog in the water")
    assert url_params(page)["target"] == ["captions"]
    captions = page.get_by_role("list", name="Captions").get_by_role("listitem")
    expect(captions).to_have_count(PAGE)
    expected = api_search(page, q="a dog in the water", target="captions", limit=PAGE)["results"]
    shown = page.locator(".caption-text").all_inner_texts()
    assert shown == [r["text"] for r in expected]


def test_empty_and_error_states(page):
    page.goto(page.url.split("?")[0] + "?img=upload:0123abcd")  # an upload the server no longer holds
    expect(page.get_by_role("alert")).to_contain_text("no upload 0123abcd")  # the server's own words
    page.goto(page.url.split("?")[0] + "?q=a+dog&min_score=0.999")
    expect(page.get_by_role("heading", name="No photos match")).to_be_visible()
    assert names(page) == []
    page.get_by_role("button", name="Clear filters").last.click()
    assert len(settle(page)) == PAGE
