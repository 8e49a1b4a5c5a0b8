"""Shared fixtures: a tiny real open_clip model saved to a checkpoint, and a CLI runner.

No weights can be downloaded here, so tests build the registered `loupe-tiny` config with
seeded random weights, save it to a file, and load it through the same path users take.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from loupe.indexer.models.random_weights import save_random_model  # noqa: F401  (tests import it from here too)

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub call would otherwise hang ~47 s before failing
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# exporting a model's text tower to ONNX (`loupe.indexer.models.text_tower`) costs seconds per fresh index: tests
# that are not about it keep the torch path; tests/test_cold_search.py turns it on where it tests it
os.environ.setdefault("LOUPE_TEXT_TOWER", "0")
# exported model towers (`loupe.indexer.models.image_tower`) go to a cache of this test session, never the user's
if "LOUPE_CACHE_DIR" not in os.environ:
    import atexit
    import tempfile

    os.environ["LOUPE_CACHE_DIR"] = tempfile.mkdtemp(prefix="loupe-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LOUPE_CACHE_DIR"], True)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FLICKR8K = SHARED_DATA / "flickr8k_800"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("models") / "loupe-tiny.pt")


@pytest.fixture(scope="session")
def tiny_encoder(tiny_checkpoint):
    from loupe.indexer.models.encoder import load_encoder
    from loupe.indexer.models.spec import make_spec

    return load_encoder(make_spec(None, None, tiny_checkpoint), "cpu")


@pytest.fixture(scope="session")
def flickr_images() -> Path:
    images = FLICKR8K / "images"
    assert images.is_dir(), f"test data missing: {images} (../shared/data must sit beside the repo)"
    return images


@pytest.fixture
def photo_dir(tmp_path, flickr_images) -> Path:
    """A small private copy of real photos that a test may change freely."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in sorted(flickr_images.iterdir())[:12]:
        shutil.copy2(src, folder / src.name)
    return folder


@pytest.fixture
def store(tmp_path):
    from loupe.indexer.storage.store import Store

    return Store.open(home=tmp_path / "home")


class LoupeRunner:
    """Runs the real `loupe` command in a subprocess with its own index home."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def env(self) -> dict:
        env = dict(os.environ)
        env.update(HF_HUB_OFFLINE="1", LOUPE_HOME=str(self.home), PYTHONPATH=str(REPO))
        return env

    def __call__(self, *args: str, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "loupe", *map(str, args)],
            cwd=REPO,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if ok and proc.returncode != 0:
            raise AssertionError(f"loupe {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "loupe", *map(str, args)],
            cwd=REPO,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


# Ctrl-C must reach a `loupe` child even when the test run itself was started in the background: a
# shell's `cmd &` ignores SIGINT and an ignored signal is inherited through exec, while a handled one
# is reset to the default there. So the run handles it (a `preexec_fn` resetting it in the child
# instead can deadlock the fork of this many-threaded process before its exec, and Popen with it).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def loupe(tmp_path) -> LoupeRunner:
    return LoupeRunner(tmp_path / "loupe-home")


# ---- a real `loupe serve`, and a real browser in front of it -----------------------------------

SERVE_START_TIMEOUT = 180  # model load on a busy 2-core machine
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
    "--disable-component-update", "--disable-sync",
]


def wait_for_state(path: Path, proc: subprocess.Popen):
    """The state `loupe serve` (`proc`) writes to `path` once it listens."""
    from loupe.retrieval.web.client import read_state

    deadline = time.monotonic() + SERVE_START_TIMEOUT
    while time.monotonic() < deadline:
        state = read_state(path)
        if state is not None and state.pid == proc.pid:
            return state
        if proc.poll() is not None:
            raise AssertionError(f"loupe serve exited ({proc.returncode}):\n{proc.stderr.read()}")
        time.sleep(0.2)
    raise AssertionError("loupe serve did not start in time")


@contextmanager
def serving(loupe: LoupeRunner, *args: str) -> Iterator:
    """A real `loupe serve --port 0 ARGS` on the runner's home: yields its state once it listens,
    stops it on the way out."""
    from loupe.indexer.storage.locations import resolve_location
    from loupe.retrieval.web.client import state_file

    proc = loupe.popen("serve", "--port", "0", *args)
    try:
        yield wait_for_state(state_file(resolve_location(loupe.home)), proc)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def require_chromium() -> None:
    """Skips the calling test module where Playwright or Debian's Chromium is missing."""
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)


@contextmanager
def chromium(*args: str) -> Iterator:
    """Headless Chromium driven by Playwright (extra command-line ARGS), closed on the way out."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, *args])
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def browser_page(browser, url: str) -> Iterator:
    """A fresh page of `browser` at `url` (1280x900, 20 s timeouts); fails the test if the page
    raised a JavaScript error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


# ---- a small real index for the web API (tests/test_webapp.py, tests/test_web_security.py) ------


WEB_DATES = {"a": (2020, 6, 15), "b": (2022, 3, 10)}


class WebIndex:
    """Photos in two dated folders (a: 2020-06-15, b: 2022-03-10), indexed with the tiny model.

    a/ has 6 real photos, `broken.jpg` (skipped), `rotated.jpg` (EXIF orientation 6, camera and
    capture time 2019-05-01) and `victim.jpg` (which a security test replaces by a symlink);
    b/ has 6 other photos and `dup.jpg`, a copy of a/'s first photo. `outside/secret.jpg` lies
    outside the indexed folder; `captions.json` holds the 12 photos' captions (indexed).
    """

    def __init__(self, root: Path, encoder) -> None:
        self.root = root
        self.photos = root / "photos"
        self.home = root / "home"
        self.outside = root / "outside"
        self.encoder = encoder

    def path(self, name: str) -> Path:
        return self.photos / name


def _make_rotated(src: Path, dst: Path) -> None:
    from datetime import datetime as _dt

    from PIL import Image

    with Image.open(src) as img:
        rgb = img.convert("RGB")
    w, h = rgb.size
    for x in range(w // 3):  # a dark band on the stored left edge: the top edge once rotated
        for y in range(h):
            rgb.putpixel((x, y), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    exif[0x010F] = "Canon"
    exif[0x0110] = "Canon EOS 5D"
    exif[0x0132] = _dt(2019, 5, 1, 10, 0, 0).strftime("%Y:%m:%d %H:%M:%S")
    rgb.save(dst, "JPEG", quality=90, exif=exif.tobytes())


@pytest.fixture(scope="session")
def web_index(tmp_path_factory, tiny_encoder, flickr_images) -> WebIndex:
    import json as _json
    from datetime import datetime as _dt

    from loupe.indexer.pipeline.captions import index_captions
    from loupe.indexer.pipeline.indexing import index_folder
    from loupe.indexer.storage.store import Store

    idx = WebIndex(tmp_path_factory.mktemp("web"), tiny_encoder)
    sources = sorted(flickr_images.iterdir())
    for folder, chosen in (("a", sources[:6]), ("b", sources[6:12])):
        (idx.photos / folder).mkdir(parents=True)
        for src in chosen:
            shutil.copy2(src, idx.photos / folder / src.name)
    shutil.copy2(sources[0], idx.photos / "b" / "dup.jpg")
    (idx.photos / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    _make_rotated(sources[20], idx.photos / "a" / "rotated.jpg")
    shutil.copy2(sources[21], idx.photos / "a" / "victim.jpg")
    for folder, (y, m, d) in WEB_DATES.items():
        stamp = _dt(y, m, d, 12, 0, 0).timestamp()
        for p in (idx.photos / folder).iterdir():
            os.utime(p, (stamp, stamp))
    idx.outside.mkdir()
    shutil.copy2(sources[30], idx.outside / "secret.jpg")
    names = {p.name for p in sources[:12]}
    data = [item for item in _json.loads((FLICKR8K / "captions.json").read_text()) if item["image"] in names]
    captions = idx.root / "captions.json"
    captions.write_text(_json.dumps(data))
    store = Store.open(home=idx.home)
    index_folder(store, tiny_encoder, idx.photos, batch_size=8, workers=1)
    index_captions(store, tiny_encoder, captions)
    return idx


# `loupe train` on the 800 captioned photos, once per session: a small model far above chance,
# for the tests that compare loupe's numbers with a reference (tests/test_pixels.py,
# tests/test_clip_benchmark.py). 100 steps of 128: R@10 text->image ~48% (chance 1.25%), ~40 s on two idle cores.
FLICKR_TRAIN_STEPS = 100
FLICKR_TRAIN_BATCH = 128


@pytest.fixture(scope="session")
def flickr_trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flickr-trained")
    out = folder / "loupe-tiny-flickr8k.pt"
    LoupeRunner(folder / "home")(
        "train", "--model", "loupe-tiny", "--images", FLICKR8K / "images", "--annotations", FLICKR8K / "captions.json",
        "--steps", FLICKR_TRAIN_STEPS, "--batch-size", FLICKR_TRAIN_BATCH, "--seed", "0", "--device", "cpu",
        "--out", out, timeout=3600,  # ~30 s on two idle cores; far longer on a crowded machine
    )
    return out
