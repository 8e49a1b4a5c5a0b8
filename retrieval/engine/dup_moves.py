"""Resolving near-duplicate groups without losing anything: move the non-keepers aside, journal
first, and put them back (`undo`) byte-identical.

loupe never deletes a photo. `resolve` moves the other members of a group into a folder (by
default `.loupe-duplicates` inside the indexed root that holds the file; indexing skips hidden
folders), under their path relative to that root. Before each file moves, a journal line (source,
destination, content hash, size) is written and fsynced; after it, a "done" line. A crash at any
point leaves every file either at its source or at its destination, and the journal says which
ones may have moved: `undo` checks each by content hash and moves it back. A file changed since
it was grouped (size, mtime or content hash differ from the catalog's) is refused, with its group.
The catalog follows each move (the row's path changes, its vector stays; nothing is re-embedded):
set-aside files are hidden ('missing'), restored ones visible again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from loupe.indexer.errors import LoupeError

FOLDER = ".loupe-duplicates"


def journal_path(location) -> Path:
    return Path(location.vector_dir) / f"{location.prefix}duplicates-journal.jsonl"


def file_hash(path: str | os.PathLike) -> str:
    """The content hash loupe catalogs (blake2b-128 of the bytes)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _append(journal: Path, record: dict) -> None:
    journal.parent.mkdir(parents=True, exist_ok=True)
    with open(journal, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _read(journal: Path) -> list[dict]:
    if not journal.is_file():
        return []
    out = []
    with open(journal, encoding="utf-8") as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a crash mid-write: its move never started
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _move(src: Path, dst: Path) -> None:
    """Move one file: a rename on one file system, else copy (fsynced) then remove the source."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != 18:  # EXDEV: another file system
            raise
        part = dst.with_name(dst.name + ".loupe-part")
        shutil.copy2(src, part)
        with open(part, "rb") as fh:
            os.fsync(fh.fileno())
        os.rename(part, dst)
        _fsync_dir(dst.parent)
        os.unlink(src)
    _fsync_dir(dst.parent)
    _fsync_dir(src.parent)


def _test_pause() -> None:
    """Tests slow moves down (LOUPE_TEST_MOVE_PAUSE seconds after each journal line) to kill one mid-way."""
    pause = os.environ.get("LOUPE_TEST_MOVE_PAUSE")
    if pause:
        import time

        time.sleep(float(pause))


@dataclass
class Outcome:
    moved: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (group id, why)
    restored: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _root_of(path: str, roots: Sequence[str]) -> str:
    best = ""
    for r in roots:
        if (path == r or path.startswith(r.rstrip(os.sep) + os.sep)) and len(r) > len(best):
            best = r
    return best or os.path.dirname(path)


def _check(store, member) -> str | None:
    """Why a file cannot be moved (changed since grouping, gone), or None."""
    from loupe.indexer.storage.catalog_names import path_key_of

    p = member.path
    try:
        st = os.stat(p)
    except OSError:
        return f"{p} is gone"
    rows = store.catalog.image_rows_at([path_key_of(p)])
    row = next(iter(rows.values()), None)
    if row is None or row.status != "ok":
        return f"{p} is not a catalogued photo"
    if st.st_size != row.size or st.st_mtime_ns != row.mtime_ns or row.content_hash != member.content_hash:
        return f"{p} changed since it was grouped (run `loupe index` and `loupe duplicates` again)"
    if file_hash(p) != member.content_hash:
        return f"{p} changed since it was grouped (its content differs; run `loupe index` and `loupe duplicates` again)"
    return None


def resolve(store, groups, keep: dict[str, str] | None = None, move_to: str | os.PathLike | None = None) -> Outcome:
    """Move every member but the keeper of each group (`keep`: group id -> path, else the suggestion) aside."""
    from loupe.indexer.storage.catalog_names import MISSING, path_key_of

    roots = [r.path for r in store.catalog.roots()]
    journal = journal_path(store.location)
    out = Outcome()
    for group in groups:
        keeper = (keep or {}).get(group.id, group.keep)
        if keeper not in group.paths:
            out.refused.append((group.id, f"the keeper {keeper} is not in the group"))
            continue
        members = [m for m in group.members if m.path != keeper]
        keeper_member = next(m for m in group.members if m.path == keeper)
        why = next((w for w in (_check(store, m) for m in [keeper_member, *members]) if w), None)
        if why:
            out.refused.append((group.id, why))
            continue
        batch = os.urandom(6).hex()
        for m in members:
            src = Path(m.path)
            root = _root_of(m.path, roots)
            base = Path(move_to).resolve() if move_to else Path(root) / FOLDER
            dst = base / os.path.relpath(m.path, root)
            n = 1
            while dst.exists() or dst.with_name(dst.name + ".loupe-part").exists():
                dst = dst.with_name(f"{src.stem}.{n}{src.suffix}")
                n += 1
            if base.resolve() == src.parent.resolve() or str(src.resolve()).startswith(str(base.resolve()) + os.sep):
                out.refused.append((group.id, f"{src} is inside the destination folder already"))
                break
            _append(journal, {"op": "move", "batch": batch, "group": group.id, "src": str(src), "dst": str(dst),
                              "hash": m.content_hash, "size": m.size})
            _test_pause()
            _move(src, dst)
            store.catalog.relocate_image(path_key_of(str(src)), path_key_of(str(dst)), MISSING)
            _append(journal, {"op": "done", "batch": batch, "src": str(src), "dst": str(dst)})
            out.moved.append((str(src), str(dst)))
    return out


def pending(store) -> list[dict]:
    """The journal's moves not undone yet, oldest first."""
    records = _read(journal_path(store.location))
    undone = {(r.get("batch"), r["src"]) for r in records if r.get("op") == "undone"}
    return [r for r in records if r.get("op") == "move" and (r.get("batch"), r["src"]) not in undone]


def undo(store) -> Outcome:
    """Put back every file the journal moved (newest first), byte-identical; the catalog follows."""
    from loupe.indexer.storage.catalog_names import OK, path_key_of

    journal = journal_path(store.location)
    out = Outcome()
    for r in reversed(pending(store)):
        src, dst = Path(r["src"]), Path(r["dst"])
        part = dst.with_name(dst.name + ".loupe-part")
        if src.exists() and not dst.exists():  # the move never happened (a crash before it)
            if part.exists() and file_hash(src) == r["hash"]:
                os.unlink(part)  # loupe's own unfinished copy; the source is intact
            _append(journal, {"op": "undone", "batch": r.get("batch"), "src": str(src), "dst": str(dst)})
            store.catalog.relocate_image(path_key_of(str(dst)), path_key_of(str(src)), OK)
            continue
        if not dst.exists():
            out.problems.append(f"{dst} is gone: cannot put {src} back")
            continue
        if file_hash(dst) != r["hash"]:
            out.problems.append(f"{dst} changed since it was moved: left where it is")
            continue
        if src.exists():
            if file_hash(src) == r["hash"]:  # a cross-device move copied but did not remove the source yet
                os.unlink(dst)
                _append(journal, {"op": "undone", "batch": r.get("batch"), "src": str(src), "dst": str(dst)})
                store.catalog.relocate_image(path_key_of(str(dst)), path_key_of(str(src)), OK)
                out.restored.append(str(src))
                continue
            out.problems.append(f"{src} exists again with other content: {dst} left where it is")
            continue
        _move(dst, src)
        store.catalog.relocate_image(path_key_of(str(dst)), path_key_of(str(src)), OK)
        _append(journal, {"op": "undone", "batch": r.get("batch"), "src": str(src), "dst": str(dst)})
        out.restored.append(str(src))
    if out.problems and not out.restored:
        raise LoupeError("; ".join(out.problems))
    return out
