"""The Ray executor: the runner loop's read+decode and embed on a cluster.

    plan (driver) -> Ray Data of work units -> read+decode + signals (parallel tasks) -> embed
    (a pool of actors, one model load each) -> iter_batches on the driver -> the loop of
    `loupe.indexer.pipeline.runner.run_plan` (driver: precision admission, commit, progress)

The catalog stays the single source of truth: only the driver writes it, with the same commit
unit, so a re-run plans no work for what is committed, and a job that stops anywhere (a killed
worker, a lost node, Ctrl-C of the driver) leaves a consistent catalog that the next run
continues. Work units are idempotent (a row is keyed by path, its vector by content hash), so a
task or actor that Ray retries (`max_task_retries`, `max_restarts`) can double nothing: a vector
for content the catalog already holds is written as a reuse.

Streaming: Ray Data runs the stages concurrently with bounded queues, so memory stays flat
however many files the plan lists. Images travel between stages as float32 bytes.
"""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Sequence

import numpy as np

from loupe.indexer.errors import LoupeError
from loupe.indexer.pipeline.runner import Chunk, IndexReport, Precision, run_plan
from loupe.indexer.pipeline.stages import Loaded, Reader, StageTimes, WorkUnit, embed_batch, reason_for
from loupe.indexer.signals.base import Signal

EXTRA_HINT = "pip install 'loupe[ray]'"


def require_ray():
    """Import ray (and Ray Data) or fail with one line that names the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise LoupeError(f"--ray needs Ray, which is not installed: {EXTRA_HINT}") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to the cluster at `address`, or start a local one (`num_cpus` CPUs) when None.

    Returns True when this call started or joined Ray (and should shut it down). Workers import
    the installed `loupe` package (the same install on every node) and get the caller's
    PYTHONPATH and the hub's offline flag.
    """
    ray = require_ray()
    if ray.is_initialized():
        return False
    import logging

    env = {}
    for name in ("PYTHONPATH", "HF_HUB_OFFLINE", "LOUPE_HOME", "TOKENIZERS_PARALLELISM"):
        if name in os.environ:
            env[name] = os.environ[name]
    kwargs: dict = dict(
        runtime_env={"env_vars": env},
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
        configure_logging=True,
    )
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, object_store_memory=_object_store_bytes(), **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    return True


def _object_store_bytes() -> int:
    """A local cluster's object store: 10% of RAM, between 256 MiB and 4 GiB (streaming keeps
    the working set small; Ray's default of 30% of RAM is meant for machines it owns)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return int(min(4 << 30, max(256 << 20, total // 10)))


# ---- the units, as Ray runs them -----------------------------------------------------------

_UNIT_COLUMNS = ("path", "size", "mtime_ns", "row_id", "old_hash", "old_ok", "signals")


def read_decode_batch(batch: dict, known: frozenset, image_size: int, preprocess: Callable | None, signals: Sequence[Signal] = ()) -> dict:
    """Ray task body: the read+decode unit (`stages.Reader`, signals included) over a batch of work units.

    Output columns: the unit's, plus action, hash, width, height, taken_at (ns or -1), reason
    (skip reason or ''), outcomes (the signal outcomes, pickled), pixels (float32 bytes, empty
    unless action == 'embed').
    """
    times = StageTimes()
    reader = Reader(known, image_size, preprocess, times, signals)
    out: dict[str, list] = {k: [] for k in ("action", "hash", "width", "height", "taken_at", "reason", "outcomes", "pixels")}
    for i in range(len(batch["path"])):
        unit = _unit_of(batch, i)
        try:
            got = reader(unit)
        except Exception as exc:  # noqa: BLE001 - a bad file is a row with its reason
            got = Loaded(unit, "failed", "", reason=reason_for(exc))
        info = got.info
        taken = getattr(info, "taken_at", None)
        out["action"].append(got.action)
        out["hash"].append(got.content_hash)
        out["width"].append(int(getattr(info, "width", None) or -1))
        out["height"].append(int(getattr(info, "height", None) or -1))
        out["taken_at"].append((taken.replace(tzinfo=None) - _EPOCH) // _US if taken is not None else -1)
        out["reason"].append(got.reason or "")
        out["outcomes"].append(pickle.dumps(got.signals) if got.signals else b"")
        tensor = got.tensor if got.action == "embed" else None
        out["pixels"].append(np.ascontiguousarray(tensor.numpy(), dtype=np.float32).tobytes() if tensor is not None else b"")
    result = {k: batch[k] for k in _UNIT_COLUMNS}
    n = max(1, len(batch["path"]))  # this batch's stage seconds, spread over its rows for the driver to sum
    for stage in ("read", "decode", "signals"):
        result[f"{stage}_s"] = np.full(len(batch["path"]), times.seconds.get(stage, 0.0) / n)
    result["decoded"] = np.array([a in ("embed", "signals") for a in out["action"]], dtype=bool)
    result["signalled"] = np.full(len(batch["path"]), times.items.get("signals", 0) / n)
    for k, v in out.items():
        numeric = k in ("width", "height", "taken_at")
        result[k] = np.array(v, dtype=np.int64) if numeric else np.array(v, dtype=object)
    return result


class Embedder:
    """Ray actor: loads the model once, then embeds the 'embed' rows of each batch (the embed unit).

    Rows of other actions pass through with an empty vector.
    """

    def __init__(self, spec, device: str = "auto") -> None:
        import torch

        from loupe.indexer.models.factory import index_encoder

        cpus = int(os.environ.get("OMP_NUM_THREADS") or 0)
        if cpus > 0:
            torch.set_num_threads(cpus)
        self.encoder = index_encoder(spec, device)  # in the spec's precisions: the driver's, resolved
        self.shape = (3, self.encoder.image_size, self.encoder.image_size)
        self.pid = os.getpid()

    def __call__(self, batch: dict) -> dict:
        todo = [i for i, a in enumerate(batch["action"]) if a == "embed"]
        vectors = np.empty(len(batch["action"]), dtype=object)
        vectors[:] = [b""] * len(vectors)
        seconds = 0.0
        if todo:
            pixels = [np.frombuffer(batch["pixels"][i], dtype=np.float32).reshape(self.shape) for i in todo]
            t = time.perf_counter()
            vecs = embed_batch(self.encoder, pixels)
            seconds = time.perf_counter() - t
            for i, v in zip(todo, vecs):
                vectors[i] = np.ascontiguousarray(v, dtype=np.float32).tobytes()
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["vector"] = vectors
        out["embed_s"] = np.full(len(vectors), seconds / max(1, len(vectors)))
        p = Precision.of(self.encoder)  # what made these vectors: the driver admits it before writing them
        out["precision"] = np.full(len(vectors), p.image_precision, dtype=object)
        out["cosine"] = np.full(len(vectors), p.image_cosine)
        out["bound"] = np.full(len(vectors), p.image_bound)
        out["fidelity_s"] = np.full(len(vectors), p.fidelity_seconds)
        return out


def _unit_of(batch: dict, i: int) -> WorkUnit:
    row_id = batch["row_id"][i]
    old_hash = batch["old_hash"][i]
    signals = batch["signals"][i]
    return WorkUnit(
        str(batch["path"][i]),
        int(batch["size"][i]),
        int(batch["mtime_ns"][i]),
        int(row_id) if row_id is not None and row_id >= 0 else None,
        str(old_hash) if old_hash else None,
        bool(batch["old_ok"][i]),
        tuple(str(signals).split(",")) if signals else (),
    )


_EPOCH = datetime(1970, 1, 1)
_US = timedelta(microseconds=1)


class _Info:
    """width/height/taken_at as the committer reads them (taken_at: naive EXIF time, in µs)."""

    def __init__(self, width: int, height: int, taken_us: int) -> None:
        self.width = width if width >= 0 else None
        self.height = height if height >= 0 else None
        self.taken_at = _EPOCH + taken_us * _US if taken_us >= 0 else None


def _units_table(units):
    import pyarrow as pa

    return pa.table(
        {
            "path": pa.array([u.path for u in units], pa.string()),
            "size": pa.array([u.size for u in units], pa.int64()),
            "mtime_ns": pa.array([u.mtime_ns for u in units], pa.int64()),
            "row_id": pa.array([u.row_id if u.row_id is not None else -1 for u in units], pa.int64()),
            "old_hash": pa.array([u.old_hash or "" for u in units], pa.string()),
            "old_ok": pa.array([u.old_ok for u in units], pa.bool_()),
            "signals": pa.array([",".join(u.signals) for u in units], pa.string()),
        }
    )


def embed_actor_options(device: str, actors: int | None) -> dict:
    """map_batches options of the embedding actors: one GPU each where CUDA is available (and
    one actor per GPU by default), else CPU actors (one by default).

    Ray Data gives map actors `max_restarts=-1` and `max_task_retries=-1` (a dead actor is
    restarted and its batches retried, as `map_batches(..., max_restarts=0)` would turn off),
    and map tasks retry on system failures; loupe relies on those defaults rather than passing
    them through the `**ray_remote_args` that Ray 2.60 deprecates.
    """
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0)) if device in ("auto", "cuda") else 0
    pool = ray.data.ActorPoolStrategy(size=actors or max(1, gpus))
    return dict(num_gpus=1, compute=pool) if gpus else dict(num_cpus=1, compute=pool)


class RayExecutor:
    """Runs read+decode (Ray tasks) and embed (a pool of actors, each loading its own copy of the
    driver encoder's model) on a Ray cluster; the driver's loop commits what comes back."""

    name = "ray"

    def __init__(self, device: str = "auto", actors: int | None = None, address: str | None = None, num_cpus: int | None = None) -> None:
        self.device = device
        self.actors = actors  # embedding actors (default: one per GPU, else one)
        self.address, self.num_cpus = address, num_cpus  # the cluster `connect` joins or starts
        self.started = False  # whether `run` started or joined Ray (the caller shuts it down)

    def run(self, units, encoder, known, signals, batch_size, times):
        import ray

        self.started = connect(self.address, self.num_cpus) or self.started
        device = self.device
        if device == "auto":
            device = "cuda" if encoder is not None and encoder.device.type == "cuda" else "auto"
        read_rows = max(1, min(16, batch_size))
        image_size = getattr(encoder, "image_size", 0)
        ds = (
            ray.data.from_arrow(_units_table(units))
            .repartition(max(1, -(-len(units) // read_rows)))
            .map_batches(
                read_decode_batch,
                batch_size=read_rows,
                batch_format="numpy",
                fn_kwargs=dict(known=frozenset(known), image_size=image_size, preprocess=getattr(encoder, "preprocess", None), signals=tuple(signals)),
                num_cpus=1,
            )
        )
        if any(not u.signals for u in units):  # something to embed: the actors load the model
            ds = ds.map_batches(
                Embedder,
                batch_size=batch_size,
                batch_format="numpy",
                fn_constructor_kwargs=dict(spec=encoder.spec, device=device),
                **embed_actor_options(device, self.actors),
            )
        dim = getattr(encoder, "dim", 0)
        started = time.perf_counter()
        it = ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2)
        try:
            for n_batches, batch in enumerate(it, 1):
                chunk = _chunk_of(batch, dim)
                n = len(chunk.items)
                if n_batches == 1:  # cluster start-up: scheduling, worker imports, actors' model load
                    times.add("first_batch", time.perf_counter() - started, n)
                times.add("read", float(np.sum(batch["read_s"])), n)
                times.add("decode", float(np.sum(batch["decode_s"])), int(np.sum(batch["decoded"])))
                times.add("signals", float(np.sum(batch["signals_s"])), int(round(np.sum(batch["signalled"]))))
                if "embed_s" in batch:
                    times.add("embed", float(np.sum(batch["embed_s"])), 0 if chunk.vectors is None else len(chunk.vectors))
                yield chunk
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            times.add("cluster", time.perf_counter() - started, 0)  # wall time of read+decode+embed on Ray


def _chunk_of(batch: dict, dim: int) -> Chunk:
    """A batch of rows from the cluster as the loop's chunk."""
    items, vectors, precision = [], [], None
    for i in range(len(batch["path"])):
        action = str(batch["action"][i])
        info = _Info(int(batch["width"][i]), int(batch["height"][i]), int(batch["taken_at"][i]))
        outcomes = batch["outcomes"][i]
        loaded = Loaded(
            _unit_of(batch, i), action, str(batch["hash"][i]), info=info,
            signals=pickle.loads(outcomes) if len(outcomes) else [], reason=str(batch["reason"][i]) or None,
        )
        items.append(loaded)
        if action == "embed":
            vectors.append(np.frombuffer(batch["vector"][i], dtype=np.float32))
            precision = Precision(str(batch["precision"][i]), float(batch["cosine"][i]), float(batch["bound"][i]), float(batch["fidelity_s"][i]))
    if not vectors:
        return Chunk(items)
    return Chunk(items, np.stack(vectors).reshape(len(vectors), dim), precision)


@dataclass(frozen=True)
class RayRun:
    """How a plan runs on Ray (`index_on_ray` takes these as keywords)."""

    batch_size: int = 32
    actors: int | None = None  # embedding actors (default: one per GPU, else one)
    device: str = "auto"
    progress: bool = False
    prune: bool = False
    max_batches: int | None = None  # stop after that many batches as if interrupted (tests)
    signals: tuple | None = None  # the per-photo signals (default: the registered ones)


def index_on_ray(
    store,
    encoder,
    source: str,
    files: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    **options,
) -> IndexReport:
    """`loupe index SOURCE --ray [ADDRESS]`: plan here, read+decode+embed on Ray, commit here.

    `options` are `RayRun`'s fields (batch_size, actors, device, progress, prune, max_batches, signals).
    Videos are not read on Ray (a video's moments stream from one decoding thread): the walk leaves
    them out and those indexed before are kept; `loupe index` without --ray indexes them.
    """
    from loupe.indexer.pipeline.indexing import source_plan, timed_plan
    from loupe.indexer.storage.locking import writer_lock

    run = RayRun(**options)
    require_ray()
    t0 = time.perf_counter()
    with writer_lock(store):
        report, make_plan = source_plan(store, source, files, video=False)
        plan, times = timed_plan(make_plan)
        if not callable(encoder):
            store.bind(encoder)
        executor = RayExecutor(run.device, run.actors, address, num_cpus)  # joins the cluster only if there is work
        try:
            return run_plan(
                store, encoder, plan, report, times, t0, executor=executor,
                batch_size=run.batch_size, progress=run.progress, max_batches=run.max_batches, prune=run.prune, signals=run.signals,
            )
        finally:
            if executor.started:
                import ray

                ray.shutdown()
