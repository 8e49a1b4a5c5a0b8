"""The one runner loop of indexing, and the in-process executor.

`run_plan` drives the stages of `loupe.indexer.pipeline.stages` for a plan: it loads the model
only when something must be embedded, asks an executor to read+decode (running the per-photo
signals on the decoded pixels) and embed, admits the precision of the vectors before the first
is written, commits every chunk the executor hands back, shows progress, and handles Ctrl-C
and offline folders. Executors differ only in where read+decode and embed run:
`ThreadExecutor` (threads in this process, the model in this thread) and
`loupe.indexer.pipeline.ray_runner.RayExecutor` (a Ray cluster); the loop takes either, as
clip-retrieval's runner takes a distributor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from loupe.indexer.pipeline.parallel import parallel_map
from loupe.indexer.pipeline.stages import (
    Committer,
    Loaded,
    Plan,
    Reader,
    StageTimes,
    WorkUnit,
    embed_batch,
    finish_plan,
    reason_for,
    signal_units,
)
from loupe.indexer.signals.base import Signal, SignalResult, split_deferred
from loupe.indexer.storage.catalog import IMAGE, path_key_of
from loupe.indexer.storage.critical import critical_section
from loupe.indexer.storage.store import Store


@dataclass
class IndexReport:
    """What an indexing run did; printed by the CLI and checked by tests."""

    root: str
    files: int = 0
    unchanged: int = 0
    embedded: int = 0
    moments: int = 0  # of the videos embedded (each video counts once in `embedded`)
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
    model_seconds: float = 0.0  # loading the model, once the run knew it had files to embed (part of `seconds`)
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    runner: str = "in-process"  # or 'ray'
    stages: dict = field(default_factory=dict)  # {stage: {seconds, items, per_second}} (StageTimes.as_dict)
    signals: dict = field(default_factory=dict)  # {signal name: {"done": n, "failed": n}} of this run
    deferred: dict = field(default_factory=dict)  # {signal name: photos left} after the deferred pass (0: complete)
    deferred_seconds: float = 0.0  # wall time of the deferred pass (the rest of `seconds` is the embedding pass)
    unavailable: dict = field(default_factory=dict)  # {signal name: why it cannot run here}: skipped, nothing recorded
    signal_errors: list[tuple[str, str, str]] = field(default_factory=list)  # (path, signal, reason)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Precision:
    """The arithmetic that made a chunk's vectors, as `Store.admit_precision` reads it off an encoder."""

    image_precision: str
    image_cosine: float
    image_bound: float
    fidelity_seconds: float = field(default=0.0, compare=False)

    @classmethod
    def of(cls, encoder) -> "Precision":
        return cls(encoder.image_precision, encoder.image_cosine, encoder.image_bound, encoder.fidelity_seconds)


@dataclass
class Chunk:
    """What an executor hands the loop: read units in plan order ('failed' ones with their
    reason), and the vectors of the 'embed' ones, in order, with the precision that made them."""

    items: list[Loaded]
    vectors: np.ndarray | None = None
    precision: Precision | None = None


class Executor(Protocol):
    """Runs read+decode (with signals) and embed over work units; yields chunks as they finish."""

    name: str

    def run(
        self, units: Sequence[WorkUnit], encoder, known: dict[str, int], signals: Sequence[Signal], batch_size: int, times: StageTimes
    ) -> Iterator[Chunk]: ...


VIDEO_BATCH = 8  # moments per model batch: small, so decoding the next scenes overlaps embedding these


class ThreadExecutor:
    """read+decode in a pool of threads, embed in the calling thread."""

    name = "in-process"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers

    def run(self, units, encoder, known, signals, batch_size, times) -> Iterator[Chunk]:
        reader = Reader(known, getattr(encoder, "image_size", 0), getattr(encoder, "preprocess", None), times, signals)
        batch: list[Loaded] = []
        for unit, result in parallel_map(reader, units, self.workers, window=max(64, 4 * batch_size)):
            if isinstance(result, BaseException):
                result = Loaded(unit, "failed", "", reason=reason_for(result))
            if result.action == "video":
                yield self._video(encoder, result, min(batch_size, VIDEO_BATCH), times)
                continue
            if result.action != "embed":
                yield Chunk([result])
                continue
            batch.append(result)
            if len(batch) >= batch_size:
                yield self._embed(encoder, batch, times)
                batch = []
        if batch:
            yield self._embed(encoder, batch, times)

    @staticmethod
    def _video(encoder, item: Loaded, batch_size: int, times: StageTimes) -> Chunk:
        """Embed a video's moments as its decoding thread hands them over (decoding overlaps the
        model); one chunk with all its vectors, or a failed item (nothing of it is kept)."""
        vectors, infos, pending = [], [], []
        try:
            for tensor, info in item.tensor:
                pending.append(tensor)
                infos.append(info)
                if len(pending) >= batch_size:
                    vectors.append(embed_batch(encoder, pending, times))
                    pending = []
            if pending:
                vectors.append(embed_batch(encoder, pending, times))
        except Exception as exc:  # noqa: BLE001 - a bad video is a skip with its reason
            return Chunk([Loaded(item.unit, "failed", item.content_hash, reason=reason_for(exc))])
        finally:
            item.tensor = None
        item.moments = infos
        dim = getattr(encoder, "dim", 0)
        return Chunk([item], np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32), Precision.of(encoder))

    @staticmethod
    def _embed(encoder, batch: list[Loaded], times: StageTimes) -> Chunk:
        vectors = embed_batch(encoder, [b.tensor for b in batch], times)
        for b in batch:
            b.tensor = None  # from here these rows travel only with their vectors: committed, or redone next run
        return Chunk(batch, vectors, Precision.of(encoder))


def start_report(store: Store, plan: Plan, report: IndexReport) -> None:
    """Copy the plan's counts into the report and restore missing files found again unchanged."""
    report.files, report.unchanged, report.skipped = plan.files, plan.unchanged, plan.unchanged_skipped
    report.ignored, report.walk_errors = plan.ignored, plan.walk_errors + len(plan.not_found)
    report.bad_files.extend((p, "file not found") for p in plan.not_found)
    if plan.found_again:
        report.restored = len(plan.found_again)
        report.skipped += report.restored - store.catalog.restore_images(plan.found_again)


def end_report(store: Store, plan: Plan, report: IndexReport, times: StageTimes, t0: float, prune: bool = False) -> IndexReport:
    """The end of every run: unseen files marked missing (unless interrupted), vector files synced."""
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


def offline(store: Store, report: IndexReport, why: str, row_ids: list[int], t0: float) -> IndexReport:
    """An indexed folder that is gone, empty or unreadable: its files are marked missing (hidden
    until it is back), nothing is dropped, and `--prune` is not applied to it."""
    report.offline = why
    report.missing, _ = store.catalog.mark_missing(row_ids, drop_moved=False)
    store.catalog.record_root(path_key_of(report.root), 0, offline=why)
    store.sync_all()
    report.seconds = time.perf_counter() - t0
    return report


def run_plan(
    store: Store,
    encoder: "Encoder | Callable[[], Encoder]",
    plan: Plan,
    report: IndexReport,
    times: StageTimes,
    t0: float,
    executor: Executor | None = None,
    batch_size: int = 32,
    progress: bool = False,
    max_batches: int | None = None,
    prune: bool = False,
    signals: Sequence[Signal] | None = None,
) -> IndexReport:
    """Run `plan` with `executor` (default: threads in this process) and commit what it makes.

    `encoder` may be a function that loads it, given the number of files to embed: called only if
    some file needs embedding. Every
    registered signal (or `signals`) runs on each photo decoded for embedding, and, decode only,
    on indexed photos that lack it at its current version. `max_batches` stops after that many
    embedded chunks as if interrupted (tests).
    """
    from loupe.indexer.signals.registry import registered

    executor = executor or ThreadExecutor()
    report.runner = executor.name
    if plan.offline:
        return offline(store, report, plan.offline, plan.gone, t0)
    start_report(store, plan, report)
    report.scan_seconds = time.perf_counter() - t0
    signals, deferred = split_deferred(registered() if signals is None else signals)
    backlog = signal_units(store.catalog, plan, signals)
    if callable(encoder) and (plan.todo or store.meta() is None):
        started = time.perf_counter()
        encoder = encoder(len(plan.todo))  # how many files it will embed: the factory may choose by it
        report.model_seconds = time.perf_counter() - started
        store.bind(encoder)
    units = plan.todo + backlog
    if not units:
        deferred_pass(store, plan, report, executor, deferred, batch_size, progress, times)
        return end_report(store, plan, report, times, t0, prune)

    known = store.catalog.hash_to_vector(IMAGE)
    commit = Committer(store.catalog, known, report, times)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(units), desc=f"indexing ({executor.name})", unit="img", dynamic_ncols=True, smoothing=0.1)
    admitted: set[Precision] = set()  # precisions checked against the index's (before any of their vectors is written)
    batches_done = 0
    chunks = executor.run(units, encoder, known, signals, batch_size, times)
    try:
        for chunk in chunks:
            embedded = []
            videos = []
            for item in chunk.items:
                if item.signals:
                    commit.signals(item.unit, item.signals)
                if item.action == "failed":
                    commit.failed(item.unit, item.reason)
                elif item.action == "touch":
                    commit.touched(item.unit)
                elif item.action == "reuse":
                    commit.reused(item.unit, item.content_hash, item.info)
                elif item.action == "embed":
                    embedded.append((item.unit, item.content_hash, item.info))
                elif item.action == "video":
                    videos.append(item)
            if (embedded or videos) and chunk.precision not in admitted and len(chunk.vectors):
                store.admit_precision(chunk.precision)
                admitted.add(chunk.precision)
                report.precision = chunk.precision.image_precision
                report.precision_check_seconds = chunk.precision.fidelity_seconds
            if embedded:
                with critical_section():
                    commit.embedded(embedded, chunk.vectors)
                    batches_done += 1
            for item in videos:  # a video is committed with all its moments, or not at all
                with critical_section():
                    commit.video(item.unit, item.content_hash, item.info, item.moments, chunk.vectors)
                    batches_done += 1
                embedded.append(item)
            if not embedded and commit.pending >= 512:
                commit.flush()  # reuse/skip-only stretches still commit regularly
            if bar is not None:
                bar.update(len(chunk.items))
                bar.set_postfix(new=report.embedded, reused=report.reused, bad=report.skipped, refresh=False)
            if max_batches is not None and embedded and batches_done >= max_batches:
                raise KeyboardInterrupt
        commit.flush()
    except KeyboardInterrupt:
        report.interrupted = True
        with critical_section():  # a second Ctrl-C waits for this clean-up
            commit.flush()  # keep decided rows; an unembedded batch is redone next run
    finally:
        if bar is not None:
            bar.close()
        chunks.close()
    if not report.interrupted:
        deferred_pass(store, plan, report, executor, deferred, batch_size, progress, times)
    return end_report(store, plan, report, times, t0, prune)


def deferred_pass(
    store: Store, plan: Plan, report: IndexReport, executor: Executor, deferred: Sequence[Signal],
    batch_size: int, progress: bool, times: StageTimes,
) -> None:
    """The second pass of a run: deferred signals (OCR) over every indexed photo that lacks them,
    after the embeddings, so search works at once and the signal fills in. Each photo decodes at
    the signal's own `min_side`; outcomes are committed every `batch_size` photos, so a Ctrl-C
    (or a crash) loses at most that many, and the next `loupe index` resumes where it stopped. A
    photo the pass cannot read keeps its vector: the signal's failure is recorded and reported."""
    if not deferred or report.interrupted:
        return
    for sig in deferred:
        why = sig.unavailable()
        if why:
            report.unavailable[sig.name] = why
    deferred = [s for s in deferred if s.name not in report.unavailable]
    if not deferred:
        return
    started = time.perf_counter()
    units = signal_units(store.catalog, plan, deferred)
    report.deferred = {s.name: 0 for s in deferred}
    if not units:
        return
    commit = Committer(store.catalog, {}, report, times)
    bar = None
    if progress:
        from tqdm import tqdm

        names = ", ".join(s.name for s in deferred)
        bar = tqdm(total=len(units), desc=f"{names} (search works meanwhile)", unit="img", dynamic_ncols=True, smoothing=0.1)
    left = {s.name: 0 for s in deferred}
    for u in units:
        for name in u.signals:
            left[name] = left.get(name, 0) + 1
    chunks = executor.run(units, None, {}, deferred, batch_size, times)
    try:
        for chunk in chunks:
            for item in chunk.items:
                results = item.signals
                if item.action == "failed":  # unreadable now: the photo keeps its vector, the signal records why
                    results = [SignalResult(item.unit.old_hash, name, _version(deferred, name), reason=item.reason) for name in item.unit.signals]
                if results:
                    commit.signals(item.unit, results)
                    for r in results:
                        left[r.name] -= 1
            if commit.pending >= batch_size:
                commit.flush()
            if bar is not None:
                bar.update(len(chunk.items))
        commit.flush()
    except KeyboardInterrupt:
        report.interrupted = True
        with critical_section():
            commit.flush()  # keep what was read; the rest is read by the next run
    finally:
        if bar is not None:
            bar.close()
        chunks.close()
        report.deferred = left
        report.deferred_seconds = time.perf_counter() - started


def _version(signals: Sequence[Signal], name: str) -> int:
    return next(s.version for s in signals if s.name == name)
