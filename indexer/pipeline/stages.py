"""The indexing pipeline as small units that every runner composes: plan -> read+decode (+ signals) -> embed -> commit.

- plan (`plan_folder`, `plan_files`, `signal_units`): which files need work, from a walk (or a
  file list) and one catalog query; stat-only, nothing is opened.
- read+decode (`Reader` for indexing, `decode_paths` for eval/train): read the bytes, hash them,
  decide touch / reuse / embed against the catalog's known hashes, decode what must be embedded
  with its media kind's decoder (`loupe.indexer.pipeline.media`), and run the per-photo signals
  (`loupe.indexer.signals`) on the decoded picture, before the model's preprocess.
- embed (`embed_batch`, `embed_stream`): stack preprocessed images and run the model.
- commit (`Committer`): the catalog write, a batch's rows together with their vectors, in a
  critical section; the only unit that writes.

One loop drives them (`loupe.indexer.pipeline.runner.run_plan`); an executor runs read+decode and
embed, in this process (threads) or on Ray (`loupe.indexer.pipeline.ray_runner`). Each unit
records its seconds and item counts in a `StageTimes`, which the JSON report carries as `stages`.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from loupe.indexer.errors import LoupeError
from loupe.indexer.pipeline.imageio import BadImage, decode_image, probe_image
from loupe.indexer.pipeline.media import kind_of
from loupe.indexer.pipeline.parallel import parallel_map, reason_for
from loupe.indexer.pipeline.sources import FileEntry, WalkStats, walk_images
from loupe.indexer.signals.base import Signal, SignalResult, SourceFile, run_signals
from loupe.indexer.storage.catalog import IMAGE, MISSING, Catalog, ImageRecord, ImageState, path_key_of
from loupe.indexer.storage.critical import critical_section


def content_hash(data: bytes) -> str:
    """Identity of a file's content (BLAKE2b-128, hex): equal bytes, equal vector."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# ---- timings ------------------------------------------------------------------------------


class StageTimes:
    """Seconds and item counts per stage (thread-safe). Parallel stages (read, decode) add up
    their workers' time, so their seconds can exceed the run's wall time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.items: dict[str, int] = {}

    def add(self, stage: str, seconds: float, items: int = 0) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            self.items[stage] = self.items.get(stage, 0) + items

    @contextmanager
    def timed(self, stage: str, items: int = 0):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t, items)

    def as_dict(self) -> dict[str, dict[str, float | int]]:
        """{stage: {"seconds": s, "items": n, "per_second": n/s}}, in pipeline order."""
        order = ["plan", "read", "decode", "signals", "embed", "commit"]
        names = sorted(self.seconds, key=lambda s: (order.index(s) if s in order else len(order), s))
        out = {}
        for name in names:
            s, n = self.seconds[name], self.items.get(name, 0)
            out[name] = {"seconds": round(s, 4), "items": n, "per_second": round(n / s, 1) if s > 0 else 0.0}
        return out


# ---- plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkUnit:
    """A file that must be read: new, changed, or left without vector by an interrupted run.

    Idempotent: redoing a unit (a retried task, a re-run) writes the same row, keyed by path,
    with the vector keyed by content hash.
    """

    path: str
    size: int
    mtime_ns: int
    row_id: int | None = None
    old_hash: str | None = None
    old_ok: bool = False
    signals: tuple[str, ...] = ()  # set: a signals-only unit (content `old_hash` lacks these signals; no embedding)

    @property
    def key(self) -> bytes:
        return os.fsencode(self.path)


@dataclass
class Plan:
    """What the plan stage found: work units, and the catalog rows the walk did or did not see."""

    todo: list[WorkUnit] = field(default_factory=list)
    files: int = 0
    unchanged: int = 0
    unchanged_skipped: int = 0  # unchanged files that are catalogued as skipped (bad files)
    found_again: list[int] = field(default_factory=list)  # missing rows found again unchanged
    gone: list[int] = field(default_factory=list)  # rows under the root that the walk did not see
    offline: str | None = None  # 'missing' | 'empty' | 'unreadable'
    ignored: int = 0
    walk_errors: int = 0
    not_found: list[str] = field(default_factory=list)  # listed files that do not exist (file lists)
    root_key: bytes | None = None  # None for a file list: no folder is recorded, nothing marked gone
    listed: set[bytes] = field(default_factory=set)  # a file list's existing files (path keys)


def _unit(entry: FileEntry, state: ImageState | None) -> WorkUnit:
    if state is None:
        return WorkUnit(entry.path, entry.size, entry.mtime_ns)
    return WorkUnit(entry.path, entry.size, entry.mtime_ns, state.id, state.content_hash, state.status == "ok")


def _compare(plan: Plan, entries: Iterable[FileEntry], states: dict[bytes, ImageState]) -> None:
    """Split walked files into unchanged (same size and mtime) and work units; pops seen states."""
    for entry in entries:
        plan.files += 1
        state = states.pop(entry.key, None)
        same = state is not None and state.size == entry.size and state.mtime_ns == entry.mtime_ns
        if same and not state.needs_work:  # a row left without vector by an old interrupted run is redone
            plan.unchanged += 1
            if state.status == MISSING:
                plan.found_again.append(state.id)
            elif state.status != "ok":
                plan.unchanged_skipped += 1
            continue
        plan.todo.append(_unit(entry, state))


def plan_folder(catalog: Catalog, root: str, exclude: list | None = None, video: bool = True) -> Plan:
    """Walk `root` (stat only) and compare with the catalog: one query, one pass. Without `video`
    the walk lists no videos, and the videos catalogued under `root` are left as they are."""
    root_abs = os.path.abspath(root)
    plan = Plan(root_key=path_key_of(root_abs))
    if not os.path.isdir(root_abs):
        plan.offline = "missing"
        plan.gone = [s.id for s in catalog.image_states(plan.root_key).values()]
        return plan
    states = catalog.image_states(plan.root_key)
    kinds = None
    if not video:
        from loupe.indexer.pipeline.media import PHOTOS, is_video

        kinds = frozenset({PHOTOS.name})
        states = {k: v for k, v in states.items() if not is_video(os.fsdecode(k))}
    stats = WalkStats()
    _compare(plan, walk_images(root_abs, exclude=exclude, stats=stats, kinds=kinds), states)
    plan.gone = [s.id for s in states.values()]
    plan.ignored, plan.walk_errors = stats.ignored, stats.errors
    if plan.files == 0 and states:  # photos were indexed here: an unplugged drive's mount point
        plan.offline = _why_empty(root_abs)
    return plan


def _why_empty(root: str) -> str:
    """Why a folder showed no photos: 'unreadable' if it cannot be listed, else 'empty'."""
    try:
        with os.scandir(root) as entries:
            next(entries, None)
    except OSError:
        return "unreadable"
    return "empty"


def read_file_list(path: str | os.PathLike) -> list[str]:
    """Paths from a text file (one per line, '#' comments) or a parquet file with a `path` column.

    Relative paths are taken relative to the list's folder, so a list travels with its photos.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise LoupeError(f"file list not found: {p}")
    if p.lower().endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise LoupeError("reading a parquet file list needs pyarrow: pip install pyarrow") from None
        try:
            table = pq.read_table(p, columns=["path"])
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise LoupeError(f"{p}: cannot read a 'path' column ({str(exc).splitlines()[0][:200]})") from None
        raw = [str(x) for x in table.column("path").to_pylist() if x]
    else:
        try:
            with open(p, encoding="utf-8") as f:
                raw = [s.strip() for s in f if s.strip() and not s.lstrip().startswith("#")]
        except UnicodeDecodeError as exc:
            raise LoupeError(f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    base = os.path.dirname(os.path.abspath(p))
    seen: dict[str, None] = {}
    for s in raw:
        seen.setdefault(os.path.abspath(os.path.join(base, os.path.expanduser(s))), None)
    return list(seen)


def plan_files(catalog: Catalog, paths: Sequence[str]) -> Plan:
    """The plan for an explicit list of files: stat each; files not found are reported (and a
    catalogued one is marked missing, as a walk would); nothing else in the catalog is touched."""
    plan = Plan()
    if not paths:
        return plan
    prefix = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    states = catalog.image_states(path_key_of(prefix))
    listed: dict[bytes, ImageState] = {}
    entries: list[FileEntry] = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            st = None
        key = os.fsencode(p)
        if st is None or not os.path.isfile(p):
            plan.not_found.append(p)
            if key in states:
                plan.gone.append(states[key].id)
            continue
        if key in states:
            listed[key] = states[key]
        entries.append(FileEntry(p, st.st_size, st.st_mtime_ns))
    _compare(plan, entries, listed)
    plan.listed = set(listed) | {e.key for e in entries}
    return plan


def signal_units(catalog: Catalog, plan: Plan, signals: Sequence[Signal]) -> list[WorkUnit]:
    """The signals-only work of a run: one unit per indexed content (in the plan's folder, or
    among its listed files) that lacks a signal at its current version."""
    if not signals or plan.offline:
        return []
    versions = {s.name: s.version for s in signals}
    scope = plan.root_key
    if scope is None:
        if not plan.listed:
            return []
        keys = sorted(plan.listed)
        scope = path_key_of(os.path.commonpath([os.fsdecode(k) for k in keys]) if len(keys) > 1 else os.path.dirname(os.fsdecode(keys[0])))
    backlog = catalog.signal_backlog(versions, scope)
    if plan.root_key is None:
        backlog = [b for b in backlog if b[1] in plan.listed]
    return [WorkUnit(os.fsdecode(key), 0, 0, old_hash=h, old_ok=True, signals=names) for h, key, names in backlog]


# ---- read + decode -------------------------------------------------------------------------


@dataclass
class Loaded:
    """A read work unit: what the catalog must do with it, its content hash, (for 'embed') the
    preprocessed image, and the outcomes of the signals run on its pixels.

    Actions: 'embed', 'reuse', 'touch'; 'video' (`tensor` is the lazy stream of its moments, and
    once embedded `moments` their times); 'signals' (a signals-only unit); 'stale' (a signals-only
    unit whose file changed since: its own unit handles it); 'failed' (`reason` says why).
    """

    unit: WorkUnit
    action: str
    content_hash: str
    tensor: object = None
    info: object = None  # anything with width, height, taken_at (imageio.ImageInfo)
    signals: list[SignalResult] = field(default_factory=list)
    reason: str | None = None
    moments: list = field(default_factory=list)  # a video's MomentInfo, in the order of its vectors


class Reader:
    """Read a unit's bytes, hash them and decide: touch (same content), reuse (a vector for this
    content exists or is being made in this process), or embed (decoded and preprocessed here,
    with every signal run on the decoded picture). A signals-only unit is decoded for its
    signals alone, at the size they need."""

    def __init__(
        self, known: "Iterable[str] | dict", image_size: int, preprocess: Callable | None, times: StageTimes | None = None,
        signals: Sequence[Signal] = (),
    ) -> None:
        self.known = known  # content hashes with a vector (a dict the committer keeps current, or a set)
        self.in_flight: set[str] = set()  # hashes being embedded in this run: their copies wait
        self.image_size = image_size
        self.preprocess = preprocess
        self.times = times or StageTimes()
        self.signals = tuple(signals)

    def __call__(self, unit: WorkUnit) -> Loaded:
        kind = kind_of(unit.path)
        if kind.stream is not None and not unit.signals:
            return self._video(unit, kind)
        with self.times.timed("read", 1):
            with open(unit.path, "rb") as f:
                data = f.read()
            h = content_hash(data)
        if unit.signals:
            return self._signals_only(unit, data, h)
        if unit.old_hash == h and unit.old_ok:
            return Loaded(unit, "touch", h)
        if h in self.known or h in self.in_flight:
            return Loaded(unit, "reuse", h, info=probe_image(data))
        self.in_flight.add(h)
        with self.times.timed("decode", 1):
            tensor, info, results = self._decode(unit.path, data, h, self.signals, self.image_size, self.preprocess)
        return Loaded(unit, "embed", h, tensor=tensor, info=info, signals=results)

    def _video(self, unit: WorkUnit, kind) -> Loaded:
        """A file of many items (a video): hashed as a stream; to embed, a lazy stream of its
        moments (decoded in a thread of its own as the executor consumes it, see
        `loupe.indexer.pipeline.moments`): action 'video'."""
        from loupe.indexer.pipeline.moments import file_hash

        with self.times.timed("read", 1):
            h = file_hash(unit.path)
        if unit.old_hash == h and unit.old_ok:
            return Loaded(unit, "touch", h)
        if h in self.known or h in self.in_flight:
            return Loaded(unit, "reuse", h, info=kind.probe(unit.path))
        with self.times.timed("decode"):
            info = kind.probe(unit.path)  # a file that cannot even be opened fails here, before any model work
        self.in_flight.add(h)
        stream = kind.stream(unit.path, self.image_size, self.preprocess, None)
        return Loaded(unit, "video", h, tensor=stream, info=info)

    def _signals_only(self, unit: WorkUnit, data: bytes, h: str) -> Loaded:
        if h != unit.old_hash:
            return Loaded(unit, "stale", h)
        todo = [s for s in self.signals if s.name in unit.signals]
        side = max((s.min_side for s in todo), default=0)
        with self.times.timed("decode", 1):
            _, _, results = self._decode(unit.path, data, h, todo, side, None, draft_factor=1.0)
        return Loaded(unit, "signals", h, signals=results)

    def _decode(self, path: str, data: bytes, h: str, signals, size: int, preprocess, draft_factor: float | None = None):
        """Decode with the file's media kind; signals see the RGB picture before `preprocess`."""
        results: list[SignalResult] = []

        def transform(rgb):
            if signals:
                with self.times.timed("signals", 1):
                    results.extend(run_signals(signals, rgb, SourceFile(path, data, h)))
            return preprocess(rgb) if preprocess is not None else None

        kind = kind_of(path)
        extra = {} if draft_factor is None else {"draft_factor": draft_factor}
        items = kind.decode(data, size, transform, **extra)
        if len(items) != 1:  # the catalog keeps one vector per file
            raise BadImage(f"{len(items)} items in one {kind.name} file")
        tensor, info = items[0]
        return tensor, info, results


def decode_paths(
    paths: Sequence, image_size: int, preprocess: Callable | None, workers: int | None = None, window: int = 256,
    times: StageTimes | None = None, reference: bool = False,
) -> Iterator[tuple[int, object]]:
    """Decode and preprocess files in threads: yields (index, tensor or the exception), in order.

    The read+decode unit of `loupe eval` and `loupe train` (indexing uses `Reader`, which also hashes);
    `reference`: the reference pipeline's pixels (`decode_image`'s reference mode).
    """
    times = times or StageTimes()

    def load(i: int):
        with times.timed("decode", 1):
            return decode_image(paths[i], image_size, preprocess, reference=reference)[0]

    yield from parallel_map(load, range(len(paths)), workers, window=window)


# ---- embed ---------------------------------------------------------------------------------


def embed_batch(encoder: "Encoder", tensors: Sequence, times: StageTimes | None = None) -> np.ndarray:
    """Embed preprocessed images (torch tensors or numpy arrays of one shape) as L2-normalised rows.

    An encoder that takes numpy pixels (`numpy_pixels`: `loupe.indexer.models.onnx_images`) gets them
    stacked by numpy, and torch is never imported."""
    t = time.perf_counter()
    if getattr(encoder, "numpy_pixels", False):
        pixels = np.stack([np.asarray(x, dtype=np.float32) for x in tensors])
    else:
        import torch  # here, not at the top: a run with nothing to embed never imports it

        pixels = torch.stack([x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x)) for x in tensors])
    vecs = encoder.encode_images(pixels)
    if times is not None:
        times.add("embed", time.perf_counter() - t, len(tensors))
    return vecs


def embed_stream(
    encoder: "Encoder", decoded: Iterable[tuple[object, object]], batch_size: int, times: StageTimes | None = None
) -> Iterator[tuple[list, np.ndarray, dict]]:
    """Batch a stream of (key, tensor or exception) and embed it: yields (keys, vectors, {key: reason}).

    Bad items never stop the stream; they come back with their skip reason.
    """
    keys: list = []
    batch: list = []
    bad: dict = {}
    for key, result in decoded:
        if isinstance(result, BaseException):
            bad[key] = reason_for(result)
            continue
        keys.append(key)
        batch.append(result)
        if len(batch) >= batch_size:
            yield keys, embed_batch(encoder, batch, times), bad
            keys, batch, bad = [], [], {}
    if batch or bad:
        vecs = embed_batch(encoder, batch, times) if batch else np.zeros((0, encoder.dim), np.float32)
        yield keys, vecs, bad


# ---- commit --------------------------------------------------------------------------------


class Committer:
    """The catalog side of a run: collects decided rows and writes them, a batch's rows only
    together with their vectors, each write one transaction inside a critical section (a Ctrl-C
    lands before the commit or after it, never between the catalog and `known`)."""

    def __init__(self, catalog: Catalog, known: dict[str, int], report, times: StageTimes | None = None) -> None:
        self.catalog = catalog
        self.known = known  # content hash -> vector id, kept in line with the catalog by write_images
        self.report = report  # an IndexReport: counts are added here
        self.times = times or StageTimes()
        self.records: list[ImageRecord] = []
        self.waiting: list[ImageRecord] = []  # copies of content whose vector is not committed yet
        self.touches: list[tuple[int, int, int]] = []
        self.signal_results: list[SignalResult] = []

    @staticmethod
    def record(unit: WorkUnit, h: str, info: object = None, reason: str | None = None) -> ImageRecord:
        return ImageRecord(
            path_key=unit.key,
            size=unit.size,
            mtime_ns=unit.mtime_ns,
            content_hash=h,
            width=getattr(info, "width", None),
            height=getattr(info, "height", None),
            taken_at=getattr(info, "taken_at", None),
            reason=reason,
        )

    def failed(self, unit: WorkUnit, reason: str) -> None:
        self.records.append(ImageRecord(path_key=unit.key, size=unit.size, mtime_ns=unit.mtime_ns, reason=reason))
        self.report.skipped += 1
        self.report.bad_files.append((unit.path, reason))

    def signals(self, unit: WorkUnit, results: Sequence[SignalResult]) -> None:
        """Keep signal outcomes for the next write; a failed signal is counted and reported like a
        skip (the photo keeps its vector)."""
        for r in results:
            counts = self.report.signals.setdefault(r.name, {"done": 0, "failed": 0})
            counts["failed" if r.reason is not None else "done"] += 1
            if r.reason is not None:
                self.report.signal_errors.append((unit.path, r.name, r.reason))
        self.signal_results.extend(results)

    def touched(self, unit: WorkUnit) -> None:
        self.touches.append((unit.row_id, unit.size, unit.mtime_ns))
        self.report.touched += 1

    def reused(self, unit: WorkUnit, h: str, info: object) -> None:
        rec = self.record(unit, h, info)
        (self.records if h in self.known else self.waiting).append(rec)
        self.report.reused += 1

    def embedded(self, items: Sequence[tuple[WorkUnit, str, object]], vectors: np.ndarray) -> int:
        """Commit (unit, hash, info) rows with their vectors, plus every decided row; one transaction.

        Content already committed (a copy embedded by another worker) is written as a reuse, and
        a hash twice in `items` stores one vector: a retried or duplicated unit doubles nothing.
        Returns the number of new vectors.
        """
        new_vectors: dict[str, np.ndarray] = {}
        rows: list[ImageRecord] = []
        for (unit, h, info), vec in zip(items, vectors):
            rows.append(self.record(unit, h, info))
            if h in self.known or h in new_vectors:
                self.report.reused += 1
            else:
                new_vectors[h] = vec
        with critical_section(), self.times.timed("commit", len(rows)):
            self.catalog.write_images(self.records + rows, list(new_vectors.items()), self.known)
            self.records.clear()
            self.report.embedded += len(new_vectors)
        self._settle()
        self._write_signals()
        return len(new_vectors)

    def video(self, unit: WorkUnit, h: str, info: object, moments: Sequence, vectors: np.ndarray) -> None:
        """Commit a video with all its moments (and its pooled vector), one transaction; a video
        without a single usable moment (blank, black) is a skip with that reason."""
        if len(moments) == 0:
            self.failed(unit, "no usable frame (blank or black video)")
            return
        pooled = vectors.mean(axis=0)
        pooled = (pooled / max(float(np.linalg.norm(pooled)), 1e-12)).astype(np.float32)
        record = self.record(unit, h, info)
        with critical_section(), self.times.timed("commit", 1):
            if self.records:
                self.catalog.write_images(self.records, [], self.known)
                self.records.clear()
            self.catalog.write_video(record, [(m.start, m.time, m.end) for m in moments], vectors, pooled, self.known)
            self.report.embedded += 1
            self.report.moments += len(moments)
        self._settle()

    def flush(self) -> None:
        """Write the decided rows (skips, reuses whose vector is committed, touches)."""
        if self.records:
            with critical_section(), self.times.timed("commit", len(self.records)):
                self.catalog.write_images(self.records, [], self.known)
                self.records.clear()
        self._settle()
        self._write_signals()

    def _write_signals(self) -> None:
        with critical_section():
            if self.signal_results:
                with self.times.timed("commit"):  # seconds only: the stage counts file rows
                    self.catalog.write_signals(self.signal_results)
                self.signal_results.clear()

    def _settle(self) -> None:
        with critical_section():
            ready = [w for w in self.waiting if w.content_hash in self.known]
            if ready:
                with self.times.timed("commit", len(ready)):
                    self.catalog.write_images(ready, [], self.known)
                self.waiting[:] = [w for w in self.waiting if w.content_hash not in self.known]
        with critical_section():
            if self.touches:
                with self.times.timed("commit", len(self.touches)):
                    self.catalog.touch_images(self.touches)
                self.touches.clear()

    @property
    def pending(self) -> int:
        return len(self.records) + len(self.signal_results)


def finish_plan(catalog: Catalog, plan: Plan, report, prune: bool) -> None:
    """After a complete (not interrupted) run: mark unseen rows missing (moved files dropped),
    apply --prune, record the folder."""
    report.missing, report.removed = catalog.mark_missing(plan.gone)
    if plan.root_key is None:
        return
    if prune:
        missing = catalog.missing_ids(plan.root_key)
        report.removed += catalog.delete_images(missing) if missing else 0  # and the vectors they alone used
    catalog.record_root(plan.root_key, report.files)
