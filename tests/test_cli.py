"""The `loupe` command as a user runs it: real subprocesses, real model file, real photos."""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
import time

import pytest

from tests.conftest import FLICKR8K


def test_readme_journey_on_flickr8k(loupe, tiny_checkpoint, flickr_images):
    out = loupe("index", flickr_images, "--checkpoint", tiny_checkpoint, "--batch-size", "64").stdout
    assert "800 images seen; 800 embedded" in out
    again = loupe("index", flickr_images).stdout  # the index remembers its model
    assert "0 embedded" in again and "800 unchanged" in again

    table = loupe("search", "a dog runs on the beach", "-k", "3").stdout.splitlines()
    assert table[0].split() == ["rank", "score", "path"] and len(table) == 4
    assert all(line.split()[2].startswith(str(flickr_images)) for line in table[1:])

    hits = [json.loads(line) for line in loupe("search", "a dog runs on the beach", "-k", "3", "--json").stdout.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert [h["path"] for h in hits] == [line.split()[2] for line in table[1:]]
    assert {"score", "size", "width", "height", "taken_at", "modified", "duplicates"} <= set(hits[0])

    photo = sorted(flickr_images.iterdir())[5]
    by_image = json.loads(loupe("search", photo, "-k", "1", "--json").stdout.splitlines()[0])
    assert by_image["path"] == str(photo) and by_image["score"] == pytest.approx(1.0, abs=1e-4)

    assert "4000 captions" in loupe("index-text", FLICKR8K / "captions.json").stdout
    caps = [json.loads(line) for line in loupe("search", photo, "--captions", "-k", "5", "--json").stdout.splitlines()]
    assert len(caps) == 5 and all(c["kind"] == "text" and c["text"] and c["image"] for c in caps)

    info = json.loads(loupe("info", "--json").stdout)
    assert (info["images_indexed"], info["captions"], info["model"]) == (800, 4000, "loupe-tiny")
    assert "agree" in loupe("check").stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["index", "/no/such/folder"], "not a folder"),
        (["index", ".", "--checkpoint", "/no/such.pt"], "checkpoint file not found"),
        (["search", "a dog"], "no index at"),
        (["index", ".", "--model", "ViT-Nope", "--checkpoint", __file__], "unknown model"),
        (["index-text", "/no/such.txt"], "caption file not found"),
        (["search", "dog", "+"], "operator"),
    ],
)
def test_errors_are_one_line(loupe, args, message):
    proc = loupe(*args, ok=False, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loupe: error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def absent_devices() -> list[str]:
    """Devices this host lacks: CUDA without a GPU, an ordinal past the last GPU, MPS off a Mac."""
    import torch

    absent = [f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"]
    if sys.platform != "darwin":
        absent.append("mps")
    return absent


def test_absent_devices_are_refused():
    from loupe.indexer.models.encoder import resolve_device
    from loupe.indexer.errors import LoupeError

    for name in [*absent_devices(), "cuda:99", "cuda:x", "tpu"]:
        with pytest.raises(LoupeError, match=r"--device|unknown device"):
            resolve_device(name)
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")


def test_absent_device_is_a_one_line_cli_error(loupe, tiny_checkpoint):
    proc = loupe("index", ".", "--device", absent_devices()[0], "--checkpoint", tiny_checkpoint, ok=False, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("loupe: error: --device"), proc.stderr


def test_wrong_checkpoint_for_index_and_no_pretrained_tag(loupe, tiny_checkpoint, photo_dir, tmp_path):
    from tests.conftest import save_random_model

    loupe("index", photo_dir, "--checkpoint", tiny_checkpoint)
    other = save_random_model(tmp_path / "other.pt", seed=7)
    proc = loupe("search", "dog", "--checkpoint", other, ok=False)
    assert proc.returncode == 1 and "other weights" in proc.stderr
    proc = loupe("index", photo_dir, "--home", tmp_path / "h2", "--model", "loupe-tiny", "--pretrained", "openai", ok=False)
    assert "not a pretrained tag" in proc.stderr


def test_every_command_has_help(loupe):
    for cmd in ("index", "index-text", "search", "info", "check", "remove", "models"):
        out = loupe(cmd, "--help").stdout
        assert "Usage: loupe " + cmd in out and len(out) > 200


def _indexed_rows(home) -> int:
    try:
        with sqlite3.connect(home / "catalog.db", timeout=5) as con:
            return con.execute("select count(*) from images").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupt_and_kill_leave_a_usable_index(loupe, tiny_checkpoint, flickr_images, sig):
    proc = loupe.popen("index", flickr_images, "--checkpoint", tiny_checkpoint, "--batch-size", "8", "--workers", "1")
    deadline = time.time() + 120
    while _indexed_rows(loupe.home) < 50 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    done = _indexed_rows(loupe.home)
    assert 0 < done < 800, f"the run was not interrupted mid-way (exit {proc.returncode}): {stderr[-300:]}"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "re-run to continue" in stderr
    hits = loupe("search", "a child", "-k", "3", "--json").stdout.splitlines()  # usable as is
    assert len(hits) == 3
    out = loupe("index", flickr_images).stdout
    assert "800 images seen" in out and f"{done} unchanged" in out
    assert "agree" in loupe("check").stdout


def test_a_finished_command_leaves_as_the_interpreter_would():
    """`loupe` leaves by `os._exit` (no teardown of every module) after doing what an exit does:
    idle thread-pool workers are told to stop and every other thread is waited for, the exit
    handlers run, the output is flushed, and the exit code is the command's."""
    import subprocess

    from tests.conftest import REPO

    code = (
        "import atexit, sys, threading, time\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "pool = ThreadPoolExecutor(2); pool.submit(int).result()  # never shut down\n"
        "threading.Thread(target=lambda: (time.sleep(0.5), print('thread done'))).start()\n"
        "atexit.register(lambda: print('exit handler'))\n"
        "from loupe.cli.main import _exit\n"
        "sys.stdout.write('buffered, no newline')\n"
        "_exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.startswith("buffered, no newline") and "thread done" in proc.stdout and "exit handler" in proc.stdout
    assert proc.stderr == ""
