"""Where items come from: photo folders on disk, and caption corpus files.

The folder walk is stat-only (os.scandir reuses the directory entry's stat on most systems):
nothing is opened or hashed here, so a re-scan of an unchanged library costs one walk.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from loupe.indexer.errors import LoupeError
from loupe.indexer.pipeline.media import extensions

JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db"}


@dataclass(frozen=True)
class FileEntry:
    """A candidate image file as the walk saw it."""

    path: str  # absolute; may hold surrogate escapes for non-UTF-8 names
    size: int
    mtime_ns: int

    @property
    def key(self) -> bytes:
        return os.fsencode(self.path)


@dataclass
class WalkStats:
    files_seen: int = 0
    ignored: int = 0  # not an image extension, hidden, junk
    errors: int = 0  # unreadable folders


def is_hidden(name: str) -> bool:
    """Dot-files, macOS resource forks (._x) and OS thumbnail junk are never photos to index."""
    return name.startswith(".") or name.lower() in JUNK_NAMES


def walk_images(
    root: str | os.PathLike, exclude: list[Path] | None = None, stats: WalkStats | None = None,
    kinds: frozenset[str] | None = None,
) -> Iterator[FileEntry]:
    """Yield image files under `root`, following folder symlinks without ever looping.

    Skipped: hidden files and folders, `._*`, .DS_Store, Thumbs.db, and the `exclude` folders
    (the index's own files). Unreadable folders are counted in `stats.errors`, not fatal.
    """
    stats = stats if stats is not None else WalkStats()
    exts = extensions(kinds)  # the files of these media kinds (default: every kind)
    root = os.path.abspath(root)
    excluded = {os.path.realpath(p) for p in (exclude or [])}
    seen_dirs: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError:
            stats.errors += 1
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen_dirs or os.path.realpath(folder) in excluded:
            continue
        seen_dirs.add(ident)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            stats.errors += 1
            continue
        subdirs = []
        for entry in entries:
            name = entry.name
            if is_hidden(name):
                stats.ignored += 1
                continue
            try:
                if entry.is_dir():  # follows symlinks; loops are cut by seen_dirs
                    subdirs.append(entry.path)
                    continue
                if not entry.is_file():
                    continue
                stats.files_seen += 1
                if os.path.splitext(name)[1].lower() not in exts:
                    stats.ignored += 1
                    continue
                est = entry.stat()
            except OSError:
                stats.errors += 1
                continue
            yield FileEntry(entry.path, est.st_size, est.st_mtime_ns)
        stack.extend(reversed(subdirs))


# ---- caption corpora --------------------------------------------------------------------


@dataclass(frozen=True)
class Caption:
    position: int
    text: str
    image: str | None = None


def read_captions(path: str | os.PathLike, text_column: str | None = None) -> list[Caption]:
    """Read captions from .txt (one per line), .jsonl, .csv/.tsv (a text column) or captions.json.

    captions.json is the `[{"image": ..., "captions": [...]}, ...]` format of ../shared/data;
    its captions keep the image name they describe.
    """
    p = Path(path)
    if not p.is_file():
        raise LoupeError(f"caption file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".json":
            return _read_json(p)
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(p, text_column)
        if suffix in (".csv", ".tsv"):
            return _read_csv(p, text_column, "\t" if suffix == ".tsv" else ",")
        with open(p, encoding="utf-8") as f:
            out = [Caption(i, line.strip()) for i, line in enumerate(f) if line.strip()]
    except UnicodeDecodeError as exc:
        raise LoupeError(f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise LoupeError(f"{p}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    return out


_TEXT_KEYS = ("text", "caption", "sentence", "captions", "raw")


def _pick_text(obj: dict, column: str | None, where: str) -> object:
    if column:
        if column not in obj:
            raise LoupeError(f"{where}: no '{column}' field")
        return obj[column]
    for key in _TEXT_KEYS:
        if key in obj:
            return obj[key]
    raise LoupeError(f"{where}: no text field (looked for {', '.join(_TEXT_KEYS)}; pass --column)")


def _read_json(p: Path) -> list[Caption]:
    data = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise LoupeError(f"{p}: expected a JSON list of {{'image', 'captions'}} objects")
    out: list[Caption] = []
    for n, item in enumerate(data):
        if isinstance(item, str):
            out.append(Caption(len(out), item))
            continue
        if not isinstance(item, dict):
            raise LoupeError(f"{p}: entry {n} is not an object")
        texts = _pick_text(item, None, f"{p} entry {n}")
        image = item.get("image") or item.get("filename")
        for t in texts if isinstance(texts, list) else [texts]:
            if isinstance(t, dict):
                t = t.get("raw", "")
            if str(t).strip():
                out.append(Caption(len(out), str(t).strip(), image))
    return out


def _read_jsonl(p: Path, column: str | None) -> list[Caption]:
    out: list[Caption] = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            text = obj if isinstance(obj, str) else _pick_text(obj, column, f"{p} line {n}")
            image = obj.get("image") if isinstance(obj, dict) else None
            for t in text if isinstance(text, list) else [text]:
                if str(t).strip():
                    out.append(Caption(len(out), str(t).strip(), image))
    return out


def _read_csv(p: Path, column: str | None, delimiter: str) -> list[Caption]:
    with open(p, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        fields = reader.fieldnames or []
        col = column or next((c for c in fields if c.lower() in _TEXT_KEYS), None)
        if col is None or col not in fields:
            raise LoupeError(f"{p}: no text column among {fields} (pass --column NAME)")
        image_col = next((c for c in fields if c.lower() in ("image", "filename", "file", "path")), None)
        return [
            Caption(i, row[col].strip(), row.get(image_col) if image_col else None)
            for i, row in enumerate(r for r in reader if (r.get(col) or "").strip())
        ]
