"""Indexing jobs: the in-process runner of the stages in `loupe.indexer.pipeline.stages` (plan -> read+decode
-> embed -> commit), plus caption corpora and removals.

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

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from loupe.indexer.pipeline.batching import parallel_map, reason_for
from loupe.indexer.storage.catalog import IMAGE, TEXT, path_key_of
from loupe.indexer.storage.critical import critical_section
from loupe.indexer.errors import LoupeError
from loupe.indexer.storage.locking import holds_writer_lock
from loupe.indexer.pipeline.sources import read_captions
from loupe.indexer.pipeline.stages import (  # noqa: F401  (content_hash is imported from here by loupe.retrieval.engine.search)
    Committer,
    Loaded,
    Plan,
    Reader,
    StageTimes,
    content_hash,
    embed_batch,
    finish_plan,
    plan_files,
    plan_folder,
    read_file_list,
)
from loupe.indexer.storage.store import Store


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
    runner: str = "in-process"  # or 'ray'
    stages: dict = field(default_factory=dict)  # {stage: {seconds, items, per_second}} (StageTimes.as_dict)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0


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
    t0 = time.perf_counter()
    report, make_plan = source_plan(store, root)
    return _plan_and_run(
        store, encoder, make_plan, report, t0,
        batch_size=batch_size, workers=workers, progress=progress, max_batches=max_batches, prune=prune,
    )


@holds_writer_lock
def index_files(
    store: Store,
    encoder: "Encoder | Callable[[], Encoder]",
    file_list: str | os.PathLike,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = False,
    max_batches: int | None = None,
) -> IndexReport:
    """Index the files named in `file_list` (text, one path a line, or parquet with a `path`
    column): the same stages as a folder, with a file list as the source. Listed files that do
    not exist are reported (and marked missing if catalogued); nothing unlisted is touched."""
    t0 = time.perf_counter()
    report, make_plan = source_plan(store, file_list, files=True)
    return _plan_and_run(
        store, encoder, make_plan, report, t0, batch_size=batch_size, workers=workers, progress=progress, max_batches=max_batches
    )


def source_plan(store: Store, source: str | os.PathLike, files: bool = False) -> tuple[IndexReport, Callable[[], Plan]]:
    """The report of a run over `source` and its plan stage (not run yet): a folder, checked here
    (gone is fine when it holds indexed photos: they are marked missing), or a file list."""
    if files:
        return IndexReport(root=os.path.abspath(source)), lambda: plan_files(store.catalog, read_file_list(source))
    root_abs = os.path.abspath(Path(source).expanduser())
    if not os.path.isdir(root_abs) and not store.catalog.has_images(path_key_of(root_abs)):
        raise LoupeError(f"not a folder: {source}")
    return IndexReport(root=root_abs), lambda: plan_folder(store.catalog, root_abs, exclude=store.location.own_paths())


def timed_plan(make_plan: Callable[[], Plan]) -> tuple[Plan, StageTimes]:
    """Run a plan stage, timed as the report's first stage."""
    times = StageTimes()
    with times.timed("plan"):
        plan = make_plan()
    times.items["plan"] = plan.files
    return plan, times


def _plan_and_run(
    store: Store, encoder: "Encoder | Callable[[], Encoder]", make_plan: Callable[[], Plan], report: IndexReport, t0: float,
    **run_args,
) -> IndexReport:
    """What every source shares once its arguments are checked: bind a loaded model, plan (timed),
    and run the plan in this process (`run_args`: `run_plan`'s options)."""
    if not callable(encoder):
        store.bind(encoder)
    plan, times = timed_plan(make_plan)
    return run_plan(store, encoder, plan, report, times, t0, **run_args)


def start_report(store: Store, plan: Plan, report: IndexReport) -> None:
    """Copy the plan's counts into the report and restore missing files found again unchanged."""
    report.files, report.unchanged, report.skipped = plan.files, plan.unchanged, plan.unchanged_skipped
    report.ignored, report.walk_errors = plan.ignored, plan.walk_errors + len(plan.not_found)
    report.bad_files.extend((p, "file not found") for p in plan.not_found)
    if plan.found_again:
        report.restored = len(plan.found_again)
        report.skipped += report.restored - store.catalog.restore_images(plan.found_again)


def end_report(store: Store, plan: Plan, report: IndexReport, times: StageTimes, t0: float, prune: bool = False) -> IndexReport:
    """The end of every runner's job: unseen files marked missing (unless interrupted), vector files synced."""
    if not report.interrupted:
        finish_plan(store.catalog, plan, report, prune)
    if plan.todo:
        store.catalog.collect_garbage()
    with times.timed("sync"):
        store.sync_all()
    report.stages = times.as_dict()
    report.encode_seconds = times.seconds.get("embed", 0.0)
    report.seconds = time.perf_counter() - t0
    return report


def run_plan(
    store: Store,
    encoder: "Encoder | Callable[[], Encoder]",
    plan: Plan,
    report: IndexReport,
    times: StageTimes,
    t0: float,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = False,
    max_batches: int | None = None,
    prune: bool = False,
) -> IndexReport:
    """The in-process runner: read+decode in threads, embed and commit in this thread."""
    catalog = store.catalog
    if plan.offline:
        return _offline(store, report, plan.offline, plan.gone, t0)
    start_report(store, plan, report)
    report.scan_seconds = time.perf_counter() - t0
    if callable(encoder) and (plan.todo or store.meta() is None):
        encoder = encoder()
        store.bind(encoder)

    known = catalog.hash_to_vector(IMAGE) if plan.todo else {}
    reader = Reader(known, getattr(encoder, "image_size", 0), getattr(encoder, "preprocess", None), times)
    commit = Committer(catalog, known, report, times)
    bar = None
    if progress and plan.todo:
        from tqdm import tqdm

        bar = tqdm(total=len(plan.todo), desc="indexing", unit="img", dynamic_ncols=True, smoothing=0.1)
    batch: list[Loaded] = []
    batches_done = 0
    admitted = False  # whether this run's image precision was checked against the index's

    def embed_and_commit() -> None:
        nonlocal batches_done, admitted
        vecs = embed_batch(encoder, [b.tensor for b in batch], times)
        if not admitted:  # the first batch fixed the precision: refused before any vector is written
            store.admit_precision(encoder)
            admitted = True
            report.precision, report.precision_check_seconds = encoder.image_precision, encoder.fidelity_seconds
        items = [(b.unit, b.content_hash, b.info) for b in batch]
        batch.clear()  # from here these rows travel only with their vectors: committed, or redone next run
        with critical_section():
            commit.embedded(items, vecs)
            batches_done += 1

    try:
        for unit, result in parallel_map(reader, plan.todo, workers, window=max(64, 4 * batch_size)):
            if isinstance(result, BaseException):
                commit.failed(unit, reason_for(result))
            elif result.action == "touch":
                commit.touched(unit)
            elif result.action == "reuse":
                commit.reused(unit, result.content_hash, result.info)
            else:
                batch.append(result)
                if len(batch) >= batch_size:
                    embed_and_commit()
                    if max_batches is not None and batches_done >= max_batches:
                        raise KeyboardInterrupt
            if bar is not None:
                bar.update(1)
                bar.set_postfix(new=report.embedded + len(batch), reused=report.reused, bad=report.skipped, refresh=False)
            if commit.pending >= 512:
                commit.flush()  # reuse/skip-only stretches still commit regularly
        if batch:
            embed_and_commit()
        commit.flush()
    except KeyboardInterrupt:
        report.interrupted = True
        with critical_section():  # a second Ctrl-C waits for this clean-up
            commit.flush()  # keep decided rows; the unembedded batch is redone next run
    finally:
        if bar is not None:
            bar.close()
    return end_report(store, plan, report, times, t0, prune)


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
