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
from pathlib import Path

import pytest

from indexer.random_weights import save_random_model  # noqa: F401  (tests import it from here too)

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub call would otherwise hang ~47 s before failing
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FLICKR8K = SHARED_DATA / "flickr8k_800"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("models") / "loupe-tiny.pt")


@pytest.fixture(scope="session")
def tiny_encoder(tiny_checkpoint):
    from indexer.encoder import load_encoder, make_spec

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
    from indexer.store import Store

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
            [sys.executable, "-m", "cli.main", *map(str, args)],
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
            [sys.executable, "-m", "cli.main", *map(str, args)],
            cwd=REPO,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_default_sigint,
        )


def _default_sigint() -> None:
    """Let Ctrl-C reach the child even when the test run itself was started in the background
    (a shell's `cmd &` ignores SIGINT, and an ignored signal is inherited)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def loupe(tmp_path) -> LoupeRunner:
    return LoupeRunner(tmp_path / "loupe-home")


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
