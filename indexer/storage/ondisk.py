"""Indices larger than memory, built from embedding shards (clip-retrieval's layout).

For a collection whose float vectors do not fit in RAM (10M x 512 float32 is 20 GB), nothing
here ever holds more than one batch of them:

1. train: an IVF coarse quantizer and a product quantizer on a random sample of rows, read
   row by row with plain reads (`TRAIN_PER_LIST` rows per inverted list);
2. add: each npy shard is read in batches into its own small IVF block (codes only: 64 bytes
   per vector for PQ128), written to disk, then dropped; a block already written by an
   interrupted run is kept;
3. merge: the blocks' inverted lists are merged into one `OnDiskInvertedLists` file
   (`lists.ivfdata`, FAISS's merge_ondisk), which a search memory-maps: the kernel pages in
   the lists a query probes, and the index file itself holds only the quantizers;
4. search: probe the lists, take `rerank` candidates by their compressed codes, then score them
   exactly against the float vectors, read from the memory-mapped shards (a few hundred rows
   per query), so the ranking is exact among the candidates.

Ids are global row numbers: shard order, then row order within a shard, which is the order
of the shards' metadata rows, so a result maps back to its `image_path` directly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from loupe.indexer.interop import shards as sh
from loupe.indexer.errors import LoupeError
from loupe.indexer.storage.vectors import RERANK_FACTOR, VectorIndex, ids_digest
from loupe.indexer.storage.vectors import default_nprobe as _default_nprobe

if TYPE_CHECKING:
    from loupe.indexer.storage.catalog import Catalog, Meta
    from loupe.indexer.storage.store import Store

INDEX_FILE = "index.faiss"
LISTS_FILE = "lists.ivfdata"
INFO_FILE = "ondisk.json"
TRAINED_FILE = "trained.faiss"
BLOCKS_DIR = "blocks"
TRAIN_PER_LIST = 40  # FAISS wants >= 39 points per centroid; more costs training time for little gain
MAX_TRAIN = 300_000
DEFAULT_RERANK = 300  # candidates re-scored exactly per query (100 lost 9-12 points of recall@10 with PQ64)
ADD_BATCH = 100_000


def faiss_module():
    from loupe.indexer.storage.vectors import faiss_module as load

    return load()


def auto_factory(n: int, dim: int) -> str:
    """IVF with about sqrt(n) lists (a power of two, 256..65536) and PQ codes of dim/4 bytes.

    PQ128 for 512-d vectors is 1/16 of float32: a 10M index is ~1.4 GB on disk, and its merge
    maps no more than that (SQ8 would be 5.1 GB). Measured on text-like queries (RESULTS.md):
    PQ128 with exact re-ranking reaches the recall of SQ4/SQ8 (bounded by the lists visited),
    while PQ64 stays 2-4 points lower whatever the re-ranking depth.

    "np": FAISS's factory turns on polysemous training for IVF-PQ, a simulated annealing over
    the codes that only Hamming-filtered search uses (not this one): at 200k x 512 it took 1303
    of the 1344 s of a build.
    """
    nlist = 2 ** int(round(math.log2(max(256.0, min(65536.0, math.sqrt(max(n, 1)))))))
    m = max(1, dim // 4)
    while dim % m:
        m -= 1
    return f"IVF{nlist},PQ{m}np"


ONDISK_PROBES_PER_SQRT_LIST = 4  # 128 of 1024 lists at 1M (recall@10 0.9855), 256 of 4096 at 10M (0.9973)


def default_nprobe(nlist: int) -> int:
    """Lists a query visits by default: 4 * sqrt(lists), half the in-memory share (`vectors.default_nprobe`)
    since the 300 candidates re-ranked exactly recover what PQ codes misorder; at 10M x 512 this
    gave recall@10 0.9973 at p50 75 ms on 2 cores, where 8 * sqrt (512 lists) cost 2.4x the time
    for 0.9987 (benchmarks/RESULTS.md)."""
    return _default_nprobe(nlist, ONDISK_PROBES_PER_SQRT_LIST)


# ---- reading the shards ----------------------------------------------------------------------
@dataclass
class ShardSet:
    """The npy files of one embedding kind, in order, with the global row number of each first row."""

    paths: list[Path]
    rows: list[int]
    dim: int
    dtype: str

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(sum(self.rows))

    @classmethod
    def scan(cls, root: str | os.PathLike, kind: str = sh.IMG) -> "ShardSet":
        """The `kind` embeddings of a layout folder; only the npy headers are read (no pyarrow needed)."""
        folder = sh.emb_dir(Path(root), kind)
        files = sh._numbered(folder, f"{kind}_emb", "npy")
        if not files:
            raise LoupeError(f"{root}: no {kind}_emb/{kind}_emb_N.npy shards")
        paths, rows, dims, dtypes = [], [], set(), set()
        for n in sorted(files):
            shape, dtype, _ = sh.npy_header(files[n])
            if len(shape) != 2 or dtype not in (np.float16, np.float32):
                raise LoupeError(f"{files[n]}: expected a 2-D float16/float32 array, found {dtype} {shape}")
            paths.append(files[n].resolve())
            rows.append(int(shape[0]))
            dims.add(int(shape[1]))
            dtypes.add(str(dtype))
        if len(dims) != 1:
            raise LoupeError(f"{root}: shards of different dimensions {sorted(dims)}")
        return cls(paths, rows, dims.pop(), dtypes.pop() if len(dtypes) == 1 else "mixed")

    def read_sample(self, size: int, seed: int = 0) -> np.ndarray:
        """`size` distinct random rows (float32), read row by row: no shard is mapped or loaded."""
        total = self.total
        size = min(size, total)
        picked = np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))
        out = np.empty((size, self.dim), dtype=np.float32)
        offsets = self.offsets
        done = 0
        for s, path in enumerate(self.paths):
            lo, hi = np.searchsorted(picked, [offsets[s], offsets[s + 1]])
            if lo == hi:
                continue
            shape, dtype, header = sh.npy_header(path)
            width = self.dim * dtype.itemsize
            fd = os.open(path, os.O_RDONLY)
            try:
                for j, row in enumerate(picked[lo:hi] - offsets[s]):
                    buf = os.pread(fd, width, header + int(row) * width)
                    out[done + j] = np.frombuffer(buf, dtype=dtype)
            finally:
                os.close(fd)
            done += hi - lo
        return out

    def mapped(self) -> list[np.ndarray]:
        """Every shard memory-mapped read-only (for re-ranking: only the rows touched are read)."""
        return [sh.open_embeddings(p) for p in self.paths]

    # the building interface (`_build`): one block per shard, ids are global row numbers
    block_name = "shard"

    def plan(self) -> dict:
        return {"shards": [str(p) for p in self.paths], "rows": self.rows}

    def block_rows(self) -> list[int]:
        return list(self.rows)

    def read_block(self, s: int, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(float32 vectors, ids) of shard `s`, `batch` rows at a time, read without mapping."""
        first = int(self.offsets[s])
        for start in range(0, self.rows[s], batch):
            vecs = sh.read_rows(self.paths[s], start, start + batch)
            yield vecs, np.arange(first + start, first + start + len(vecs), dtype=np.int64)


@dataclass
class CatalogRows:
    """The vectors of one kind in a loupe catalog, as `_build` reads them: ids are catalog vector
    ids (the same the catalog's FAISS files use), read in blocks of `ADD_BATCH` ids."""

    catalog: "Catalog"
    kind: str
    dim: int
    ids: np.ndarray
    block_name = "block"

    @property
    def total(self) -> int:
        return len(self.ids)

    def plan(self) -> dict:
        return {"kind": self.kind, "ids_digest": ids_digest(self.ids)}

    def block_rows(self) -> list[int]:
        return [len(self.ids[i : i + ADD_BATCH]) for i in range(0, len(self.ids), ADD_BATCH)]

    def read_block(self, b: int, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        part = self.ids[b * ADD_BATCH : (b + 1) * ADD_BATCH]
        for start in range(0, len(part), batch):
            ids = part[start : start + batch]
            yield self.catalog.load_vectors(ids, self.dim), ids

    def read_sample(self, size: int, seed: int = 0) -> np.ndarray:
        picked = self.ids
        if len(picked) > size:
            picked = np.sort(np.random.default_rng(seed).choice(self.ids, size=size, replace=False))
        return self.catalog.load_vectors(picked, self.dim)


# ---- building ------------------------------------------------------------------------------
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


# ---- searching -------------------------------------------------------------------------------
class OnDiskIndex:
    """A built on-disk index, opened for searching: lists memory-mapped, floats memory-mapped."""

    def __init__(self, out: str | os.PathLike, nprobe: int | None = None, rerank: int = DEFAULT_RERANK) -> None:
        faiss = faiss_module()
        self.out = Path(out)
        info_file = self.out / INFO_FILE
        if not info_file.exists():
            raise LoupeError(f"{self.out}: no on-disk index here (build one with `loupe build-index`)")
        self.info = json.loads(info_file.read_text())
        # OnDiskInvertedLists always map their file (read-only here). IO_FLAG_MMAP, which maps the
        # in-memory kind of lists, must not be added: with on-disk lists faiss 1.15 then crashes
        # on the first search (measured).
        flags = faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_ONDISK_SAME_DIR
        self.index = faiss.read_index(str(self.out / INDEX_FILE), flags)
        self.ivf = faiss.extract_index_ivf(self.index)
        self.ivf.nprobe = nprobe or default_nprobe(self.ivf.nlist)
        self.rerank = rerank
        self.paths = [Path(s["path"]) for s in self.info["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum([s["rows"] for s in self.info["shards"]])]).astype(np.int64)
        self._mapped: list[np.ndarray] | None = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def nprobe(self) -> int:
        return int(self.ivf.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.ivf.nprobe = int(value)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Float32 vectors of global `rows`, from the memory-mapped shards."""
        if self._mapped is None:
            self._mapped = [sh.open_embeddings(p) for p in self.paths]
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), int(self.info["dim"])), dtype=np.float32)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            local = rows[sel] - self.offsets[s]
            order = np.argsort(local)  # ascending offsets: sequential-ish reads
            got = self._mapped[s][local[order]]
            out[np.flatnonzero(sel)[order]] = got
        return out

    def search(self, queries: np.ndarray, k: int = 10, rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, global row ids) per query: `rerank` candidates by code, re-scored exactly."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        fetch = max(k, rerank or self.rerank)
        _, cand = self.index.search(queries, fetch)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for i, row in enumerate(cand):
            row = row[row >= 0]
            if not len(row):
                continue
            exact = self.vectors(row) @ queries[i]
            top = np.argsort(-exact, kind="stable")[:k]
            scores[i, : len(top)], ids[i, : len(top)] = exact[top], row[top]
        return scores, ids


def exact_search(shards: ShardSet, queries: np.ndarray, k: int = 10, batch: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k over every row of the shards, read batch by batch (the ground truth)."""
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    offsets = shards.offsets
    for s, path in enumerate(shards.paths):
        for start in range(0, shards.rows[s], batch):
            vecs = sh.read_rows(path, start, start + batch)
            sims = queries @ vecs.T
            kk = min(k, sims.shape[1])
            part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
            cand_s = np.concatenate([best_s, np.take_along_axis(sims, part, axis=1)], axis=1)
            cand_i = np.concatenate([best_i, part + offsets[s] + start], axis=1)
            order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
            best_s, best_i = np.take_along_axis(cand_s, order, axis=1), np.take_along_axis(cand_i, order, axis=1)
    return best_s, best_i


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), mapped file pages included."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def report_dict(report: BuildReport) -> dict:
    return asdict(report)


# ---- the on-disk index of a catalog -----------------------------------------------------------
# `loupe build-index` without shards builds one per kind in the index folder (`Location.ondisk_dir`),
# over the catalog's vectors with their catalog ids. Its ondisk.json is its label, as the one-file
# FAISS units carry theirs (`vectors.Label`): which catalog, which generation, how many ids and a
# digest of them. The Store searches it instead of the FAISS file while it is current.
CATALOG_SOURCE = "catalog"
SMALL = TRAIN_PER_LIST * 256  # below this many vectors PQ's 256 codes per sub-space cannot be trained well


def catalog_factory(n: int, dim: int) -> str:
    """`auto_factory` for a collection large enough to train it; below `SMALL`, fewer lists (at
    least `TRAIN_PER_LIST` vectors each) and SQ8 codes, so any collection gets a usable index."""
    if n >= SMALL:
        return auto_factory(n, dim)
    return f"IVF{2 ** int(math.log2(max(1, n // TRAIN_PER_LIST)))},SQ8"


def build_catalog_ondisk(
    store: "Store", kind: str, factory: str | None = None, train_rows: int | None = None,
    batch: int = ADD_BATCH, progress: Callable[[str], None] | None = None,
) -> BuildReport:
    """Build the on-disk index of the catalog's `kind` vectors ('image' or 'text') in its index folder.

    Call it holding the writer lock (`loupe build-index` does), so the catalog cannot change
    while its vectors are read. The index is built beside the old one and swapped in at the end:
    a search sees the old index, no index (and uses the FAISS file), or the new one.
    """
    import shutil

    from loupe.indexer.storage.critical import critical_section
    from loupe.indexer.storage.store import catalog_identity

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


def read_info(folder: Path) -> dict | None:
    try:
        return json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


def catalog_ondisk_state(store: "Store", kind: str, meta: "Meta", info: dict) -> tuple[bool, str, int]:
    """(current, why not, catalog generation) of the on-disk index described by `info`.

    Current: built for this catalog (identity and dimension), at its present generation, or
    holding exactly its present vector ids (a change that left this kind alone, such as new
    captions for the image index, does not make it stale; ids are never reused, so the same ids
    are the same vectors).
    """
    from loupe.indexer.storage.store import catalog_identity

    generation = store.catalog.generation()
    if info.get("source") != CATALOG_SOURCE or info.get("kind") != kind:
        return False, "was not built from this catalog's vectors", generation
    if info.get("catalog") != catalog_identity(meta) or info.get("dim") != meta.dim:
        return False, "belongs to another catalog", generation
    if info.get("generation") == generation:
        return True, "", generation
    n = store.catalog.count_vectors(kind)
    if n != info.get("rows") or ids_digest(store.catalog.vector_ids(kind)) != info.get("ids_digest"):
        return False, f"is behind the catalog (built over {info.get('rows')} vectors, the catalog now has {n})", generation
    return True, "", generation


def ondisk_status(store: "Store", meta: "Meta") -> dict[str, dict]:
    """What `loupe info` says of the on-disk indices of this catalog: kind -> facts and state."""
    out = {}
    for kind in ("image", "text"):
        folder = store.location.ondisk_dir(kind)
        info = read_info(folder)
        if info is None:
            continue
        current, why, _ = catalog_ondisk_state(store, kind, meta, info)
        out[kind] = {
            "path": str(folder), "factory": info.get("factory"), "vectors": info.get("rows"), "built_at": info.get("built_at"),
            "bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
            "state": "current" if current else "stale", "why": why or None,
        }
    return out


def open_catalog_ondisk(store: "Store", kind: str, meta: "Meta") -> tuple["OnDiskVectorIndex | None", str | None]:
    """The catalog's on-disk index of `kind` if there is one and it is current, else None, with a
    one-line notice when one exists but cannot be used (stale, another catalog's, unreadable)."""
    folder = store.location.ondisk_dir(kind)
    if not (folder / INFO_FILE).exists():
        return None, None
    info = read_info(folder)
    rebuild = "`loupe build-index" + (" --texts`" if kind == "text" else "`")
    if info is None:
        return None, f"the on-disk {kind} index {folder} is unreadable: searching the regular index instead; {rebuild} rebuilds it"
    current, why, generation = catalog_ondisk_state(store, kind, meta, info)
    if not current:
        return None, f"the on-disk {kind} index {folder} {why}: searching the regular index instead; {rebuild} rebuilds it"
    try:
        return OnDiskVectorIndex.open(folder, info, generation), None
    except (LoupeError, RuntimeError, OSError) as exc:
        return None, f"the on-disk {kind} index {folder} is unreadable ({str(exc).splitlines()[0]}): searching the regular index instead"


def _file_ids(folder: Path) -> tuple:
    return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in (os.stat(folder / n) for n in (INFO_FILE, INDEX_FILE, LISTS_FILE)))


class OnDiskVectorIndex(VectorIndex):
    """A catalog's on-disk index, searched like its FAISS file: ids are catalog vector ids, and
    candidates are re-scored exactly against the catalog's float vectors (`Store._attach`).

    Read-only (its lists are memory-mapped). It fetches `DEFAULT_RERANK` candidates at least,
    since its PQ codes rank less faithfully than SQ8, and visits this module's share of its
    lists (`default_nprobe`), fewer than an in-memory IVF would, which is what keeps it fast.
    """

    rerank_depth = DEFAULT_RERANK
    probes_per_sqrt_list = ONDISK_PROBES_PER_SQRT_LIST

    @classmethod
    def open(cls, folder: Path, info: dict, generation: int) -> "OnDiskVectorIndex":
        """Open the index files whose label is `info`; `generation` is the catalog's, checked current."""
        faiss = faiss_module()
        for _ in range(3):  # label and lists from one build: no swap happened while they were opened
            before = _file_ids(folder)
            flags = faiss.IO_FLAG_READ_ONLY
            if info.get("lists_path") != str(folder.resolve() / LISTS_FILE):  # the folder moved since
                flags |= faiss.IO_FLAG_ONDISK_SAME_DIR  # (faiss says so on stdout, once per opening)
            index = faiss.read_index(str(folder / INDEX_FILE), flags)
            if _file_ids(folder) == before and read_info(folder) == info:
                break
        else:
            raise LoupeError(f"{folder} kept being replaced while it was read")
        if (int(index.ntotal), int(index.d)) != (info["rows"], info["dim"]):
            raise LoupeError(f"{folder}: its label does not describe its content")
        out = cls(index, info["factory"], generation, info["catalog"])
        out.mmapped = True  # never written: `Store` searches it or falls back to the FAISS file
        out.folder = folder
        return out

    def candidates(self, k: int) -> int:
        return max(k * RERANK_FACTOR, self.rerank_depth)
