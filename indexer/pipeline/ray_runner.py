"""The Ray runner: the same stages as the in-process runner, with read+decode and embed on a cluster.

    plan (driver) -> Ray Data of work units -> read+decode (parallel tasks) -> embed (a pool of
    actors, one model load each) -> iter_batches on the driver -> commit (driver, `Committer`)

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
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

import numpy as np

from loupe.indexer.errors import LoupeError

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

_UNIT_COLUMNS = ("path", "size", "mtime_ns", "row_id", "old_hash", "old_ok")


def read_decode_batch(batch: dict, known: frozenset, image_size: int, preprocess: Callable | None) -> dict:
    """Ray task body: the read+decode unit (`stages.Reader`) over a batch of work units.

    Output columns: the unit's, plus action, hash, width, height, taken_at (ns or -1), reason
    (skip reason or ''), pixels (float32 bytes, empty unless action == 'embed').
    """
    from loupe.indexer.pipeline.batching import reason_for
    from loupe.indexer.pipeline.stages import Reader, WorkUnit

    from loupe.indexer.pipeline.stages import StageTimes

    times = StageTimes()
    reader = Reader(known, image_size, preprocess, times)
    out: dict[str, list] = {k: [] for k in ("action", "hash", "width", "height", "taken_at", "reason", "pixels")}
    for i in range(len(batch["path"])):
        unit = _unit_of(batch, i, WorkUnit)
        try:
            got = reader(unit)
        except Exception as exc:  # noqa: BLE001 - a bad file is a row with its reason
            got, reason = None, reason_for(exc)
        else:
            reason = ""
        info = getattr(got, "info", None)
        taken = getattr(info, "taken_at", None)
        out["action"].append(got.action if got else "failed")
        out["hash"].append(got.content_hash if got else "")
        out["width"].append(int(getattr(info, "width", None) or -1))
        out["height"].append(int(getattr(info, "height", None) or -1))
        out["taken_at"].append((taken.replace(tzinfo=None) - _EPOCH) // _US if taken is not None else -1)
        out["reason"].append(reason)
        tensor = got.tensor if got is not None and got.action == "embed" else None
        out["pixels"].append(np.ascontiguousarray(tensor.numpy(), dtype=np.float32).tobytes() if tensor is not None else b"")
    result = {k: batch[k] for k in _UNIT_COLUMNS}
    n = max(1, len(batch["path"]))  # this batch's stage seconds, spread over its rows for the driver to sum
    result["read_s"] = np.full(len(batch["path"]), times.seconds.get("read", 0.0) / n)
    result["decode_s"] = np.full(len(batch["path"]), times.seconds.get("decode", 0.0) / n)
    result["decoded"] = np.array([a == "embed" for a in out["action"]], dtype=bool)
    for k, v in out.items():
        result[k] = np.array(v, dtype=object) if k in ("action", "hash", "reason", "pixels") else np.array(v, dtype=np.int64)
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
        from loupe.indexer.pipeline.stages import embed_batch

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
        return out


def _unit_of(batch: dict, i: int, cls):
    row_id = batch["row_id"][i]
    old_hash = batch["old_hash"][i]
    return cls(
        str(batch["path"][i]),
        int(batch["size"][i]),
        int(batch["mtime_ns"][i]),
        int(row_id) if row_id is not None and row_id >= 0 else None,
        str(old_hash) if old_hash else None,
        bool(batch["old_ok"][i]),
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


@dataclass(frozen=True)
class RayRun:
    """How a plan runs on Ray (`index_on_ray` takes these as keywords)."""

    batch_size: int = 32
    actors: int | None = None  # embedding actors (default: one per GPU, else one)
    device: str = "auto"
    progress: bool = False
    prune: bool = False
    max_batches: int | None = None  # stop after that many batches as if interrupted (tests)


def run_plan_on_ray(store, encoder, plan, report, times, t0: float, run: RayRun = RayRun()):
    """The Ray runner of a plan (see the module docstring); `encoder` is the driver's (it binds
    the index and provides the preprocessing); actors load their own copy of its model."""
    from loupe.indexer.storage.catalog import IMAGE
    from loupe.indexer.storage.critical import critical_section
    from loupe.indexer.pipeline.jobs import _offline, end_report, start_report
    from loupe.indexer.pipeline.stages import Committer, WorkUnit

    ray = require_ray()
    if plan.offline:
        return _offline(store, report, plan.offline, plan.gone, t0)
    start_report(store, plan, report)
    report.scan_seconds = time.perf_counter() - t0
    report.runner = "ray"
    if callable(encoder) and (plan.todo or store.meta() is None):
        encoder = encoder()
        store.bind(encoder)
    if not plan.todo:
        return end_report(store, plan, report, times, t0, run.prune)

    catalog = store.catalog
    known = catalog.hash_to_vector(IMAGE)
    commit = Committer(catalog, known, report, times)
    spec = encoder.spec
    device = run.device
    if device == "auto":
        device = "cuda" if encoder.device.type == "cuda" else "auto"
    batch_size = run.batch_size
    read_rows = max(1, min(16, batch_size))
    ds = (
        ray.data.from_arrow(_units_table(plan.todo))
        .repartition(max(1, -(-len(plan.todo) // read_rows)))
        .map_batches(
            read_decode_batch,
            batch_size=read_rows,
            batch_format="numpy",
            fn_kwargs=dict(known=frozenset(known), image_size=encoder.image_size, preprocess=encoder.preprocess),
            num_cpus=1,
        )
        .map_batches(
            Embedder,
            batch_size=batch_size,
            batch_format="numpy",
            fn_constructor_kwargs=dict(spec=spec, device=device),
            **embed_actor_options(device, run.actors),
        )
    )
    bar = None
    if run.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan.todo), desc="indexing (ray)", unit="img", dynamic_ncols=True, smoothing=0.1)
    shape_dim = encoder.dim
    started = time.perf_counter()
    batches_done = 0
    it = ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2)
    try:
        for batch in it:
            items, vecs = [], []
            n = len(batch["path"])
            for i in range(n):
                unit = _unit_of(batch, i, WorkUnit)
                action, h = batch["action"][i], batch["hash"][i]
                info = _Info(int(batch["width"][i]), int(batch["height"][i]), int(batch["taken_at"][i]))
                if action == "failed":
                    commit.failed(unit, str(batch["reason"][i]))
                elif action == "touch":
                    commit.touched(unit)
                elif action == "reuse":
                    commit.reused(unit, h, info)
                else:
                    items.append((unit, h, info))
                    vecs.append(np.frombuffer(batch["vector"][i], dtype=np.float32))
            with critical_section():
                if items:
                    commit.embedded(items, np.stack(vecs).reshape(len(vecs), shape_dim))
                commit.flush()
            batches_done += 1
            if batches_done == 1:  # cluster start-up: scheduling, worker imports, actors' model load
                times.add("first_batch", time.perf_counter() - started, n)
            times.add("read", float(np.sum(batch["read_s"])), n)
            times.add("decode", float(np.sum(batch["decode_s"])), int(np.sum(batch["decoded"])))
            times.add("embed", float(np.sum(batch["embed_s"])), len(items))
            if bar is not None:
                bar.update(n)
                rate = report.embedded / max(1e-9, time.perf_counter() - started)
                bar.set_postfix(new=report.embedded, reused=report.reused, bad=report.skipped, img_s=f"{rate:.1f}", refresh=False)
            if run.max_batches is not None and batches_done >= run.max_batches:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        report.interrupted = True
        with critical_section():
            commit.flush()
    finally:
        if bar is not None:
            bar.close()
        close = getattr(it, "close", None)
        if close is not None:
            close()
    times.add("cluster", time.perf_counter() - started, report.embedded)  # wall time of read+decode+embed on Ray
    return end_report(store, plan, report, times, t0, run.prune)


def index_on_ray(
    store,
    encoder,
    source: str,
    files: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    **options,
):
    """`loupe index SOURCE --ray [ADDRESS]`: plan here, read+decode+embed on Ray, commit here.

    `options` are `RayRun`'s fields (batch_size, actors, device, progress, prune, max_batches).
    """
    from loupe.indexer.storage.locking import writer_lock
    from loupe.indexer.pipeline.jobs import source_plan, timed_plan

    run = RayRun(**options)
    require_ray()
    t0 = time.perf_counter()
    with writer_lock(store):
        report, make_plan = source_plan(store, source, files)
        plan, times = timed_plan(make_plan)
        if not callable(encoder):
            store.bind(encoder)
        started = connect(address, num_cpus) if plan.todo else False
        try:
            return run_plan_on_ray(store, encoder, plan, report, times, t0, run)
        finally:
            if started:
                import ray

                ray.shutdown()
