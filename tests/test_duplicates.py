"""Near-duplicates: every tier and edit kind on a small real-photo set indexed with a random-weight
model (the pixels do the work), the keeper rule, incremental grouping, and the journalled move/undo
(a kill in the middle of a move, files changed since grouping)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import dupset
from loupe.indexer.signals.neardup import NearDuplicate, compare, extract_signal, parse
from loupe.indexer.signals.registry import by_name
from loupe.retrieval.engine.duplicates import Grouper, Member, choose_keeper


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dup_index(tmp_path_factory, tiny_checkpoint, flickr_images):
    """8 originals with their 8 edited copies each, 3 bursts of 4 frames, 12 distinct photos: indexed."""
    root = tmp_path_factory.mktemp("dups")
    manifest = dupset.build(root / "photos", flickr_images, n_edit=8, n_burst=3, n_distract=12, seed=1)
    from tests.conftest import LoupeRunner

    runner = LoupeRunner(root / "home")
    runner("index", root / "photos", "--checkpoint", tiny_checkpoint)
    return root, manifest, runner


def _groups(runner, *args):
    out = runner("duplicates", "--json", *args).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_the_signal_is_registered_and_small():
    sig = by_name("neardup")
    assert isinstance(sig, NearDuplicate) and sig.min_side >= 256


def test_every_edit_kind_is_the_same_photo_and_bursts_are_similar(dup_index):
    root, manifest, runner = dup_index
    groups = _groups(runner)
    assert groups and all({"tier", "paths", "keep", "reason"} <= set(g) for g in groups)
    scores = dupset.pair_scores(manifest, groups)
    assert scores["same"]["precision"] >= 0.98 and scores["same"]["recall"] >= 0.95, scores
    assert set(scores["recall_per_edit"]) == set(dupset.EDITS)
    assert all(r == 1.0 for r in scores["recall_per_edit"].values()), scores["recall_per_edit"]
    assert scores["burst_pairs_in_same"] == 0
    assert scores["similar"]["precision"] == 1.0 and scores["similar"]["recall"] >= 0.6, scores["similar"]
    assert scores["keeper_accuracy"] >= 0.9, scores
    # --tier filters; the table names the keeper and its reason
    assert {g["tier"] for g in _groups(runner, "--tier", "similar")} == {"similar"}
    table = runner("duplicates", "--tier", "same").stdout
    assert "keep" in table and "same-photo groups" in table
    # --in keeps only the files under that folder (none of ours: an empty answer, not an error)
    other = root / "elsewhere"
    other.mkdir(exist_ok=True)
    assert _groups(runner, "--in", other) == []
    assert runner("duplicates", "--tier", "both", ok=False).returncode != 0


def test_dates_filter_like_search(dup_index):
    _, manifest, runner = dup_index
    assert _groups(runner, "--after", "2100") == []
    assert _groups(runner, "--before", "2100")


def test_pairs_verified_by_pixels(flickr_images):
    from PIL import Image

    a, b = sorted(flickr_images.iterdir())[:2]
    img = Image.open(a).convert("RGB")
    pa = parse(extract_signal(img))
    assert compare(pa, parse(extract_signal(img.resize((img.width // 2, img.height // 2))))).tier == "same"
    assert compare(pa, parse(extract_signal(Image.open(b).convert("RGB")))).tier is None
    # the same pixels 5 s apart are not one picture (a burst of a still scene): similar, never same
    assert compare(pa, pa, 100.0, 105.0).tier == "similar"
    assert compare(pa, pa, 100.0, 100.1).tier == "same"


def _member(path, **kw):
    fields = dict(content_hash=path, size=100_000, mtime_ns=0, width=800, height=600, taken_at=None)
    fields.update(kw)
    return Member(path, **fields)


def test_keeper_rule_and_reasons():
    # a cropped copy loses to its full frame even when it is newer and sharper
    k, why = choose_keeper([_member("a.jpg", cropped=True, sharpness=900.0), _member("b.jpg", sharpness=100.0)])
    assert k == 1 and why.startswith("not cropped")
    # more pixels wins; an upscaled copy does not count as larger
    k, why = choose_keeper([_member("small.jpg", width=400, height=300), _member("big.jpg")])
    assert k == 1 and "largest pixel count" in why
    k, _ = choose_keeper([_member("orig.jpg", width=400, height=300, size=60_000),
                          _member("up.jpg", width=1600, height=1200, size=60_000, upscaled=True)])
    assert k == 0
    # original format, then camera metadata over an editor's copy, then the earliest capture
    k, why = choose_keeper([_member("a.png"), _member("a.jpg")])
    assert k == 1 and why == "original format"
    k, why = choose_keeper([_member("edited.jpg", flags=3, mtime_ns=1), _member("camera.jpg", flags=1, mtime_ns=9)])
    assert k == 1 and why == "camera metadata intact"
    k, why = choose_keeper([_member("late.jpg", capture=200.0), _member("early.jpg", capture=100.0)])
    assert k == 1 and "earliest capture" in why
    # the file date decides only when nothing else does
    k, why = choose_keeper([_member("x.jpg", mtime_ns=5), _member("y.jpg", mtime_ns=2)])
    assert k == 1 and why == "oldest file"


def test_grouping_is_incremental(flickr_images):
    from PIL import Image

    files = sorted(flickr_images.iterdir())[:6]
    sigs = [extract_signal(Image.open(f).convert("RGB")) for f in files]
    img0 = Image.open(files[0]).convert("RGB")
    copy = extract_signal(img0.resize((img0.width * 3 // 4, img0.height * 3 // 4)))
    g = Grouper()
    g.add([f"h{i}" for i in range(6)], sigs)
    fetched = []

    def fetch(keys):
        fetched.extend(keys)
        return {k: sigs[int(k[1:])] for k in keys}

    report = g.add(["copy"], [copy], fetch=fetch)
    assert report.added == 1 and report.same_edges == 1
    assert fetched == ["h0"]  # only the candidate's signal was read again
    (tier, members, _), = g.clusters()
    assert tier == "same" and sorted(g.keys[i] for i in members) == ["copy", "h0"]


def test_state_saved_and_reloaded(tmp_path, flickr_images):
    from PIL import Image

    f = sorted(flickr_images.iterdir())[0]
    img = Image.open(f).convert("RGB")
    g = Grouper()
    g.add(["a", "b"], [extract_signal(img), extract_signal(img.resize((120, 80)))])
    g.save(tmp_path / "s.npz")
    again = Grouper.load(tmp_path / "s.npz")
    assert again.keys == ["a", "b"] and [c[1] for c in again.clusters()] == [[0, 1]]
    assert np.array_equal(again.edges, g.edges)


def test_resolve_moves_aside_and_undo_restores_every_byte(dup_index):
    root, _, runner = dup_index
    photos = root / "photos"
    before = _tree(photos)
    groups = _groups(runner, "--tier", "same")
    out = runner("duplicates", "--resolve")
    assert "files moved" in out.stdout
    aside = photos / ".loupe-duplicates"
    moved = sum(len(g["paths"]) - 1 for g in groups)
    assert len(list(aside.rglob("*.*"))) == moved
    for g in groups:
        assert Path(g["keep"]).exists()
    # the catalog followed: the moved files are no longer grouped (nor shown), nothing re-embedded
    assert _groups(runner, "--tier", "same") == []
    # indexing skips the folder and re-embeds nothing
    idx = runner("index", photos).stdout
    assert "0 embedded" in idx
    assert "restored" in runner("duplicates", "--undo").stdout
    assert _tree(photos) == {k: v for k, v in before.items()}
    assert not any(aside.rglob("*.*"))
    assert len(_groups(runner, "--tier", "same")) == len(groups)


def test_files_changed_since_grouping_are_refused(dup_index):
    root, _, runner = dup_index
    groups = _groups(runner, "--tier", "same")
    victim = Path(next(p for p in groups[0]["paths"] if p != groups[0]["keep"]))
    data = victim.read_bytes()
    st = victim.stat()
    victim.write_bytes(data[:-2] + b"\x00\x00")  # same size, restored mtime: only the content hash tells
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    try:
        out = runner("duplicates", "--resolve", ok=False)
        assert "changed since it was grouped" in out.stderr
        assert victim.exists() and Path(groups[0]["keep"]).exists()
    finally:
        victim.write_bytes(data)
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        runner("duplicates", "--undo")


def test_kill_in_the_middle_of_a_move_then_undo_restores_every_byte(dup_index):
    root, _, runner = dup_index
    photos = root / "photos"
    before = _tree(photos)
    total = sum(len(g["paths"]) - 1 for g in _groups(runner, "--tier", "same"))
    # slow every move down so the kill lands in the middle (a test hook: a pause after each journal line)
    env = runner.env()
    env["LOUPE_TEST_MOVE_PAUSE"] = "0.2"
    journal = Path(env["LOUPE_HOME"]) / "duplicates-journal.jsonl"
    done_before = journal.read_text().count('"op":"done"') if journal.exists() else 0
    proc = subprocess.Popen([sys.executable, "-m", "loupe", "duplicates", "--resolve"], env=env, cwd=str(Path(__file__).parents[1]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not journal.exists() or journal.read_text().count('"op":"done"') < done_before + 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    aside = list((photos / ".loupe-duplicates").rglob("*.*"))
    assert 0 < len(aside) < total  # killed in the middle
    runner("duplicates", "--undo")
    assert _tree(photos) == before


def test_search_shows_copies_of_one_photo_once(dup_index):
    _, manifest, runner = dup_index
    _groups(runner)  # the grouping is saved beside the index
    hits = [json.loads(line) for line in runner("search", "a photo", "-k", "500", "--json").stdout.splitlines()]
    group = {m["path"]: m["group"] for m in manifest}
    shown = [group[h["path"]] for h in hits if h["path"] in group]
    edited = {m["group"] for m in manifest if m["kind"] == "edit"}
    assert len(hits) == len(set(shown))  # one result per photo
    assert edited <= set(shown)
    for h in hits:
        if group[h["path"]] in edited:
            assert len(h["duplicates"]) == 8  # its 8 copies listed with it
