"""The near-duplicate review view in real Chromium (by ARIA roles and names), against a real
`loupe serve` over a small edited-copy set: keyboard review, resolve, undo; the API needs the token."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import dupset
from tests.conftest import LoupeRunner, browser_page, chromium, require_chromium, serving
from tests.test_web_page import page_url

require_chromium()

from playwright.sync_api import expect  # noqa: E402


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint, flickr_images):
    root = tmp_path_factory.mktemp("dupweb")
    dupset.build(root / "photos", flickr_images, n_edit=2, n_burst=0, n_distract=3, seed=3, edits=("q40", "down55", "crop88"))
    loupe = LoupeRunner(root / "home")
    loupe("index", root / "photos", "--checkpoint", tiny_checkpoint)
    with serving(loupe) as state:
        yield root / "photos", state


def test_review_resolve_and_undo_by_keyboard(served):
    photos, state = served
    before = _tree(photos)
    with chromium() as browser, browser_page(browser, page_url(state)) as page:
        # the API wants the token like every route
        status = page.evaluate("async () => (await fetch('/api/duplicates')).status")
        assert status == 401
        page.get_by_role("link", name="Duplicates").click()
        expect(page.get_by_role("heading", name="Group 1 of 2: same photo")).to_be_visible()
        group = page.get_by_role("region", name="Group 1 of 2: same photo")
        radios = group.get_by_role("radiogroup", name="Photo to keep").get_by_role("radio")
        expect(radios).to_have_count(4)
        expect(group.get_by_role("img")).to_have_count(4)
        checked = [i for i in range(4) if radios.nth(i).is_checked()]
        assert len(checked) == 1
        keeper_name = radios.nth(checked[0]).get_attribute("aria-label")
        assert keeper_name.endswith("__orig.jpg")  # the unedited original is suggested
        page.keyboard.press("n")
        expect(page.get_by_role("heading", name="Group 2 of 2: same photo")).to_be_visible()
        page.keyboard.press("p")
        expect(page.get_by_role("heading", name="Group 1 of 2: same photo")).to_be_visible()
        # pick another keeper with the keyboard, then accept
        other = next(i for i in range(4) if i != checked[0])
        page.keyboard.press(str(other + 1))
        radios = page.get_by_role("radiogroup", name="Photo to keep").get_by_role("radio")
        expect(radios.nth(other)).to_be_checked()
        kept = radios.nth(other).get_attribute("aria-label").removeprefix("Keep ")
        page.keyboard.press("a")
        expect(page.get_by_role("status").filter(has_text="Moved 3 photos aside")).to_be_visible()
        expect(page.get_by_role("heading", name="Group 1 of 1: same photo")).to_be_visible()
        assert (photos / kept).exists()
        assert len(list((photos / ".loupe-duplicates").rglob("*.*"))) == 3
        # the button resolves too; Undo puts every file back
        page.get_by_role("button", name="Resolve group").click()
        expect(page.get_by_text("No near-duplicates left.")).to_be_visible()
        page.get_by_role("button", name="Undo moves").click()
        expect(page.get_by_role("status").filter(has_text="Put back 6 photos")).to_be_visible()
        expect(page.get_by_role("heading", name="Group 1 of 2: same photo")).to_be_visible()
    assert _tree(photos) == before
