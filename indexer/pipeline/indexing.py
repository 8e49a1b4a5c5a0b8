"""Indexing photos: `loupe index` over a folder or a file list, run in this process.

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
from pathlib import Path
from typing import Callable, Sequence, TypedDict, Unpack

from loupe.indexer.errors import LoupeError
from loupe.indexer.pipeline.runner import IndexReport, ThreadExecutor, run_plan
from loupe.indexer.pipeline.stages import Plan, StageTimes, plan_files, plan_folder, read_file_list
from loupe.indexer.signals.base import Signal
from loupe.indexer.storage.catalog import path_key_of
from loupe.indexer.storage.locking import holds_writer_lock
from loupe.indexer.storage.store import Store


class RunOptions(TypedDict, total=False):
    """What indexing in this process takes besides its source; left out, `run_plan`'s defaults."""

    batch_size: int  # items per model batch
    workers: int | None  # decode threads (default: one per core)
    progress: bool
    max_batches: int | None  # stop after that many model batches as if interrupted (tests)
    signals: Sequence[Signal] | None  # the per-photo signals to run (default: the registered ones)


@holds_writer_lock
def index_folder(
    store: Store,
    encoder: "Encoder | Callable[[], Encoder]",
    root: str | os.PathLike,
    *,
    prune: bool = False,
    video: bool = True,
    **options: Unpack[RunOptions],
) -> IndexReport:
    """Bring the catalog and vector index in line with the images (and, with `video`, the videos) under `root`.

    Files not found are marked missing, not dropped (see the module docstring); `prune` forgets
    the missing files under `root` and the vectors only they used, unless `root` is offline.
    `max_batches` stops after that many model batches as if interrupted (used by tests to
    prove that a resumed run ends where an uninterrupted one does). `encoder` may be a function
    that loads it: it is then called only if some file needs embedding, so a re-scan that
    finds nothing new costs no model load.
    """
    t0 = time.perf_counter()
    report, make_plan = source_plan(store, root, video=video)
    return _plan_and_run(store, encoder, make_plan, report, t0, prune=prune, **options)


@holds_writer_lock
def index_files(
    store: Store, encoder: "Encoder | Callable[[], Encoder]", file_list: str | os.PathLike, **options: Unpack[RunOptions]
) -> IndexReport:
    """Index the files named in `file_list` (text, one path a line, or parquet with a `path`
    column): the same stages as a folder, with a file list as the source. Listed files that do
    not exist are reported (and marked missing if catalogued); nothing unlisted is touched."""
    t0 = time.perf_counter()
    report, make_plan = source_plan(store, file_list, files=True)
    return _plan_and_run(store, encoder, make_plan, report, t0, **options)


def source_plan(
    store: Store, source: str | os.PathLike, files: bool = False, video: bool = True
) -> tuple[IndexReport, Callable[[], Plan]]:
    """The report of a run over `source` and its plan stage (not run yet): a folder, checked here
    (gone is fine when it holds indexed photos: they are marked missing), or a file list."""
    if files:
        return IndexReport(root=os.path.abspath(source)), lambda: plan_files(store.catalog, read_file_list(source))
    root_abs = os.path.abspath(Path(source).expanduser())
    if not os.path.isdir(root_abs) and not store.catalog.has_images(path_key_of(root_abs)):
        raise LoupeError(f"not a folder: {source}")
    return IndexReport(root=root_abs), lambda: plan_folder(store.catalog, root_abs, exclude=store.location.own_paths(), video=video)


def timed_plan(make_plan: Callable[[], Plan]) -> tuple[Plan, StageTimes]:
    """Run a plan stage, timed as the report's first stage."""
    times = StageTimes()
    with times.timed("plan"):
        plan = make_plan()
    times.items["plan"] = plan.files
    return plan, times


def _plan_and_run(
    store: Store, encoder: "Encoder | Callable[[], Encoder]", make_plan: Callable[[], Plan], report: IndexReport, t0: float,
    workers: int | None = None, **run_args,
) -> IndexReport:
    """What every source shares once its arguments are checked: bind a loaded model, plan (timed),
    and run the plan with threads in this process (`run_args`: `run_plan`'s options)."""
    if not callable(encoder):
        store.bind(encoder)
    plan, times = timed_plan(make_plan)
    return run_plan(store, encoder, plan, report, times, t0, executor=ThreadExecutor(workers), **run_args)
