"""Building an on-disk index: train on a sample, add block by block, merge the blocks' lists into
one file; from shards (`build_ondisk`) or from a catalog (`build_catalog_ondisk`). Memory stays
bounded by the training sample plus one batch, and an interrupted build resumes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from loupe.indexer.errors import LoupeError
from loupe.indexer.interop import shards as sh
from loupe.indexer.storage.catalog_names import catalog_identity
from loupe.indexer.storage.critical import critical_section
from loupe.indexer.storage.ondisk.layout import (
    ADD_BATCH, BLOCKS_DIR, CATALOG_SOURCE, INDEX_FILE, INFO_FILE, LISTS_FILE, MAX_TRAIN, TRAIN_PER_LIST, TRAINED_FILE,
    CatalogAt, auto_factory, catalog_factory, faiss_module,
)
from loupe.indexer.storage.ondisk.sources import CatalogRows, ShardSet
from loupe.indexer.storage.vectors import ids_digest


@dataclass
class BuildReport:
    out: str
    rows: int
    shards: int
    dim: int
    factory: str
    train_rows: int
    seconds: dict[str, float] = field(default_factory=dict)  # per stage: sample, train, add, merge
    disk_bytes: int = 0
    blocks_reused: int = 0


def _atomic_write_index(index, path: Path) -> None:
    faiss = faiss_module()
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def build_ondisk(
    shards_dir: str | os.PathLike,
    out: str | os.PathLike,
    factory: str | None = None,
    kind: str = sh.IMG,
    train_rows: int | None = None,
    batch: int = ADD_BATCH,
    progress: Callable[[str], None] | None = None,
) -> BuildReport:
    """Build an on-disk IVF index over the `kind` shards of `shards_dir` into the folder `out`.

    Memory stays bounded by the training sample plus one batch and one shard's codes, whatever
    the collection size. Re-running after an interruption reuses the trained index and every
    block already written, as long as the shards and factory are the same.
    """
    shards = ShardSet.scan(shards_dir, kind)
    factory = factory or auto_factory(shards.total, shards.dim)
    extra = {"shards": [{"path": str(p), "rows": r} for p, r in zip(shards.paths, shards.rows)], "kind": kind}
    return _build(shards, Path(out), factory, extra, train_rows, batch, progress)


@contextlib.contextmanager
def _c_stdout_to_stderr() -> Iterator[None]:
    """Send what C code prints on stdout to stderr meanwhile, so a command's stdout stays its output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        try:
            import ctypes

            ctypes.CDLL(None).fflush(None)  # C's buffered output goes where it was meant to
        except (OSError, AttributeError):
            pass
        os.dup2(saved, 1)
        os.close(saved)


def _build(
    source: "ShardSet | CatalogRows", out: Path, factory: str, extra: dict, train_rows: int | None = None,
    batch: int = ADD_BATCH, progress: Callable[[str], None] | None = None, lists_path: Path | None = None,
) -> BuildReport:
    """Train on a sample of `source`, add it block by block, merge the blocks' lists into one
    on-disk file in `out`, and describe it in ondisk.json (`extra` added to the description).

    `source` hands out vectors with their ids: a ShardSet (global row numbers, one block per
    shard) or CatalogRows (catalog vector ids, one block per `ADD_BATCH` ids). `lists_path`: where
    the lists file will be read from (the folder the index is moved to), recorded in the index
    file; by default its name alone, found beside the index file when read.
    """
    faiss = faiss_module()
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / BLOCKS_DIR).mkdir(exist_ok=True)
    plan = {"factory": factory, "dim": source.dim, **source.plan()}
    plan_file = out / "plan.json"
    stored = json.loads(plan_file.read_text()) if plan_file.exists() else {}
    if {k: stored.get(k) for k in plan} != plan:
        for stale in [out / TRAINED_FILE, *(out / BLOCKS_DIR).glob("*.index")]:
            stale.unlink(missing_ok=True)  # another collection or factory: nothing is reusable
        plan_file.write_text(json.dumps(plan))
    say = progress or (lambda _: None)
    sizes = source.block_rows()
    report = BuildReport(str(out), source.total, len(sizes), source.dim, factory, 0)

    trained_path = out / TRAINED_FILE
    if trained_path.exists():
        trained = faiss.read_index(str(trained_path))
        report.train_rows = int(json.loads(plan_file.read_text()).get("train_rows", 0))
    else:
        try:
            trained = faiss.index_factory(source.dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise LoupeError(f"bad FAISS factory string {factory!r}: {str(exc).splitlines()[0]}") from None
        if faiss.try_extract_index_ivf(trained) is None:
            raise LoupeError(f"{factory!r} is not an inverted-file index: an on-disk index needs IVF lists")
        nlist = faiss.extract_index_ivf(trained).nlist
        size = train_rows or min(MAX_TRAIN, max(TRAIN_PER_LIST * nlist, 10_000))
        t = time.perf_counter()
        sample = source.read_sample(size)
        report.seconds["sample"] = time.perf_counter() - t
        say(f"training {factory} on {len(sample)} rows")
        t = time.perf_counter()
        try:
            trained.train(sample)
        except RuntimeError as exc:  # e.g. fewer training rows than the lists or codes need
            raise LoupeError(f"cannot train {factory!r} on {len(sample)} vectors: {str(exc).splitlines()[0]}") from None
        report.seconds["train"] = time.perf_counter() - t
        report.train_rows = len(sample)
        del sample
        _atomic_write_index(trained, trained_path)
        plan["train_rows"] = report.train_rows
        plan_file.write_text(json.dumps(plan))

    t = time.perf_counter()
    blocks = []
    done = 0
    for s, rows in enumerate(sizes):
        block_path = out / BLOCKS_DIR / f"block_{s:05d}.index"
        blocks.append(str(block_path))
        done += rows
        if block_path.exists():
            report.blocks_reused += 1
            continue
        block = faiss.clone_index(trained)
        for vecs, ids in source.read_block(s, batch):
            block.add_with_ids(vecs, ids)
        _atomic_write_index(block, block_path)
        del block
        say(f"added {source.block_name} {s + 1}/{len(sizes)} ({done} rows)")
    report.seconds["add"] = time.perf_counter() - t

    t = time.perf_counter()
    from faiss.contrib.ondisk import merge_ondisk

    merged = faiss.read_index(str(trained_path))
    lists_tmp = out / (LISTS_FILE + ".tmp")
    lists_tmp.unlink(missing_ok=True)
    with _c_stdout_to_stderr():  # faiss prints "resizing FILE to N bytes" with printf
        merge_ondisk(merged, blocks, str(lists_tmp))
    # the lists file is named relative to the index file (IO_FLAG_ONDISK_SAME_DIR when reading)
    os.replace(lists_tmp, out / LISTS_FILE)
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(merged).invlists)
    invlists.filename = str(lists_path) if lists_path else LISTS_FILE
    _atomic_write_index(merged, out / INDEX_FILE)
    del merged
    report.seconds["merge"] = time.perf_counter() - t

    info = {
        "factory": factory, "dim": source.dim, "metric": "inner_product", "rows": source.total,
        **extra, "train_rows": report.train_rows, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    for b in blocks:
        Path(b).unlink(missing_ok=True)
    trained_path.unlink(missing_ok=True)
    report.disk_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    report.seconds["total"] = time.perf_counter() - t0
    return report


def report_dict(report: BuildReport) -> dict:
    return asdict(report)


def build_catalog_ondisk(
    store: CatalogAt, kind: str, factory: str | None = None, train_rows: int | None = None,
    batch: int = ADD_BATCH, progress: Callable[[str], None] | None = None,
) -> BuildReport:
    """Build the on-disk index of the catalog's `kind` vectors ('image' or 'text') in its index folder.

    Call it holding the writer lock (`loupe build-index` does), so the catalog cannot change
    while its vectors are read. The index is built beside the old one and swapped in at the end:
    a search sees the old index, no index (and uses the FAISS file), or the new one.
    """
    meta = store.require_meta()
    generation = store.catalog.generation()  # before the ids: a label may lag its content, never lead it
    ids = store.catalog.vector_ids(kind)
    if not len(ids):
        raise LoupeError(f"the index holds no {kind} vectors to build an on-disk index of")
    source = CatalogRows(store.catalog, kind, meta.dim, ids)
    final = store.location.ondisk_dir(kind)
    work = final.with_name(final.name + ".build")
    old = final.with_name(final.name + ".old")
    label = {
        "source": CATALOG_SOURCE, "kind": kind, "catalog": catalog_identity(meta), "generation": generation,
        "ids_digest": ids_digest(ids), "weights": meta.weights_id,
    }
    label["lists_path"] = str(final.resolve() / LISTS_FILE)  # so that opening it needs no IO_FLAG_ONDISK_SAME_DIR
    report = _build(
        source, work, factory or catalog_factory(len(ids), meta.dim), label, train_rows, batch, progress,
        lists_path=Path(label["lists_path"]),
    )
    (work / "plan.json").unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)
    with critical_section():
        if final.exists():
            os.replace(final, old)
        os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)
    report.out = str(final)
    return report
