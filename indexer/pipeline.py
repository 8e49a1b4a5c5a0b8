"""Indexing jobs: reader (folder walk / caption file) -> mapper (decode, hash, embed) -> writer.

Incremental by design: an unchanged file (same size and mtime) costs one dict lookup; a
changed or new file is read once, hashed and, only when its content hash has no vector yet,
decoded and embedded. Every batch is committed to the catalog in one transaction, so an
interrupted run keeps everything done so far and the next run continues from there.

Nothing is dropped because a walk did not see it: a file not found is kept as 'missing' (with
its vector, hidden from results) and comes back without embedding; a folder that is gone, empty
or unreadable where files were indexed is reported offline (an unplugged drive, not a deletion).
Only `loupe remove` and `--prune` forget files.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from indexer.batching import parallel_map, reason_for
from indexer.catalog import IMAGE, MISSING, TEXT, ImageRecord, path_key_of
from indexer.critical import critical_section
from indexer.errors import LoupeError
from indexer.imageio import decode_image, probe_image
from indexer.locking import holds_writer_lock
from indexer.sources import FileEntry, WalkStats, read_captions, walk_images
from indexer.store import Store


def content_hash(data: bytes) -> str:
    """Identity of a file's content (BLAKE2b-128, hex): equal bytes, equal vector."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class IndexReport:
    """What an indexing run did; printed by the CLI and checked by tests."""

    root: str
    files: int = 0
    unchanged: int = 0
    embedded: int = 0
    reused: int = 0
    touched: int = 0
    skipped: int = 0
    removed: int = 0  # rows forgotten: moved files (their content is indexed at another path), --prune
    missing: int = 0  # files newly not found: kept with their vector, hidden from results
    restored: int = 0  # missing files found again unchanged (nothing embedded)
    offline: str | None = None  # 'missing' | 'empty' | 'unreadable': the folder is away, nothing removed
    ignored: int = 0
    walk_errors: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    scan_seconds: float = 0.0
    encode_seconds: float = 0.0
    precision: str | None = None  # of the image vectors embedded (None: nothing embedded)
    precision_check_seconds: float = 0.0  # the first-batch fidelity check of a precision other than fp32
    bad_files: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0


@dataclass
class _Loaded:
    entry: FileEntry
    row_id: int | None
    action: str  # 'embed' | 'reuse' | 'touch'
    content_hash: str
    tensor: object = None
    info: object = None


@holds_writer_lock
def index_folder(
    store: Store,
    encoder: "Encoder | Callable[[], Encoder]",
    root: str | os.PathLike,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = False,
    max_batches: int | None = None,
    prune: bool = False,
) -> IndexReport:
    """Bring the catalog and vector index in line with the images under `root`.

    Files not found are marked missing, not dropped (see the module docstring); `prune` forgets
    the missing files under `root` and the vectors only they used, unless `root` is offline.
    `max_batches` stops after that many model batches as if interrupted (used by tests to
    prove that a resumed run ends where an uninterrupted one does). `encoder` may be a function
    that loads it: it is then called only if some file needs embedding, so a re-scan that
    finds nothing new costs no model load.
    """
    root_path = Path(root).expanduser()
    t0 = time.perf_counter()
    catalog = store.catalog
    root_abs = os.path.abspath(root_path)
    root_key = path_key_of(root_abs)
    report = IndexReport(root=root_abs)
    if not root_path.is_dir():
        if not catalog.has_images(root_key):
            raise LoupeError(f"not a folder: {root_path}")
        return _offline(store, report, "missing", [s.id for s in catalog.image_states(root_key).values()], t0)
    if not callable(encoder):
        store.bind(encoder)
    states = catalog.image_states(root_key)
    walk_stats = WalkStats()
    todo: list[tuple[FileEntry, object]] = []
    found_again: list[int] = []
    for entry in walk_images(root_abs, exclude=store.location.own_paths(), stats=walk_stats):
        report.files += 1
        state = states.pop(entry.key, None)
        same = state is not None and state.size == entry.size and state.mtime_ns == entry.mtime_ns
        if same and not state.needs_work:  # a row left without vector by an old interrupted run is redone
            report.unchanged += 1
            if state.status == MISSING:
                found_again.append(state.id)
            elif state.status != "ok":
                report.skipped += 1
            continue
        todo.append((entry, state))
    if report.files == 0 and states:  # photos were indexed here: an unplugged drive's mount point, not a deletion
        return _offline(store, report, _why_empty(root_abs), [s.id for s in states.values()], t0)
    if found_again:
        report.restored = len(found_again)
        report.skipped += report.restored - catalog.restore_images(found_again)
    gone = [s.id for s in states.values()]
    report.ignored, report.walk_errors = walk_stats.ignored, walk_stats.errors
    report.scan_seconds = time.perf_counter() - t0
    if callable(encoder) and (todo or store.meta() is None):
        encoder = encoder()
        store.bind(encoder)

    known = catalog.hash_to_vector(IMAGE) if todo else {}
    in_flight: set[str] = set()  # hashes being embedded in this run: their copies wait, not re-embed

    def load(job: tuple[FileEntry, object]) -> _Loaded:
        entry, state = job
        with open(entry.path, "rb") as f:
            data = f.read()
        h = content_hash(data)
        row_id = state.id if state is not None else None
        if state is not None and state.content_hash == h and state.status == "ok":
            return _Loaded(entry, row_id, "touch", h)
        if h in known or h in in_flight:
            return _Loaded(entry, row_id, "reuse", h, info=probe_image(data))
        in_flight.add(h)
        tensor, info = decode_image(data, encoder.image_size, encoder.preprocess)
        return _Loaded(entry, row_id, "embed", h, tensor=tensor, info=info)

    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="indexing", unit="img", dynamic_ncols=True, smoothing=0.1)

    records: list[ImageRecord] = []
    waiting: list[ImageRecord] = []  # copies of content whose vector is not committed yet
    touches: list[tuple[int, int, int]] = []
    batch: list[_Loaded] = []
    batches_done = 0
    admitted = False  # whether this run's image precision was checked against the index's

    def record(item: _Loaded, reason: str | None = None) -> ImageRecord:
        info = item.info
        return ImageRecord(
            path_key=item.entry.key,
            size=item.entry.size,
            mtime_ns=item.entry.mtime_ns,
            content_hash=item.content_hash,
            width=getattr(info, "width", None),
            height=getattr(info, "height", None),
            taken_at=getattr(info, "taken_at", None),
            reason=reason,
        )

    def commit(embedded: list[ImageRecord], new_vectors: list[tuple[str, np.ndarray]]) -> None:
        """Write the decided rows, plus a batch's rows with their vectors, as one uninterruptible unit."""
        with critical_section():  # a Ctrl-C lands before the commit or after `records`/`known` match it
            catalog.write_images(records + embedded, new_vectors, known)
            records.clear()

    def flush(embed: bool) -> None:
        nonlocal batches_done, admitted
        if embed and batch:
            import torch  # here, not at the top: a run with nothing to embed never imports it

            t = time.perf_counter()
            vecs = encoder.encode_images(torch.stack([b.tensor for b in batch]))
            report.encode_seconds += time.perf_counter() - t
            if not admitted:  # the first batch fixed the precision: refused before any vector is written
                store.admit_precision(encoder)
                admitted = True
                report.precision, report.precision_check_seconds = encoder.image_precision, encoder.fidelity_seconds
            new_vectors = [(b.content_hash, v) for b, v in zip(batch, vecs)]
            embedded = [record(b) for b in batch]
            batch.clear()  # from here these rows travel only with their vectors: committed, or redone next run
            with critical_section():
                commit(embedded, new_vectors)
                report.embedded += len(embedded)
                batches_done += 1
        elif records:
            commit([], [])
        with critical_section():
            ready = [w for w in waiting if w.content_hash in known]
            if ready:
                catalog.write_images(ready, [], known)
                waiting[:] = [w for w in waiting if w.content_hash not in known]
        with critical_section():
            if touches:
                catalog.touch_images(touches)
                touches.clear()

    try:
        for job, result in parallel_map(load, todo, workers, window=max(64, 4 * batch_size)):
            entry = job[0]
            if isinstance(result, BaseException):
                reason = reason_for(result)
                records.append(ImageRecord(path_key=entry.key, size=entry.size, mtime_ns=entry.mtime_ns, reason=reason))
                report.skipped += 1
                report.bad_files.append((entry.path, reason))
            elif result.action == "touch":
                touches.append((result.row_id, entry.size, entry.mtime_ns))
                report.touched += 1
            elif result.action == "reuse":
                (records if result.content_hash in known else waiting).append(record(result))
                report.reused += 1
            else:
                batch.append(result)
                if len(batch) >= batch_size:
                    flush(embed=True)
                    if max_batches is not None and batches_done >= max_batches:
                        raise KeyboardInterrupt
            if bar is not None:
                bar.update(1)
                bar.set_postfix(new=report.embedded + len(batch), reused=report.reused, bad=report.skipped, refresh=False)
            if len(records) >= 512:
                flush(embed=False)  # reuse/skip-only stretches still commit regularly
        flush(embed=True)
    except KeyboardInterrupt:
        report.interrupted = True
        with critical_section():  # a second Ctrl-C waits for this clean-up
            flush(embed=False)  # keep decided rows; the unembedded batch is redone next run
    finally:
        if bar is not None:
            bar.close()
    if not report.interrupted:
        report.missing, report.removed = catalog.mark_missing(gone)  # kept, hidden; moved files dropped
        if prune:
            missing = catalog.missing_ids(root_key)
            report.removed += catalog.delete_images(missing) if missing else 0  # and the vectors they alone used
        catalog.record_root(root_key, report.files)
    if todo:
        catalog.collect_garbage()
    store.sync_all()
    report.seconds = time.perf_counter() - t0
    return report


def _why_empty(root: str) -> str:
    """Why a folder showed no photos: 'unreadable' if it cannot be listed, else 'empty'."""
    try:
        with os.scandir(root) as entries:
            next(entries, None)
    except OSError:
        return "unreadable"
    return "empty"


def _offline(store: Store, report: IndexReport, why: str, row_ids: list[int], t0: float) -> IndexReport:
    """An indexed folder that is gone, empty or unreadable: its files are marked missing (hidden
    until it is back), nothing is dropped, and `--prune` is not applied to it."""
    report.offline = why
    report.missing, _ = store.catalog.mark_missing(row_ids, drop_moved=False)
    store.catalog.record_root(path_key_of(report.root), 0, offline=why)
    store.sync_all()
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class TextReport:
    source: str
    captions: int = 0
    embedded: int = 0
    reused: int = 0
    seconds: float = 0.0


@holds_writer_lock
def index_captions(
    store: Store,
    encoder: "Encoder",
    path: str | os.PathLike,
    column: str | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> TextReport:
    """Make the caption corpus `path` searchable (replacing what an earlier run took from it)."""
    t0 = time.perf_counter()
    captions = read_captions(path, column)
    if not captions:
        raise LoupeError(f"no captions found in {path}")
    store.bind(encoder)
    source = os.path.abspath(path)
    report = TextReport(source=source, captions=len(captions))
    known = store.catalog.hash_to_vector(TEXT)
    hashes = [content_hash(c.text.encode("utf-8")) for c in captions]
    todo: dict[str, str] = {}
    for c, h in zip(captions, hashes):
        if h not in known and h not in todo:
            todo[h] = c.text
    report.reused = len(captions) - len(todo)
    items = list(todo.items())
    new_vectors: list[tuple[str, np.ndarray]] = []
    bar = None
    if progress and items:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="captions", unit="text", dynamic_ncols=True)
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            vecs = encoder.encode_texts([t for _, t in chunk], batch_size=batch_size)
            new_vectors.extend((h, v) for (h, _), v in zip(chunk, vecs))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    report.embedded = len(new_vectors)
    rows = [(c.position, c.text, c.image, h) for c, h in zip(captions, hashes)]
    with critical_section():
        store.catalog.replace_captions(source, rows, new_vectors, known)
    store.sync_all()
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class RemoveReport:
    images: int = 0
    captions: int = 0


@holds_writer_lock
def remove_items(store: Store, paths: list[str | os.PathLike]) -> RemoveReport:
    """Forget files, whole folders, or caption corpus files, missing ones included (the files on
    disk are untouched)."""
    store.require_meta()
    catalog = store.catalog
    report = RemoveReport()
    row_ids: list[int] = []
    for p in paths:
        key = path_key_of(p)
        catalog.forget_roots(key)
        ids = [s.id for s in catalog.image_states(key).values()]  # a folder's files
        exact = catalog.image_id(key)  # or the file itself
        ids += [exact] if exact is not None else []
        removed_captions = catalog.delete_captions(os.path.abspath(p)) if not ids else 0
        if not ids and not removed_captions:
            raise LoupeError(f"nothing indexed at {os.path.abspath(p)}")
        row_ids.extend(ids)
        report.captions += removed_captions
    if row_ids:
        report.images = catalog.delete_images(row_ids)
    store.sync_all()
    return report
